"""Triton kernels of `rep_distance` and the custom ops that launch them (repbend::rep_distance_fwd / _bwd).

Shapes: hidden is L x [B, T, D] (a list) or one [L, B, T, D]; ref the same, or gathered [L, N, D]; rows int64 [N],
the flat positions b * T + t of the masked tokens, ascending and unique. Float32 arithmetic throughout.

Forward, grid (N, L): program (i, l) reads row rows[i] of layer l of hidden and ref (ref row i if gathered) in
BLOCK_D chunks, accumulating sum (h - r)^2, |h|^2, |r|^2 and <h, r> in float32, and writes, into buf [7, L, N]:
    0 dist = ||h - r||     1 cos = <h, r> / (max(|h|, eps) max(|r|, eps))     2 max(cos, 0)     3 ss = ||h - r||^2
    4 inv_dist = 1 / dist (0 at dist = 0)     5 inv_den = 1 / (max(|h|, eps) max(|r|, eps))
    6 c_h = cos / (max(|h|, eps) |h|) (0 at |h| = 0)
sums [4, L] = buf[:4].sum(-1), deterministic (no atomics). Programs of layer 0 also write slot[rows[i]] = i into
slot [B*T + 1] (int32, -1 elsewhere), the map the backward reads; a row index out of [0, B*T) or not above its
predecessor loads nothing and sets slot[B*T] = 1, which an async assert turns into an error.

Backward, grid (B*T, L'): program (p, j) writes row p of layer j's gradient (zeros for an unmasked position), with
the upstream gradients g = grad of (l2, cos, relu_cos, sq) [4, L]:
    dL/dh = (g_l2 inv_dist + 2 g_sq) (h - r) + (g_cos + g_relu [cos > 0]) (inv_den r - c_h h)
(0 where h == r for the norm: its subgradient at 0; the relu's gradient at cos = 0 is 0, as torch.relu's). The
cosine term is autograd's gradient of F.cosine_similarity, which clamps each norm at eps under no_grad and lets
the gradient flow through the unclamped norm.

The backward covers every position, not only the N selected ones: autograd needs the whole [B, T, D] gradient of
each layer, and writing its zero rows in the same pass moves exactly those bytes once (a memset first would write
the selected rows twice). The traffic of one forward + backward is thus 2 L N D reads, then 2 L N D reads and
L B T D writes (benchmarks/bench_kernels.py reports it against a device copy).

Layers are addressed through strides when hidden / ref are one tensor each, and through an int64 table of base
addresses (one row per layer, built from data_ptr() on the host) when either is a list: L model outputs cost one
launch and no stacking copy. Within a layer, rows use the caller's strides (b, t, d), so views are read in place;
a gathered ref may have row stride 0 (one vector expanded over the rows). The table comes from host memory, so the
list form refuses CUDA-graph capture (see _dispatch.pointer_table); the stacked form captures.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dispatch import cudagraph_unsafe_tags, num_chunks, on_device, pointer_table

COS_EPS = 1e-8  # torch.nn.functional.cosine_similarity's default eps
BUF_ROWS = 7
SUM_ROWS = 4
# Integer arguments that change with the micro-batch (selected rows, positions, row length) or the method (layers).
# Triton would specialise an int argument on divisibility by 16 and turn one equal to 1 into a constant: one
# compiled variant per combination, compiled inside a timed step whenever a micro-batch brings a new one (0.3-0.5 s
# each on an H100). Not specialised, each kernel has one variant per dtype and form (tests/test_kernel_compile.py
# counts them). They only index rows, never the vectorised feature axis, so nothing is lost.
SHAPE_ARGS_FWD = ("N", "BT", "T")
SHAPE_ARGS_BWD = ("N", "L", "BT", "T")


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _layer_bases(h_ptr, r_ptr, tab_ptr, slot, layer, h_stride_l, r_stride_l,
                 TAB_COLS: tl.constexpr, TABLE: tl.constexpr, ALIGNED: tl.constexpr):
    """Typed pointers to layer `layer`'s hidden and ref: from table row `slot`, or from layer 0 and the strides."""
    if TABLE:
        h_base = tl.load(tab_ptr + slot * TAB_COLS).to(tl.pointer_type(h_ptr.dtype.element_ty), bitcast=True)
        r_base = tl.load(tab_ptr + slot * TAB_COLS + 1).to(tl.pointer_type(r_ptr.dtype.element_ty), bitcast=True)
        if ALIGNED:  # every address 16-byte aligned: lets the compiler vectorise the row loads
            h_base = tl.multiple_of(h_base, 16)
            r_base = tl.multiple_of(r_base, 16)
    else:
        h_base = h_ptr + layer.to(tl.int64) * h_stride_l
        r_base = r_ptr + layer.to(tl.int64) * r_stride_l
    return h_base, r_base


