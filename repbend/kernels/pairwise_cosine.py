"""Mean pairwise cosine distance between the vectors of each layer (the RepBend L_cos term).

    loss = mean over l of  1/(N(N-1)) * sum over ordered pairs i != j of (1 - <u[l,i], u[l,j]>)
    u = F.normalize(x, dim=-1)  (x / max(||x||, 1e-12))

With s = sum_i u_i, sum_{i != j} <u_i, u_j> = ||s||^2 - sum_i ||u_i||^2, so no N x N matrix is formed.

Triton design: the work is tiny (N = 2B vectors per layer, e.g. 8 x 4096 for 11 layers), so launches dominate its
cost on a GPU. Measured (torch.profiler on CPU, [11, 8, 4096] bf16; no GPU was available for timing): the eager
version runs about 14 compute ops forward and 29 backward, each a kernel launch on a GPU; this path is one kernel
forward (+ a torch mean) and one kernel backward, so it is what `impl="triton"` / CUDA `auto` use.
One program per layer holds a [BLOCK_N, BLOCK_D] tile of its N rows: pass 1 sums squares into the row norms, pass 2
forms s chunk by chunk and ||s||^2. The forward writes the per-layer losses [L] (the mean over layers is a torch op)
and keeps s [L, D] and the norms [L, N] (float32), so the backward is two passes over x per layer, with g_l the
upstream gradient of layer l's loss:
    du_i = -2 g_l / (N (N-1)) * (s - u_i)
    dx_i = du_i / n_i - [||x_i|| >= eps] * u_i <u_i, du_i> / n_i,   n_i = max(||x_i||, eps)
which is autograd's gradient of F.normalize (clamp_min passes the gradient where ||x|| >= eps; the norm's
gradient at 0 is 0). N > BLOCK_N_MAX = 1024 vectors per layer (far above the method's N = 2B) runs the eager code.
Both kernels are custom ops (repbend::pairwise_cosine_fwd / _bwd) with autograd registered: torch.compile traces
them without a graph break. Loops run over constexpr chunk counts (see _dispatch.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import nn

from ._dispatch import num_chunks, on_device, resolve_impl
from .reference import pairwise_cosine_loss_torch

__all__ = ["pairwise_cosine_loss", "PairwiseCosineLoss"]

NORMALIZE_EPS = 1e-12  # F.normalize's default eps
BLOCK_N_MAX = 1024
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit(do_not_specialize=("N",))
def _pairwise_cosine_fwd_kernel(
    x_ptr,  # [L, N, D], any strides
    loss_ptr,  # fp32 [L]: per-layer mean over pairs of 1 - cos
    s_ptr,  # fp32 [L, D]: s = sum_i u_i, for the backward
    norm_ptr,  # fp32 [L, N]: ||x_i||, for the backward
    N, D,
    stride_l, stride_n, stride_d,
    eps,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, NUM_CHUNKS: tl.constexpr,
):
    layer = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK_N)
    row_ok = rows < N
    x_rows = x_ptr + layer * stride_l + rows[:, None].to(tl.int64) * stride_n  # [BLOCK_N, 1]

    acc_sq = tl.zeros([BLOCK_N], dtype=tl.float32)
    for c in range(NUM_CHUNKS):
        offs = c * BLOCK_D + tl.arange(0, BLOCK_D)
        ok = row_ok[:, None] & (offs < D)[None, :]
        x = tl.load(x_rows + offs[None, :] * stride_d, mask=ok, other=0.0).to(tl.float32)
        acc_sq += tl.sum(x * x, axis=1)
    norm = tl.sqrt_rn(acc_sq)
    inv = 1.0 / tl.maximum(norm, eps)  # padding rows: x = 0, so they add nothing below

    acc_ss = tl.zeros([BLOCK_D], dtype=tl.float32)
    for c in range(NUM_CHUNKS):
        offs = c * BLOCK_D + tl.arange(0, BLOCK_D)
        ok = row_ok[:, None] & (offs < D)[None, :]
        x = tl.load(x_rows + offs[None, :] * stride_d, mask=ok, other=0.0).to(tl.float32)
        s = tl.sum(x * inv[:, None], axis=0)
        tl.store(s_ptr + layer * D + offs, s, mask=offs < D)
        acc_ss += s * s
    u_sq = norm * inv
    uu = tl.sum(tl.where(row_ok, u_sq * u_sq, 0.0), axis=0)  # sum_i ||u_i||^2 (1 unless ||x_i|| < eps)
    pairs = tl.cast(N * (N - 1), tl.float32)
    tl.store(loss_ptr + layer, 1.0 - (tl.sum(acc_ss, axis=0) - uu) / pairs)
    tl.store(norm_ptr + layer * N + rows, norm, mask=row_ok)


@triton.jit(do_not_specialize=("N",))
def _pairwise_cosine_bwd_kernel(
    x_ptr, dx_ptr,  # [L, N, D] (any strides), dx contiguous [L, N, D] in x's dtype
    s_ptr, norm_ptr,  # from the forward
    grad_ptr,  # fp32 [L]: upstream gradient of each layer's loss
    N, D,
    stride_l, stride_n, stride_d,
    eps,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, NUM_CHUNKS: tl.constexpr,
):
    layer = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK_N)
    row_ok = rows < N
    x_rows = x_ptr + layer * stride_l + rows[:, None].to(tl.int64) * stride_n
    dx_rows = dx_ptr + (layer * N + rows[:, None].to(tl.int64)) * D
    scale = -2.0 * tl.load(grad_ptr + layer) / tl.cast(N * (N - 1), tl.float32)  # du_i = scale * (s - u_i)

    norm = tl.load(norm_ptr + layer * N + rows, mask=row_ok, other=0.0)
    den = tl.maximum(norm, eps)
    inv = 1.0 / den
    u_sq = norm * inv
    # <u_i, du_i> = scale * (<u_i, s> - ||u_i||^2), <u_i, s> = inv_i <x_i, s>
    acc_xs = tl.zeros([BLOCK_N], dtype=tl.float32)
    for c in range(NUM_CHUNKS):
        offs = c * BLOCK_D + tl.arange(0, BLOCK_D)
        ok = row_ok[:, None] & (offs < D)[None, :]
        x = tl.load(x_rows + offs[None, :] * stride_d, mask=ok, other=0.0).to(tl.float32)
        s = tl.load(s_ptr + layer * D + offs, mask=offs < D, other=0.0)
        acc_xs += tl.sum(x * s[None, :], axis=1)
    u_du = scale * (inv * acc_xs - u_sq * u_sq)
    proj = tl.where(norm >= eps, u_du * inv, 0.0)  # the clamped norm passes no gradient

    for c in range(NUM_CHUNKS):
        offs = c * BLOCK_D + tl.arange(0, BLOCK_D)
        ok = row_ok[:, None] & (offs < D)[None, :]
        x = tl.load(x_rows + offs[None, :] * stride_d, mask=ok, other=0.0).to(tl.float32)
        s = tl.load(s_ptr + layer * D + offs, mask=offs < D, other=0.0)
        u = x * inv[:, None]
        du = scale * (s[None, :] - u)
        dx = du * inv[:, None] - u * proj[:, None]
        tl.store(dx_rows + offs[None, :], dx.to(dx_ptr.dtype.element_ty), mask=ok)


def _launch_config(N: int, D: int) -> dict:
    """BLOCK_N, BLOCK_D, NUM_CHUNKS, num_warps: all N rows in one tile of at most 4096 elements (16 to 4096 in D)."""
    block_n = triton.next_power_of_2(max(int(N), 1))
    block_d = max(16, min(triton.next_power_of_2(max(int(D), 1)), 4096 // block_n))
    return {"BLOCK_N": block_n, "BLOCK_D": block_d, "NUM_CHUNKS": num_chunks(D, block_d), "num_warps": 4}


@torch.library.custom_op("repbend::pairwise_cosine_fwd", mutates_args=())
def pairwise_cosine_fwd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [L, N, D] (2 <= N <= BLOCK_N_MAX, D >= 1) -> (per-layer loss [L], s [L, D], norms [L, N]), all fp32."""
    L, N, D = x.shape
    loss = torch.empty(L, dtype=torch.float32, device=x.device)
    s = torch.empty((L, D), dtype=torch.float32, device=x.device)
    norm = torch.empty((L, N), dtype=torch.float32, device=x.device)
    with on_device(x.device):
        _pairwise_cosine_fwd_kernel[(L,)](x, loss, s, norm, N, D, *x.stride(), NORMALIZE_EPS, **_launch_config(N, D))
    return loss, s, norm


