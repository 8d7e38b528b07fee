"""Eager PyTorch versions of the RepBend kernels: the readable definition each Triton op must reproduce.

These run on any device and upcast to float32 before any arithmetic; they are what `impl="torch"` (and
`impl="auto"` on CPU tensors) runs. rep_distance_torch and pairwise_cosine_loss_torch are differentiable by
autograd; kl_rows_torch (with softcap_torch) is the eager twin of linear_kl's row kernel, which forms its gradient
explicitly (linear_kl runs it chunk by chunk between its matmuls).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence, Union

import torch
import torch.nn.functional as F

__all__ = ["RepDistance", "rep_distance_torch", "pairwise_cosine_loss_torch", "mask_rows", "check_rows",
           "softcap_torch", "kl_rows_torch", "linear_logprob_reference"]

Layers = Union[torch.Tensor, Sequence[torch.Tensor]]


class RepDistance(NamedTuple):
    """Per-layer sums over the masked tokens (see `rep_distance`).

    l2:       [L] float32, sum of ||hidden - ref||_2 over masked tokens.
    cos:      [L] float32, sum of cosine_similarity(hidden, ref) over masked tokens.
    count:    0-dim int64, number of masked tokens (the same for every layer).
    relu_cos: [L] float32, sum of max(cosine_similarity(hidden, ref), 0) (Circuit Breakers' term).
    sq:       [L] float32, sum of ||hidden - ref||_2^2 (RMU's term).
    """

    l2: torch.Tensor
    cos: torch.Tensor
    count: torch.Tensor
    relu_cos: torch.Tensor
    sq: torch.Tensor


def mask_rows(mask: torch.Tensor) -> torch.Tensor:
    """int64 [N]: the flat positions b * T + t of the nonzero entries of a [B, T] mask, ascending.

    Reads the mask's values, so on CUDA the host waits for the device (an index tensor built on the host avoids it).
    """
    return mask.reshape(-1).nonzero().squeeze(1)


def check_rows(rows: torch.Tensor, n_positions: int, op: str) -> None:
    """Assert (asynchronously on CUDA, at once on the CPU) that rows are ascending, unique and in [0, n_positions)."""
    if rows.numel() == 0:
        return
    ok = (rows[0] >= 0) & (rows[-1] < n_positions) & (rows[1:] > rows[:-1]).all()
    torch._assert_async(ok, f"{op}: the row indices must be ascending, unique and in [0, B*T = {n_positions})")


def rep_distance_torch(hidden: Layers, ref: Layers, mask: torch.Tensor) -> RepDistance:
    """Eager `rep_distance`: same arguments and result (shapes are validated by `rep_distance`).

    hidden: [L, B, T, D] or L tensors [B, T, D]; ref: the same shapes, or gathered [L, N, D] (row i belongs to the
    i-th selected position); mask: [B, T] bool or 0/1, or int64 [N] flat positions b * T + t (ascending, unique).
    For each layer l, over the selected (b, t):
        l2[l]       = sum ||h - r||_2                                  (gradient 0 where h == r)
        cos[l]      = sum F.cosine_similarity(h, r, dim=-1, eps=1e-8)  (= h.r / (max(|h|, eps) * max(|r|, eps)))
        relu_cos[l] = sum relu(cos)                                    (gradient 0 where cos == 0)
        sq[l]       = sum ||h - r||_2^2
    """
    h0 = hidden[0]
    B, T, D = h0.shape[-3:]
    rows = mask_rows(mask) if mask.dim() == 2 else mask.to(torch.int64)
    check_rows(rows, B * T, "rep_distance")
    gathered = isinstance(ref, torch.Tensor) and ref.dim() == 3
    l2, cos, relu_cos, sq = [], [], [], []
    for layer in range(len(hidden)):
        h = hidden[layer].reshape(B * T, D).index_select(0, rows).float()  # (N, D) in row order
        r = ref[layer] if gathered else ref[layer].reshape(B * T, D).index_select(0, rows)
        r = r.detach().float()  # ref is a constant
        diff = h - r
        # vector_norm's gradient at a zero vector is 0 (its subgradient), not NaN: LoRA starts at h == r.
        l2.append(torch.linalg.vector_norm(diff, dim=-1).sum())
        c = F.cosine_similarity(h, r, dim=-1)
        cos.append(c.sum())
        relu_cos.append(torch.relu(c).sum())
        sq.append(diff.square().sum())
    count = torch.full((), rows.shape[0], dtype=torch.int64, device=h0.device)
    return RepDistance(torch.stack(l2), torch.stack(cos), count, torch.stack(relu_cos), torch.stack(sq))


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


def softcap_torch(z: torch.Tensor, dz: torch.Tensor, cap: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gemma-2's soft-capping c(z) = cap * tanh(z / cap) on fp32 tensors: (c(z), c(z + dz) - c(z), c'(z + dz)),
    the change relative to dz (see linear_kl's module docstring).

    Same formulas as linear_kl's `_scaled_logits`, with torch.tanh for tanh(a) and tanh(d) (accurate for small
    arguments).
    """
    def parts(x):  # tanh, 1 - |tanh|, sech^2 from u = exp(-2|x|)
        u = torch.exp(-2.0 * x.abs())
        inv = 1.0 / (1.0 + u)
        m = 2.0 * u * inv
        return torch.where(x < 0, -(1.0 - u) * inv, (1.0 - u) * inv), m, 2.0 * m * inv

    a, d = z / cap, dz / cap
    (_, m_a, sech2_a), t_a, t_d = parts(a), torch.tanh(a), torch.tanh(d)
    t_ad, m_ad, sech2_ad = parts(a + d)
    same_sign = (a < 0) == (a + d < 0)
    plain = torch.where(same_sign, torch.where(a < 0, m_ad - m_a, m_a - m_ad), t_ad - t_a)
    den = 1.0 + t_a * t_d
    use_product = den >= 0.5
    change = torch.where(use_product, t_d * sech2_a / torch.where(use_product, den, 1.0), plain)
    return cap * t_a, cap * change, sech2_ad


def kl_rows_torch(ref_logits: torch.Tensor, delta_logits: torch.Tensor, temperature: float, softcap: float | None,
                  compute_grad: bool):
    """Eager twin of linear_kl's `_kl_rows_kernel` on a [C, V] chunk: (loss [C] fp32, grad [C, V] fp32 or None).

    Works in place on fp32 copies of its inputs (or on the inputs themselves when they are fp32: the caller passes
    fresh matmul outputs).
    """
    inv_t = 1.0 / temperature
    slope = None
    if softcap is None:
        zp = ref_logits.float().mul_(inv_t)
        x = delta_logits.float().mul_(inv_t)
    else:
        zp, x, slope = softcap_torch(ref_logits.float(), delta_logits.float(), float(softcap))
        zp.mul_(inv_t)
        x.mul_(inv_t)
    m_p = zp.amax(dim=-1, keepdim=True)
    m_q = torch.add(zp, x).amax(dim=-1, keepdim=True)
    zp.sub_(m_p)  # zp - m_p
    e_q = zp.add(m_p - m_q).add_(x).exp_()  # exp((zp - m_q) + x)
    e_p = zp.exp_()
    s_p = e_p.sum(dim=-1, keepdim=True)
    s_q = e_q.sum(dim=-1, keepdim=True)
    mean_x = torch.linalg.vecdot(e_p, x).unsqueeze(-1).div_(s_p)  # E_p[x]
    kl = (m_q - m_p) + torch.log(s_q / s_p) - mean_x
    loss = kl.squeeze(-1).mul_(temperature * temperature)
    if not compute_grad:
        return loss, None
    grad = e_q.mul_(temperature / s_q).sub_(e_p.mul_(temperature / s_p))  # T * (q - p)
    if slope is not None:
        grad.mul_(slope)
    return loss, grad


def linear_logprob_reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                             softcap: float | None = None) -> torch.Tensor:
    """Eager `linear_logprob` with full [N, V] logits, differentiable by autograd: hidden [N, D], weight [V, D],
    labels int64 [N] -> log_softmax(c(hidden @ weight^T), -1)[n, labels[n]], c(z) = cap * tanh(z / cap) or z.

    Computes in float32, or float64 when given float64 inputs (the tests' exact side).
    """
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    z = hidden.to(dtype) @ weight.to(dtype).t()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return torch.log_softmax(z, dim=-1).gather(1, labels.unsqueeze(1)).squeeze(1)
