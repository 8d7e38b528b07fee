"""Fused LM-head + temperature KL for the RepBend retain term, without ever holding `[N, V]` logits.

    loss = T^2 * sum_n KL( softmax(z_n / T) || softmax(z'_n / T) ),   z = ref_hidden @ W^T,  z' = hidden @ W^T

`ref_hidden` gives the reference (adapters off) distribution p, a constant: no gradient flows to `ref_hidden`, nor
to `weight` through it. `hidden` gives the trained distribution q. Per row, with zp = z/T, x = (z' - z)/T, zq = zp + x:

    KL(p || q) = -E_p[x] + (m_q - m_p) + log(S_q / S_p),    S_a = sum_v exp(za_v - m_a),  m_a ~ max_v za_v
    d loss / d z'_v = T^2 * (q_v - p_v) / T = T * (q_v - p_v)

The retain term lives near q = p (LoRA starts at zero), where the textbook log p - log q cancels catastrophically.
So the logit change z' - z = (hidden - ref_hidden) @ W^T gets its own matmul (instead of a second full logit matmul:
same cost), which rounds relative to the change, and the KL above never subtracts two full log-sum-exps.
hidden == ref_hidden gives exactly 0 and zero gradients.

Rows are processed in chunks of C rows so that the extra memory is O(C x V) in forward and backward:
  triton: per chunk two matmuls (cuBLAS, input dtype, fp32 accumulation) for z and z' - z, then one Triton program
          per row: an online pass over V tiles for max / sum-exp of both rows and the KL, and, when a gradient is
          needed, a second pass writing T * (q - p) over the z' - z buffer. Then grad_hidden = G @ W and, only if
          `weight` requires grad, grad_W += G^T @ hidden_chunk.
  torch:  the same math per chunk in eager PyTorch (fp32), used on CPU.
The gradient is computed during the forward and scaled by grad_output in backward (the loss is a scalar).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dispatch import resolve_impl

# Bytes of one [C, V] logit buffer per chunk. The Triton path holds two (in the input dtype); the eager path holds
# about four fp32 ones at its peak, hence its smaller budget. 256 MiB gives C = 1024 rows for V = 128256 in bf16,
# enough rows for the two GEMMs to run at full tensor-core speed.
TRITON_CHUNK_BYTES = 256 * 1024 * 1024
TORCH_CHUNK_BYTES = 32 * 1024 * 1024
# Vocabulary tile of the row kernel: 4096 fp32 values of each logit row per program of 8 warps is 16 values per
# thread per row, no spills on sm_90 (tests/test_linear_kl_compile.py).
MAX_BLOCK_V = 4096


@triton.jit
def _kl_rows_kernel(
    ref_ptr,  # [C, V] reference logits z = ref_hidden @ W^T (input dtype), read only
    delta_ptr,  # [C, V] logit change z' - z = (hidden - ref_hidden) @ W^T; overwritten with d loss / d z'
    loss_ptr,  # [C] fp32: T^2 * KL(p || q) per row
    stride_ref,
    stride_delta,
    V,
    temperature,
    BLOCK_V: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    ref_row = ref_ptr + row * stride_ref
    delta_row = delta_ptr + row * stride_delta
    inv_t = 1.0 / temperature
    cols = tl.arange(0, BLOCK_V)

    # Pass 1, online over V tiles: m_p, S_p of zp = z / T; m_q, S_q of zq = zp + x (x = delta / T);
    # acc = sum_v exp(zp_v - m_p) * x_v. zq is formed as (zp - m_q) + x so that its rounding stays relative to
    # the small numbers that carry the weight, not to |z|.
    m_p = tl.full([], float("-inf"), tl.float32)
    m_q = tl.full([], float("-inf"), tl.float32)
    s_p = tl.zeros([], tl.float32)
    s_q = tl.zeros([], tl.float32)
    acc = tl.zeros([], tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        mask = offs < V
        zp = tl.load(ref_row + offs, mask=mask, other=0.0).to(tl.float32) * inv_t
        x = tl.load(delta_row + offs, mask=mask, other=0.0).to(tl.float32) * inv_t
        zp = tl.where(mask, zp, float("-inf"))  # x stays 0 on masked lanes: no -inf - -inf

        m_p_new = tl.maximum(m_p, tl.max(zp, axis=0))
        scale_p = tl.exp(m_p - m_p_new)
        e_p = tl.exp(zp - m_p_new)
        s_p = s_p * scale_p + tl.sum(e_p, axis=0)
        acc = acc * scale_p + tl.sum(e_p * x, axis=0)
        m_p = m_p_new

        m_q_new = tl.maximum(m_q, tl.max(zp + x, axis=0))
        s_q = s_q * tl.exp(m_q - m_q_new) + tl.sum(tl.exp((zp - m_q_new) + x), axis=0)
        m_q = m_q_new

    # KL(p || q) = E_p[zp - zq] + lse_q - lse_p = -E_p[x] + (m_q - m_p) + log(S_q / S_p)
    kl = (m_q - m_p) + tl.log(s_q / s_p) - acc / s_p
    tl.store(loss_ptr + row, kl * temperature * temperature)

    if COMPUTE_GRAD:
        # Pass 2: d loss / d z'_v = T * (q_v - p_v), written over the logit change.
        log_s_p = tl.log(s_p)
        log_s_q = tl.log(s_q)
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            mask = offs < V
            zp = tl.load(ref_row + offs, mask=mask, other=0.0).to(tl.float32) * inv_t
            x = tl.load(delta_row + offs, mask=mask, other=0.0).to(tl.float32) * inv_t
            p = tl.exp((zp - m_p) - log_s_p)
            q = tl.exp(((zp - m_q) + x) - log_s_q)
            g = (q - p) * temperature
            tl.store(delta_row + offs, g.to(delta_ptr.dtype.element_ty), mask=mask)


def kl_rows_launch_config(V: int) -> dict:
    """Block size and warps of `_kl_rows_kernel` for a vocabulary of V (also used by the compile test)."""
    block_v = min(MAX_BLOCK_V, triton.next_power_of_2(max(V, 16)))
    num_warps = 8 if block_v >= 2048 else 4
    return {"BLOCK_V": block_v, "num_warps": num_warps}


def _chunk_rows(n: int, v: int, elem_bytes: int, budget: int, chunk_rows: int | None) -> int:
    """Rows per chunk: `chunk_rows` if given, else as many as fit one [C, V] buffer in `budget` bytes."""
    if chunk_rows is None:
        chunk_rows = max(1, budget // (v * elem_bytes))
        if chunk_rows >= 128:
            chunk_rows -= chunk_rows % 64  # GEMM-friendly
    return max(1, min(int(chunk_rows), n))


def _kl_rows_triton(ref_logits: torch.Tensor, delta_logits: torch.Tensor, loss: torch.Tensor, temperature: float,
                    compute_grad: bool) -> None:
    """One program per row of the [C, V] buffers: writes loss[C] and, if asked, the gradient over delta_logits."""
    c, v = delta_logits.shape
    cfg = kl_rows_launch_config(v)
    _kl_rows_kernel[(c,)](
        ref_logits, delta_logits, loss, ref_logits.stride(0), delta_logits.stride(0), v, float(temperature),
        BLOCK_V=cfg["BLOCK_V"], COMPUTE_GRAD=compute_grad, num_warps=cfg["num_warps"],
    )


def _kl_rows_torch(ref_logits: torch.Tensor, delta_logits: torch.Tensor, temperature: float, compute_grad: bool):
    """Eager twin of `_kl_rows_kernel` on a [C, V] chunk: (loss [C] fp32, grad [C, V] fp32 or None).

    Works in place on fp32 copies of its inputs (or on the inputs themselves when they are fp32: the caller passes
    fresh matmul outputs).
    """
    inv_t = 1.0 / temperature
    zp = ref_logits.float().mul_(inv_t)
    x = delta_logits.float().mul_(inv_t)
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
    return loss, grad


def _linear_kl_forward(hidden, ref_hidden, weight, temperature, impl, chunk_rows, need_grad_h, need_grad_w):
    """(loss 0-dim fp32, grad_hidden [N, D] or None, grad_weight [V, D] or None) for grad_output = 1."""
    n, d = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    need_grad = need_grad_h or need_grad_w
    grad_h = torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_grad_h else None
    grad_w = torch.zeros_like(weight, memory_format=torch.contiguous_format) if need_grad_w else None
    row_loss = torch.empty(n, dtype=torch.float32, device=dev)
    if n == 0:
        if grad_h is not None:
            grad_h.zero_()
        return row_loss.sum(), grad_h, grad_w

    w_t = weight.t()  # [D, V] view
    if impl == "triton":
        rows = _chunk_rows(n, v, weight.element_size(), TRITON_CHUNK_BYTES, chunk_rows)
        ref_buf = torch.empty(rows, v, dtype=weight.dtype, device=dev)
        delta_buf = torch.empty(rows, v, dtype=weight.dtype, device=dev)
    else:
        rows = _chunk_rows(n, v, 4, TORCH_CHUNK_BYTES, chunk_rows)

    for s in range(0, n, rows):
        e = min(s + rows, n)
        h_c = hidden[s:e]
        r_c = ref_hidden[s:e]
        # z' = z + (h - r) W^T: the change in the logits comes from its own matmul, so that its rounding is
        # relative to the change, not to the logits (the two passes differ little: LoRA starts at zero).
        dh_c = h_c - r_c
        if impl == "triton":
            z = torch.mm(r_c, w_t, out=ref_buf[: e - s])
            g = torch.mm(dh_c, w_t, out=delta_buf[: e - s])
            _kl_rows_triton(z, g, row_loss[s:e], temperature, need_grad)  # g now holds d loss / d z'
        else:
            loss_c, g = _kl_rows_torch(torch.mm(r_c, w_t), torch.mm(dh_c, w_t), temperature, need_grad)
            row_loss[s:e] = loss_c
            if g is not None:
                g = g.to(weight.dtype)
        if need_grad_h:
            torch.mm(g, weight, out=grad_h[s:e])
        if need_grad_w:  # accumulates in the weight's dtype: one rounding per chunk (RepBend's head is frozen)
            grad_w.addmm_(g.t(), h_c)
    return row_loss.sum(), grad_h, grad_w


def _check_inputs(hidden: torch.Tensor, ref_hidden: torch.Tensor, weight: torch.Tensor, temperature: float) -> None:
    if hidden.dim() != 2 or ref_hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"linear_kl: hidden, ref_hidden must be [N, D] and weight [V, D]; got "
                         f"{tuple(hidden.shape)}, {tuple(ref_hidden.shape)}, {tuple(weight.shape)}")
    if hidden.shape != ref_hidden.shape or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_kl: shape mismatch: hidden {tuple(hidden.shape)}, ref_hidden "
                         f"{tuple(ref_hidden.shape)}, weight {tuple(weight.shape)} (need [N, D], [N, D], [V, D])")
    if not (hidden.dtype == ref_hidden.dtype == weight.dtype):
        raise ValueError(f"linear_kl: dtypes differ: hidden {hidden.dtype}, ref_hidden {ref_hidden.dtype}, "
                         f"weight {weight.dtype}")
    if not (hidden.device == ref_hidden.device == weight.device):
        raise ValueError(f"linear_kl: devices differ: hidden {hidden.device}, ref_hidden {ref_hidden.device}, "
                         f"weight {weight.device}")
    if not temperature > 0:
        raise ValueError(f"linear_kl: temperature must be > 0, got {temperature}")
    if weight.shape[0] == 0:
        raise ValueError("linear_kl: weight has V = 0 rows")


class LinearKLFunction(torch.autograd.Function):
    """autograd for `linear_kl`; the gradient is computed in forward and scaled by grad_output in backward."""

    @staticmethod
    def forward(ctx, hidden, ref_hidden, weight, temperature, impl, chunk_rows):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        with torch.autocast(hidden.device.type, enabled=False):
            loss, grad_h, grad_w = _linear_kl_forward(
                hidden.detach(), ref_hidden.detach(), weight.detach(), temperature, impl, chunk_rows, need_h, need_w)
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        # out of place, so that a second backward (retain_graph) sees the unscaled gradients again
        if grad_h is not None:
            grad_h = grad_h * grad_out.to(grad_h.dtype)
        if grad_w is not None:
            grad_w = grad_w * grad_out.to(grad_w.dtype)
        return grad_h, None, grad_w, None, None, None


def linear_kl(hidden: torch.Tensor, ref_hidden: torch.Tensor, weight: torch.Tensor, temperature: float = 2.0,
              impl: str = "auto", *, chunk_rows: int | None = None) -> torch.Tensor:
    """T^2 * sum_n KL(softmax(ref_hidden[n] W^T / T) || softmax(hidden[n] W^T / T)) as a 0-dim fp32 tensor.

    hidden, ref_hidden: [N, D] final (post-norm) hidden states of the trained and the reference pass; weight:
    [V, D] LM head; all of one dtype (fp32, bf16, fp16) and device. The reference side is a constant. Gradients go
    to `hidden` and, only when it requires grad, to `weight`. Divide by the number of sequences for "batchmean".
    impl: "auto" (Triton on CUDA, eager chunked PyTorch elsewhere), "triton", "torch".
    chunk_rows: rows per chunk (default: from a byte budget per [chunk, V] logit buffer).
    """
    _check_inputs(hidden, ref_hidden, weight, temperature)
    impl = resolve_impl(impl, hidden.device)
    temperature = float(temperature)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return LinearKLFunction.apply(hidden, ref_hidden, weight, temperature, impl, chunk_rows)
    with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
        loss, _, _ = _linear_kl_forward(hidden, ref_hidden, weight, temperature, impl, chunk_rows, False, False)
    return loss


class LinearKL(torch.nn.Module):
    """Module form of `linear_kl`: forward(hidden [N, D], ref_hidden [N, D], weight [V, D]) -> 0-dim fp32."""

    def __init__(self, temperature: float = 2.0, impl: str = "auto"):
        super().__init__()
        self.temperature = temperature
        self.impl = impl

    def forward(self, hidden: torch.Tensor, ref_hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return linear_kl(hidden, ref_hidden, weight, self.temperature, self.impl)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, impl={self.impl!r}"
