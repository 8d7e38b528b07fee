"""From a `MicroBatch` to one model input (`repbend.loss.layout`) and the token sets each loss term reads.

All sets of a micro-batch (safe, unsafe, retain) go through the model together. A term's tokens are given as flat
indices into the R*T positions of the input (row-major), built on the host, so that no kernel needs a device
sync to learn how many tokens it reads. Sequences are laid out in the order safe, unsafe, retain.

RepBend's token sets (docs/method.md, "Loss modes"), for a row whose request is [0, r) and response [r, n):

    request_last      r-1                 request_all   [0, r)   (the rows hold the request only)
    request_response  [0, n)              response_all  [r, n)
    response_one      r                   response_R    [r, min(r+R, n))

    safe, unsafe   the mode's positions of every safe / unsafe row, ascending
    cos            the last request token r-1 of every unsafe row, in row order
    pair           positions p .. p+R'-1 (p = r-1) of the harmful WildJailbreak rows (the trained side), ascending,
    pair_ref       and the same positions of the aligned refusal rows (the reference side), in matching order;
                   R' = min(paired_repr_length, the shortest response among the pair rows)
    retain         every token of the retain rows, ascending

Circuit Breakers and RMU read every token of their rows: `forget` (the unsafe rows) and `retain` (the safe rows,
then the retain rows), each ascending. `meta` holds, per set, its number of rows (`forget_rows`, `retain_rows`) and
its longest row (`forget_longest`, `retain_longest`: the padded length a per-set layout would have, which RMU's
denominators count). For RMU the two sets are laid out apart, the retain set's rows first: the reference pass,
which only the retain tokens need, runs on the first `meta["reference_rows"]` rows alone, and the flat indices of
the retain tokens are the same in that prefix.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import LossConfig
from .layout import Placement, Rows, lay_out
from .types import MicroBatch


@dataclass
class StepBatch:
    rows: Rows                          # the model input and its attention layout
    index: dict[str, torch.Tensor]      # token sets (module docstring): int64 flat indices
    n_safe: int
    n_unsafe: int
    n_retain: int
    n_pairs: int = 0
    pair_len: int = 0                   # R' of L_pair (0 without pairs)
    useful_tokens: int = 0              # real (non-padding) tokens of the input
    meta: dict[str, int] = field(default_factory=dict)  # method-specific counts (e.g. padded lengths for RMU)

    @property
    def input_ids(self) -> torch.Tensor:
        return self.rows.input_ids

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.rows.input_ids.shape)

    def to(self, device) -> "StepBatch":
        if self.rows.input_ids.device == torch.device(device):
            return self
        return StepBatch(self.rows.to(device), {k: v.to(device, non_blocking=True) for k, v in self.index.items()},
                         self.n_safe, self.n_unsafe, self.n_retain, self.n_pairs, self.pair_len, self.useful_tokens,
                         dict(self.meta))


def term_positions(mode: str, request_len: int, length: int, response_r: int) -> range:
    """Token positions of one safe/unsafe sequence that its set's RepBend term reads (module docstring)."""
    r, n = request_len, length
    if mode == "request_last":
        return range(r - 1, r)
    if mode == "request_all":
        return range(0, r)
    if mode == "request_response":
        return range(0, n)
    if mode == "response_all":
        return range(r, n)
    if mode == "response_one":
        return range(r, min(r + 1, n))
    if mode == "response_R":
        return range(r, min(r + response_r, n))
    raise ValueError(f"unknown loss mode {mode!r}")


def pair_length(safe_pairs, unsafe_pairs, paired_repr_length: int) -> int:
    if not safe_pairs:
        return 0
    shortest = min(s.response_len for s in list(safe_pairs) + list(unsafe_pairs))
    return max(0, min(paired_repr_length, shortest))


def _long(values) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.long)


