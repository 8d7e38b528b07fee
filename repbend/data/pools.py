"""Public files -> tokenized `Pools` by role: read and validate every row, apply the label rules, cap each role,
render with the chat template as the method's `DataSpec` says.

Sources and the roles they give (a new source plugs in here: a reader, and a line in SOURCES):
    wildguardmix   safe, unsafe   by the label rules (repbend/data/wildguardmix.py)
    wildjailbreak  pair           (request + refusal, request + harmful answer) of each harmful request
    ultrachat      retain         chats with at least MIN_RETAIN_MESSAGES messages (fewer: counted as left)

Cap: when more rows than `max_examples_per_pool` qualify for a role (each role on its own; the spec's `uncapped`
roles never), a uniform random subset of that size is taken without replacement, seeded from (seed, "subset",
role), and kept in file order; the retain chats keep their first rows in file order instead (`subset="first"`,
the reference's choice; `"random"` samples them too). Every row is still read and validated first, so a bad row anywhere in a file is
reported even when the subset would not have used it; only the subset is tokenized. With `skip_invalid`, a row
whose rendering fails (its template raises) is skipped after the cap, so such a role can end up under the cap.

Rendering (`DataSpec`): requests with the template's generation prompt and bare response ids, or with
`response_markup` the assistant turn through the template with its end-of-turn markup (repbend/data/chat.py). With
`empty_request_p` > 0, every row but the harmful side of a pair gets, with that probability, an empty instruction:
its user turn is rendered empty (the request is the template's markup only), and a retain chat so drawn becomes that
empty request plus its first assistant reply (with markup). The draw is one uniform per row of the capped role, in
file order, from a generator seeded by (seed, "empty_request", role): the same rows for the same seed and files.
"""
from __future__ import annotations

import os
from collections import Counter
from typing import Callable

from repbend.data.chat import Limits, render_conversations, render_requests_responses
from repbend.data.errors import DataError
from repbend.data.examples import DataReport, DataSpec, Pools, SourceReport
from repbend.data.sampler import seeded_rng
from repbend.data.ultrachat import read_ultrachat
from repbend.data.wildguardmix import read_wildguardmix
from repbend.data.wildjailbreak import read_wildjailbreak

Source = str | os.PathLike

SOURCES = {"wildguardmix": ("safe", "unsafe"), "wildjailbreak": ("pair",), "ultrachat": ("retain",)}
MIN_RETAIN_MESSAGES = 2


SUBSETS = ("first", "random")


def _cap(rows: list, cap: int | None, seed: int, role: str, first: bool = False) -> list:
    if cap is None or len(rows) <= cap:
        return rows
    if first:
        return rows[:cap]
    keep = sorted(seeded_rng(seed, "subset", role).choice(len(rows), size=cap, replace=False).tolist())
    return [rows[i] for i in keep]


def empty_request_draw(n: int, p: float, seed: int, role: str) -> list[bool]:
    """Which of `n` rows of `role` get an empty instruction (module docstring): u_i < p, u = one seeded uniform per
    row. p = 0 draws nothing."""
    if n == 0 or p <= 0.0:
        return [False] * n
    return (seeded_rng(seed, "empty_request", role).random(n) < p).tolist()


def _render(items: list, render: Callable[[list, Counter], list], report: SourceReport, role: str,
            skip_invalid: bool) -> list:
    """render(items, counts) -> one output per item. With skip_invalid, items whose rendering raises DataError are
    dropped one by one and moved from qualified to skipped."""
    counts = Counter()
    try:
        out = render(items, counts)
    except DataError:
        if not skip_invalid:
            raise
        out, counts = [], Counter()
        for item in items:
            try:
                out.extend(render([item], counts))
            except DataError as err:
                report.skipped.add(err)
                report.qualified[role] -= 1
    report.truncated.update(counts)
    report.taken[role] += len(out)
    return out


