"""Per-layer L2 distance and cosine similarity between hidden states and reference hidden states, over masked tokens.

The RepBend terms L_safe / L_unsafe need, for each layer l of a set of layers,
    l2[l]  = sum over masked (b, t) of ||hidden[l, b, t] - ref[l, b, t]||_2
    cos[l] = sum over masked (b, t) of cos(hidden[l, b, t], ref[l, b, t])
where hidden comes from the LoRA pass (trainable) and ref from the reference pass (constant).

Triton design
- One program per (token row, layer): grid (B*T, L). A program reads its mask entry and loads its rows of hidden and
  ref with loads masked by it, so unmasked rows are never read (a masked-off program only writes zeros). The row of
  D features is read in BLOCK_D chunks (one chunk for D <= 4096) and reduced in float32.
- Layers are reached through a device table of int64 base addresses (one entry per layer, cast to typed pointers in
  the kernel), so a list of L per-layer tensors, as a model returns them, costs one launch and no stacking copy.
  A stacked [L, B, T, D] tensor goes through the same table (its layer views). Within a layer, rows are addressed
  with the caller's strides (b, t, d), so transposed views and strided slices are read in place. The table is built
  on the host from `data_ptr()`s (host metadata, no device sync) and copied from pinned memory without blocking.
- The forward writes each row's l2 and cos into a [2, L, B*T] float32 buffer (zeros for unmasked rows) reduced with
  torch.sum: deterministic, no atomics. It also keeps three float32 coefficients per row for the backward, so the
  backward reads each masked row of hidden and ref exactly once:
      dL/dh = g_l2[l] * (h - r) / ||h - r||                      (0 where h == r: the norm's subgradient at 0)
            + g_cos[l] * (r / (n_h n_r) - cos * h / (n_h |h|))   (second term 0 where |h| == 0)
  with n_h = max(|h|, eps), n_r = max(|r|, eps), cos = <h, r> / (n_h n_r), eps = 1e-8. This is exactly what autograd
  gives for torch.nn.functional.cosine_similarity in torch 2.x, which clamps each norm separately at eps (under
  no_grad) and lets the gradient flow through the unclamped norm; checked in the tests with tiny-norm rows.
- A gathered ref [L, N, D] is indexed by the exclusive cumsum of the mask (computed on device).
- No host sync: the token count stays a device tensor; nothing branches on data in Python.
"""
from __future__ import annotations

import contextlib
from typing import Sequence, Union

import torch
import triton
import triton.language as tl
from torch import nn

from ._dispatch import resolve_impl
from .reference import RepDistance, rep_distance_torch

__all__ = ["RepDistance", "rep_distance", "RepDistanceLoss"]

COS_EPS = 1e-8  # torch.nn.functional.cosine_similarity's default eps
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

