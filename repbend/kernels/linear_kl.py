"""Fused LM-head + temperature KL for the RepBend retain term, without ever holding `[N, V]` logits.

    loss = T^2 * sum_n KL( softmax(c(z_n) / T) || softmax(c(z'_n) / T) ),   z = ref_hidden @ W^T,  z' = hidden @ W^T

with c the identity, or Gemma-2's logit soft-capping c(z) = cap * tanh(z / cap) when `softcap` is given.

`ref_hidden` gives the reference (adapters off) distribution p, a constant: no gradient flows to `ref_hidden`, nor
to `weight` through it. `hidden` gives the trained distribution q. Per row, with zp = c(z)/T, x = (c(z') - c(z))/T,
zq = zp + x:

    KL(p || q) = -E_p[x] + (m_q - m_p) + log(S_q / S_p),    S_a = sum_v exp(za_v - m_a),  m_a ~ max_v za_v
    d loss / d z'_v = T^2 * (q_v - p_v) c'(z'_v) / T = T * (q_v - p_v) c'(z'_v)

The retain term lives near q = p (LoRA starts at zero), where the textbook log p - log q cancels catastrophically.
So the logit change z' - z = (hidden - ref_hidden) @ W^T gets its own matmul (instead of a second full logit matmul:
same cost), which rounds relative to the change, and the KL above never subtracts two full log-sum-exps.
hidden == ref_hidden gives exactly 0 and zero gradients.

Soft-capping keeps that: with a = z / cap, d = (z' - z) / cap, the capped change is formed as
    c(z') - c(z) = cap * (tanh(a + d) - tanh(a)) = cap * tanh(d) (1 - tanh(a)^2) / (1 + tanh(a) tanh(d))
(relative to tanh(d), computed by its series below |d| = 1/8) where the denominator is >= 1/2, else (|d| > 0.55:
nothing cancels) as the plain difference, written as m(a) - m(a + d) with m = 1 - |tanh| where both tanh share a
sign, so that saturated logits keep relative precision too. tanh, m and sech^2 come from u = exp(-2|a|)
(m = 2u / (1 + u), sech^2 = 4u / (1 + u)^2): no overflow, and no fp64 or libdevice call (the interpreter has
none). The gradient gains the factor d c(z') / dz' = sech(a + d)^2.

Rows are processed in chunks of C rows so that the extra memory is O(C x V) in forward and backward:
  triton: per chunk two matmuls (cuBLAS, input dtype, fp32 accumulation) for z and z' - z, then one Triton program
          per row: an online pass over V tiles for max / sum-exp of both rows and the KL, and, when a gradient is
          needed, a second pass writing T * (q - p) over the z' - z buffer. Then grad_hidden = G @ W and, only if
          `weight` requires grad, grad_W += G^T @ hidden_chunk.
  torch:  the same math per chunk in eager PyTorch (fp32), used on CPU.
The gradient is computed during the forward and scaled by grad_output in backward (the loss is a scalar). Both are
one custom op (repbend::linear_kl) with autograd registered, so torch.compile traces it without a graph break.
The vocabulary loop runs over a constexpr tile count (see _dispatch.py). A weight sharded as a DTensor is refused.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dispatch import check_not_sharded, num_chunks, on_device, resolve_impl
from .reference import kl_rows_torch, softcap_torch  # noqa: F401 (softcap_torch: the eager soft-capping)

# Bytes of one [C, V] logit buffer per chunk. The Triton path holds two (in the input dtype); the eager path holds
# about four fp32 ones at its peak, hence its smaller budget. 256 MiB gives C = 1024 rows for V = 128256 in bf16,
# enough rows for the two GEMMs to run at full tensor-core speed.
TRITON_CHUNK_BYTES = 256 * 1024 * 1024
TORCH_CHUNK_BYTES = 32 * 1024 * 1024
# Vocabulary tile of the row kernel: 4096 fp32 values of each logit row per program of 8 warps is 16 values per
# thread per row, no spills on sm_90 (tests/test_linear_kl_compile.py); half of it with soft-capping.
MAX_BLOCK_V = 4096


@triton.jit
def _tanh_parts(a):
    """(tanh(a), 1 - |tanh(a)|, sech(a)^2) in fp32 for any a, from u = exp(-2|a|) in (0, 1]: nothing overflows,
    and 1 - |tanh(a)| = 2u / (1 + u) keeps its relative precision where tanh saturates."""
    u = tl.exp(-2.0 * tl.abs(a))
    inv = 1.0 / (1.0 + u)
    m = 2.0 * u * inv
    t = (1.0 - u) * inv
    return tl.where(a < 0.0, -t, t), m, 2.0 * m * inv


@triton.jit
def _tanh_rel(d):
    """tanh(d) to fp32 relative precision also for small |d|: its series below 1/8 (1 - u would cancel)."""
    d2 = d * d
    p = d2 * (62.0 / 2835.0) - 17.0 / 315.0
    p = p * d2 + 2.0 / 15.0
    p = p * d2 - 1.0 / 3.0
    t, _, _ = _tanh_parts(d)
    return tl.where(tl.abs(d) < 0.125, d + d * d2 * p, t)


@triton.jit
def _scaled_logits(z, dz, inv_t, cap, SOFTCAP: tl.constexpr):
    """(c(z) / T, (c(z + dz) - c(z)) / T, c'(z + dz)) for reference logits z and logit changes dz (fp32)."""
    if SOFTCAP:
        a = z / cap
        d = dz / cap
        _, m_a, sech2_a = _tanh_parts(a)
        t_a = _tanh_rel(a)  # c(z) = cap tanh(a) ~ z to relative precision, also for a cap far above |z|
        t_d = _tanh_rel(d)
        den = 1.0 + t_a * t_d
        ad = a + d
        t_ad, m_ad, sech2_ad = _tanh_parts(ad)
        # den >= 1/2: the product form, relative to tanh(d). Else |d| > 0.55 and the plain difference cancels
        # nothing: written as sign(a) (m_a - m_ad) where tanh(a), tanh(a + d) share a sign (both may saturate).
        plain = tl.where((a < 0.0) == (ad < 0.0), tl.where(a < 0.0, m_ad - m_a, m_a - m_ad), t_ad - t_a)
        use_product = den >= 0.5
        change = tl.where(use_product, t_d * sech2_a / tl.where(use_product, den, 1.0), plain)
        zp = (cap * inv_t) * t_a
        x = (cap * inv_t) * change
        slope = sech2_ad
    else:
        zp = z * inv_t
        x = dz * inv_t
        slope = 1.0
    return zp, x, slope


@triton.jit
def _kl_rows_kernel(
    ref_ptr,  # [C, V] reference logits z = ref_hidden @ W^T (input dtype), read only
    delta_ptr,  # [C, V] logit change z' - z = (hidden - ref_hidden) @ W^T; overwritten with d loss / d z'
    loss_ptr,  # [C] fp32: T^2 * KL(p || q) per row
    stride_ref,
    stride_delta,
    V,
    temperature,
    softcap,  # cap of c(z) = cap * tanh(z / cap) (SOFTCAP only)
    BLOCK_V: tl.constexpr,
    NUM_TILES: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    ref_row = ref_ptr + row * stride_ref
    delta_row = delta_ptr + row * stride_delta
    inv_t = 1.0 / temperature
    cols = tl.arange(0, BLOCK_V)

    # Pass 1, online over V tiles: m_p, S_p of zp = c(z) / T; m_q, S_q of zq = zp + x (x = (c(z') - c(z)) / T);
    # acc = sum_v exp(zp_v - m_p) * x_v. zq is formed as (zp - m_q) + x so that its rounding stays relative to
    # the small numbers that carry the weight, not to |z|.
    m_p = tl.full([], float("-inf"), tl.float32)
    m_q = tl.full([], float("-inf"), tl.float32)
    s_p = tl.zeros([], tl.float32)
    s_q = tl.zeros([], tl.float32)
    acc = tl.zeros([], tl.float32)
    for tile in range(NUM_TILES):
        offs = tile * BLOCK_V + cols
        mask = offs < V
        z = tl.load(ref_row + offs, mask=mask, other=0.0).to(tl.float32)
        dz = tl.load(delta_row + offs, mask=mask, other=0.0).to(tl.float32)
        zp, x, _ = _scaled_logits(z, dz, inv_t, softcap, SOFTCAP)
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
        # Pass 2: d loss / d z'_v = T * (q_v - p_v) * c'(z'_v), written over the logit change.
        log_s_p = tl.log(s_p)
        log_s_q = tl.log(s_q)
        for tile in range(NUM_TILES):
            offs = tile * BLOCK_V + cols
            mask = offs < V
            z = tl.load(ref_row + offs, mask=mask, other=0.0).to(tl.float32)
            dz = tl.load(delta_row + offs, mask=mask, other=0.0).to(tl.float32)
            zp, x, slope = _scaled_logits(z, dz, inv_t, softcap, SOFTCAP)
            p = tl.exp((zp - m_p) - log_s_p)
            q = tl.exp(((zp - m_q) + x) - log_s_q)
            g = (q - p) * (temperature * slope)
            tl.store(delta_row + offs, g.to(delta_ptr.dtype.element_ty), mask=mask)


def kl_rows_launch_config(V: int, softcap: bool = False) -> dict:
    """Tile, tile count and warps of `_kl_rows_kernel` for a vocabulary of V (also used by the compile test).

    Soft-capping needs about twice the temporaries per logit: half the tile keeps it near 80 registers (a 4096 tile
    would take 115 on sm_90).
    """
    block_v = min(MAX_BLOCK_V // (2 if softcap else 1), triton.next_power_of_2(max(V, 16)))
    num_warps = 8 if block_v >= 2048 else 4
    return {"BLOCK_V": block_v, "NUM_TILES": num_chunks(V, block_v), "num_warps": num_warps}


def _chunk_rows(n: int, v: int, elem_bytes: int, budget: int, chunk_rows: int | None) -> int:
    """Rows per chunk: `chunk_rows` if given, else as many as fit one [C, V] buffer in `budget` bytes."""
    if chunk_rows is None:
        chunk_rows = max(1, budget // (v * elem_bytes))
        if chunk_rows >= 128:
            chunk_rows -= chunk_rows % 64  # GEMM-friendly
    return max(1, min(int(chunk_rows), n))


def _kl_rows_triton(ref_logits: torch.Tensor, delta_logits: torch.Tensor, loss: torch.Tensor, temperature: float,
                    softcap: float | None, compute_grad: bool) -> None:
    """One program per row of the [C, V] buffers: writes loss[C] and, if asked, the gradient over delta_logits."""
    c, v = delta_logits.shape
    _kl_rows_kernel[(c,)](
        ref_logits, delta_logits, loss, ref_logits.stride(0), delta_logits.stride(0), v, float(temperature),
        float(softcap or 1.0), COMPUTE_GRAD=compute_grad, SOFTCAP=softcap is not None,
        **kl_rows_launch_config(v, softcap is not None),
    )


def _linear_kl_forward(hidden, ref_hidden, weight, temperature, softcap, impl, chunk_rows, need_grad_h, need_grad_w):
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
            with on_device(dev):
                _kl_rows_triton(z, g, row_loss[s:e], temperature, softcap, need_grad)  # g: d loss / d z'
        else:
            loss_c, g = kl_rows_torch(torch.mm(r_c, w_t), torch.mm(dh_c, w_t), temperature, softcap, need_grad)
            row_loss[s:e] = loss_c
            if g is not None:
                g = g.to(weight.dtype)
        if need_grad_h:
            torch.mm(g, weight, out=grad_h[s:e])
        if need_grad_w:  # accumulates in the weight's dtype: one rounding per chunk (RepBend's head is frozen)
            grad_w.addmm_(g.t(), h_c)
    return row_loss.sum(), grad_h, grad_w


def _check_not_sharded(t: torch.Tensor, what: str) -> None:
    check_not_sharded(t, what, "linear_kl", "softmax")


def _check_inputs(hidden, ref_hidden, weight, temperature, softcap) -> None:
    for t, what in ((hidden, "hidden"), (ref_hidden, "ref_hidden"), (weight, "weight")):
        _check_not_sharded(t, what)
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
    if softcap is not None and not softcap > 0:
        raise ValueError(f"linear_kl: softcap must be None or > 0, got {softcap}")
    if weight.shape[0] == 0:
        raise ValueError("linear_kl: weight has V = 0 rows")


def _local(t: torch.Tensor) -> torch.Tensor:
    """A replicated DTensor's local tensor (differentiable); any other tensor as it is."""
    return t.to_local() if type(t).__name__ == "DTensor" else t


# ----------------------------------------------------------------------------------------------------------------
# Custom op: loss and gradients in one forward; the backward scales the saved gradients by grad_output
# ----------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("repbend::linear_kl", mutates_args=())
def linear_kl_op(hidden: torch.Tensor, ref_hidden: torch.Tensor, weight: torch.Tensor, temperature: float,
                 softcap: float | None, impl: str, chunk_rows: int | None, need_grad_h: bool,
                 need_grad_w: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss 0-dim fp32, grad_hidden [N, D] or [0], grad_weight [V, D] or [0]) for grad_output = 1."""
    with torch.autocast(hidden.device.type, enabled=False):
        loss, gh, gw = _linear_kl_forward(hidden.detach(), ref_hidden.detach(), weight.detach(), temperature,
                                          softcap, impl, chunk_rows, need_grad_h, need_grad_w)
    return loss, (gh if gh is not None else hidden.new_empty(0)), (gw if gw is not None else weight.new_empty(0))


@linear_kl_op.register_fake
def _(hidden, ref_hidden, weight, temperature, softcap, impl, chunk_rows, need_grad_h, need_grad_w):
    return (hidden.new_empty((), dtype=torch.float32),
            hidden.new_empty(hidden.shape if need_grad_h else (0,)),
            weight.new_empty(weight.shape if need_grad_w else (0,)))


def _setup_context(ctx, inputs, output):
    _, grad_h, grad_w = output
    ctx.need_h, ctx.need_w = inputs[7], inputs[8]
    ctx.save_for_backward(grad_h, grad_w)
    ctx.mark_non_differentiable(grad_h, grad_w)


def _backward(ctx, grad_out, _grad_h, _grad_w):
    grad_h, grad_w = ctx.saved_tensors
    # out of place, so that a second backward (retain_graph) sees the unscaled gradients again
    gh = grad_h * grad_out.to(grad_h.dtype) if ctx.need_h else None
    gw = grad_w * grad_out.to(grad_w.dtype) if ctx.need_w else None
    return gh, None, gw, None, None, None, None, None, None


linear_kl_op.register_autograd(_backward, setup_context=_setup_context)


def linear_kl(hidden: torch.Tensor, ref_hidden: torch.Tensor, weight: torch.Tensor, temperature: float = 2.0,
              impl: str = "auto", *, chunk_rows: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """T^2 * sum_n KL(softmax(c(ref_hidden[n] W^T) / T) || softmax(c(hidden[n] W^T) / T)) as a 0-dim fp32 tensor.

    hidden, ref_hidden: [N, D] final (post-norm) hidden states of the trained and the reference pass; weight:
    [V, D] LM head; all of one dtype (fp32, bf16, fp16) and device. The reference side is a constant. Gradients go
    to `hidden` and, only when it requires grad, to `weight`. Divide by the number of sequences for "batchmean".
    impl: "auto" (Triton on CUDA, eager chunked PyTorch elsewhere), "triton", "torch".
    chunk_rows: rows per chunk (default: from a byte budget per [chunk, V] logit buffer).
    softcap: None, or the cap of Gemma-2's logit soft-capping c(z) = cap * tanh(z / cap) (the model config's
    final_logit_softcapping), applied to both logit rows before the temperature.
    A DTensor weight must be replicated: a sharded one raises TypeError.
    """
    _check_inputs(hidden, ref_hidden, weight, temperature, softcap)
    hidden, ref_hidden, weight = _local(hidden), _local(ref_hidden), _local(weight)
    impl = resolve_impl(impl, hidden.device)
    temperature = float(temperature)
    softcap = None if softcap is None else float(softcap)
    grad_on = torch.is_grad_enabled()
    need_h, need_w = grad_on and hidden.requires_grad, grad_on and weight.requires_grad
    loss, _, _ = linear_kl_op(hidden, ref_hidden.detach(), weight, temperature, softcap, impl, chunk_rows,
                              need_h, need_w)
    return loss


class LinearKL(torch.nn.Module):
    """Module form of `linear_kl`: forward(hidden [N, D], ref_hidden [N, D], weight [V, D]) -> 0-dim fp32."""

    def __init__(self, temperature: float = 2.0, impl: str = "auto", softcap: float | None = None):
        super().__init__()
        self.temperature = temperature
        self.impl = impl
        self.softcap = softcap

    def forward(self, hidden: torch.Tensor, ref_hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return linear_kl(hidden, ref_hidden, weight, self.temperature, self.impl, softcap=self.softcap)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, impl={self.impl!r}, softcap={self.softcap}"
