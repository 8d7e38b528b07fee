"""Fused LM-head + log-softmax gather: per-row log-probabilities of the labels, without ever holding `[N, V]` logits.

    logp_n = log_softmax(c(z_n))[y_n] = c(z_n)[y_n] - lse_n,   z_n = hidden_n @ W^T,   lse_n = log sum_v exp(c(z_n)_v)

with c the identity, or Gemma-2's logit soft-capping c(z) = cap * tanh(z / cap) when `softcap` is given. The output is
a per-row vector, so the backward takes a per-row grad_output g_n:

    d L / d z_nv = g_n * (1[v = y_n] - softmax(c(z_n))_v) * c'(z_nv),   c'(z) = sech(z / cap)^2 (1 without a cap)
    d L / d hidden = G @ W,   d L / d W = G^T @ hidden   (the latter only if `weight` requires grad)

The forward keeps lse_n (fp32 [N]) for the backward, which recomputes the logits chunk by chunk: the extra memory is
O(C x V) for C rows per chunk in both directions, never O(N x V).
  triton: per chunk one matmul (cuBLAS, input dtype, fp32 accumulation) into a [C, V] buffer in the input dtype,
          then one Triton program per row. Forward: an online max / sum-exp over V tiles and the label's logit,
          giving logp and lse. Backward: the same matmul, then the row program writes d L / d z over the buffer
          (input dtype), then grad_hidden = G @ W and, only if `weight` requires grad, grad_W += G^T @ hidden_chunk
          (accumulated in the weight's dtype, one rounding per chunk, as in linear_kl).
  torch:  the same math per chunk in eager PyTorch (matmul in the input dtype, everything after it in fp32), the
          CPU path.
The label's logit is read from the same rounded logit row as the log-sum-exp (lse >= max_v c(z)_v >= c(z)[y] also
after rounding), so logp <= 0 holds exactly. Soft-capping uses linear_kl's Triton helpers
(`_tanh_parts`, `_tanh_rel`): tanh to relative precision for small arguments and sech^2 without cancellation where
tanh saturates; the eager path forms c(z) as softcap_torch does and sech^2 as `_tanh_parts` does, in place.

Both directions are custom ops (repbend::linear_logprob with autograd registered, and repbend::linear_logprob_backward)
with fake implementations, so torch.compile(fullgraph=True) traces them and FakeTensorMode runs them. Labels outside
[0, V) raise ValueError naming the first bad row: the check costs one host sync, taken after the forward's work has
been queued (the kernels never read outside a row, whatever the labels); inside a CUDA graph capture it is a device
assert instead, and the forward op is tagged cudagraph-unsafe so that Inductor leaves it outside its graphs. A weight
sharded as a DTensor is refused.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dispatch import check_not_sharded, cudagraph_unsafe_tags, num_chunks, on_device, resolve_impl
from .linear_kl import _chunk_rows, _local, _tanh_parts, _tanh_rel

# Bytes of the one [C, V] logit buffer of the Triton path (input dtype): 256 MiB gives C = 1024 rows for V = 128256
# in bf16, enough for the matmuls to run at full tensor-core speed. The eager path holds a few fp32 [C, V]
# temporaries at its peak (three in the soft-capped backward), hence its smaller budget.
TRITON_CHUNK_BYTES = 256 * 1024 * 1024
TORCH_CHUNK_BYTES = 32 * 1024 * 1024
# Vocabulary tile of the row kernels: 4096 logits per program of 8 warps, 16 per thread; half of it with soft-capping,
# whose tanh / sech^2 need more temporaries (on sm_90 the fp32 capped backward takes 80 registers at 4096, 48 at 2048;
# tests/test_linear_logprob_compile.py checks every specialisation for spills).
MAX_BLOCK_V = 4096


@triton.jit
def _capped(z, cap, SOFTCAP: tl.constexpr):
    """c(z) in fp32: cap * tanh(z / cap) (relative precision also where cap >> |z|), or z."""
    if SOFTCAP:
        z = cap * _tanh_rel(z / cap)
    return z


@triton.jit
def _logprob_fwd_kernel(
    logits_ptr,  # [C, V] z = hidden_chunk @ W^T (input dtype), read only
    labels_ptr,  # [C] int64
    logp_ptr,  # [C] fp32 out: c(z)[y] - lse
    lse_ptr,  # [C] fp32 out: log sum_v exp(c(z)_v)
    stride_logits,
    V,
    softcap,  # cap of c(z) = cap * tanh(z / cap) (SOFTCAP only)
    BLOCK_V: tl.constexpr,
    NUM_TILES: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * stride_logits
    cols = tl.arange(0, BLOCK_V)
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.zeros([], tl.float32)
    for tile in range(NUM_TILES):
        offs = tile * BLOCK_V + cols
        mask = offs < V
        z = tl.load(logits_row + offs, mask=mask, other=0.0).to(tl.float32)
        z = tl.where(mask, _capped(z, softcap, SOFTCAP), float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    # The label's logit from the same row (the same rounding as the sum above). An out-of-range label reads
    # nothing and gives NaN; the host raises on it after the launch.
    label = tl.load(labels_ptr + row)
    ok = (label >= 0) & (label < V)
    zl = tl.load(logits_row + tl.where(ok, label, 0)).to(tl.float32)
    zl = _capped(zl, softcap, SOFTCAP)
    log_s = tl.log(s)
    tl.store(logp_ptr + row, tl.where(ok, (zl - m) - log_s, float("nan")))
    tl.store(lse_ptr + row, m + log_s)


@triton.jit
def _logprob_bwd_kernel(
    logits_ptr,  # [C, V] z = hidden_chunk @ W^T (input dtype); overwritten with d L / d z
    labels_ptr,  # [C] int64
    lse_ptr,  # [C] fp32, from the forward
    grad_out_ptr,  # [C] fp32: d L / d logp
    stride_logits,
    V,
    softcap,
    BLOCK_V: tl.constexpr,
    NUM_TILES: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * stride_logits
    cols = tl.arange(0, BLOCK_V)
    label = tl.load(labels_ptr + row)
    lse = tl.load(lse_ptr + row)
    g = tl.load(grad_out_ptr + row)
    for tile in range(NUM_TILES):
        offs = tile * BLOCK_V + cols
        mask = offs < V
        z = tl.load(logits_row + offs, mask=mask, other=0.0).to(tl.float32)
        p = tl.exp(_capped(z, softcap, SOFTCAP) - lse)
        dz = tl.where(offs == label, 1.0 - p, -p) * g
        if SOFTCAP:
            _, _, sech2 = _tanh_parts(z / softcap)
            dz = dz * sech2
        tl.store(logits_row + offs, dz.to(logits_ptr.dtype.element_ty), mask=mask)


def logprob_rows_launch_config(V: int, softcap: bool = False) -> dict:
    """Tile, tile count and warps of both row kernels for a vocabulary of V (also used by the compile test)."""
    block_v = min(MAX_BLOCK_V // (2 if softcap else 1), triton.next_power_of_2(max(V, 16)))
    num_warps = 8 if block_v >= 2048 else 4
    return {"BLOCK_V": block_v, "NUM_TILES": num_chunks(V, block_v), "num_warps": num_warps}


# ----------------------------------------------------------------------------------------------------------------
# Eager row math on one fp32 [C, V] chunk (the torch path)
# ----------------------------------------------------------------------------------------------------------------
def _rows_fwd_torch(z: torch.Tensor, labels: torch.Tensor, softcap: float | None):
    """(logp [C], lse [C]) from fp32 logits z [C, V] (overwritten)."""
    if softcap is not None:
        z.div_(softcap).tanh_().mul_(softcap)  # c(z) = cap * tanh(z / cap), as softcap_torch forms it
    m = z.amax(dim=-1, keepdim=True)
    zl = z.gather(1, labels.unsqueeze(1))
    log_s = z.sub_(m).exp_().sum(dim=-1, keepdim=True).log_()  # in place: no second [C, V] temporary
    return (zl.sub_(m).sub_(log_s)).squeeze(1), (m + log_s).squeeze(1)


def _rows_bwd_torch(z: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, grad_out: torch.Tensor,
                    softcap: float | None) -> torch.Tensor:
    """d L / d z [C, V] fp32 from fp32 logits z [C, V] (overwritten), lse [C] and grad_out [C]."""
    slope = None
    if softcap is not None:
        a = z.div_(softcap)
        z = torch.tanh(a).mul_(softcap)  # c(z), the forward's exact operations
        # c'(z) = sech(a)^2 = 4u / (1 + u)^2 with u = exp(-2|a|), in place (linear_kl's `_tanh_parts`): relative
        # precision where tanh saturates, where 1 - tanh^2 would give 0. (softcap_torch also forms the capped change
        # of a second logit row: about 15 [C, V] temporaries and ten times the time, for a change of 0 here.)
        u = a.abs_().mul_(-2.0).exp_()
        slope = u.mul(4.0).div_(u.add_(1.0).square_())
    p = z.sub_(lse.unsqueeze(1)).exp_()
    grad = p.neg_()
    grad.scatter_add_(1, labels.unsqueeze(1), torch.ones_like(lse).unsqueeze(1))  # 1[v = y] - p
    grad.mul_(grad_out.unsqueeze(1))
    if slope is not None:
        grad.mul_(slope)
    return grad


# ----------------------------------------------------------------------------------------------------------------
# Chunked drivers
# ----------------------------------------------------------------------------------------------------------------
def _rows_per_chunk(n: int, weight: torch.Tensor, impl: str, chunk_rows: int | None) -> int:
    if impl == "triton":
        return _chunk_rows(n, weight.shape[0], weight.element_size(), TRITON_CHUNK_BYTES, chunk_rows)
    return _chunk_rows(n, weight.shape[0], 4, TORCH_CHUNK_BYTES, chunk_rows)


def _raise_on_bad_labels(bad: torch.Tensor, labels: torch.Tensor, v: int) -> None:
    """ValueError naming the first row whose label is outside [0, V) (reads `bad` on the host). Inside a CUDA graph
    capture, where the host cannot read it, an asynchronous device assert instead (it names no row)."""
    if labels.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        torch._assert_async(~bad.any(), f"linear_logprob: a label is outside [0, V = {v})")
        return
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        raise ValueError(f"linear_logprob: labels[{first}] = {int(labels[first])} is outside [0, V = {v}) "
                         f"(the weight has V = {v} rows); select only rows with a real label")


def _linear_logprob_forward(hidden, weight, labels, softcap, impl, chunk_rows):
    """(logp [N] fp32, lse [N] fp32)."""
    n = hidden.shape[0]
    v = weight.shape[0]
    dev = hidden.device
    logp = torch.empty(n, dtype=torch.float32, device=dev)
    lse = torch.empty(n, dtype=torch.float32, device=dev)
    if n == 0:
        return logp, lse
    bad = (labels < 0) | (labels >= v)  # read after the work is queued: one host sync
    labels = labels.contiguous()
    w_t = weight.t()  # [D, V] view
    rows = _rows_per_chunk(n, weight, impl, chunk_rows)
    if impl == "triton":
        buf = torch.empty(rows, v, dtype=weight.dtype, device=dev)
        cfg = logprob_rows_launch_config(v, softcap is not None)
    for s in range(0, n, rows):
        e = min(s + rows, n)
        if impl == "triton":
            z = torch.mm(hidden[s:e], w_t, out=buf[: e - s])
            with on_device(dev):
                _logprob_fwd_kernel[(e - s,)](z, labels[s:e], logp[s:e], lse[s:e], z.stride(0), v,
                                              float(softcap or 1.0), SOFTCAP=softcap is not None, **cfg)
        else:
            lp, ls = _rows_fwd_torch(torch.mm(hidden[s:e], w_t).float(), labels[s:e].clamp(0, v - 1), softcap)
            logp[s:e] = lp
            lse[s:e] = ls
    _raise_on_bad_labels(bad, labels, v)
    return logp, lse


def _linear_logprob_backward(grad_out, hidden, weight, labels, lse, softcap, impl, chunk_rows, need_h, need_w):
    """(grad_hidden [N, D] or None, grad_weight [V, D] or None) for d L / d logp = grad_out [N]."""
    n = hidden.shape[0]
    v = weight.shape[0]
    dev = hidden.device
    grad_h = torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_h else None
    grad_w = torch.zeros_like(weight, memory_format=torch.contiguous_format) if need_w else None
    if n == 0 or not (need_h or need_w):
        return grad_h, grad_w
    grad_out = grad_out.to(torch.float32).contiguous()  # (sum's backward hands an expanded, stride-0 vector)
    labels = labels.contiguous()
    lse = lse.contiguous()
    w_t = weight.t()
    rows = _rows_per_chunk(n, weight, impl, chunk_rows)
    if impl == "triton":
        buf = torch.empty(rows, v, dtype=weight.dtype, device=dev)
        cfg = logprob_rows_launch_config(v, softcap is not None)
    for s in range(0, n, rows):
        e = min(s + rows, n)
        h_c = hidden[s:e]
        if impl == "triton":
            g = torch.mm(h_c, w_t, out=buf[: e - s])
            with on_device(dev):
                _logprob_bwd_kernel[(e - s,)](g, labels[s:e], lse[s:e], grad_out[s:e], g.stride(0), v,
                                              float(softcap or 1.0), SOFTCAP=softcap is not None, **cfg)
        else:
            g = _rows_bwd_torch(torch.mm(h_c, w_t).float(), labels[s:e], lse[s:e], grad_out[s:e], softcap)
            g = g.to(weight.dtype)
        if need_h:
            torch.mm(g, weight, out=grad_h[s:e])
        if need_w:  # only for a trained head: a frozen one costs no [V, D] work at all
            grad_w.addmm_(g.t(), h_c)
    return grad_h, grad_w


# ----------------------------------------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------------------------------------
# Tagged so that Inductor keeps the forward out of its CUDA graphs: its label check reads a flag on the host.
@torch.library.custom_op("repbend::linear_logprob", mutates_args=(), tags=cudagraph_unsafe_tags())
def linear_logprob_op(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, softcap: float | None,
                      impl: str, chunk_rows: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp [N] fp32, lse [N] fp32); lse is what the backward needs (not differentiable)."""
    with torch.autocast(hidden.device.type, enabled=False):
        return _linear_logprob_forward(hidden.detach(), weight.detach(), labels, softcap, impl, chunk_rows)


