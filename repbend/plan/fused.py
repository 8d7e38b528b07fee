"""What the fused ops of `repbend.kernels` compute and hold, which a fake step cannot see (their fake
implementations only shape the outputs): FLOPs per call, and the bytes of the buffers they allocate internally.

A multiply-add is 2 FLOPs, a square root, division or exponential 1. Shapes: L layers, N selected rows, D features,
V vocabulary entries.

    rep_distance_fwd      9 L N D       per element: h - r, and four multiply-adds (|h-r|^2, |h|^2, |r|^2, <h, r>)
    rep_distance_bwd      6 L' N D      per element of a selected row: a_d (h - r) + a_r r + a_h h (L' layers with
                                        a gradient; the zero rows of unselected positions are only written)
    pairwise_cosine_fwd   4 L N D       the norms' and s = sum_i u_i's multiply-adds
    pairwise_cosine_bwd   8 L N D       <x_i, s>, then u_i, du_i and dx_i
    linear_kl             4 N D V + N D         z = r W^T and z' - z = (h - r) W^T
                          + 15 N V              the online log-sum-exp pass over both rows and E_p[x]
                          + (11 N V + 2 N V D)  the gradient pass and grad_hidden = G W, when hidden needs one
                          + 2 N V D             grad_weight = G^T h, when the weight needs one
                          (soft-capping's extra arithmetic per logit is not counted)
    linear_logprob        2 N D V + 6 N V       z = h W^T and the online log-sum-exp with the label's logit
    linear_logprob_backward  2 N D V + 6 N V    z again, d L / d z per logit
                          + 2 N V D (+ 2 N V D) grad_hidden = G W (and grad_weight = G^T h when the head trains)
Internal buffers (live while the op runs): linear_kl's Triton path holds two [C, V] logit buffers in the weight's
dtype, its eager path about four fp32 ones; linear_logprob's one and about three; C = the rows per chunk each
op's module picks. The other ops allocate only what they return (and a table of addresses).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

KL_FWD_FLOPS_PER_LOGIT = 15
KL_GRAD_FLOPS_PER_LOGIT = 11
KL_TORCH_BUFFERS = 4
KL_TRITON_BUFFERS = 2


def _layers_d(hidden) -> tuple[int, int]:
    h0 = hidden[0]
    return (h0.shape[0] if h0.dim() == 4 else len(hidden)), h0.shape[-1]


def _rep_distance_fwd(hidden, ref, rows, ref_gathered, **_):
    L, D = _layers_d(hidden)
    return 9 * L * rows.shape[0] * D


def _rep_distance_bwd(grad_sums, buf, slot, hidden, ref, ref_gathered, layers, upstream=None, **_):
    _, D = _layers_d(hidden)
    return 6 * len(layers) * buf.shape[-1] * D


def _pairwise_fwd(x, **_):
    L, N, D = x.shape
    return 4 * L * N * D


def _pairwise_bwd(grad, x, s, norm, **_):
    L, N, D = x.shape
    return 8 * L * N * D


def _linear_kl(hidden, ref_hidden, weight, temperature, softcap, impl, chunk_rows, need_grad_h, need_grad_w, **_):
    N, D = hidden.shape
    V = weight.shape[0]
    flops = 4 * N * D * V + N * D + KL_FWD_FLOPS_PER_LOGIT * N * V
    if need_grad_h or need_grad_w:
        flops += KL_GRAD_FLOPS_PER_LOGIT * N * V
    if need_grad_h:
        flops += 2 * N * V * D
    if need_grad_w:
        flops += 2 * N * V * D
    return flops


def _linear_kl_buffers(hidden, ref_hidden, weight, temperature, softcap, impl, chunk_rows, *rest, **_):
    lk = importlib.import_module("repbend.kernels.linear_kl")  # the module (the package re-exports the function)
    N = hidden.shape[0]
    V = weight.shape[0]
    if N == 0:
        return 0
    if impl == "triton":
        rows = lk._chunk_rows(N, V, weight.element_size(), lk.TRITON_CHUNK_BYTES, chunk_rows)
        return KL_TRITON_BUFFERS * rows * V * weight.element_size() + 4 * N
    rows = lk._chunk_rows(N, V, 4, lk.TORCH_CHUNK_BYTES, chunk_rows)
    return KL_TORCH_BUFFERS * rows * V * 4 + 4 * N


LOGPROB_FLOPS_PER_LOGIT = 6
LOGPROB_TORCH_BUFFERS = 3


def _linear_logprob(hidden, weight, labels, softcap, impl, chunk_rows, **_):
    N, D = hidden.shape
    V = weight.shape[0]
    return 2 * N * D * V + LOGPROB_FLOPS_PER_LOGIT * N * V


def _linear_logprob_bwd(grad_out, hidden, weight, labels, lse, softcap, impl, chunk_rows, need_h, need_w, **_):
    N, D = hidden.shape
    V = weight.shape[0]
    return (2 * N * D * V + LOGPROB_FLOPS_PER_LOGIT * N * V + (2 * N * V * D if need_h else 0)
            + (2 * N * V * D if need_w else 0))


def _logprob_buffers(hidden, weight, labels, softcap, impl, chunk_rows):
    lp = importlib.import_module("repbend.kernels.linear_logprob")
    N, V = hidden.shape[0], weight.shape[0]
    if N == 0:
        return 0
    rows = lp._rows_per_chunk(N, weight, impl, chunk_rows)
    return rows * V * (weight.element_size() if impl == "triton" else 4 * LOGPROB_TORCH_BUFFERS)


def _linear_logprob_buffers(hidden, weight, labels, softcap, impl, chunk_rows, **_):
    return _logprob_buffers(hidden, weight, labels, softcap, impl, chunk_rows)


def _linear_logprob_bwd_buffers(grad_out, hidden, weight, labels, lse, softcap, impl, chunk_rows, *rest, **_):
    return _logprob_buffers(hidden, weight, labels, softcap, impl, chunk_rows)


@dataclass(frozen=True)
class FusedCost:
    flops: Callable
    buffers: Callable | None = None

    def transient_bytes(self, args, kwargs) -> int:
        return int(self.buffers(*args, **kwargs)) if self.buffers else 0


# keyed by the op's name as str(op overload packet)
FUSED = {
    "repbend.rep_distance_fwd": FusedCost(_rep_distance_fwd),
    "repbend.rep_distance_bwd": FusedCost(_rep_distance_bwd),
    "repbend.pairwise_cosine_fwd": FusedCost(_pairwise_fwd),
    "repbend.pairwise_cosine_bwd": FusedCost(_pairwise_bwd),
    "repbend.linear_kl": FusedCost(_linear_kl, _linear_kl_buffers),
    "repbend.linear_logprob": FusedCost(_linear_logprob, _linear_logprob_buffers),
    "repbend.linear_logprob_backward": FusedCost(_linear_logprob_bwd, _linear_logprob_bwd_buffers),
}


def _kv_as_query_heads(query_shape, *shapes):
    """Key/value shapes (b, h_kv, s, d) with the query's head count: grouped-query attention broadcasts each KV head
    to its query heads, so the FLOPs are those of h_q heads. torch's own formulas accept h_kv < h_q only from 2.13
    on (2.11 raises), so the shapes are expanded before they reach them."""
    h = query_shape[1]
    return [tuple(s[:1]) + (h,) + tuple(s[2:]) for s in shapes]


def _sdpa_cpu_fwd(query, key, value, *args, out_val=None, **kwargs):
    from torch.utils.flop_counter import sdpa_flop_count
    return sdpa_flop_count(tuple(query.shape), *_kv_as_query_heads(query.shape, key.shape, value.shape))


def _sdpa_cpu_bwd(grad_out, query, key, value, *args, out_val=None, **kwargs):
    from torch.utils.flop_counter import sdpa_backward_flop_count
    return sdpa_backward_flop_count(tuple(grad_out.shape), tuple(query.shape),
                                    *_kv_as_query_heads(query.shape, key.shape, value.shape))


def extra_flop_formulas() -> dict:
    """{op overload packet: formula(*args, out_val, **kwargs) -> FLOPs}: the fused ops (the kernels must be
    imported, which registers them) and the CPU flash-attention ops torch's counter has no formula for."""
    import torch

    import repbend.kernels  # noqa: F401 - registers torch.ops.repbend.*

    out = {}
    for name, cost in FUSED.items():
        ns, op = name.split(".", 1)
        packet = getattr(getattr(torch.ops, ns), op, None)
        if packet is not None:
            out[packet] = (lambda f: lambda *a, out_val=None, **k: f(*a, **k))(cost.flops)
    for op, f in (("_scaled_dot_product_flash_attention_for_cpu", _sdpa_cpu_fwd),
                  ("_scaled_dot_product_flash_attention_for_cpu_backward", _sdpa_cpu_bwd)):
        packet = getattr(torch.ops.aten, op, None)
        if packet is not None:
            out[packet] = f
    return out
