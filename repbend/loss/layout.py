"""Rows of the model input, and attention inputs that keep every sequence to itself on each attention backend.

Rows: the sequences of a micro-batch go through the model together. Unpacked, each gets its own row, right-padded
to the longest; packed, they are placed first-fit decreasing into rows of at most `pack_length` tokens (a longer
sequence gets a row of its own). Position ids restart at 0 for every sequence. Padding belongs to the sequence
before it in its row (its positions go on counting), so a real token never sees padding: attention is causal.

Attention, by the model's `config._attn_implementation` (`attention_inputs`):
    any name with "flash"   rows flattened into one row [1, R*T] with flash-attn's varlen arguments
                            cu_seq_lens_q/k (int32 boundaries of every sequence, its padding tail included) and
                            max_length_q/k: transformers passes a single packed row to the varlen kernel.
    flex_attention          a BlockMask: position q sees position k when both hold the same sequence and k <= q.
    sdpa                    the same rule as a boolean [R, 1, T, T] mask.
    eager                   the same rule as an additive [R, 1, T, T] mask (0 / the dtype's lowest value).
Rows that hold one sequence each need none of this: plain causal attention is exact, and no mask is passed.
Flat indices into the R*T positions (row-major) name the same tokens in every layout.

Hidden tokens (`lay_out(..., hide_id=pad)`, for DPO, whose reference hides every pad-valued token from attention):
a hidden token keeps its position but no query sees it as a key. sdpa, eager and flex add that to their mask (rows
then always get one, packed or not); flash-attn's varlen layout cannot mask a key, so the hidden tokens are left out
of the flattened row altogether (as transformers itself does for a padding mask on that backend): the passes put
every kept output back at its flat index (`Rows.kept`), and a hidden token's own output is not available there.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .types import Sequence


@dataclass
class Placement:
    """Where one sequence sits in the model input."""
    row: int
    start: int
    length: int
    request_len: int

    def flat(self, row_len: int, t: int) -> int:
        """Flat (row-major) index of the sequence's token t."""
        return self.row * row_len + self.start + t


@dataclass
class Rows:
    input_ids: torch.Tensor     # [R, T] long
    position_ids: torch.Tensor  # [R, T] long, restarting at 0 for every sequence
    doc_ids: torch.Tensor       # [R, T] int32: which sequence of the micro-batch a position belongs to
    placements: list[Placement]
    cu_seqlens: list[int]       # flat start of every sequence (padding tails included), then R*T
    packed: bool                # some row holds more than one sequence
    hidden: torch.Tensor | None = None  # [R, T] bool: tokens no query attends to (None: none)
    kept: torch.Tensor | None = None    # [K] long: the flat positions not hidden, ascending (with `hidden`)
    kept_cu_seqlens: list[int] | None = None  # cu_seqlens counted over the kept positions only (with `hidden`)

    @property
    def row_len(self) -> int:
        return self.input_ids.shape[1]

    def to(self, device) -> "Rows":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Rows(move(self.input_ids), move(self.position_ids), move(self.doc_ids), self.placements,
                    self.cu_seqlens, self.packed, move(self.hidden), move(self.kept), self.kept_cu_seqlens)

    def compacted(self, attn_implementation: str | None) -> bool:
        """Whether the model input leaves the hidden tokens out (flash-attn's varlen layout with hidden tokens)."""
        return self.hidden is not None and layout_kind(attn_implementation) == "varlen"


def first_fit_decreasing(lengths: list[int], capacity: int) -> tuple[list[tuple[int, int]], int, int]:
    """Place sequences of `lengths` into rows. Returns ([(row, start) per sequence], n_rows, row_len)."""
    capacity = max(capacity, max(lengths))
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    fill: list[int] = []
    where: list[tuple[int, int] | None] = [None] * len(lengths)
    for i in order:
        for r, used in enumerate(fill):
            if used + lengths[i] <= capacity:
                where[i] = (r, used)
                fill[r] += lengths[i]
                break
        else:
            where[i] = (len(fill), 0)
            fill.append(lengths[i])
    return where, len(fill), max(fill)