@triton.jit
def _add4(a0, a1, a2, a3, b0, b1, b2, b3):
    return a0 + b0, a1 + b1, a2 + b2, a3 + b3


@triton.jit(do_not_specialize=SHAPE_ARGS_FWD)
def _rep_distance_fwd_kernel(
    h_ptr, r_ptr,  # typed pointers to layer 0 (element types; the bases when TABLE is off)
    tab_ptr,  # int64 [L, 2]: base address of each layer of hidden, ref (TABLE only)
    rows_ptr,  # int64 [N]: flat positions b * T + t of the masked tokens, ascending
    slot_ptr,  # int32 [BT + 1]: slot[rows[i]] = i (written by layer 0); slot[BT] = 1 flags a bad row index
    buf_ptr,  # fp32 [7, L, N]: per-row values (module docstring)
    N, BT, T, D,
    h_stride_l, h_stride_b, h_stride_t, h_stride_d,
    r_stride_l, r_stride_b, r_stride_t, r_stride_d,  # gathered ref: (l, n, -, d)
    eps,
    TABLE: tl.constexpr, ALIGNED: tl.constexpr, R_GATHERED: tl.constexpr,
    BLOCK_D: tl.constexpr, NUM_CHUNKS: tl.constexpr,
):
    i = tl.program_id(0)
    layer = tl.program_id(1)
    n_layers = tl.num_programs(1)
    pos = tl.load(rows_ptr + i)
    prev = tl.load(rows_ptr + i - 1, mask=i > 0, other=-1)
    ok = (pos >= 0) & (pos < BT) & (prev < pos)
    pos = tl.where(ok, pos, 0)
    b = pos // T
    t = pos - b * T
    h_base, r_base = _layer_bases(h_ptr, r_ptr, tab_ptr, layer, layer, h_stride_l, r_stride_l, 2, TABLE, ALIGNED)
    h_row = h_base + b * h_stride_b + t * h_stride_t
    if R_GATHERED:
        r_row = r_base + i.to(tl.int64) * r_stride_b
    else:
        r_row = r_base + b * r_stride_b + t * r_stride_t

    # Vector partial sums, one chunk wide (a few values per thread), reduced once after the loop.
    acc_dd = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_hh = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_rr = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_hr = tl.zeros([BLOCK_D], dtype=tl.float32)
    for c in range(NUM_CHUNKS):
        offs = c * BLOCK_D + tl.arange(0, BLOCK_D)
        ld = (offs < D) & ok
        h = tl.load(h_row + offs * h_stride_d, mask=ld, other=0.0).to(tl.float32)
        r = tl.load(r_row + offs * r_stride_d, mask=ld, other=0.0).to(tl.float32)
        diff = h - r
        acc_dd += diff * diff
        acc_hh += h * h
        acc_rr += r * r
        acc_hr += h * r
    # one reduction of the four partial sums: one pass through shared memory, not four
    ss, hh, rr, hr = tl.reduce((acc_dd, acc_hh, acc_rr, acc_hr), 0, _add4)
    dist = tl.sqrt_rn(ss)
    norm_h = tl.sqrt_rn(hh)
    den_h = tl.maximum(norm_h, eps)
    inv_den = 1.0 / (den_h * tl.maximum(tl.sqrt_rn(rr), eps))
    cos = hr * inv_den
    # d dist / dh = (h - r) / dist, d cos / dh = inv_den r - cos h / (den_h |h|): both 0 at a zero norm
    inv_dist = tl.where(dist > 0.0, 1.0 / tl.where(dist > 0.0, dist, 1.0), 0.0)
    c_h = tl.where(norm_h > 0.0, cos / (den_h * tl.where(norm_h > 0.0, norm_h, 1.0)), 0.0)

    out = buf_ptr + layer.to(tl.int64) * N + i
    field = n_layers.to(tl.int64) * N
    tl.store(out, dist)
    tl.store(out + field, cos)
    tl.store(out + 2 * field, tl.maximum(cos, 0.0))
    tl.store(out + 3 * field, ss)
    tl.store(out + 4 * field, inv_dist)
    tl.store(out + 5 * field, inv_den)
    tl.store(out + 6 * field, c_h)
    first = layer == 0
    tl.store(slot_ptr + pos, i, mask=first & ok)
    tl.store(slot_ptr + BT, 1, mask=first & (ok == 0))


