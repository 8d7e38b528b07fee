"""rep_distance with an index tensor of flat positions (the rows launch), and the relu_cos / sq outputs.

Every case is checked against the float64 formula of kernel_refs.py, forward and gradient of all four outputs under
random upstream gradients: fp32 inputs within 2e-5 relative to the largest magnitude; bf16 no worse than the plain
bf16 PyTorch path plus 1e-4 of the largest magnitude (as in test_rep_distance.py).
"""
import pytest
import torch

from kernel_refs import (DEVICE, FIELDS, assert_fp32_close, f64_reference, lowp_rep_distance, max_err, on_device,
                         scale_of, upstream, weighted)
from repbend.kernels import rep_distance

IMPLS = ["torch", "triton"]


def make(L, B, T, D, dtype=torch.float32, seed=0, n=None, spread=0.3):
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(L, B, T, D, generator=g).to(dtype)
    hidden = (ref.float() + spread * torch.randn(L, B, T, D, generator=g)).to(dtype)
    n = (B * T + 1) // 2 if n is None else n
    rows = torch.randperm(B * T, generator=g)[:n].sort().values
    return hidden, ref, rows


def gather(ref, rows):
    L, B, T, D = ref.shape
    return ref.reshape(L, B * T, D)[:, rows]


def run(hidden, ref, rows, impl, g, stacked=True):
    """rep_distance on DEVICE copies: (RepDistance, gradient [L, B, T, D] on the CPU)."""
    leaf = on_device(hidden).requires_grad_()
    h_arg = leaf if stacked else list(leaf.unbind(0))
    ref_arg = on_device(ref) if isinstance(ref, torch.Tensor) else on_device(list(ref))
    out = rep_distance(h_arg, ref_arg, on_device(rows), impl=impl)
    (grad,) = torch.autograd.grad(weighted(out, g), leaf)
    return out, grad.cpu()


def check(out, grad, want, want_grads, what=""):
    for k in FIELDS:
        assert getattr(out, k).dtype == torch.float32
        assert_fp32_close(getattr(out, k), want[k], f"{what}{k}")
    assert torch.isfinite(grad).all()
    assert_fp32_close(grad, torch.stack(want_grads), f"{what}grad")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("stacked", [True, False], ids=["stacked", "list"])
@pytest.mark.parametrize("ref_form", ["full", "gathered", "list"])
def test_indices_match_float64_and_mask(impl, stacked, ref_form):
    L, B, T, D = 3, 3, 5, 37
    hidden, ref, rows = make(L, B, T, D, seed=1)
    g = upstream(L, seed=2)
    ref_arg = {"full": ref, "gathered": gather(ref, rows), "list": list(ref)}[ref_form]
    out, grad = run(hidden, ref_arg, rows, impl, g, stacked)
    assert out.count.item() == rows.numel() and out.count.dtype == torch.int64
    check(out, grad, *f64_reference(list(hidden), ref, rows, g))

    mask = torch.zeros(B * T, dtype=torch.bool)
    mask[rows] = True
    leaf = on_device(hidden).requires_grad_()
    by_mask = rep_distance(leaf if stacked else list(leaf.unbind(0)), on_device(ref_arg), on_device(mask.view(B, T)),
                           impl=impl)
    (grad_mask,) = torch.autograd.grad(weighted(by_mask, g), leaf)
    for k in FIELDS:  # the same kernels on the same rows: identical results
        assert torch.equal(getattr(by_mask, k), getattr(out, k)), k
    assert torch.equal(grad_mask.cpu(), grad)


@pytest.mark.parametrize("impl", IMPLS)
def test_relu_and_square_edge_rows(impl):
    """cos exactly 0 (disjoint supports: relu's gradient is 0 there), negative cos, h == r, and ordinary rows."""
    L, B, T, D = 2, 2, 4, 24
    hidden, ref, _ = make(L, B, T, D, seed=3)
    hidden[:, 0, 0], ref[:, 0, 0] = 0.0, 0.0
    hidden[:, 0, 0, :12] = torch.randn(L, 12)
    ref[:, 0, 0, 12:] = torch.randn(L, 12)  # <h, r> = 0 exactly
    hidden[:, 0, 1] = -ref[:, 0, 1] + 0.1 * torch.randn(L, D)  # cos close to -1
    hidden[:, 1, 2] = ref[:, 1, 2]  # h == r: l2 = sq = 0, relu_cos = 1
    rows = torch.tensor([0, 1, 3, 6, 7])
    g = upstream(L, seed=4)
    out, grad = run(hidden, gather(ref, rows), rows, impl, g)
    want, want_grads = f64_reference(list(hidden), ref, rows, g)
    check(out, grad, want, want_grads)
    assert (out.relu_cos >= out.cos).all() and (out.relu_cos >= 0).all()
    # the cos = 0 row: relu_cos passes no gradient (torch.relu's convention), cos does
    g_relu = {k: torch.zeros(L) for k in FIELDS}
    g_relu["relu_cos"] = torch.ones(L)
    only = torch.tensor([0])
    out, grad = run(hidden, gather(ref, only), only, impl, g_relu)
    assert torch.equal(out.relu_cos.cpu(), torch.zeros(L)) and torch.equal(grad, torch.zeros_like(grad))
    g_cos = {k: torch.zeros(L) for k in FIELDS}
    g_cos["cos"] = torch.ones(L)
    _, grad = run(hidden, gather(ref, only), only, impl, g_cos)
    assert grad[:, 0, 0].abs().max() > 0


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("ref_form", ["full", "gathered"])
def test_empty_index(impl, ref_form):
    L, B, T, D = 2, 2, 3, 16
    hidden, ref, _ = make(L, B, T, D, seed=5)
    rows = torch.zeros(0, dtype=torch.int64)
    ref_arg = ref if ref_form == "full" else gather(ref, rows)
    out, grad = run(hidden, ref_arg, rows, impl, upstream(L))
    assert out.count.item() == 0
    for k in FIELDS:
        assert torch.equal(getattr(out, k).cpu(), torch.zeros(L)), k
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pos", [0, 5, 11])
def test_single_row(impl, pos):
    L, B, T, D = 2, 3, 4, 19
    hidden, ref, _ = make(L, B, T, D, seed=6 + pos)
    rows = torch.tensor([pos])
    g = upstream(L, seed=pos)
    out, grad = run(hidden, gather(ref, rows), rows, impl, g, stacked=False)
    check(out, grad, *f64_reference(list(hidden), ref, rows, g))
    others = torch.ones(B * T, dtype=torch.bool)
    others[pos] = False
    assert torch.equal(grad.reshape(L, B * T, D)[:, others], torch.zeros(L, B * T - 1, D))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 2, 7, 3), (4, 1, 9, 130), (2, 3, 1, 64), (2, 2, 2, 4100)])