@pairwise_cosine_fwd.register_fake
def _(x):
    L, N, D = x.shape
    f32 = torch.float32
    return x.new_empty(L, dtype=f32), x.new_empty((L, D), dtype=f32), x.new_empty((L, N), dtype=f32)


@torch.library.custom_op("repbend::pairwise_cosine_bwd", mutates_args=())
def pairwise_cosine_bwd(grad: torch.Tensor, x: torch.Tensor, s: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """Gradient in x (x's dtype, contiguous [L, N, D]) of sum_l grad[l] * loss[l]."""
    L, N, D = x.shape
    dx = torch.empty((L, N, D), dtype=x.dtype, device=x.device)
    g = grad.detach().to(torch.float32).contiguous()
    with on_device(x.device):
        _pairwise_cosine_bwd_kernel[(L,)](x, dx, s, norm, g, N, D, *x.stride(), NORMALIZE_EPS,
                                          **_launch_config(N, D))
    return dx


@pairwise_cosine_bwd.register_fake
def _(grad, x, s, norm):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    _, s, norm = output
    ctx.save_for_backward(inputs[0], s, norm)
    ctx.mark_non_differentiable(s, norm)


def _backward(ctx, grad_loss, grad_s, grad_norm):
    x, s, norm = ctx.saved_tensors
    if grad_loss is None:
        return None
    return pairwise_cosine_bwd(grad_loss, x, s, norm)


pairwise_cosine_fwd.register_autograd(_backward, setup_context=_setup_context)


def pairwise_cosine_loss(x: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """Mean over layers of the mean over ordered pairs i != j of 1 - cos(x[l, i], x[l, j]).

    Args:
        x: [L, N, D] float32 / bfloat16 / float16 (L >= 1), any strides; e.g. the unsafe rows' hidden state at
            their last request token, for each target layer.
        impl: "auto" (Triton on CUDA, eager PyTorch on CPU), "triton" (CPU needs TRITON_INTERPRET=1) or "torch".
    Returns a 0-dim float32 tensor:
        mean_l 1/(N(N-1)) sum_{i != j} (1 - <u_li, u_lj>),  u = x / max(||x||_2, 1e-12) (as F.normalize)
    N < 2 gives a differentiable 0. Gradient in x's dtype.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"pairwise_cosine_loss: x must be a [L, N, D] tensor, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"pairwise_cosine_loss: x must be float32, bfloat16 or float16, got {x.dtype}")
    L, N, D = x.shape
    if L == 0:
        raise ValueError("pairwise_cosine_loss: x has no layers (L = 0)")
    path = resolve_impl(impl, x.device)
    if path == "torch" or N > BLOCK_N_MAX or D == 0:
        return pairwise_cosine_loss_torch(x)
    if N < 2:
        return x.float().sum() * 0.0
    loss, _, _ = pairwise_cosine_fwd(x)
    return loss.mean()


class PairwiseCosineLoss(nn.Module):
    """nn.Module form of `pairwise_cosine_loss`: forward(x [L, N, D]) -> 0-dim float32."""

    def __init__(self, impl: str = "auto"):
        super().__init__()
        self.impl = impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pairwise_cosine_loss(x, impl=self.impl)

    def extra_repr(self) -> str:
        return f"impl={self.impl!r}"