def collate(micro: MicroBatch, loss: LossConfig, pad_id: int, pack_length: int | None = None) -> StepBatch:
    """Lay out `micro` and build the token sets of `loss.method` (module docstring). `pack_length` None = one row
    per sequence, right-padded; else rows of at most that many tokens."""
    seqs = list(micro.safe) + list(micro.unsafe) + list(micro.retain)
    n_safe, n_unsafe, n_retain = len(micro.safe), len(micro.unsafe), len(micro.retain)
    if loss.method != "repbend":
        sets = {"forget": list(range(n_safe, n_safe + n_unsafe)),
                "retain": [*range(n_safe), *range(n_safe + n_unsafe, len(seqs))]}
        if loss.method == "rmu":
            rows, reference_rows = _apart(seqs, sets["retain"], sets["forget"], pad_id, pack_length)
        else:
            rows = lay_out(seqs, pad_id, pack_length)
        T, P = rows.row_len, rows.placements
        batch = StepBatch(rows, {}, n_safe, n_unsafe, n_retain, useful_tokens=sum(len(s) for s in seqs))
        for name, ks in sets.items():
            batch.index[name] = _long(sorted(P[k].flat(T, t) for k in ks for t in range(P[k].length)))
            batch.meta[f"{name}_rows"] = len(ks)
            batch.meta[f"{name}_longest"] = max((P[k].length for k in ks), default=0)
        if loss.method == "rmu":
            batch.meta["reference_rows"] = reference_rows
        return batch

    rows = lay_out(seqs, pad_id, pack_length)
    T, P = rows.row_len, rows.placements
    every = lambda ks: sorted(P[k].flat(T, t) for k in ks for t in range(P[k].length))  # noqa: E731
    batch = StepBatch(rows, {}, n_safe, n_unsafe, n_retain, useful_tokens=sum(len(s) for s in seqs))

    def mode_positions(ks):
        out = []
        for k in ks:
            cols = term_positions(loss.mode, P[k].request_len, P[k].length, loss.response_r)
            out.extend(P[k].flat(T, t) for t in cols)
        return sorted(out)
    batch.index["safe"] = _long(mode_positions(range(n_safe)))
    batch.index["unsafe"] = _long(mode_positions(range(n_safe, n_safe + n_unsafe)))
    batch.index["cos"] = _long(P[k].flat(T, P[k].request_len - 1) for k in range(n_safe, n_safe + n_unsafe))
    batch.index["retain"] = _long(every(range(n_safe + n_unsafe, len(seqs))))

    n_pairs = micro.n_pairs
    refusals = list(range(n_safe - n_pairs, n_safe))
    harmful = list(range(n_safe + n_unsafe - n_pairs, n_safe + n_unsafe))
    plen = pair_length([seqs[k] for k in refusals], [seqs[k] for k in harmful], loss.paired_repr_length)
    pairs = sorted((P[ku].flat(T, P[ku].request_len - 1 + i), P[ks].flat(T, P[ks].request_len - 1 + i))
                   for ks, ku in zip(refusals, harmful) for i in range(plen))
    batch.index["pair"] = _long(a for a, _ in pairs)
    batch.index["pair_ref"] = _long(b for _, b in pairs)
    batch.n_pairs, batch.pair_len = n_pairs, plen
    return batch


def _apart(seqs, first: list[int], second: list[int], pad_id: int, pack_length: int | None) -> tuple[Rows, int]:
    """Rows of `seqs` with the sequences `first` laid out among themselves in the leading rows and `second` in the
    rows after them (each set as `lay_out` places it), all rows padded to the longest; placements stay indexed by
    sequence. Returns (rows, number of leading rows)."""
    parts = [(ks, lay_out([seqs[k] for k in ks], pad_id, pack_length)) for ks in (first, second) if ks]
    if not parts:
        raise ValueError("collate: no sequences")
    T = max(r.row_len for _, r in parts)
    ids, pos, doc, placements, row0 = [], [], [], [None] * len(seqs), 0
    for ks, r in parts:
        n, extra = r.input_ids.shape[0], T - r.row_len
        ids.append(torch.nn.functional.pad(r.input_ids, (0, extra), value=pad_id))
        # the added padding belongs to the sequence that ends the row (its positions go on counting)
        pos.append(torch.cat([r.position_ids, r.position_ids[:, -1:] + torch.arange(1, extra + 1)], dim=1))
        local = torch.cat([r.doc_ids, r.doc_ids[:, -1:].expand(n, extra)], dim=1).long()
        doc.append(torch.tensor(ks, dtype=torch.int32)[local])
        for j, p in enumerate(r.placements):
            placements[ks[j]] = Placement(row0 + p.row, p.start, p.length, p.request_len)
        row0 += n
    starts = sorted(p.row * T + p.start for p in placements)
    packed = any(r.packed for _, r in parts)
    rows = Rows(torch.cat(ids), torch.cat(pos), torch.cat(doc), placements, starts + [row0 * T], packed)
    return rows, (parts[0][1].input_ids.shape[0] if first else 0)
