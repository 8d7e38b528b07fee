"""From a micro-batch of sequences to one padded input and the token sets each loss term reads.

All sets of a micro-batch (safe, unsafe, retain) go through the model together, as the rows of one
`[R, T]` input padded only to its longest row (or packed several to a row, see `repbend.packing`). The loss
terms then read the hidden states at the token sets chosen here, given as boolean `[R, T]` masks (for
`rep_distance`) and as flat indices into the `R*T` positions (for gathering), always in row-major order.

Where the masks come from (REFERENCE.md, "Loss modes"), for a row whose request is `[0, r)` and whose
response is `[r, n)`:

    request_last      r-1                 request_all   [0, r)   (the rows hold the request only)
    request_response  [0, n)              response_all  [r, n)
    response_one      r                   response_R    [r, min(r+R, n))

`L_cos` reads the last request token r-1 of every unsafe row; `L_pair` reads positions p .. p+R'-1 (p = r-1)
of the aligned WildJailbreak rows (harmful in the trained pass, refusal in the reference pass), with
R' = min(paired_repr_length, the shortest response among the batch's pair rows); `L_KL` reads every
token of the retain rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import LossConfig
from .packing import first_fit_decreasing


@dataclass
class Placement:
    """Where each sequence of a micro-batch sits in the model input: row and first column."""
    row: int
    start: int
    length: int
    request_len: int


@dataclass
class StepBatch:
    input_ids: torch.Tensor        # [R, T] long
    position_ids: torch.Tensor     # [R, T] long, restarting at 0 for every sequence
    safe_mask: torch.Tensor        # [R, T] bool: tokens of L_safe
    unsafe_mask: torch.Tensor      # [R, T] bool: tokens of L_unsafe
    safe_index: torch.Tensor       # flat indices of safe_mask (row-major), built on the host: no device sync
    unsafe_index: torch.Tensor     # flat indices of unsafe_mask
    cos_index: torch.Tensor        # [n_unsafe] flat index of each unsafe sequence's last request token
    pair_mask: torch.Tensor        # [R, T] bool: L_pair positions of the harmful pair sequences (trained pass)
    pair_ref_index: torch.Tensor   # [n_pair_tokens] flat index of the same positions in the refusal sequences
    retain_index: torch.Tensor     # [n_retain_tokens] flat index of all retain tokens
    n_retain_seqs: int
    n_pairs: int
    pair_len: int                  # R' of L_pair (0 when there are no pairs)
    useful_tokens: int             # real (non-padding) tokens in the input

    @property
    def shape(self):
        return tuple(self.input_ids.shape)

    def to(self, device) -> "StepBatch":
        moved = {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
                 for k, v in self.__dict__.items()}
        return StepBatch(**moved)


def term_positions(mode: str, request_len: int, length: int, response_r: int) -> range:
    """Token positions of one safe/unsafe sequence that its set's term reads (see the module docstring)."""
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
    shortest = min(len(s.input_ids) - s.request_len for s in list(safe_pairs) + list(unsafe_pairs))
    return max(0, min(paired_repr_length, shortest))


