"""WildGuardMix rows -> safe / unsafe / left.

Fields: prompt, response, prompt_harm_label (harmful | unharmful), response_refusal_label (refusal |
compliance), response_harm_label (harmful | unharmful). Labels are matched with surrounding whitespace trimmed and
case folded (`sources.get_label`, the rule of every label field), each such normalisation counted in the report.

Response modes (docs/method.md):
    safe   = (prompt unharmful AND compliance AND response unharmful)
             OR (prompt harmful AND refusal AND response unharmful)
    unsafe = prompt harmful AND compliance            (whatever response_harm_label says)
    left   = every other combination, and rows without a response or with null labels (the public set has
             prompt-only rows): not errors, counted by reason.
Request-only modes: split by prompt_harm_label alone; the response fields are not read at all.

Errors (DataError, or skipped and counted with skip_invalid): a missing field, a label string outside the
lists above, a non-string or empty prompt, an empty response in a row the rules select.
"""
from __future__ import annotations

from dataclasses import dataclass

from repbend.data.errors import DataError
from repbend.data.sources import get_field, get_label, get_text, validated

HUB_CONFIG, HUB_SPLIT = "wildguardtrain", "train"

PROMPT_LABELS = ("harmful", "unharmful")
REFUSAL_LABELS = ("refusal", "compliance")
HARM_LABELS = ("harmful", "unharmful")


@dataclass(frozen=True)
class WGMRow:
    origin: str
    prompt: str
    response: str | None  # None in request-only modes
    label: str  # "safe" | "unsafe"


def classify(origin: str, row: dict, *, request_only: bool = False, normalised=None) -> tuple[str, WGMRow | str]:
    """-> ("safe" | "unsafe", WGMRow) for a selected row, ("left", reason) for one the rules leave out.
    Raises DataError for invalid input (module docstring). `normalised`: a Counter of label normalisations."""
    def _label(row, origin, name, allowed):
        return get_label(row, origin, name, allowed, normalised)

    prompt = get_text(row, origin, "prompt")
    prompt_label = _label(row, origin, "prompt_harm_label", PROMPT_LABELS)
    if request_only:
        if prompt_label is None:
            return "left", "prompt_harm_label is null"
        label = "unsafe" if prompt_label == "harmful" else "safe"
        return label, WGMRow(origin, prompt, None, label)

    response = get_field(row, origin, "response")
    refusal = _label(row, origin, "response_refusal_label", REFUSAL_LABELS)
    response_harm = _label(row, origin, "response_harm_label", HARM_LABELS)
    if response is None:
        return "left", "no response"
    if prompt_label is None or refusal is None or response_harm is None:
        return "left", "null label(s)"
    if prompt_label == "harmful" and refusal == "compliance":
        label = "unsafe"
    elif response_harm == "unharmful" and (prompt_label, refusal) in (("unharmful", "compliance"),
                                                                       ("harmful", "refusal")):
        label = "safe"
    else:
        return "left", f"prompt {prompt_label}, {refusal}, response {response_harm}"
    response = get_text(row, origin, "response")  # a selected row needs a real response
    return label, WGMRow(origin, prompt, response, label)


def read_wildguardmix(source, report, *, request_only: bool = False, skip_invalid: bool = False
                      ) -> tuple[list[WGMRow], list[WGMRow]]:
    """All selected rows of `source` as (safe, unsafe), in file order; counts go to `report`
    (a SourceReport: rows_read, qualified["safe"/"unsafe"], left by reason, skipped by reason)."""
    safe, unsafe = [], []
    parse = lambda origin, row: classify(origin, row, request_only=request_only,  # noqa: E731
                                         normalised=report.normalised)
    for label, item in validated(source, parse, report, skip_invalid=skip_invalid,
                                 hub_config=HUB_CONFIG, hub_split=HUB_SPLIT):
        if label == "left":
            report.left[item] += 1
            continue
        report.qualified[label] += 1
        (safe if label == "safe" else unsafe).append(item)
    return safe, unsafe
