"""From a `MicroBatch` to one model input (`repbend.loss.layout`) and the token sets each loss term reads.

All sets of a micro-batch (safe, unsafe, retain) go through the model together, laid out in the order safe, unsafe,
retain. A term's tokens are given as flat indices into the R*T positions of the input (row-major), built on the
host, so that no kernel needs a device sync to learn how many tokens it reads. Which tokens each term reads is the
method's (its `collate`, in its module under repbend/methods/); this module holds the batch type and the pieces
they share.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from .layout import Placement, Rows, lay_out
from .types import MicroBatch


@dataclass
class StepBatch:
    """One model input and the token sets of its terms. Each method's batch is a subclass with its own typed counts
    (e.g. `RepBendBatch.n_pairs`); `to(device)` keeps the subclass."""

    rows: Rows                          # the model input and its attention layout
    index: dict[str, torch.Tensor] = field(default_factory=dict)  # token sets: int64 flat indices
    useful_tokens: int = 0              # real (non-padding) tokens of the input
    max_id: int | None = None           # the largest token id (checked against the model's vocabulary)

    @property
    def input_ids(self) -> torch.Tensor:
        return self.rows.input_ids

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.rows.input_ids.shape)

    def to(self, device) -> "StepBatch":
        if self.rows.input_ids.device == torch.device(device):
            return self
        return dataclasses.replace(self, rows=self.rows.to(device),
                                   index={k: v.to(device, non_blocking=True) for k, v in self.index.items()})


def sequences(micro: MicroBatch) -> list:
    """The micro-batch's sequences in layout order: safe, unsafe, retain."""
    return list(micro.safe) + list(micro.unsafe) + list(micro.retain)


def require_request(micro: MicroBatch, sets: tuple[str, ...], why: str) -> None:
    """ValueError naming the row and field when a sequence of `sets` has no request token (request_len 0)."""
    for name in sets:
        for i, s in enumerate(getattr(micro, name)):
            if s.request_len < 1:
                raise ValueError(f"MicroBatch.{name}[{i}] ({s.origin or 'no origin'}): request_len 0, but {why}")


def set_ranges(micro: MicroBatch) -> tuple[range, range, range]:
    """The positions of the safe, unsafe and retain sequences in `sequences(micro)`."""
    a, b, c = len(micro.safe), len(micro.unsafe), len(micro.retain)
    return range(0, a), range(a, a + b), range(a + b, a + b + c)


def long(values) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.long)


def every_token(rows: Rows, ks) -> torch.Tensor:
    """Flat indices of every token of the sequences `ks`, ascending."""
    T, P = rows.row_len, rows.placements
    return long(sorted(P[k].flat(T, t) for k in ks for t in range(P[k].length)))


def tokens_at(rows: Rows, ks, positions) -> torch.Tensor:
    """Flat indices of the tokens `positions(placement)` (a range of token positions) of each sequence `ks`,
    ascending."""
    T, P = rows.row_len, rows.placements
    return long(sorted(P[k].flat(T, t) for k in ks for t in positions(P[k])))


def useful_tokens(seqs) -> int:
    return sum(len(s) for s in seqs)


def laid_apart(seqs, first: list[int], second: list[int], pad_id: int, pack_length: int | None) -> tuple[Rows, int]:
    """Rows of `seqs` with the sequences `first` laid out among themselves in the leading rows and `second` in the
    rows after them (each set as `lay_out` places it), all rows padded to the longest; placements stay indexed by
    sequence. Returns (rows, number of leading rows). A pass that reads only the `first` sequences can then run on
    the leading rows alone, and their flat indices are the same there."""
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


def leading_rows(rows: Rows, n: int) -> Rows:
    """The first `n` rows of a layout, with the sequences that lie in them (flat indices below n*T keep naming the
    same tokens)."""
    T = rows.row_len
    inside = [p for p in rows.placements if p.row < n]
    per_row: dict[int, int] = {}
    for p in inside:
        per_row[p.row] = per_row.get(p.row, 0) + 1
    starts = [c for c in rows.cu_seqlens[:-1] if c < n * T]
    return Rows(rows.input_ids[:n], rows.position_ids[:n], rows.doc_ids[:n], inside, starts + [n * T],
                any(k > 1 for k in per_row.values()))


def collate(micro: MicroBatch, loss, pad_id: int, pack_length: int | None = None) -> StepBatch:
    """`loss.method`'s collate (a LossConfig): kept for callers of the module-level function."""
    from .module import RepBendLoss
    return RepBendLoss(loss).collate(micro, pad_id, pack_length)
