"""Roles of data rows, and how a method asks for its rows (`DataSpec`) and draws its micro-batches (`Draw`).

This module imports nothing: the data layer (repbend/data/) and the methods (repbend/methods/) both use it.

Roles (what a row is for, whatever file it came from):
    safe    a request with an answer that is fine to give (WildGuardMix: unharmful compliance, or a refusal of a
            harmful request)
    unsafe  a harmful request with a compliant answer (WildGuardMix)
    pair    one harmful request twice: (request + refusal, request + harmful answer) (WildJailbreak)
    retain  an ordinary conversation, every token a retain token (UltraChat)
"""
from __future__ import annotations

from dataclasses import dataclass, fields

ROLES = ("safe", "unsafe", "pair", "retain")


@dataclass(frozen=True)
class DataSpec:
    """How a method wants its rows read and rendered (each method's `data_spec()`; `repbend.data.pools` does it).

    roles: the roles the method reads; a data file that gives none of them is an error, not ignored.
    request_only: render requests (with the generation prompt) only; WildGuardMix split by prompt_harm_label alone,
        a WildJailbreak pair becomes (request, request).
    response_markup: render each assistant turn through the template with its end-of-turn markup (else the bare
        response text's tokens).
    empty_request_p: chance that a row (all but the harmful side of a pair) gets an empty instruction: its user
        turn is rendered empty, and a retain chat so drawn becomes that empty request plus its first reply.
    uncapped: roles that `max_examples_per_pool` does not cap.
    whole_retain_side: cut each retain-side row (a safe row, a pair's refusal side, a retain chat) as one sequence at
        `max_retain_tokens`, keeping its start, instead of request and response apart (Circuit Breakers' and RMU's
        reference tokenizes those rows whole).
    description: one line for the data report.
    """

    roles: tuple[str, ...] = ROLES
    request_only: bool = False
    response_markup: bool = False
    empty_request_p: float = 0.0
    uncapped: tuple[str, ...] = ()
    whole_retain_side: bool = False
    description: str = "requests with bare responses"

    def __post_init__(self):
        bad = [r for r in self.roles + self.uncapped if r not in ROLES]
        if bad:
            raise ValueError(f"DataSpec: unknown role(s) {bad}; roles are {', '.join(ROLES)}")
        if not 0.0 <= self.empty_request_p <= 1.0:
            raise ValueError(f"DataSpec: empty_request_p must be in [0, 1], got {self.empty_request_p}")

    def to_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}


PART = {None: "", 0: " (refusal side)", 1: " (harmful side)"}


@dataclass(frozen=True)
class Draw:
    """`rows` rows per micro-batch from the concatenation of `sources`: (role, part) with part None = the role's
    items as they are (a pair: both sides), 0 / 1 = the refusal / harmful side of each pair alone."""

    sources: tuple[tuple[str, int | None], ...]
    rows: int

    def describe(self) -> str:
        return " + ".join(f"{role}{PART[part]}" for role, part in self.sources)