def collate(micro, loss: LossConfig, pad_id: int, pack_length: int | None = None) -> StepBatch:
    """Lay out `micro` (a `repbend.data.sampler.MicroBatch`) as one input and build every term's token set.

    Without `pack_length` each sequence gets its own row, padded on the right to the longest one. With it,
    sequences share rows of at most `pack_length` tokens (`repbend.packing`). Either way every sequence's
    position ids start at 0 and padding continues the positions of its row's last sequence, so no attention
    mask is needed: causal attention never lets a real token see the padding after it.
    The order of sequences is safe, then unsafe, then retain.
    """
    seqs = list(micro.safe) + list(micro.unsafe) + list(micro.retain)
    if pack_length:
        where, n_rows, row_len = first_fit_decreasing([len(s.input_ids) for s in seqs], pack_length)
        placements = [Placement(r, c, len(s.input_ids), s.request_len) for (r, c), s in zip(where, seqs)]
    else:
        placements = [Placement(i, 0, len(s.input_ids), s.request_len) for i, s in enumerate(seqs)]
        n_rows, row_len = len(seqs), max(len(s.input_ids) for s in seqs)
    n_safe, n_unsafe, n_retain = len(micro.safe), len(micro.unsafe), len(micro.retain)

    ids = torch.full((n_rows, row_len), pad_id, dtype=torch.long)
    attn = torch.zeros((n_rows, row_len), dtype=torch.long)
    pos = torch.zeros((n_rows, row_len), dtype=torch.long)
    safe_mask = torch.zeros((n_rows, row_len), dtype=torch.bool)
    unsafe_mask = torch.zeros_like(safe_mask)
    pair_mask = torch.zeros_like(safe_mask)
    for k, (s, p) in enumerate(zip(seqs, placements)):
        sl = slice(p.start, p.start + p.length)
        ids[p.row, sl] = torch.tensor(s.input_ids, dtype=torch.long)
        attn[p.row, sl] = 1
        pos[p.row, sl] = torch.arange(p.length)
        if k < n_safe + n_unsafe:
            target = safe_mask if k < n_safe else unsafe_mask
            cols = term_positions(loss.mode, s.request_len, p.length, loss.response_r)
            target[p.row, p.start + cols.start: p.start + cols.stop] = True

    flat = lambda k, t: placements[k].row * row_len + placements[k].start + t  # noqa: E731
    cos_index = torch.tensor([flat(n_safe + j, placements[n_safe + j].request_len - 1) for j in range(n_unsafe)],
                             dtype=torch.long)

    n_pairs = micro.n_pairs
    safe_pairs = seqs[n_safe - n_pairs:n_safe]
    unsafe_pairs = seqs[n_safe + n_unsafe - n_pairs:n_safe + n_unsafe]
    plen = pair_length(safe_pairs, unsafe_pairs, loss.paired_repr_length)
    ref_index = []
    for j in range(n_pairs):
        ks, ku = n_safe - n_pairs + j, n_safe + n_unsafe - n_pairs + j
        ps, pu = placements[ks].request_len - 1, placements[ku].request_len - 1
        pu_row, pu_start = placements[ku].row, placements[ku].start
        pair_mask[pu_row, pu_start + pu: pu_start + pu + plen] = True
        ref_index.extend(flat(ks, ps + i) for i in range(plen))
    # the trained side is read in row-major order of pair_mask; put the reference side in the same order
    lora_order = [flat(n_safe + n_unsafe - n_pairs + j, placements[n_safe + n_unsafe - n_pairs + j].request_len - 1 + i)
                  for j in range(n_pairs) for i in range(plen)]
    order = sorted(range(len(lora_order)), key=lambda i: lora_order[i])
    pair_ref_index = torch.tensor([ref_index[i] for i in order], dtype=torch.long)

    for row in range(n_rows):  # padding continues the positions of the row's last sequence
        used = int(attn[row].sum())
        if used < row_len:
            last = int(pos[row, used - 1]) + 1 if used else 0
            pos[row, used:] = torch.arange(last, last + row_len - used)

    retain_index = torch.tensor(
        [flat(k, t) for k in range(n_safe + n_unsafe, len(seqs)) for t in range(placements[k].length)],
        dtype=torch.long)
    retain_index, _ = retain_index.sort()
    return StepBatch(
        input_ids=ids, position_ids=pos, safe_mask=safe_mask, unsafe_mask=unsafe_mask,
        safe_index=_flat(safe_mask), unsafe_index=_flat(unsafe_mask),
        cos_index=cos_index, pair_mask=pair_mask, pair_ref_index=pair_ref_index, retain_index=retain_index,
        n_retain_seqs=n_retain, n_pairs=n_pairs, pair_len=plen, useful_tokens=int(attn.sum()),
    )


def _flat(mask: torch.Tensor) -> torch.Tensor:
    return mask.reshape(-1).nonzero().squeeze(1)