def test_odd_shapes(impl, shape):
    """Odd sizes, D = 4100 (two full 2048-wide chunks and a partial one), index tensors as int32 too."""
    L, B, T, D = shape
    hidden, ref, rows = make(L, B, T, D, seed=sum(shape), n=max(1, (B * T * 2) // 3))
    g = upstream(L, seed=7)
    out, grad = run(hidden, ref, rows.to(torch.int32), impl, g)
    check(out, grad, *f64_reference(list(hidden), ref, rows, g))


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_no_worse_than_plain_bf16(impl):
    L, B, T, D = 3, 2, 6, 100
    hidden, ref, rows = make(L, B, T, D, dtype=torch.bfloat16, seed=8, spread=0.05)
    g = upstream(L, seed=9)
    ref_g = gather(ref, rows)
    out, grad = run(hidden, ref_g, rows, impl, g)
    want, want_grads = f64_reference(list(hidden), ref, rows, g)
    lp_leaf = hidden.clone().requires_grad_()
    lp = lowp_rep_distance(lp_leaf, ref_g, rows)
    (lp_grad,) = torch.autograd.grad(weighted(lp, {k: v.to(torch.bfloat16) for k, v in g.items()}), lp_leaf)
    assert grad.dtype == torch.bfloat16
    pairs = [(getattr(out, k), lp[k], want[k], k) for k in FIELDS] + [(grad, lp_grad, torch.stack(want_grads), "grad")]
    for got, low, exact, what in pairs:
        err, lp_err, scale = max_err(got, exact), max_err(low, exact), scale_of(exact)
        assert err <= lp_err + 1e-4 * scale, f"{what}: error {err:.3e} > plain bf16 path's {lp_err:.3e}"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("per_layer", [False, True], ids=["one_vector", "one_per_layer"])
def test_stride_zero_ref(impl, per_layer):
    """RMU's control vector: ref rows all the same vector (row stride 0), expanded without a copy."""
    L, B, T, D = 3, 2, 5, 40
    hidden, _, rows = make(L, B, T, D, seed=10)
    N = rows.numel()
    gen = torch.Generator().manual_seed(11)
    c = torch.randn(L if per_layer else 1, D, generator=gen) * 3.0
    ref_g = c.view(-1, 1, D).expand(L, N, D)
    assert ref_g.stride(1) == 0
    full = c.view(-1, 1, 1, D).expand(L, B, T, D)
    g = upstream(L, seed=12)
    out, grad = run(hidden, ref_g, rows, impl, g)
    check(out, grad, *f64_reference(list(hidden), full.contiguous(), rows, g))
    out_full, _ = run(hidden, full, rows, impl, g)  # stride 0 in b, t and (one vector) layer
    for k in FIELDS:
        assert_fp32_close(getattr(out_full, k), getattr(out, k).cpu(), f"full-shaped expanded ref {k}")


@pytest.mark.skipif(DEVICE.type == "cuda", reason="a device-side assert would end the CUDA context of the session")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("rows", [[0, 3, 2], [1, 1, 4], [0, 12], [-1, 2]], ids=["unsorted", "dup", "high", "neg"])
def test_bad_indices_raise(impl, rows):
    hidden, ref, _ = make(2, 3, 4, 8, seed=13)  # B * T = 12 positions
    with pytest.raises(RuntimeError, match="ascending, unique and in"):
        rep_distance(hidden, ref, torch.tensor(rows), impl=impl)


def test_index_form_errors():
    hidden, ref, rows = make(2, 3, 4, 8, seed=14)
    with pytest.raises(TypeError, match="index tensor"):
        rep_distance(hidden, ref, torch.ones(12, dtype=torch.bool))
    with pytest.raises(TypeError, match="int64"):
        rep_distance(hidden, ref, rows.float())
    with pytest.raises(ValueError, match="N = 7 rows per layer but 6 tokens"):
        rep_distance(hidden, torch.randn(2, 7, 8), rows, impl="triton")
    with pytest.raises(ValueError, match="mask"):
        rep_distance(hidden, ref, rows.view(2, 3))
