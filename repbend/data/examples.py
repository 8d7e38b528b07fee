"""The data types between the readers and the trainer: tokenized `Sequence`s, the `Pools` of rows by role
(`repbend.roles`) that a micro-batch is drawn from, and the `DataReport` that says what was read, taken, left,
skipped and truncated."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from repbend.data.errors import SkipLog
from repbend.loss.types import Sequence  # noqa: F401  (re-exported: the readers' output type)
from repbend.roles import ROLES, DataSpec  # noqa: F401  (re-exported)


@dataclass
class SourceReport:
    """What one source gave. Invariant: rows_read == sum(qualified) + sum(left) + skipped.total.

    qualified: rows the label rules selected, per role ("safe", "unsafe", "pair", "retain").
    taken: of those, rows kept after the `max_examples_per_pool` cap.
    left: rows the rules did not select (not errors), by reason.
    skipped: invalid rows dropped with `skip_invalid=True`, by reason.
    truncated: sequences cut to the limits, by part ("request", "response", "retain"); a pair whose
        shared request is cut counts once per rendered row (twice).
    empty_request: rows drawn with an empty instruction, per role (methods whose DataSpec asks for the draw).
    normalised: label values that matched only once trimmed or case-folded, per field (e.g. 'Harmful ').
    """

    name: str
    source: str
    rows_read: int = 0
    qualified: Counter = field(default_factory=Counter)
    taken: Counter = field(default_factory=Counter)
    left: Counter = field(default_factory=Counter)
    skipped: SkipLog = field(default_factory=SkipLog)
    truncated: Counter = field(default_factory=Counter)
    empty_request: Counter = field(default_factory=Counter)
    normalised: Counter = field(default_factory=Counter)

    def to_dict(self) -> dict:
        out = {
            "source": self.source, "rows_read": self.rows_read, "qualified": dict(self.qualified),
            "taken": dict(self.taken), "left": dict(self.left), "skipped": self.skipped.to_dict(),
            "truncated": dict(self.truncated),
        }
        if self.empty_request:
            out["empty_request"] = dict(self.empty_request)
        if self.normalised:
            out["normalised"] = dict(self.normalised)
        return out


@dataclass
class DataReport:
    """Per-source reports plus the settings they were built with (`spec`: how the rows were rendered)."""

    spec: DataSpec
    limits: dict
    max_examples_per_pool: int | None
    seed: int
    sources: dict[str, SourceReport] = field(default_factory=dict)

    @property
    def request_only(self) -> bool:
        return self.spec.request_only

    def to_dict(self) -> dict:
        return {
            "spec": self.spec.to_dict(), "limits": dict(self.limits),
            "max_examples_per_pool": self.max_examples_per_pool, "seed": self.seed,
            "sources": {name: rep.to_dict() for name, rep in self.sources.items()},
        }

    def summary(self) -> str:
        """A plain-text table for the log: one line per (source, set), then the reasons rows were left
        or skipped."""
        lim, spec = self.limits, self.spec
        cap = "no cap" if self.max_examples_per_pool is None else f"at most {self.max_examples_per_pool} per pool"
        if spec.uncapped:
            cap += f" ({', '.join(spec.uncapped)} uncapped)"
        mode = spec.description + (f", empty instruction with p {spec.empty_request_p}" if spec.empty_request_p
                                   else "")
        lines = [f"data: {mode}; tokens request<={lim['max_request_tokens']} response<={lim['max_response_tokens']}"
                 f" retain<={lim['max_retain_tokens']}; {cap} (seed {self.seed})"]
        head = f"  {'source':<14}{'rows':>8}  {'role':<8}{'qualified':>10}{'taken':>8}{'left':>8}{'skipped':>9}" \
               f"  truncated req/resp/retain"
        lines.append(head)
        for name, rep in self.sources.items():
            sets = sorted(set(rep.qualified) | set(rep.taken)) or ["-"]
            trunc = "/".join(str(rep.truncated.get(k, 0)) for k in ("request", "response", "retain"))
            for i, s in enumerate(sets):
                first = i == 0
                lines.append(
                    f"  {name if first else '':<14}{rep.rows_read if first else '':>8}  {s:<8}"
                    f"{rep.qualified.get(s, 0):>10}{rep.taken.get(s, 0):>8}"
                    f"{sum(rep.left.values()) if first else '':>8}{rep.skipped.total if first else '':>9}"
                    f"  {trunc if first else ''}".rstrip())
        for name, rep in self.sources.items():
            for reason, n in rep.left.most_common():
                lines.append(f"  {name}: left {n}: {reason}")
            if rep.empty_request:
                drawn = ", ".join(f"{n} {s}" for s, n in sorted(rep.empty_request.items()))
                lines.append(f"  {name}: empty instruction: {drawn}")
            for label, n in rep.normalised.most_common():
                lines.append(f"  {name}: {n} {label} value(s) matched once trimmed / case-folded")
            for reason, n in rep.skipped.counts.most_common():
                lines.append(f"  {name}: skipped {n}: {reason}")
            for example in rep.skipped.examples:
                lines.append(f"    e.g. {example}")
        return "\n".join(lines)


@dataclass
class Pools:
    """Everything a run trains on, tokenized, by role (module docstring).

    safe / unsafe / retain: Sequences (retain: request_len = 0, unless a method's DataSpec drew an empty
        instruction for it: then the empty request and its first reply).
    pair: (request + refusal, request + harmful answer); the request ids of the two are identical unless the
        refusal side was drawn with an empty instruction. request_only: (request, request), the same Sequence.
    spec: how the rows were rendered (the method's `data_spec()`); a sampler checks it matches its method.
    """

    safe: list[Sequence]
    unsafe: list[Sequence]
    pair: list[tuple[Sequence, Sequence]]
    retain: list[Sequence]
    report: DataReport
    spec: DataSpec = field(default_factory=DataSpec)

    @property
    def request_only(self) -> bool:
        return self.spec.request_only

    def role(self, name: str) -> list:
        if name not in ROLES:
            raise KeyError(f"no role {name!r}; roles are {', '.join(ROLES)}")
        return getattr(self, name)
