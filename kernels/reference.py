"""Eager PyTorch versions of the RepBend kernels: the readable definition each Triton op must reproduce.

These run on any device and are differentiable by autograd; they upcast to float32 before any arithmetic.
They are also what `impl="auto"` runs on CPU tensors.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence, Union

import torch
import torch.nn.functional as F

__all__ = ["RepDistance", "rep_distance_torch", "pairwise_cosine_loss_torch"]

Layers = Union[torch.Tensor, Sequence[torch.Tensor]]


class RepDistance(NamedTuple):
    """Per-layer sums over the masked tokens (see `rep_distance`).

    l2:    [L] float32, sum of ||hidden - ref||_2 over masked tokens.
    cos:   [L] float32, sum of cosine_similarity(hidden, ref) over masked tokens.
    count: 0-dim int64, number of masked tokens (the same for every layer).
    """

    l2: torch.Tensor
    cos: torch.Tensor
    count: torch.Tensor


def rep_distance_torch(hidden: Layers, ref: Layers, mask: torch.Tensor) -> RepDistance:
    """Eager `rep_distance`: same arguments and result (shapes are validated by `rep_distance`).

    hidden: [L, B, T, D] or L tensors [B, T, D]; ref: the same shapes, or gathered [L, N, D] (the N masked rows of
    each layer in row-major (b, t) order); mask: [B, T] bool or 0/1. For each layer l, over masked (b, t):
        l2[l]  = sum ||h - r||_2                                   (gradient 0 where h == r)
        cos[l] = sum F.cosine_similarity(h, r, dim=-1, eps=1e-8)   (= h.r / (max(|h|, eps) * max(|r|, eps)))
    """
    keep = mask.ne(0)  # [B, T]
    gathered = isinstance(ref, torch.Tensor) and ref.dim() == 3
    l2, cos = [], []
    for layer in range(len(hidden)):
        h = hidden[layer][keep].float()  # (N, D): masked rows, row-major (b, t) order
        r = ref[layer] if gathered else ref[layer][keep]
        r = r.detach().float()  # (N, D); ref is a constant
        # vector_norm's gradient at a zero vector is 0 (its subgradient), not NaN: LoRA starts at h == r.
        l2.append(torch.linalg.vector_norm(h - r, dim=-1).sum())
        cos.append(F.cosine_similarity(h, r, dim=-1).sum())
    return RepDistance(torch.stack(l2), torch.stack(cos), keep.sum())


def pairwise_cosine_loss_torch(x: torch.Tensor) -> torch.Tensor:
    """Eager `pairwise_cosine_loss`: x [L, N, D] -> 0-dim float32.

    loss = mean_l  1/(N(N-1)) * sum_{i != j} (1 - <u_li, u_lj>),  u = F.normalize(x, dim=-1) (eps 1e-12);
    N < 2 gives a (differentiable) zero. Uses sum_{i != j} <u_i, u_j> = ||sum_i u_i||^2 - sum_i ||u_i||^2,
    so no N x N matrix is formed.
    """
    L, N, _ = x.shape
    u = F.normalize(x.float(), dim=-1)  # (L, N, D)
    if N < 2:
        return u.sum() * 0.0
    pair_dot = u.sum(dim=1).square().sum(dim=-1) - u.square().sum(dim=(1, 2))  # (L,): sum_{i != j} <u_i, u_j>
    return (1.0 - pair_dot / (N * (N - 1))).mean()
