"""WildJailbreak pairs file -> (request, refusal, harmful answer) triples.

One JSON object a line: prompt, prompt_type, harmless_answer, harmful_answer. Only rows with
prompt_type "harmful" are used (matched as every label is: whitespace trimmed, case folded, `sources.get_label`;
others are counted as left, by prompt_type); `harmless_answer` is the
refusal (safe side), `harmful_answer` the compliance (unsafe side) for the same request.
In request-only modes the answers are not read.

Errors (DataError, or skipped and counted with skip_invalid): a missing field, a non-string or empty
prompt, and, in response modes, a non-string or empty answer of a harmful row.
"""
from __future__ import annotations

from dataclasses import dataclass

from repbend.data.sources import get_label, get_text, validated

HUB_CONFIG, HUB_SPLIT = None, "train"


@dataclass(frozen=True)
class WJPair:
    origin: str
    prompt: str
    refusal: str | None  # None in request-only modes
    harmful: str | None


def parse_pair(origin: str, row: dict, *, request_only: bool = False, normalised=None) -> tuple[str, WJPair | str]:
    """-> ("pair", WJPair) for a harmful row, ("left", reason) otherwise. Raises DataError."""
    prompt_type = get_label(row, origin, "prompt_type", normalised=normalised)
    if prompt_type != "harmful":
        return "left", f"prompt_type {prompt_type!r}"
    prompt = get_text(row, origin, "prompt")
    if request_only:
        return "pair", WJPair(origin, prompt, None, None)
    return "pair", WJPair(origin, prompt, get_text(row, origin, "harmless_answer"),
                           get_text(row, origin, "harmful_answer"))


def read_wildjailbreak(source, report, *, request_only: bool = False, skip_invalid: bool = False) -> list[WJPair]:
    """All harmful rows of `source`, in file order; counts go to `report` (qualified["pair"], left, skipped)."""
    pairs = []
    parse = lambda origin, row: parse_pair(origin, row, request_only=request_only,  # noqa: E731
                                           normalised=report.normalised)
    for label, item in validated(source, parse, report, skip_invalid=skip_invalid,
                                 hub_config=HUB_CONFIG, hub_split=HUB_SPLIT):
        if label == "left":
            report.left[item] += 1
        else:
            report.qualified["pair"] += 1
            pairs.append(item)
    return pairs