class _Renderer:
    """Rows of each role -> Sequences, as `spec` says (module docstring)."""

    def __init__(self, tokenizer, spec: DataSpec, limits: Limits, seed: int, report: SourceReport):
        self.tok, self.spec, self.limits, self.seed, self.report = tokenizer, spec, limits, seed, report

    def _turns(self, parts, counts, retain_side: bool = False) -> list:
        """(prompt, response or None, origin) triples -> Sequences; `retain_side`: rows the spec may cut whole."""
        whole = self.limits.max_retain_tokens if retain_side and self.spec.whole_retain_side else None
        return render_requests_responses(self.tok, [q for q, _, _ in parts], [a for _, a, _ in parts], self.limits,
                                         [o for _, _, o in parts], counts=counts,
                                         response_markup=self.spec.response_markup, whole_limit=whole)

    def _drawn(self, rows: list, role: str) -> list[tuple]:
        empty = empty_request_draw(len(rows), self.spec.empty_request_p, self.seed, role)
        if self.spec.empty_request_p:
            self.report.empty_request[role] += sum(empty)
        return list(zip(rows, empty))

    def one_turn(self, rows: list, role: str, skip_invalid: bool) -> list:
        """WildGuardMix rows of `role` (safe or unsafe)."""
        def render(items, counts):
            return self._turns([("" if empty else r.prompt, r.response, r.origin) for r, empty in items], counts,
                               retain_side=role == "safe")
        return _render(self._drawn(rows, role), render, self.report, role, skip_invalid)

    def pairs(self, rows: list, skip_invalid: bool) -> list:
        """WildJailbreak rows -> (refusal side, harmful side); the harmful side always keeps its request."""
        def render(items, counts):
            if self.spec.request_only:
                seqs = self._turns([(r.prompt, None, r.origin) for r, _ in items], counts)
                return [(s, s) for s in seqs]
            refusals = self._turns([("" if empty else r.prompt, r.refusal, r.origin) for r, empty in items], counts,
                                   retain_side=True)
            out = list(zip(refusals, self._turns([(r.prompt, r.harmful, r.origin) for r, _ in items], counts)))
            same_cut = not self.spec.whole_retain_side  # (a refusal cut whole may keep more of a long request)
            for (refusal, harmful), (_, empty) in zip(out, items):  # the same request text gives the same ids;
                if same_cut and not empty and \
                        refusal.input_ids[:refusal.request_len] != harmful.input_ids[:harmful.request_len]:
                    raise DataError(refusal.origin, "the request renders to different ids with the two answers",
                                    reason="pair requests differ")  # checked, it is cheap
            return out
        return _render(self._drawn(rows, "pair"), render, self.report, "pair", skip_invalid)

    def chats(self, chats: list, skip_invalid: bool) -> list:
        """UltraChat chats -> retain Sequences (whole chat; or, drawn empty, the empty request + its first reply)."""
        def render(items, counts):
            out: list = [None] * len(items)
            one = [k for k, (c, empty) in enumerate(items) if empty and _first_reply(c.messages) is not None]
            ones = set(one)
            whole = [k for k in range(len(items)) if k not in ones]
            firsts = self._turns([("", _first_reply(items[k][0].messages), items[k][0].origin) for k in one], counts,
                                 retain_side=True)
            rest = render_conversations(self.tok, [list(items[k][0].messages) for k in whole], self.limits,
                                        [items[k][0].origin for k in whole], counts=counts)
            for k, s in list(zip(one, firsts)) + list(zip(whole, rest)):
                out[k] = s
            return out
        return _render(self._drawn(chats, "retain"), render, self.report, "retain", skip_invalid)


def _first_reply(messages) -> str | None:
    return next((m["content"] for m in messages if m["role"] == "assistant"), None)


def build_pools(tokenizer, wildguardmix: Source | None = None, wildjailbreak: Source | None = None,
                ultrachat: Source | None = None, *, spec: DataSpec | None = None, limits: Limits | None = None,
                max_examples_per_pool: int | None = 10_000, skip_invalid: bool = False, seed: int = 0,
                subset: str = "first") -> Pools:
    """Read the given sources (local .jsonl/.json/.parquet paths or Hub specs `NAME[:CONFIG][@SPLIT]`; None =
    not used) and return the tokenized rows by role with a `DataReport`.

    spec: how the method reads and renders rows (`RepBendLoss(cfg).data_spec()`; default: RepBend's response
        modes). A given source none of whose roles the spec reads is an error (it would be ignored).
    max_examples_per_pool: cap per role (module docstring); None = no cap.
    skip_invalid: drop invalid rows and count them by reason instead of raising DataError.
    subset: which retain chats the cap keeps: "first" (in file order, the reference's) or "random" (seeded).
    """
    spec = spec or DataSpec()
    limits = limits or Limits()
    if max_examples_per_pool is not None and max_examples_per_pool < 1:
        raise ValueError(f"max_examples_per_pool must be >= 1 or None, got {max_examples_per_pool}")
    if subset not in SUBSETS:
        raise ValueError(f"subset must be {' or '.join(SUBSETS)}, got {subset!r}")
    given = {"wildguardmix": wildguardmix, "wildjailbreak": wildjailbreak, "ultrachat": ultrachat}
    for name, source in given.items():
        if source is not None and not set(SOURCES[name]) & set(spec.roles):
            raise ValueError(f"{name} ({os.fspath(source)}) gives {'/'.join(SOURCES[name])} rows, which this method "
                             f"does not read (it reads {', '.join(spec.roles)}): leave it out")
    report = DataReport(spec, limits.to_dict(), max_examples_per_pool, seed)

    def cap(rows, role):
        first = role == "retain" and subset == "first"
        return rows if role in spec.uncapped else _cap(rows, max_examples_per_pool, seed, role, first)

    def source_report(name):
        rep = report.sources[name] = SourceReport(name, os.fspath(given[name]))
        return rep, _Renderer(tokenizer, spec, limits, seed, rep)

    pools = {"safe": [], "unsafe": [], "pair": [], "retain": []}
    if wildguardmix is not None:
        rep, render = source_report("wildguardmix")
        safe, unsafe = read_wildguardmix(wildguardmix, rep, request_only=spec.request_only, skip_invalid=skip_invalid)
        for role, rows in (("safe", safe), ("unsafe", unsafe)):
            if role in spec.roles:
                pools[role] = render.one_turn(cap(rows, role), role, skip_invalid)
    if wildjailbreak is not None:
        rep, render = source_report("wildjailbreak")
        rows = read_wildjailbreak(wildjailbreak, rep, request_only=spec.request_only, skip_invalid=skip_invalid)
        pools["pair"] = render.pairs(cap(rows, "pair"), skip_invalid)
    if ultrachat is not None:
        rep, render = source_report("ultrachat")
        chats = read_ultrachat(ultrachat, rep, skip_invalid=skip_invalid)
        short = [c for c in chats if len(c.messages) < MIN_RETAIN_MESSAGES]
        if short:
            rep.qualified["retain"] -= len(short)
            rep.left[f"fewer than {MIN_RETAIN_MESSAGES} messages"] += len(short)
            chats = [c for c in chats if len(c.messages) >= MIN_RETAIN_MESSAGES]
        pools["retain"] = render.chats(cap(chats, "retain"), skip_invalid)
    return Pools(**pools, report=report, spec=spec)