Layers = Union[torch.Tensor, Sequence[torch.Tensor]]


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _row_pointers(h_ptr, r_ptr, tab_ptr, ref_row_ptr, row, layer, T,
                  h_stride_b, h_stride_t, r_stride_b, r_stride_t,
                  TAB_COLS: tl.constexpr, R_GATHERED: tl.constexpr, ALIGNED: tl.constexpr):
    """Typed pointers to the start of row `row` (= b * T + t) of `layer` in hidden and ref."""
    h_base = tl.load(tab_ptr + layer * TAB_COLS).to(tl.pointer_type(h_ptr.dtype.element_ty), bitcast=True)
    r_base = tl.load(tab_ptr + layer * TAB_COLS + 1).to(tl.pointer_type(r_ptr.dtype.element_ty), bitcast=True)
    if ALIGNED:  # every base address is 16-byte aligned: lets the compiler vectorise the row loads
        h_base = tl.multiple_of(h_base, 16)
        r_base = tl.multiple_of(r_base, 16)
    b = (row // T).to(tl.int64)
    t = (row % T).to(tl.int64)
    h_row = h_base + b * h_stride_b + t * h_stride_t
    if R_GATHERED:  # ref is [L, N, D]: its row index is the number of masked rows before this one
        r_row = r_base + tl.load(ref_row_ptr + row).to(tl.int64) * r_stride_b
    else:
        r_row = r_base + b * r_stride_b + t * r_stride_t
    return h_row, r_row


@triton.jit
def _rep_distance_fwd_kernel(
    h_ptr, r_ptr,  # typed pointers (layer 0) giving the element types; addresses come from tab_ptr
    tab_ptr,  # int64 [L, 2]: base address of each layer of hidden, ref
    keep_ptr,  # int32 [B*T]: 1 for a masked (kept) token
    ref_row_ptr,  # int32 [B*T]: exclusive cumsum of keep (gathered ref only)
    out_ptr,  # fp32 [2, L, B*T]: per-row l2 and cos
    coef_ptr,  # fp32 [L, B*T, 3]: per-row backward coefficients
    BT, T, D,
    h_stride_b, h_stride_t, h_stride_d,
    r_stride_b, r_stride_t, r_stride_d,
    eps,
    R_GATHERED: tl.constexpr, ALIGNED: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)
    layer = tl.program_id(1)
    n_layers = tl.num_programs(1)
    on = tl.load(keep_ptr + row) != 0
    h_row, r_row = _row_pointers(h_ptr, r_ptr, tab_ptr, ref_row_ptr, row, layer, T,
                                 h_stride_b, h_stride_t, r_stride_b, r_stride_t, 2, R_GATHERED, ALIGNED)

    acc_dd = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_hh = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_rr = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_hr = tl.zeros([BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs = d0 + tl.arange(0, BLOCK_D)
        ld = (offs < D) & on  # an unmasked token loads nothing
        h = tl.load(h_row + offs * h_stride_d, mask=ld, other=0.0).to(tl.float32)
        r = tl.load(r_row + offs * r_stride_d, mask=ld, other=0.0).to(tl.float32)
        diff = h - r
        acc_dd += diff * diff
        acc_hh += h * h
        acc_rr += r * r
        acc_hr += h * r
    dist = tl.sqrt_rn(tl.sum(acc_dd, axis=0))
    norm_h = tl.sqrt_rn(tl.sum(acc_hh, axis=0))
    norm_r = tl.sqrt_rn(tl.sum(acc_rr, axis=0))
    den_h = tl.maximum(norm_h, eps)
    den_r = tl.maximum(norm_r, eps)
    inv_den = 1.0 / (den_h * den_r)
    cos = tl.sum(acc_hr, axis=0) * inv_den

    # d cos / dh = r * inv_den - cos * h / (den_h * |h|); d dist / dh = (h - r) / dist; both 0 at a zero norm
    inv_dist = tl.where(dist > 0.0, 1.0 / tl.maximum(dist, 1e-38), 0.0)
    c_h = tl.where(norm_h > 0.0, cos / (den_h * tl.maximum(norm_h, 1e-38)), 0.0)
    # an unmasked token loaded only zeros: dist = cos = 0 without a select (so a stray read would show in tests)
    tl.store(out_ptr + layer * BT + row, dist)
    tl.store(out_ptr + (n_layers + layer) * BT + row, cos)
    zero = 0.0
    c = coef_ptr + (layer.to(tl.int64) * BT + row) * 3
    tl.store(c, tl.where(on, inv_dist, zero))
    tl.store(c + 1, tl.where(on, inv_den, zero))
    tl.store(c + 2, tl.where(on, c_h, zero))


@triton.jit
def _rep_distance_bwd_kernel(
    h_ptr, r_ptr, g_ptr,  # typed pointers giving the element types of hidden, ref, grad
    tab_ptr,  # int64 [L', 4]: base address of hidden, ref, grad, and the layer index, for each layer needing a grad
    keep_ptr, ref_row_ptr,
    coef_ptr,  # fp32 [L, B*T, 3] from the forward
    grad_l2_ptr, grad_cos_ptr,  # fp32 [L]: upstream gradients
    BT, T, D,
    h_stride_b, h_stride_t, h_stride_d,
    r_stride_b, r_stride_t, r_stride_d,
    R_GATHERED: tl.constexpr, ALIGNED: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)
    slot = tl.program_id(1)
    on = tl.load(keep_ptr + row) != 0
    h_row, r_row = _row_pointers(h_ptr, r_ptr, tab_ptr, ref_row_ptr, row, slot, T,
                                 h_stride_b, h_stride_t, r_stride_b, r_stride_t, 4, R_GATHERED, ALIGNED)
    g_base = tl.load(tab_ptr + slot * 4 + 2).to(tl.pointer_type(g_ptr.dtype.element_ty), bitcast=True)
    if ALIGNED:
        g_base = tl.multiple_of(g_base, 16)
    g_row = g_base + row.to(tl.int64) * D  # grads are contiguous [B, T, D] per layer
    layer = tl.load(tab_ptr + slot * 4 + 3)

    c = coef_ptr + (layer * BT + row) * 3
    inv_dist = tl.load(c)
    inv_den = tl.load(c + 1)
    c_h = tl.load(c + 2)
    g_l2 = tl.load(grad_l2_ptr + layer)
    g_cos = tl.load(grad_cos_ptr + layer)
    # grad = a_h * h + a_r * r
    a_h = g_l2 * inv_dist - g_cos * c_h
    a_r = g_cos * inv_den - g_l2 * inv_dist
    for d0 in range(0, D, BLOCK_D):
        offs = d0 + tl.arange(0, BLOCK_D)
        in_row = offs < D
        ld = in_row & on
        h = tl.load(h_row + offs * h_stride_d, mask=ld, other=0.0).to(tl.float32)
        r = tl.load(r_row + offs * r_stride_d, mask=ld, other=0.0).to(tl.float32)
        g = a_h * h + a_r * r  # exactly 0 for an unmasked token (h = r = 0 and its coefficients are 0)
        tl.store(g_row + offs, g.to(g_ptr.dtype.element_ty), mask=in_row)


# ----------------------------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------------------------
def _launch_config(D: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_D, num_warps) for rows of D features of `dtype`.

    A whole row up to D = 4096 is one chunk; longer rows loop over 4096-wide chunks. 4096 features over 8 warps is
    16 per thread per operand (two 16-byte loads of bf16, four of fp32). Measured for sm_90 with tests/hopper.py
    (ptxas of triton 3.7.1), D = 4096: forward 98 (bf16) / 99 (fp32) registers, backward 32 / 40, no spills, vector
    loads. (4 warps would need ~170 registers in the forward; 16 warps ~56.)
    """
    block_d = min(triton.next_power_of_2(max(int(D), 1)), 4096)
    num_warps = max(1, min(8, block_d // 512))
    return block_d, num_warps


def _pointer_table(rows: list[list[int]], device: torch.device) -> torch.Tensor:
    """int64 [len(rows), len(rows[0])] on `device`; on CUDA copied from pinned memory without blocking the host."""
    if device.type != "cuda":
        return torch.tensor(rows, dtype=torch.int64, device=device)
    return torch.tensor(rows, dtype=torch.int64, pin_memory=True).to(device, non_blocking=True)


def _on_device(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _same_strides(layers: list[torch.Tensor]) -> list[torch.Tensor]:
    """Layers sharing one stride pattern, as the kernel takes one (b, t, d) stride set for all layers.

    Layers of a stacked tensor and a model's per-layer outputs already do; otherwise make them contiguous.
    """
    if all(x.stride() == layers[0].stride() for x in layers):
        return layers
    return [x.contiguous() for x in layers]


def _aligned(addresses: list[int]) -> bool:
    """All base addresses 16-byte aligned (the row strides' divisibility Triton specialises on by itself)."""
    return all(a % 16 == 0 for a in addresses)


class _RepDistanceFunction(torch.autograd.Function):
    """apply(hidden_stacked, n_hidden, ref_gathered, keep, ref_row, *hidden_tensors, *ref_tensors) -> (l2, cos)."""

    @staticmethod
    def forward(ctx, hidden_stacked, n_hidden, ref_gathered, keep, ref_row, *tensors):
        hidden_in, ref_in = tensors[:n_hidden], tensors[n_hidden:]
        hs = _same_strides(list(hidden_in[0].unbind(0)) if hidden_stacked else list(hidden_in))  # L x [B, T, D]
        if ref_gathered:
            rs = list(ref_in[0].unbind(0))  # L x [N, D]
        else:
            rs = _same_strides(list(ref_in[0].unbind(0)) if ref_in[0].dim() == 4 else list(ref_in))
        L, (B, T, D) = len(hs), hs[0].shape
        BT, dev = B * T, hs[0].device
        out = torch.empty((2, L, BT), dtype=torch.float32, device=dev)
        coef = torch.empty((L, BT, 3), dtype=torch.float32, device=dev)
        if BT > 0 and D > 0:
            h_addr, r_addr = [x.data_ptr() for x in hs], [x.data_ptr() for x in rs]
            aligned = _aligned(h_addr + r_addr)
            tab = _pointer_table([[a, b] for a, b in zip(h_addr, r_addr)], dev)
            block_d, num_warps = _launch_config(D, hs[0].dtype)
            hsb, hst, hsd = hs[0].stride()
            if ref_gathered:
                (rsb, rsd), rst = rs[0].stride(), 0
            else:
                rsb, rst, rsd = rs[0].stride()
            with _on_device(dev):
                _rep_distance_fwd_kernel[(BT, L)](
                    hs[0], rs[0], tab, keep, ref_row, out, coef,
                    BT, T, D, hsb, hst, hsd, rsb, rst, rsd, COS_EPS,
                    R_GATHERED=ref_gathered, ALIGNED=aligned, BLOCK_D=block_d, num_warps=num_warps,
                )
        else:
            out.zero_()
            coef.zero_()
        ctx.hidden_stacked, ctx.n_hidden, ctx.ref_gathered = hidden_stacked, n_hidden, ref_gathered
        ctx.save_for_backward(keep, ref_row, coef, *tensors)
        return out[0].sum(dim=-1), out[1].sum(dim=-1)  # l2 [L], cos [L]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_l2, grad_cos):
        keep, ref_row, coef, *tensors = ctx.saved_tensors
        n_hidden, stacked = ctx.n_hidden, ctx.hidden_stacked
        hidden_in, ref_in = tensors[:n_hidden], tensors[n_hidden:]
        needs = ctx.needs_input_grad[5:5 + n_hidden]
        if not any(needs):
            return (None,) * (5 + len(tensors))
        hs = list(hidden_in[0].unbind(0)) if stacked else list(hidden_in)
        hs_uniform = _same_strides(hs)
        rs = list(ref_in[0].unbind(0)) if (ctx.ref_gathered or ref_in[0].dim() == 4) else list(ref_in)
        rs = rs if ctx.ref_gathered else _same_strides(rs)
        L, (B, T, D) = len(hs), hs[0].shape
        BT, dev, dtype = B * T, hs[0].device, hs[0].dtype
        if stacked:
            grad_stacked = torch.empty((L, B, T, D), dtype=dtype, device=dev)
            gs = list(grad_stacked.unbind(0))
            layers = list(range(L))
        else:
            layers = [i for i in range(L) if needs[i]]
            gs = [torch.empty((B, T, D), dtype=dtype, device=dev) if needs[i] else None for i in range(L)]
        if BT > 0 and D > 0 and layers:
            rows = [[hs_uniform[i].data_ptr(), rs[i].data_ptr(), gs[i].data_ptr(), i] for i in layers]
            aligned = _aligned([a for r in rows for a in r[:3]])
            tab = _pointer_table(rows, dev)
            block_d, num_warps = _launch_config(D, dtype)
            hsb, hst, hsd = hs_uniform[0].stride()
            if ctx.ref_gathered:
                (rsb, rsd), rst = rs[0].stride(), 0
            else:
                rsb, rst, rsd = rs[0].stride()
            g_l2 = grad_l2.detach().to(torch.float32).contiguous()
            g_cos = grad_cos.detach().to(torch.float32).contiguous()
            with _on_device(dev):
                _rep_distance_bwd_kernel[(BT, len(layers))](
                    hs_uniform[0], rs[0], gs[layers[0]], tab, keep, ref_row, coef, g_l2, g_cos,
                    BT, T, D, hsb, hst, hsd, rsb, rst, rsd,
                    R_GATHERED=ctx.ref_gathered, ALIGNED=aligned, BLOCK_D=block_d, num_warps=num_warps,
                )
        elif layers:
            for i in layers:
                gs[i].zero_()
        grads = (grad_stacked,) if stacked else tuple(gs)
        return (None, None, None, None, None) + grads + (None,) * (len(tensors) - n_hidden)


# ----------------------------------------------------------------------------------------------------------------
# Public function and module
# ----------------------------------------------------------------------------------------------------------------
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


def rep_distance(hidden: Layers, ref: Layers, mask: torch.Tensor, impl: str = "auto") -> RepDistance:
    """Per-layer sums of ||hidden - ref||_2 and cos(hidden, ref) over the masked tokens.

    Args:
        hidden: [L, B, T, D] tensor, or a sequence of L tensors [B, T, D] (e.g. a model's hidden states, unstacked);
            float32 / bfloat16 / float16, all layers one dtype and device. Any strides.
        ref: constant (no gradient flows into it), float32 / bfloat16 / float16. Either the same shapes as hidden
            ([L, B, T, D] tensor or L tensors [B, T, D]), or gathered: one [L, N, D] tensor holding the N masked rows
            of each layer in row-major (b, t) order (N must equal the number of masked tokens).
        mask: [B, T], bool or 0/1 integers; nonzero marks a token to count.
        impl: "auto" (Triton on CUDA, eager PyTorch on CPU), "triton" (CPU needs TRITON_INTERPRET=1) or "torch".

    Returns RepDistance(l2, cos, count):
        l2[l]  = sum over masked (b, t) of ||hidden[l, b, t] - ref[l, b, t]||_2          float32 [L]
        cos[l] = sum over masked (b, t) of h.r / (max(|h|, 1e-8) * max(|r|, 1e-8))     float32 [L]
                 (= torch.nn.functional.cosine_similarity(h, r, dim=-1))
        count  = number of masked tokens                                               int64 0-dim, on device
    Differentiable in hidden only; the gradient of the norm at hidden == ref is 0. Gradients come back in hidden's
    form (stacked tensor or one tensor per layer) and dtype; unmasked tokens get zero gradient.
    """
    hidden_stacked, hidden_list = _as_layers(hidden, "hidden")
    if hidden_stacked:
        if hidden_list[0].dim() != 4:
            raise ValueError(f"rep_distance: stacked hidden must be [L, B, T, D], "
                             f"got shape {tuple(hidden_list[0].shape)}")
        L, B, T, D = hidden_list[0].shape
    else:
        B_T_D = hidden_list[0].shape
        for i, t in enumerate(hidden_list):
            if t.dim() != 3 or t.shape != B_T_D:
                raise ValueError(f"rep_distance: hidden[{i}] must be [B, T, D] = {tuple(B_T_D)} like hidden[0], "
                                 f"got shape {tuple(t.shape)}")
            if t.dtype != hidden_list[0].dtype or t.device != hidden_list[0].device:
                raise ValueError(f"rep_distance: hidden[{i}] is {t.dtype} on {t.device}, hidden[0] is "
                                 f"{hidden_list[0].dtype} on {hidden_list[0].device}")
        L, (B, T, D) = len(hidden_list), B_T_D
    if L == 0:
        raise ValueError("rep_distance: hidden has no layers (L = 0)")
    _check_float(hidden_list[0], "hidden")
    device = hidden_list[0].device

    if isinstance(ref, torch.Tensor) and ref.dim() == 3:
        ref_gathered, ref_list = True, [ref]
        if ref.shape[0] != L or ref.shape[2] != D:
            raise ValueError(f"rep_distance: gathered ref must be [L, N, D] = [{L}, N, {D}], got {tuple(ref.shape)}")
    else:
        ref_gathered = False
        ref_is_stacked, ref_list = _as_layers(ref, "ref")
        shapes = [tuple(ref_list[0].shape)] if ref_is_stacked else [tuple(t.shape) for t in ref_list]
        expect = [(L, B, T, D)] if ref_is_stacked else [(B, T, D)] * L
        if shapes != expect:
            raise ValueError(f"rep_distance: ref must be like hidden ([L, B, T, D] = {(L, B, T, D)} or {L} x "
                             f"[B, T, D]) or gathered [L, N, D]; got shapes {shapes}")
    for i, t in enumerate(ref_list):
        _check_float(t, f"ref[{i}]" if len(ref_list) > 1 else "ref")
        if t.device != device:
            raise ValueError(f"rep_distance: ref is on {t.device}, hidden on {device}")
        if t.dtype != ref_list[0].dtype:
            raise ValueError(f"rep_distance: ref[{i}] is {t.dtype}, ref[0] is {ref_list[0].dtype}")
    if not isinstance(mask, torch.Tensor) or mask.shape != (B, T):
        raise ValueError(f"rep_distance: mask must be a [B, T] = {(B, T)} tensor, got "
                         f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    if mask.is_floating_point() or mask.is_complex():
        raise TypeError(f"rep_distance: mask must be bool or integer 0/1, got {mask.dtype}")
    if mask.device != device:
        raise ValueError(f"rep_distance: mask is on {mask.device}, hidden on {device}")

    keep = mask.reshape(-1).ne(0)  # [B*T]
    if ref_gathered:
        if device.type == "cuda":  # checked on the device: no host sync
            torch._assert_async(keep.sum() == ref_list[0].shape[1], "rep_distance: gathered ref rows != masked tokens")
        elif int(keep.sum()) != ref_list[0].shape[1]:
            raise ValueError(f"rep_distance: gathered ref has N = {ref_list[0].shape[1]} rows per layer but the mask "
                             f"has {int(keep.sum())} masked tokens")

    if resolve_impl(impl, device) == "torch":
        return rep_distance_torch(hidden, ref, mask)

    keep_i32 = keep.to(torch.int32)
    ref_row = (torch.cumsum(keep_i32, 0, dtype=torch.int32) - keep_i32) if ref_gathered else keep_i32
    ref_list = [t.detach() for t in ref_list]
    l2, cos = _RepDistanceFunction.apply(hidden_stacked, len(hidden_list), ref_gathered, keep_i32, ref_row,
                                         *hidden_list, *ref_list)
    return RepDistance(l2, cos, keep.sum())


class RepDistanceLoss(nn.Module):
    """nn.Module form of `rep_distance`: forward(hidden, ref, mask) -> RepDistance(l2 [L], cos [L], count)."""

    def __init__(self, impl: str = "auto"):
        super().__init__()
        self.impl = impl

    def forward(self, hidden: Layers, ref: Layers, mask: torch.Tensor) -> RepDistance:
        return rep_distance(hidden, ref, mask, impl=self.impl)

    def extra_repr(self) -> str:
        return f"impl={self.impl!r}"
