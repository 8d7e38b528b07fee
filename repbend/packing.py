"""Packing: several sequences per row, so that the model computes (almost) no padding.

Sequences are placed first-fit decreasing into rows of at most `capacity` tokens (a longer sequence gets a row
of its own). Attention stays inside each sequence without any mask tensor: every sequence's position ids restart
at 0, and transformers derives the block-diagonal causal mask from them (sdpa) or runs flash-attn's varlen
kernels (flash_attention_2). The loss terms read positions through `repbend.batching`, which maps every mask,
last-request-token position and retain token through the placements, so the loss equals the unpacked one.
"""
from __future__ import annotations


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
