"""The data types between the readers and the trainer: tokenized `Sequence`s, the four `Pools` a micro-batch
is drawn from, and the `DataReport` that says what was read, taken, left, skipped and truncated."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from repbend.data.errors import SkipLog
from repbend.loss.types import Sequence  # noqa: F401  (re-exported: the readers' output type)


@dataclass
class SourceReport:
    """What one source gave. Invariant: rows_read == sum(qualified) + sum(left) + skipped.total.

    qualified: rows the label rules selected, per set ("safe", "unsafe", "pairs", "retain").
    taken: of those, rows kept after the `max_examples_per_pool` cap.
    left: rows the rules did not select (not errors), by reason.
    skipped: invalid rows dropped with `skip_invalid=True`, by reason.
    truncated: sequences cut to the limits, by part ("request", "response", "retain"); a pair whose
        shared request is cut counts once per rendered row (twice).
    empty_request: Circuit Breakers and RMU: rows drawn with an empty instruction, per set.
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

    def to_dict(self) -> dict:
        out = {
            "source": self.source, "rows_read": self.rows_read, "qualified": dict(self.qualified),
            "taken": dict(self.taken), "left": dict(self.left), "skipped": self.skipped.to_dict(),
            "truncated": dict(self.truncated),
        }
        if self.empty_request:
            out["empty_request"] = dict(self.empty_request)
        return out


@dataclass
class DataReport:
    """Per-source reports plus the settings they were built with (`method`: whose data; `empty_request_p`:
    Circuit Breakers and RMU only)."""

    request_only: bool
    limits: dict
    max_examples_per_pool: int | None
    seed: int
    sources: dict[str, SourceReport] = field(default_factory=dict)
    method: str = "repbend"
    empty_request_p: float | None = None

    def to_dict(self) -> dict:
        out = {
            "request_only": self.request_only, "limits": dict(self.limits),
            "max_examples_per_pool": self.max_examples_per_pool, "seed": self.seed,
            "sources": {name: rep.to_dict() for name, rep in self.sources.items()},
        }
        if self.method != "repbend":
            out.update(method=self.method, empty_request_p=self.empty_request_p)
        return out

    def summary(self) -> str:
        """A plain-text table for the log: one line per (source, set), then the reasons rows were left
        or skipped."""
        lim = self.limits
        mode = "request-only" if self.request_only else "request+response"
        cap = "no cap" if self.max_examples_per_pool is None else f"at most {self.max_examples_per_pool} per pool"
        if self.method != "repbend":
            mode = (f"{self.method} rows (assistant turns with their end-of-turn markup, empty instruction with "
                    f"p {self.empty_request_p}; WildGuardMix unsafe rows uncapped)")
        lines = [f"data: {mode}; tokens request<={lim['max_request_tokens']} response<={lim['max_response_tokens']}"
                 f" retain<={lim['max_retain_tokens']}; {cap} (seed {self.seed})"]
        head = f"  {'source':<14}{'rows':>8}  {'set':<8}{'qualified':>10}{'taken':>8}{'left':>8}{'skipped':>9}" \
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
            for reason, n in rep.skipped.counts.most_common():
                lines.append(f"  {name}: skipped {n}: {reason}")
            for example in rep.skipped.examples:
                lines.append(f"    e.g. {example}")
        return "\n".join(lines)


@dataclass
class Pools:
    """Everything a run trains on, tokenized.

    wgm_safe / wgm_unsafe: WildGuardMix rows by the label rules (docs/method.md); request-only modes: the
        unharmful / harmful requests.
    wj_pairs: WildJailbreak (request + refusal, same request + harmful answer); the request ids of the two
        are identical. Request-only modes: (request, request), the same Sequence twice.
    retain: UltraChat conversations (request_len = 0).
    request_only: whether the rows were rendered without responses.
    method: whose data the pools hold: repbend (above), or circuit_breakers / rmu, whose rows carry the template's
        end-of-turn markup and may have an empty instruction (then an UltraChat row is one request + its first
        reply, and a pair's two requests differ); `repbend.data.pools` states their contents.
    """

    wgm_safe: list[Sequence]
    wgm_unsafe: list[Sequence]
    wj_pairs: list[tuple[Sequence, Sequence]]
    retain: list[Sequence]
    report: DataReport
    request_only: bool = False
    method: str = "repbend"