def lay_out(seqs: list[Sequence], pad_id: int, pack_length: int | None = None, hide_id: int | None = None) -> Rows:
    """The rows of `seqs` (module docstring); `pack_length` None = one row per sequence. `hide_id`: tokens of that
    id inside a sequence are hidden from attention (module docstring)."""
    if not seqs:
        raise ValueError("lay_out: no sequences")
    lengths = [len(s) for s in seqs]
    if pack_length:
        where, n_rows, row_len = first_fit_decreasing(lengths, pack_length)
    else:
        where, n_rows, row_len = [(i, 0) for i in range(len(seqs))], len(seqs), max(lengths)
    placements = [Placement(r, c, len(s), s.request_len) for (r, c), s in zip(where, seqs)]
    ids = torch.full((n_rows, row_len), pad_id, dtype=torch.long)
    pos = torch.empty((n_rows, row_len), dtype=torch.long)
    doc = torch.empty((n_rows, row_len), dtype=torch.int32)
    by_row: list[list[int]] = [[] for _ in range(n_rows)]
    for k, (s, p) in enumerate(zip(seqs, placements)):
        ids[p.row, p.start:p.start + p.length] = torch.tensor(s.input_ids, dtype=torch.long)
        by_row[p.row].append(k)
    starts = []
    for row, ks in enumerate(by_row):
        ks.sort(key=lambda k: placements[k].start)
        for j, k in enumerate(ks):  # a sequence's span runs to the next one's start, or to the row's end
            p = placements[k]
            end = placements[ks[j + 1]].start if j + 1 < len(ks) else row_len
            pos[row, p.start:end] = torch.arange(end - p.start)
            doc[row, p.start:end] = k
            starts.append(row * row_len + p.start)
    packed = any(len(ks) > 1 for ks in by_row)
    rows = Rows(ids, pos, doc, placements, sorted(starts) + [n_rows * row_len], packed)
    if hide_id is not None and any(hide_id in s.input_ids for s in seqs):  # on the host: no tensor value is read
        flags = [[False] * row_len for _ in range(n_rows)]
        for s, p in zip(seqs, placements):
            flags[p.row][p.start:p.start + p.length] = [t == hide_id for t in s.input_ids]
        flat = [f for row in flags for f in row]
        visible, kept, seen = [], [], 0
        for i, f in enumerate(flat):
            if not f:
                kept.append(i)
                seen += 1
            visible.append(seen)
        rows.hidden = torch.tensor(flags, dtype=torch.bool)
        rows.kept = torch.tensor(kept, dtype=torch.long)
        rows.kept_cu_seqlens = [0] + [visible[b - 1] for b in rows.cu_seqlens[1:]]
    return rows


def layout_kind(attn_implementation: str | None) -> str:
    """"varlen" | "flex" | "sdpa" | "eager" for a transformers attention implementation name."""
    name = (attn_implementation or "sdpa").lower()
    if "flash" in name:
        return "varlen"
    if "flex" in name:
        return "flex"
    if name == "eager":
        return "eager"
    return "sdpa"


def attention_inputs(rows: Rows, attn_implementation: str | None, dtype: torch.dtype) -> dict:
    """Keyword arguments for the decoder stack's forward (input_ids, position_ids and the attention inputs), for
    `rows` already on the model's device. Every layout gives the same hidden states at the same flat indices."""
    ids, pos, hidden = rows.input_ids, rows.position_ids, rows.hidden
    if not rows.packed and hidden is None:
        return {"input_ids": ids, "position_ids": pos, "attention_mask": None}
    kind = layout_kind(attn_implementation)
    if kind == "varlen":
        return _varlen_inputs(rows)
    doc = rows.doc_ids
    if kind == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        # a hidden key belongs to no sequence (-1): one index per side, the form Inductor's CPU template compiles
        key_doc = doc if hidden is None else torch.where(hidden, torch.full_like(doc, -1), doc)

        def same_sequence_causal(b, h, q, k):
            return (doc[b, q] == key_doc[b, k]) & (k <= q)
        R, T = ids.shape
        mask = create_block_mask(same_sequence_causal, R, None, T, T, device=ids.device)
        return {"input_ids": ids, "position_ids": pos, "attention_mask": mask}
    T = ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=ids.device).tril_()
    allowed = (doc[:, :, None] == doc[:, None, :]) & causal  # [R, T, T]: query row, key column
    if hidden is not None:
        allowed &= ~hidden[:, None, :]
        # a query with no key left (a hidden token at the start of a sequence) sees itself: a real token never does
        allowed |= torch.eye(T, dtype=torch.bool, device=ids.device) & ~allowed.any(-1, keepdim=True)
    if kind == "eager":
        additive = torch.zeros(allowed.shape, dtype=dtype, device=ids.device)
        additive.masked_fill_(~allowed, torch.finfo(dtype).min)
        return {"input_ids": ids, "position_ids": pos, "attention_mask": additive[:, None]}
    return {"input_ids": ids, "position_ids": pos, "attention_mask": allowed[:, None]}


def _varlen_inputs(rows: Rows) -> dict:
    """flash-attn's varlen arguments: every sequence in one flattened row, hidden tokens left out (module docstring)."""
    ids, pos = rows.input_ids.reshape(-1), rows.position_ids.reshape(-1)
    bounds = rows.cu_seqlens
    if rows.kept is not None:
        ids, pos, bounds = ids[rows.kept], pos[rows.kept], rows.kept_cu_seqlens
    cu = torch.tensor(bounds, dtype=torch.int32).to(ids.device, non_blocking=True)
    longest = max(b - a for a, b in zip(bounds, bounds[1:]))
    return {"input_ids": ids.reshape(1, -1), "position_ids": pos.reshape(1, -1), "attention_mask": None,
            "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}