@linear_logprob_op.register_fake
def _(hidden, weight, labels, softcap, impl, chunk_rows):
    n = hidden.shape[0]
    return hidden.new_empty((n,), dtype=torch.float32), hidden.new_empty((n,), dtype=torch.float32)


@torch.library.custom_op("repbend::linear_logprob_backward", mutates_args=())
def linear_logprob_backward_op(grad_out: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                               labels: torch.Tensor, lse: torch.Tensor, softcap: float | None, impl: str,
                               chunk_rows: int | None, need_h: bool,
                               need_w: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_hidden [N, D] or [0], grad_weight [V, D] or [0]) for d L / d logp = grad_out [N]."""
    with torch.autocast(hidden.device.type, enabled=False):
        gh, gw = _linear_logprob_backward(grad_out, hidden, weight, labels, lse, softcap, impl, chunk_rows,
                                          need_h, need_w)
    return (gh if gh is not None else hidden.new_empty(0)), (gw if gw is not None else weight.new_empty(0))


@linear_logprob_backward_op.register_fake
def _(grad_out, hidden, weight, labels, lse, softcap, impl, chunk_rows, need_h, need_w):
    return (hidden.new_empty(hidden.shape if need_h else (0,)),
            weight.new_empty(weight.shape if need_w else (0,)))


def _setup_context(ctx, inputs, output):
    hidden, weight, labels, softcap, impl, chunk_rows = inputs
    _, lse = output
    ctx.softcap, ctx.impl, ctx.chunk_rows = softcap, impl, chunk_rows
    ctx.save_for_backward(hidden, weight, labels, lse)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_logp, _grad_lse):
    hidden, weight, labels, lse = ctx.saved_tensors
    need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_h or need_w):
        return None, None, None, None, None, None
    gh, gw = linear_logprob_backward_op(grad_logp, hidden.detach(), weight.detach(), labels, lse, ctx.softcap,
                                        ctx.impl, ctx.chunk_rows, need_h, need_w)
    return (gh if need_h else None), (gw if need_w else None), None, None, None, None


linear_logprob_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------
def _check_not_sharded(t: torch.Tensor, what: str) -> None:
    check_not_sharded(t, what, "linear_logprob", "log-softmax")


def _check_inputs(hidden, weight, labels, softcap) -> None:
    for t, what in ((hidden, "hidden"), (weight, "weight"), (labels, "labels")):
        _check_not_sharded(t, what)
    if hidden.dim() != 2 or weight.dim() != 2 or labels.dim() != 1:
        raise ValueError(f"linear_logprob: hidden must be [N, D], weight [V, D] and labels [N]; got "
                         f"{tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(labels.shape)}")
    if hidden.shape[1] != weight.shape[1] or labels.shape[0] != hidden.shape[0]:
        raise ValueError(f"linear_logprob: shape mismatch: hidden {tuple(hidden.shape)}, weight "
                         f"{tuple(weight.shape)}, labels {tuple(labels.shape)} (need [N, D], [V, D], [N])")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"linear_logprob: dtypes differ: hidden {hidden.dtype}, weight {weight.dtype}")
    if labels.dtype != torch.int64:
        raise ValueError(f"linear_logprob: labels must be int64, got {labels.dtype}")
    if not (hidden.device == weight.device == labels.device):
        raise ValueError(f"linear_logprob: devices differ: hidden {hidden.device}, weight {weight.device}, "
                         f"labels {labels.device}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"linear_logprob: softcap must be None or > 0, got {softcap}")
    if weight.shape[0] == 0:
        raise ValueError("linear_logprob: weight has V = 0 rows")


def linear_logprob(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, softcap: float | None = None,
                   impl: str = "auto", chunk_rows: int | None = None) -> torch.Tensor:
    """log_softmax(c(hidden[n] @ weight^T))[labels[n]] for every row n, as float32 [N].

    hidden: [N, D] final (post-norm) hidden states of the selected rows; weight: [V, D] LM head, the same dtype (fp32,
    bf16, fp16) and device; labels: int64 [N], each in [0, V) (else ValueError naming the first bad row, after one
    host sync). softcap: None, or the cap of Gemma-2's logit soft-capping c(z) = cap * tanh(z / cap) (the model
    config's final_logit_softcapping). Gradients (for any per-row grad_output) go to `hidden` when it requires grad
    and to `weight` only when it requires grad. impl: "auto" (Triton on CUDA, eager chunked PyTorch elsewhere),
    "triton", "torch". chunk_rows: rows per chunk (default: from a byte budget per [chunk, V] logit buffer).
    N = 0 gives an empty tensor. A DTensor weight must be replicated: a sharded one raises TypeError.
    """
    _check_inputs(hidden, weight, labels, softcap)
    hidden, weight, labels = _local(hidden), _local(weight), _local(labels)
    impl = resolve_impl(impl, hidden.device)
    softcap = None if softcap is None else float(softcap)
    logp, _ = linear_logprob_op(hidden, weight, labels, softcap, impl, chunk_rows)
    return logp


class LinearLogprob(torch.nn.Module):
    """Module form of `linear_logprob`: forward(hidden [N, D], weight [V, D], labels [N] int64) -> [N] fp32."""

    def __init__(self, softcap: float | None = None, impl: str = "auto", chunk_rows: int | None = None):
        super().__init__()
        self.softcap = softcap
        self.impl = impl
        self.chunk_rows = chunk_rows

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return linear_logprob(hidden, weight, labels, self.softcap, self.impl, self.chunk_rows)

    def extra_repr(self) -> str:
        return f"softcap={self.softcap}, impl={self.impl!r}, chunk_rows={self.chunk_rows}"
