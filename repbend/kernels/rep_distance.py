"""Per-layer distances between hidden states and reference hidden states over selected tokens.

For each layer l of a set of layers, over the selected token positions (b, t):
    l2[l]       = sum ||hidden[l, b, t] - ref[l, b, t]||_2                 (RepBend's L_safe / L_unsafe / L_pair)
    cos[l]      = sum cos(hidden[l, b, t], ref[l, b, t])
    relu_cos[l] = sum max(cos(hidden[l, b, t], ref[l, b, t]), 0)         (Circuit Breakers)
    sq[l]       = sum ||hidden[l, b, t] - ref[l, b, t]||_2^2               (RMU: ref a fixed control vector, or h)
where hidden comes from the trained pass and ref is a constant. All four come from one forward kernel and one
backward kernel (repbend/kernels/_rep_distance_triton.py): the forward writes per-row values into a small [7, L, N] fp32
buffer reduced by one torch.sum, the backward takes the four upstream gradients per layer, so any function of the
four sums gets its exact gradient.

Selected tokens are given either as an int64 [N] tensor of flat positions b * T + t (ascending, unique; built on
the host, so N is known without waiting for the device), or as a [B, T] mask (converted to those positions with
nonzero(), which waits for the device on CUDA). Only the N selected rows are launched (grid (N, L)); the backward
writes every position's gradient (zeros where unselected), in one pass.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import nn

from ._dispatch import resolve_impl
from ._rep_distance_triton import (  # noqa: F401 (the kernels: importable from here, where they used to live)
    COS_EPS, _rep_distance_bwd_kernel, _rep_distance_fwd_kernel, launch_config, probe_plain_backward, rep_distance_fwd)
from .reference import RepDistance, mask_rows, rep_distance_torch

__all__ = ["RepDistance", "rep_distance", "RepDistanceLoss", "COS_EPS", "launch_config"]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

Layers = Union[torch.Tensor, Sequence[torch.Tensor]]


def _as_layers(x: Layers, what: str) -> tuple[bool, list[torch.Tensor]]:
    """(is_stacked, list of tensors) for a [L, ...] tensor or a sequence of per-layer tensors."""
    if isinstance(x, torch.Tensor):
        return True, [x]
    if isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(t, torch.Tensor) for t in x):
        return False, list(x)
    raise TypeError(f"rep_distance: {what} must be a tensor or a non-empty list/tuple of tensors, "
                    f"got {type(x).__name__}")


def _check_float(t: torch.Tensor, what: str) -> None:
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"rep_distance: {what} must be float32, bfloat16 or float16, got {t.dtype}")


def _check_hidden(hidden: Layers) -> tuple[bool, list[torch.Tensor], tuple[int, int, int, int]]:
    stacked, hs = _as_layers(hidden, "hidden")
    if stacked:
        if hs[0].dim() != 4:
            raise ValueError(f"rep_distance: stacked hidden must be [L, B, T, D], got shape {tuple(hs[0].shape)}")
        L, B, T, D = hs[0].shape
    else:
        B_T_D = hs[0].shape
        for i, t in enumerate(hs):
            if t.dim() != 3 or t.shape != B_T_D:
                raise ValueError(f"rep_distance: hidden[{i}] must be [B, T, D] = {tuple(B_T_D)} like hidden[0], "
                                 f"got shape {tuple(t.shape)}")
            if t.dtype != hs[0].dtype or t.device != hs[0].device:
                raise ValueError(f"rep_distance: hidden[{i}] is {t.dtype} on {t.device}, hidden[0] is "
                                 f"{hs[0].dtype} on {hs[0].device}")
        L, (B, T, D) = len(hs), B_T_D
    if L == 0:
        raise ValueError("rep_distance: hidden has no layers (L = 0)")
    _check_float(hs[0], "hidden")
    return stacked, hs, (L, B, T, D)


def _check_ref(ref: Layers, shape: tuple[int, int, int, int], device: torch.device) -> tuple[bool, list[torch.Tensor]]:
    L, B, T, D = shape
    if isinstance(ref, torch.Tensor) and ref.dim() == 3:
        if ref.shape[0] != L or ref.shape[2] != D:
            raise ValueError(f"rep_distance: gathered ref must be [L, N, D] = [{L}, N, {D}], got {tuple(ref.shape)}")
        gathered, rs = True, [ref]
    else:
        gathered = False
        ref_stacked, rs = _as_layers(ref, "ref")
        shapes = [tuple(rs[0].shape)] if ref_stacked else [tuple(t.shape) for t in rs]
        expect = [(L, B, T, D)] if ref_stacked else [(B, T, D)] * L
        if shapes != expect:
            raise ValueError(f"rep_distance: ref must be like hidden ([L, B, T, D] = {(L, B, T, D)} or {L} x "
                             f"[B, T, D]) or gathered [L, N, D]; got shapes {shapes}")
    for i, t in enumerate(rs):
        what = f"ref[{i}]" if len(rs) > 1 else "ref"
        _check_float(t, what)
        if t.device != device:
            raise ValueError(f"rep_distance: {what} is on {t.device}, hidden on {device}")
        if t.dtype != rs[0].dtype:
            raise ValueError(f"rep_distance: {what} is {t.dtype}, ref[0] is {rs[0].dtype}")
    return gathered, rs


def _selected_rows(mask: torch.Tensor, B: int, T: int, device: torch.device) -> torch.Tensor:
    """int64 [N] flat positions from a [B, T] mask or an index tensor (validated for form here, values later)."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"rep_distance: mask must be a [B, T] mask or an int64 [N] index tensor, "
                        f"got {type(mask).__name__}")
    if mask.device != device:
        raise ValueError(f"rep_distance: mask is on {mask.device}, hidden on {device}")
    if mask.dim() == 1:
        if mask.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"rep_distance: a 1-D mask is an index tensor of flat positions b * T + t and must be "
                            f"int64 (or int32), got {mask.dtype}; a boolean mask must be [B, T] = {(B, T)}")
        return mask.to(torch.int64).contiguous()
    if mask.shape != (B, T):
        raise ValueError(f"rep_distance: mask must be a [B, T] = {(B, T)} tensor or an int64 [N] index tensor, "
                         f"got shape {tuple(mask.shape)}")
    if mask.is_floating_point() or mask.is_complex():
        raise TypeError(f"rep_distance: mask must be bool or integer 0/1, got {mask.dtype}")
    return mask_rows(mask)


