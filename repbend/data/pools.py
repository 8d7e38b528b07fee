"""Public files -> tokenized `Pools`: read and validate every row, apply the label rules, cap each pool,
render with the chat template.

Cap: when more rows than `max_examples_per_pool` qualify for a pool (wgm_safe, wgm_unsafe, wj_pairs,
retain, each on its own), a uniform random subset of that size is taken without replacement, seeded from
(seed, "subset", pool name), and kept in file order. Every row is still read and validated first, so a bad
row anywhere in a file is reported even when the subset would not have used it; only the subset is
tokenized. With `skip_invalid`, a row whose rendering fails (its template raises) is skipped after the cap,
so such a pool can end up a little under the cap.

Circuit Breakers and RMU (`method` circuit_breakers | rmu) read the same three sources into the same four pools,
rendered as those methods' data (docs/method.md, "Circuit Breakers and RMU"):
    wgm_unsafe   every WildGuardMix unsafe row (no cap): the forget rows, with the WildJailbreak harmful answers
    wgm_safe     WildGuardMix safe rows (capped)                  } the retain rows, with the UltraChat chats
    wj_pairs     (refusal, harmful answer) of the same capped WildJailbreak requests; the refusal's request may
                 be empty (below), so the two rows need not share their request ids
    retain       UltraChat chats with at least two messages (capped); fewer is counted as left
Every assistant turn is rendered through the template with its end-of-turn markup (`response_markup=True`).
Every row but the WildJailbreak harmful ones gets, with probability `empty_request_p`, an empty instruction: its
user turn is rendered empty (request = the template's markup only) and an UltraChat chat so drawn becomes that
empty request plus its first assistant reply. The draw is one uniform per row of the capped pool, in file order,
from a generator seeded by (seed, "empty_request", pool name): the same rows for the same seed and files.
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


BASELINE_METHODS = ("circuit_breakers", "rmu")
MIN_BASELINE_MESSAGES = 2


def empty_request_draw(n: int, p: float, seed: int, pool: str) -> list[bool]:
    """Which of `n` rows of `pool` get an empty instruction (module docstring): u_i < p, u = one seeded uniform per
    row."""
    if n == 0:
        return []
    return (seeded_rng(seed, "empty_request", pool).random(n) < p).tolist()


def _drawn(rows: list, p: float, seed: int, pool: str, report: SourceReport, set_name: str) -> list[tuple]:
    """(row, empty) pairs of a capped pool, the draws counted in `report.empty_request[set_name]`."""
    empty = empty_request_draw(len(rows), p, seed, pool)
    report.empty_request[set_name] += sum(empty)
    return list(zip(rows, empty))


def _baseline_pairs_renderer(tokenizer, limits, markup_requests):
    """(prompt, response) items -> Sequences with the template's assistant markup; `markup_requests` maps an item
    to its (prompt, response, origin)."""
    def render(items, counts):
        parts = [markup_requests(item) for item in items]
        return render_requests_responses(tokenizer, [q for q, _, _ in parts], [a for _, a, _ in parts], limits,
                                         [o for _, _, o in parts], counts=counts, response_markup=True)
    return render


def _first_reply(messages) -> str | None:
    return next((m["content"] for m in messages if m["role"] == "assistant"), None)


def _build_baseline_pools(tokenizer, report, wildguardmix, wildjailbreak, ultrachat, limits, cap, skip_invalid,
                          seed, p) -> tuple[list, list, list, list]:
    """The four pools of Circuit Breakers and RMU (module docstring)."""
    wgm_safe, wgm_unsafe, wj_pairs, retain = [], [], [], []
    one_turn = lambda item: (("" if item[1] else item[0].prompt), item[0].response, item[0].origin)  # noqa: E731
    if wildguardmix is not None:
        rep = report.sources["wildguardmix"] = SourceReport("wildguardmix", os.fspath(wildguardmix))
        safe, unsafe = read_wildguardmix(wildguardmix, rep, request_only=False, skip_invalid=skip_invalid)
        render = _baseline_pairs_renderer(tokenizer, limits, one_turn)
        wgm_safe = _render(_drawn(cap(safe, "wgm_safe"), p, seed, "wgm_safe", rep, "safe"), render, rep, "safe",
                           skip_invalid)
        wgm_unsafe = _render(_drawn(unsafe, p, seed, "wgm_unsafe", rep, "unsafe"), render, rep, "unsafe",
                             skip_invalid)

    if wildjailbreak is not None:
        rep = report.sources["wildjailbreak"] = SourceReport("wildjailbreak", os.fspath(wildjailbreak))
        rows = read_wildjailbreak(wildjailbreak, rep, request_only=False, skip_invalid=skip_invalid)

        def render_pairs(items, counts):  # the harmful side always keeps its request
            parts = [("" if empty else r.prompt, r.refusal, r.origin) for r, empty in items]
            parts += [(r.prompt, r.harmful, r.origin) for r, _ in items]
            seqs = render_requests_responses(tokenizer, [q for q, _, _ in parts], [a for _, a, _ in parts], limits,
                                             [o for _, _, o in parts], counts=counts, response_markup=True)
            return list(zip(seqs[:len(items)], seqs[len(items):]))
        wj_pairs = _render(_drawn(cap(rows, "wj_pairs"), p, seed, "wj_refusal", rep, "refusals"), render_pairs, rep,
                           "pairs", skip_invalid)

    if ultrachat is not None:
        rep = report.sources["ultrachat"] = SourceReport("ultrachat", os.fspath(ultrachat))
        chats = read_ultrachat(ultrachat, rep, skip_invalid=skip_invalid)
        short = [c for c in chats if len(c.messages) < MIN_BASELINE_MESSAGES]
        if short:
            rep.qualified["retain"] -= len(short)
            rep.left[f"fewer than {MIN_BASELINE_MESSAGES} messages"] += len(short)
            chats = [c for c in chats if len(c.messages) >= MIN_BASELINE_MESSAGES]

        def render_chats(items, counts):
            out: list = [None] * len(items)
            # an empty instruction needs a reply to keep; a chat without an assistant message keeps the whole chat
            one = [k for k, (c, empty) in enumerate(items) if empty and _first_reply(c.messages) is not None]
            ones = set(one)
            whole = [k for k in range(len(items)) if k not in ones]
            firsts = render_requests_responses(
                tokenizer, [""] * len(one), [_first_reply(items[k][0].messages) for k in one], limits,
                [items[k][0].origin for k in one], counts=counts, response_markup=True)
            chats_ = render_conversations(tokenizer, [list(items[k][0].messages) for k in whole], limits,
                                          [items[k][0].origin for k in whole], counts=counts)
            for k, s in list(zip(one, firsts)) + list(zip(whole, chats_)):
                out[k] = s
            return out
        retain = _render(_drawn(cap(chats, "retain"), p, seed, "retain", rep, "retain"), render_chats, rep, "retain",
                         skip_invalid)
    return wgm_safe, wgm_unsafe, wj_pairs, retain


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
                max_examples_per_pool: int | None = 10_000, skip_invalid: bool = False, seed: int = 0,
                method: str = "repbend", empty_request_p: float = 0.5) -> Pools:
    """Read the given sources (local .jsonl/.json/.parquet paths or Hub specs `NAME[:CONFIG][@SPLIT]`; None =
    not used) and return the tokenized pools with a `DataReport`.

    request_only: render requests (with the generation prompt) only, split WildGuardMix by prompt_harm_label
        alone, and put each WildJailbreak request in wj_pairs as (request, request).
    max_examples_per_pool: cap per pool (module docstring); None = no cap.
    skip_invalid: drop invalid rows and count them by reason instead of raising DataError.
    method: repbend, or circuit_breakers / rmu (their data: module docstring; `empty_request_p` is theirs).
    """
    limits = limits or Limits()
    if max_examples_per_pool is not None and max_examples_per_pool < 1:
        raise ValueError(f"max_examples_per_pool must be >= 1 or None, got {max_examples_per_pool}")
    if method not in ("repbend",) + BASELINE_METHODS:
        raise ValueError(f"method must be repbend, {' or '.join(BASELINE_METHODS)}; got {method!r}")
    if method != "repbend" and request_only:
        raise ValueError(f"{method} reads whole rows: request_only must be False")
    if not 0.0 <= empty_request_p <= 1.0:
        raise ValueError(f"empty_request_p must be in [0, 1], got {empty_request_p}")
    report = DataReport(request_only, limits.to_dict(), max_examples_per_pool, seed, method=method,
                        empty_request_p=empty_request_p if method != "repbend" else None)
    cap = lambda rows, pool: _cap(rows, max_examples_per_pool, seed, pool)  # noqa: E731
    if method != "repbend":
        pools = _build_baseline_pools(tokenizer, report, wildguardmix, wildjailbreak, ultrachat, limits, cap,
                                      skip_invalid, seed, empty_request_p)
        return Pools(*pools, report=report, method=method)
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