@triton.jit(do_not_specialize=SHAPE_ARGS_BWD)
def _rep_distance_bwd_kernel(
    h_ptr, r_ptr, g_ptr,  # typed pointers (element types); g is contiguous [L', B, T, D]
    up_ptr,  # contiguous [L', B, T, D] gradient arriving from elsewhere, added to g (ACCUMULATE only)
    tab_ptr,  # int64 [L', 3]: base address of hidden, ref and the layer index, per layer needing a grad (TABLE)
    slot_ptr,  # int32 [BT + 1] from the forward: masked row of each position, -1 if none
    buf_ptr,  # fp32 [7, L, N] from the forward
    gsum_ptr,  # fp32 [4, L]: upstream gradients of l2, cos, relu_cos, sq
    N, L, BT, T, D,
    h_stride_l, h_stride_b, h_stride_t, h_stride_d,
    r_stride_l, r_stride_b, r_stride_t, r_stride_d,
    TABLE: tl.constexpr, ALIGNED: tl.constexpr, R_GATHERED: tl.constexpr, ACCUMULATE: tl.constexpr,
    BLOCK_D: tl.constexpr, NUM_CHUNKS: tl.constexpr,
):
    pos = tl.program_id(0)
    j = tl.program_id(1)
    if TABLE:
        layer = tl.load(tab_ptr + j * 3 + 2).to(tl.int32)
    else:
        layer = j
    h_base, r_base = _layer_bases(h_ptr, r_ptr, tab_ptr, j, layer, h_stride_l, r_stride_l, 3, TABLE, ALIGNED)
    i = tl.load(slot_ptr + pos)
    on = i >= 0
    i = tl.maximum(i, 0)
    pos64 = pos.to(tl.int64)
    b = pos64 // T
    t = pos64 - b * T
    h_row = h_base + b * h_stride_b + t * h_stride_t
    if R_GATHERED:
        r_row = r_base + i.to(tl.int64) * r_stride_b
    else:
        r_row = r_base + b * r_stride_b + t * r_stride_t
    g_row = g_ptr + (j.to(tl.int64) * BT + pos64) * D
    up_row = up_ptr + (j.to(tl.int64) * BT + pos64) * D

    row = buf_ptr + layer.to(tl.int64) * N + i
    field = tl.cast(L, tl.int64) * N  # tl.cast, not L.to(): a specialised L == 1 would be a plain int
    cos = tl.load(row + field, mask=on, other=0.0)
    inv_dist = tl.load(row + 4 * field, mask=on, other=0.0)
    inv_den = tl.load(row + 5 * field, mask=on, other=0.0)
    c_h = tl.load(row + 6 * field, mask=on, other=0.0)
    g_l2 = tl.load(gsum_ptr + layer)
    g_cos = tl.load(gsum_ptr + L + layer)
    g_relu = tl.load(gsum_ptr + 2 * L + layer)
    g_sq = tl.load(gsum_ptr + 3 * L + layer)
    g_c = g_cos + tl.where(cos > 0.0, g_relu, 0.0)
    a_d = g_l2 * inv_dist + 2.0 * g_sq  # on (h - r): rounding relative to the change, not to |h|
    a_r = g_c * inv_den
    a_h = -g_c * c_h
    for c in range(NUM_CHUNKS):
        offs = c * BLOCK_D + tl.arange(0, BLOCK_D)
        in_row = offs < D
        ld = in_row & on  # an unmasked position loads nothing: h = r = 0 gives a zero row
        h = tl.load(h_row + offs * h_stride_d, mask=ld, other=0.0).to(tl.float32)
        r = tl.load(r_row + offs * r_stride_d, mask=ld, other=0.0).to(tl.float32)
        g = a_d * (h - r) + a_r * r + a_h * h
        if ACCUMULATE:
            g += tl.load(up_row + offs, mask=in_row, other=0.0).to(tl.float32)
        tl.store(g_row + offs, g.to(g_ptr.dtype.element_ty), mask=in_row)