def rep_distance(hidden: Layers, ref: Layers, mask: torch.Tensor, impl: str = "auto") -> RepDistance:
    """Per-layer sums of ||h - r||, cos(h, r), relu(cos(h, r)) and ||h - r||^2 over the selected tokens.

    Args:
        hidden: [L, B, T, D] tensor, or a sequence of L tensors [B, T, D] (e.g. a model's hidden states, unstacked);
            float32 / bfloat16 / float16, all layers one dtype and device. Any strides.
        ref: constant (no gradient flows into it), float32 / bfloat16 / float16. Either the same shapes as hidden
            ([L, B, T, D] tensor or L tensors [B, T, D]), or gathered: one [L, N, D] tensor whose row i belongs to
            the i-th selected token (in ascending position order). Any strides, row stride 0 included (one vector
            per layer expanded over the rows: `c.view(1, 1, D).expand(L, N, D)`).
        mask: the selected tokens: int64 [N] flat positions b * T + t, ascending and unique (checked on the device:
            a bad index raises a device-side assertion), or [B, T] bool / 0-1 integers (nonzero = selected; on
            CUDA this waits for the device to count them, and torch.compile cannot trace it without a graph
            break: pass index tensors there).
        impl: "auto" (Triton on CUDA, eager PyTorch on CPU), "triton" (CPU needs TRITON_INTERPRET=1) or "torch".

    Returns RepDistance(l2, cos, count, relu_cos, sq), each float32 [L] but count (int64 0-dim, on the device):
        l2[l]       = sum ||h - r||_2                                       (its gradient is 0 where h == r)
        cos[l]      = sum h.r / (max(|h|, 1e-8) * max(|r|, 1e-8))          (= F.cosine_similarity(h, r, dim=-1))
        relu_cos[l] = sum max(cos, 0)                                       (its gradient is 0 where cos == 0)
        sq[l]       = sum ||h - r||_2^2
    Differentiable in hidden only. Gradients come back in hidden's form (stacked tensor or one tensor per layer)
    and dtype; unselected tokens get zero gradient. Under torch.compile the Triton path is one custom op
    (repbend::rep_distance_fwd, backward repbend::rep_distance_bwd): no graph break, no guard on addresses.
    With a list of per-layer tensors, a plain `.backward()` writes each layer's gradient when autograd reaches that
    layer (added to what arrives from the layers above, in one launch), so the backward holds one layer's gradient
    instead of all L (repbend/kernels/_rep_distance_triton.py, `_Deferred`).
    """
    stacked, hs, shape = _check_hidden(hidden)
    L, B, T, D = shape
    device = hs[0].device
    gathered, rs = _check_ref(ref, shape, device)
    rows = _selected_rows(mask, B, T, device)
    N = rows.shape[0]
    if gathered and rs[0].shape[1] != N:
        raise ValueError(f"rep_distance: gathered ref has N = {rs[0].shape[1]} rows per layer but {N} tokens are "
                         "selected")

    if resolve_impl(impl, device) == "torch":
        return rep_distance_torch(hidden, ref, rows)

    sums, _, _ = rep_distance_fwd(hs, [t.detach() for t in rs], rows, gathered)
    l2, cos, relu_cos, sq = probe_plain_backward(sums).unbind(0)
    count = torch.full((), N, dtype=torch.int64, device=device)
    return RepDistance(l2, cos, count, relu_cos, sq)


class RepDistanceLoss(nn.Module):
    """nn.Module form of `rep_distance`: forward(hidden, ref, mask) -> RepDistance(l2, cos, count, relu_cos, sq)."""

    def __init__(self, impl: str = "auto"):
        super().__init__()
        self.impl = impl

    def forward(self, hidden: Layers, ref: Layers, mask: torch.Tensor) -> RepDistance:
        return rep_distance(hidden, ref, mask, impl=self.impl)

    def extra_repr(self) -> str:
        return f"impl={self.impl!r}"
