"""UltraChat rows -> retain conversations.

Field `messages`: a non-empty list of {"role": "user" | "assistant" | "system", "content": non-empty string}
(extra keys in a message are ignored). The whole chat is rendered with the template (no generation prompt)
and every token is a retain token. Any violation is a DataError naming the message, e.g.
`field 'messages[3].content': empty`, or with skip_invalid a skipped, counted row.
"""
from __future__ import annotations

from dataclasses import dataclass

from repbend.data.errors import DataError
from repbend.data.sources import get_field, validated

HUB_CONFIG, HUB_SPLIT = None, "train_sft"  # HuggingFaceH4/ultrachat_200k
ROLES = ("user", "assistant", "system")


@dataclass(frozen=True)
class RetainChat:
    origin: str
    messages: tuple[dict, ...]  # {"role", "content"} only


def parse_chat(origin: str, row: dict) -> RetainChat:
    messages = get_field(row, origin, "messages")
    if not isinstance(messages, (list, tuple)) or not messages:
        raise DataError(origin, "expected a non-empty list of {role, content}", field="messages",
                        reason="'messages' is not a non-empty list")
    clean = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise DataError(origin, f"expected an object, got {type(m).__name__}", field=where,
                            reason="message is not an object")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise DataError(origin, f"unknown role {role!r} (expected {'/'.join(ROLES)})", field=f"{where}.role",
                            reason="unknown message role")
        if not isinstance(content, str) or not content.strip():
            problem = "empty" if isinstance(content, str) or content is None else \
                f"expected a string, got {type(content).__name__}"
            raise DataError(origin, problem, field=f"{where}.content", reason="empty or non-string message content")
        clean.append({"role": role, "content": content})
    return RetainChat(origin, tuple(clean))


def read_ultrachat(source, report, *, skip_invalid: bool = False) -> list[RetainChat]:
    """All valid conversations of `source`, in file order; counts go to `report` (qualified["retain"], skipped)."""
    chats = []
    for chat in validated(source, parse_chat, report, skip_invalid=skip_invalid,
                          hub_config=HUB_CONFIG, hub_split=HUB_SPLIT):
        report.qualified["retain"] += 1
        chats.append(chat)
    return chats