def launch_config(D: int, dtype: torch.dtype) -> dict:
    """BLOCK_D, NUM_CHUNKS and num_warps for rows of D features of `dtype` (both kernels).

    A chunk is 8 values per thread (one 16-byte load of bf16, two of fp32) over 8 warps: 2048 features, so
    D = 4096 is two chunks, whose loads ptxas issues together in the forward. With the four sums reduced as one
    tuple, sm_90 needs 32 (bf16) / 37-39 (fp32) registers in the forward, 30-32 in the backward, no spills
    (tests/test_kernel_compile.py): 8 programs of 8 warps fit on an SM. (One 4096-wide chunk with four separate
    reductions took 98 registers.)
    """
    block_d = min(triton.next_power_of_2(max(int(D), 1)), 2048)
    num_warps = max(1, min(8, block_d // 256))
    return {"BLOCK_D": block_d, "NUM_CHUNKS": num_chunks(D, block_d), "num_warps": num_warps}


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------
def _same_strides(layers: list[torch.Tensor]) -> list[torch.Tensor]:
    """Layers sharing one stride pattern, as the kernels take one (b, t, d) stride set for all layers of a list.

    A model's per-layer outputs already do; otherwise the layers are made contiguous.
    """
    if all(x.stride() == layers[0].stride() for x in layers):
        return layers
    return [x.contiguous() for x in layers]


class _Operands:
    """hidden / ref as the kernels see them: layer-0 tensors, (l, b, t, d) strides, per-layer addresses."""

    def __init__(self, hidden: list[torch.Tensor], ref: list[torch.Tensor], ref_gathered: bool):
        self.stacked = hidden[0].dim() == 4
        self.hs = [hidden[0]] if self.stacked else _same_strides(list(hidden))
        ref_list = not ref_gathered and ref[0].dim() == 3
        self.rs = _same_strides(list(ref)) if ref_list else [ref[0]]
        self.table = not self.stacked or ref_list  # a list on either side: per-layer base addresses
        self.h_strides = _strides4(self.hs, gathered=False)
        self.r_strides = _strides4(self.rs, gathered=ref_gathered)
        self.L = hidden[0].shape[0] if self.stacked else len(hidden)
        self.B, self.T, self.D = self.hs[0].shape[-3:]

    def addresses(self, layer: int) -> list[int]:
        """[hidden, ref] base addresses of one layer (table rows)."""
        return [_address(self.hs, self.h_strides, layer), _address(self.rs, self.r_strides, layer)]

    def table_aligned(self, rows: list[list[int]]) -> bool:
        """Every address in the table 16-byte aligned (the row strides' divisibility Triton finds by itself)."""
        return all(a % 16 == 0 for row in rows for a in row[:2])


def _strides4(ts: list[torch.Tensor], gathered: bool) -> tuple[int, int, int, int]:
    """(layer, b, t, d) strides in elements; a gathered [L, N, D] ref is (layer, n, 0, d); a list has layer 0."""
    if gathered:
        sl, sn, sd = ts[0].stride()
        return sl, sn, 0, sd
    if len(ts) == 1 and ts[0].dim() == 4:
        return tuple(ts[0].stride())
    return (0, *ts[0].stride())


def _address(ts: list[torch.Tensor], strides, layer: int) -> int:
    if len(ts) > 1:
        return ts[layer].data_ptr()
    return ts[0].data_ptr() + layer * strides[0] * ts[0].element_size()


def _forward(hidden: list[torch.Tensor], ref: list[torch.Tensor], rows: torch.Tensor, ref_gathered: bool):
    """(sums [4, L] fp32, buf [7, L, N] fp32, slot [BT + 1] int32): the forward kernel and its reduction."""
    ops = _Operands(hidden, ref, ref_gathered)
    L, BT, D, N = ops.L, ops.B * ops.T, ops.D, rows.shape[0]
    dev = hidden[0].device
    buf = torch.empty((BUF_ROWS, L, N), dtype=torch.float32, device=dev)
    slot = torch.full((BT + 1,), -1, dtype=torch.int32, device=dev)
    if N > 0 and D > 0:
        if ops.table:
            addrs = [ops.addresses(layer) for layer in range(L)]
            tab, aligned = pointer_table(addrs, dev, "rep_distance"), ops.table_aligned(addrs)
        else:
            tab, aligned = rows, True
        cfg = launch_config(D, hidden[0].dtype)
        with on_device(dev):
            _rep_distance_fwd_kernel[(N, L)](
                ops.hs[0], ops.rs[0], tab, rows, slot, buf, N, BT, ops.T, D, *ops.h_strides, *ops.r_strides,
                COS_EPS, TABLE=ops.table, ALIGNED=aligned, R_GATHERED=ref_gathered, **cfg)
        torch._assert_async(slot[BT] < 0, "rep_distance: the row indices must be ascending, unique and in [0, B*T)")
    else:
        buf.zero_()
    return buf[:SUM_ROWS].sum(dim=-1), buf, slot


def _backward(grad_sums: torch.Tensor, buf: torch.Tensor, slot: torch.Tensor, hidden: list[torch.Tensor],
              ref: list[torch.Tensor], ref_gathered: bool, layers: list[int],
              upstream: torch.Tensor | None = None) -> torch.Tensor:
    """Gradient [len(layers), B, T, D] in hidden's dtype for the listed layers (all of a stacked hidden), plus
    `upstream` (the same shape) when given."""
    ops = _Operands(hidden, ref, ref_gathered)
    L, BT, D, N = ops.L, ops.B * ops.T, ops.D, buf.shape[-1]
    dev, dtype = hidden[0].device, hidden[0].dtype
    shape = (len(layers), ops.B, ops.T, D)
    if N == 0 or D == 0 or BT == 0 or not layers:
        return upstream.to(dtype).clone() if upstream is not None else torch.zeros(shape, dtype=dtype, device=dev)
    grad = torch.empty(shape, dtype=dtype, device=dev)
    up = grad if upstream is None else upstream.to(dtype).contiguous()
    if ops.table:
        addrs = [ops.addresses(layer) + [layer] for layer in layers]
        tab, aligned = pointer_table(addrs, dev, "rep_distance"), ops.table_aligned(addrs)
    else:
        tab, aligned = slot, True
    cfg = launch_config(D, dtype)
    g = grad_sums.detach().to(torch.float32).contiguous()
    with on_device(dev):
        _rep_distance_bwd_kernel[(BT, len(layers))](
            ops.hs[0], ops.rs[0], grad, up, tab, slot, buf, g, N, L, BT, ops.T, D, *ops.h_strides, *ops.r_strides,
            TABLE=ops.table, ALIGNED=aligned, R_GATHERED=ref_gathered, ACCUMULATE=upstream is not None, **cfg)
    return grad


# ----------------------------------------------------------------------------------------------------------------
# Custom ops: opaque to torch.compile (no graph break, no guard on tensor addresses), autograd registered
# ----------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("repbend::rep_distance_fwd", mutates_args=(), tags=cudagraph_unsafe_tags())
def rep_distance_fwd(hidden: list[torch.Tensor], ref: list[torch.Tensor], rows: torch.Tensor,
                     ref_gathered: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden: [H [L, B, T, D]] or L x [B, T, D]; ref: the same forms or [R [L, N, D]] (ref_gathered); rows: int64
    [N]. Returns (sums [4, L], buf [7, L, N], slot [B*T + 1]) as described in the module docstring."""
    return _forward(hidden, ref, rows, ref_gathered)


@rep_distance_fwd.register_fake
def _(hidden, ref, rows, ref_gathered):
    h0 = hidden[0]
    L = h0.shape[0] if h0.dim() == 4 else len(hidden)
    B, T = h0.shape[-3], h0.shape[-2]
    return (h0.new_empty((SUM_ROWS, L), dtype=torch.float32),
            h0.new_empty((BUF_ROWS, L, rows.shape[0]), dtype=torch.float32),
            h0.new_empty((B * T + 1,), dtype=torch.int32))


@torch.library.custom_op("repbend::rep_distance_bwd", mutates_args=(), tags=cudagraph_unsafe_tags())
def rep_distance_bwd(grad_sums: torch.Tensor, buf: torch.Tensor, slot: torch.Tensor, hidden: list[torch.Tensor],
                     ref: list[torch.Tensor], ref_gathered: bool, layers: list[int],
                     upstream: torch.Tensor | None = None) -> torch.Tensor:
    """Gradient of sum(grad_sums * sums) in hidden, [len(layers), B, T, D], for the given layer indices, plus
    `upstream` ([len(layers), B, T, D]) when given."""
    return _backward(grad_sums, buf, slot, hidden, ref, ref_gathered, layers, upstream)


@rep_distance_bwd.register_fake
def _(grad_sums, buf, slot, hidden, ref, ref_gathered, layers, upstream=None):
    h0 = hidden[0]
    return h0.new_empty((len(layers), *h0.shape[-3:]))


class _Deferred:
    """Per-layer gradients written as the backward reaches each layer (see `_setup_context`).

    The op's backward stores the upstream gradients of the sums here and returns, for each deferred layer, a zero
    placeholder that holds no memory; a hook on that layer's hidden state, which autograd runs once the layer's
    whole gradient has arrived, replaces it by that gradient plus this op's term for the layer, in one kernel
    launch. So only the layer being processed holds a slot, instead of all L layers' gradients from the start of the
    backward (2.75 GiB for RepBend's 44 slots at Llama-3-8B, batch 4).

    Only in a plain backward (`.backward()` without `inputs`): `torch.autograd.grad` returns the gradient of a
    hidden state it is asked for before that tensor's hooks run (when the engine still needs to go past it), so
    there the op writes every layer's gradient at once, as it always did. `probe_plain_backward` tells which."""

    def __init__(self):
        self.pending: dict[int, tuple] = {}  # layer index -> (grad_sums, buf, slot, hidden, ref, ref_gathered)
        self.plain = False  # set by the probe just before each backward of the op


class _PlainBackwardProbe(torch.autograd.Function):
    """Identity on the sums; its backward (which runs right before the op's) records whether this backward is a
    plain one: the engine then runs every node, a throwaway leaf's included (`torch._C._will_engine_execute_node`),
    which `autograd.grad` and `backward(inputs=...)` skip."""

    @staticmethod
    def forward(ctx, sums, sentinel):
        return sums.view_as(sums)

    @staticmethod
    def backward(ctx, grad):
        ctx.state.plain = bool(torch._C._will_engine_execute_node(ctx.sentinel_node))
        return grad, None


def probe_plain_backward(sums: torch.Tensor) -> torch.Tensor:
    """`sums` (the op's first output) through `_PlainBackwardProbe` when the op deferred its gradients."""
    if torch.compiler.is_compiling():  # compiled: the op never defers (see _deferrable)
        return sums
    state = getattr(sums.grad_fn, "deferred", None)
    if state is None:
        return sums
    sentinel = torch.empty(0, device=sums.device, requires_grad=True)
    out = _PlainBackwardProbe.apply(sums, sentinel)
    out.grad_fn.state = state
    out.grad_fn.sentinel_node = torch.autograd.graph.get_gradient_edge(sentinel).node
    return out


def _deferrable(hidden) -> bool:
    """Eager autograd on plain (or fake) tensors: not while torch.compile, AOTAutograd or a functional mode traces,
    which run the whole backward as one op."""
    from torch._subclasses.fake_tensor import FakeTensor

    if torch.compiler.is_compiling():
        return False
    return all(type(h) in (torch.Tensor, torch.nn.Parameter, FakeTensor) for h in hidden)


def _layer_hook(state_ref, index: int):
    def hook(grad):
        state = state_ref()
        if state is None or index not in state.pending:
            return grad  # a backward that did not go through this op
        grad_sums, buf, slot, hidden, ref, ref_gathered = state.pending.pop(index)
        if grad.dim() == 3 and grad.stride() == (0, 0, 0):  # only the placeholder arrived
            up = None
        else:
            up = grad.unsqueeze(0)
        return rep_distance_bwd(grad_sums, buf, slot, hidden, ref, ref_gathered, [index], up)[0]
    return hook


def _setup_context(ctx, inputs, output):
    hidden, ref, rows, ref_gathered = inputs
    _, buf, slot = output
    ctx.ref_gathered = ref_gathered
    ctx.n_hidden, ctx.n_ref = len(hidden), len(ref)
    ctx.stacked = hidden[0].dim() == 4
    ctx.needs = [h.requires_grad for h in hidden]
    ctx.save_for_backward(buf, slot, *hidden, *ref)
    ctx.mark_non_differentiable(buf, slot)
    # A list of per-layer outputs: each layer's gradient is written when autograd reaches that layer (_Deferred).
    ctx.deferred = None
    if not ctx.stacked and any(ctx.needs) and _deferrable(hidden):
        import weakref
        ctx.deferred = _Deferred()  # held by the graph; the hooks only refer to it weakly
        for i, h in enumerate(hidden):
            if ctx.needs[i]:
                h.register_hook(_layer_hook(weakref.ref(ctx.deferred), i))


def _autograd_backward(ctx, grad_sums, grad_buf, grad_slot):
    buf, slot, *tensors = ctx.saved_tensors
    hidden, ref = tensors[:ctx.n_hidden], tensors[ctx.n_hidden:]
    if ctx.stacked:
        layers = list(range(hidden[0].shape[0])) if ctx.needs[0] else []
    else:
        layers = [i for i, need in enumerate(ctx.needs) if need]
    no_ref = [None] * ctx.n_ref  # the returned structure must match the inputs'
    if not layers:
        return [None] * ctx.n_hidden, no_ref, None, None
    if grad_sums is None:
        grad_sums = buf.new_zeros((SUM_ROWS, buf.shape[1]))
    plain = ctx.deferred is not None and ctx.deferred.plain
    if plain:
        ctx.deferred.plain = False
        args = (grad_sums.detach(), buf, slot, list(hidden), list(ref), ctx.ref_gathered)
        out = []
        for i, h in enumerate(hidden):
            if ctx.needs[i]:
                ctx.deferred.pending[i] = args
                out.append(h.new_zeros(()).expand(h.shape))  # the hook on hidden[i] writes the real gradient
            else:
                out.append(None)
        return out, no_ref, None, None
    grad = rep_distance_bwd(grad_sums, buf, slot, list(hidden), list(ref), ctx.ref_gathered, layers)
    if ctx.stacked:
        return [grad], no_ref, None, None
    per_layer = iter(grad.unbind(0))
    return [next(per_layer) if need else None for need in ctx.needs], no_ref, None, None


rep_distance_fwd.register_autograd(_autograd_backward, setup_context=_setup_context)
