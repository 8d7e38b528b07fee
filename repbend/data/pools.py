"""Public files -> tokenized `Pools`: read and validate every row, apply the label rules, cap each pool,
render with the chat template.

Cap: when more rows than `max_examples_per_pool` qualify for a pool (wgm_safe, wgm_unsafe, wj_pairs,
retain, each on its own), a uniform random subset of that size is taken without replacement, seeded from
(seed, "subset", pool name), and kept in file order. Every row is still read and validated first, so a bad
row anywhere in a file is reported even when the subset would not have used it; only the subset is
tokenized. With `skip_invalid`, a row whose rendering fails (its template raises) is skipped after the cap,
so such a pool can end up a little under the cap.
"""
from __future__ import annotations

import os
from collections import Counter
from typing import Callable

from repbend.data.chat import Limits, render_conversations, render_requests_responses
from repbend.data.errors import DataError
from repbend.data.examples import DataReport, Pools, Sequence, SourceReport
from repbend.data.sampler import seeded_rng
from repbend.data.ultrachat import read_ultrachat
from repbend.data.wildguardmix import read_wildguardmix
from repbend.data.wildjailbreak import read_wildjailbreak

Source = str | os.PathLike


def _cap(rows: list, cap: int | None, seed: int, pool: str) -> list:
    if cap is None or len(rows) <= cap:
        return rows
    keep = sorted(seeded_rng(seed, "subset", pool).choice(len(rows), size=cap, replace=False).tolist())
    return [rows[i] for i in keep]


def _render(rows: list, render: Callable[[list, Counter], list], report: SourceReport, set_name: str,
            skip_invalid: bool) -> list:
    """render(rows, counts) -> one output per row. With skip_invalid, rows whose rendering raises DataError are
    dropped one by one and moved from qualified to skipped."""
    counts = Counter()
    try:
        out = render(rows, counts)
    except DataError:
        if not skip_invalid:
            raise
        out, counts = [], Counter()
        for row in rows:
            try:
                out.extend(render([row], counts))
            except DataError as err:
                report.skipped.add(err)
                report.qualified[set_name] -= 1
    report.truncated.update(counts)
    report.taken[set_name] += len(out)
    return out


def _wgm_renderer(tokenizer, limits):
    return lambda rows, counts: render_requests_responses(
        tokenizer, [r.prompt for r in rows], [r.response for r in rows], limits, [r.origin for r in rows],
        counts=counts)


def _wj_renderer(tokenizer, limits, request_only):
    def render(rows, counts) -> list[tuple[Sequence, Sequence]]:
        prompts, origins = [r.prompt for r in rows], [r.origin for r in rows]
        if request_only:
            seqs = render_requests_responses(tokenizer, prompts, [None] * len(rows), limits, origins, counts=counts)
            return [(s, s) for s in seqs]
        seqs = render_requests_responses(tokenizer, prompts * 2, [r.refusal for r in rows] +
                                         [r.harmful for r in rows], limits, origins * 2, counts=counts)
        pairs = list(zip(seqs[:len(rows)], seqs[len(rows):]))
        for refusal, harmful in pairs:  # guaranteed by rendering the same request text; checked, it is cheap
            if refusal.input_ids[:refusal.request_len] != harmful.input_ids[:harmful.request_len]:
                raise DataError(refusal.origin, "the request renders to different ids with the two answers",
                                reason="pair requests differ")
        return pairs
    return render


def build_pools(tokenizer, wildguardmix: Source | None = None, wildjailbreak: Source | None = None,
                ultrachat: Source | None = None, *, request_only: bool, limits: Limits | None = None,
                max_examples_per_pool: int | None = 10_000, skip_invalid: bool = False, seed: int = 0) -> Pools:
    """Read the given sources (local .jsonl/.json/.parquet paths or Hub specs `NAME[:CONFIG][@SPLIT]`; None =
    not used) and return the tokenized pools with a `DataReport`.

    request_only: render requests (with the generation prompt) only, split WildGuardMix by prompt_harm_label
        alone, and put each WildJailbreak request in wj_pairs as (request, request).
    max_examples_per_pool: cap per pool (module docstring); None = no cap.
    skip_invalid: drop invalid rows and count them by reason instead of raising DataError.
    """
    limits = limits or Limits()
    if max_examples_per_pool is not None and max_examples_per_pool < 1:
        raise ValueError(f"max_examples_per_pool must be >= 1 or None, got {max_examples_per_pool}")
    report = DataReport(request_only, limits.to_dict(), max_examples_per_pool, seed)
    cap = lambda rows, pool: _cap(rows, max_examples_per_pool, seed, pool)  # noqa: E731
    wgm_safe, wgm_unsafe, wj_pairs, retain = [], [], [], []

    if wildguardmix is not None:
        rep = report.sources["wildguardmix"] = SourceReport("wildguardmix", os.fspath(wildguardmix))
        safe, unsafe = read_wildguardmix(wildguardmix, rep, request_only=request_only, skip_invalid=skip_invalid)
        render = _wgm_renderer(tokenizer, limits)
        wgm_safe = _render(cap(safe, "wgm_safe"), render, rep, "safe", skip_invalid)
        wgm_unsafe = _render(cap(unsafe, "wgm_unsafe"), render, rep, "unsafe", skip_invalid)

    if wildjailbreak is not None:
        rep = report.sources["wildjailbreak"] = SourceReport("wildjailbreak", os.fspath(wildjailbreak))
        rows = read_wildjailbreak(wildjailbreak, rep, request_only=request_only, skip_invalid=skip_invalid)
        wj_pairs = _render(cap(rows, "wj_pairs"), _wj_renderer(tokenizer, limits, request_only), rep, "pairs",
                           skip_invalid)

    if ultrachat is not None:
        rep = report.sources["ultrachat"] = SourceReport("ultrachat", os.fspath(ultrachat))
        chats = read_ultrachat(ultrachat, rep, skip_invalid=skip_invalid)
        render = lambda rows, counts: render_conversations(  # noqa: E731
            tokenizer, [list(c.messages) for c in rows], limits, [c.origin for c in rows], counts=counts)
        retain = _render(cap(chats, "retain"), render, rep, "retain", skip_invalid)

    return Pools(wgm_safe=wgm_safe, wgm_unsafe=wgm_unsafe, wj_pairs=wj_pairs, retain=retain, report=report,
                 request_only=request_only)
