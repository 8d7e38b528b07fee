"""rep_distance with a [B, T] mask: every impl against the float64 formula of kernel_refs.py, forward and gradient of
all four outputs (l2, cos, relu_cos, sq) under random upstream gradients. (Index tensors, stride-0 refs and the
relu / square edge cases: test_rep_distance_rows.py.)

Tolerances: float32 inputs: forward and gradient within 2e-5 relative to the largest magnitude (fp32 arithmetic on
rows of <= 130 features). bf16 / fp16 inputs (judged as cut-cross-entropy does): the error against float64 (computed
from the same low-precision values) must be no worse than that of the plain low-precision PyTorch path (the same
formula run in bf16 / fp16 by autograd) plus 1e-4 of the largest magnitude.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from kernel_refs import (FIELDS, assert_fp32_close, f64_reference, f64_rep_distance, lowp_rep_distance,
                         mask_to_rows, max_err, on_device, scale_of, upstream, weighted)
from repbend.kernels.rep_distance import RepDistance, RepDistanceLoss, launch_config, rep_distance

IMPLS = ["torch", "triton", "auto"]


def make_case(L, B, T, D, dtype, seed=0, p_mask=0.6, close=True):
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(L, B, T, D, generator=g).to(dtype)
    # LoRA-like: hidden close to ref, or independent
    noise = torch.randn(L, B, T, D, generator=g) * (0.3 if close else 1.0)
    hidden = (ref.float() + noise).to(dtype)
    mask = torch.rand(B, T, generator=g) < p_mask
    return hidden, ref, mask


def run(hidden, ref, mask, impl, g, stacked):
    """rep_distance on DEVICE copies; returns (RepDistance, gradients as L CPU tensors)."""
    leaves = [on_device(hidden).requires_grad_()] if stacked else [h.requires_grad_() for h in on_device(hidden)]
    ref_arg = on_device(ref) if isinstance(ref, torch.Tensor) else on_device(list(ref))
    out = rep_distance(leaves[0] if stacked else leaves, ref_arg, on_device(mask), impl=impl)
    grads = torch.autograd.grad(weighted(out, g), leaves)
    grads = list(grads[0].unbind(0)) if stacked else list(grads)
    return out, [x.cpu() for x in grads]


def check_fp32(out, grads, want, want_grads, what=""):
    for k in FIELDS:
        assert_fp32_close(getattr(out, k), want[k], f"{what}{k}")
    for i, (gr, wr) in enumerate(zip(grads, want_grads)):
        assert torch.isfinite(gr).all()
        assert_fp32_close(gr, wr, f"{what}grad layer {i}")


def test_vector_norm_and_cosine_zero_gradient_conventions():
    """torch's own conventions the kernels copy: ||x|| has gradient 0 at 0; cosine_similarity clamps each norm."""
    x = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(torch.linalg.vector_norm(x), x)
    assert torch.equal(g, torch.zeros_like(g))
    # tiny |h| (below eps): F.cosine_similarity = <h, r> / (max(|h|, eps) max(|r|, eps)), not / max(|h||r|, eps^2)
    g64 = torch.Generator().manual_seed(0)
    for sh, sr in [(1e-10, 1.0), (1e-5, 1e-5), (1e-9, 1e-9), (1.0, 1e-10), (0.0, 1.0)]:
        h = torch.randn(4, generator=g64, dtype=torch.float64)
        h = (h / h.norm() * sh).requires_grad_()
        r = torch.randn(4, generator=g64, dtype=torch.float64)
        r = r / r.norm() * sr
        c = F.cosine_similarity(h, r, dim=-1)
        (gt,) = torch.autograd.grad(c, h)
        h1 = h.detach().clone().requires_grad_()
        mine = f64_rep_distance([h1.view(1, 1, 4)], [r.view(1, 1, 4)], torch.tensor([0]))
        (gm,) = torch.autograd.grad(mine["cos"].sum(), h1)
        assert math.isclose(mine["cos"].item(), c.item(), rel_tol=1e-12, abs_tol=1e-300)
        assert torch.allclose(gm, gt, rtol=1e-10, atol=0), (sh, sr, gm, gt)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("stacked", [True, False], ids=["stacked", "list"])
def test_fp32_matches_float64(impl, stacked):
    L, B, T, D = 3, 2, 5, 37
    hidden, ref, mask = make_case(L, B, T, D, torch.float32)
    hidden[1, 0, 1] = ref[1, 0, 1]  # a row exactly at the reference (LoRA's first step)
    mask[0, 1] = True
    g = upstream(L)
    out, grads = run(hidden if stacked else list(hidden), ref if stacked else list(ref), mask, impl, g, stacked)
    want, want_grads = f64_reference(list(hidden), ref, mask_to_rows(mask), g)
    assert isinstance(out, RepDistance) and out._fields[:3] == ("l2", "cos", "count")
    for k in FIELDS:
        assert getattr(out, k).dtype == torch.float32 and getattr(out, k).shape == (L,)
    assert out.count.dim() == 0 and out.count.dtype == torch.int64 and out.count.item() == int(mask.sum())
    assert all(gr.dtype == torch.float32 for gr in grads)
    check_fp32(out, grads, want, want_grads)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_no_worse_than_plain_torch(impl, dtype):
    L, B, T, D = 2, 3, 4, 100
    hidden, ref, mask = make_case(L, B, T, D, dtype, seed=3)
    g = upstream(L, seed=4)
    out, grads = run(hidden, ref, mask, impl, g, stacked=True)
    rows = mask_to_rows(mask)
    want, want_grads = f64_reference(list(hidden), ref, rows, g)

    lp_leaf = hidden.clone().requires_grad_()
    lp = lowp_rep_distance(lp_leaf, ref, rows)
    (lp_grad,) = torch.autograd.grad(weighted(lp, {k: v.to(dtype) for k, v in g.items()}), lp_leaf)

    assert all(getattr(out, k).dtype == torch.float32 for k in FIELDS)
    assert grads[0].dtype == dtype
    pairs = [(getattr(out, k), lp[k], want[k], k) for k in FIELDS]
    pairs.append((torch.stack(grads), lp_grad, torch.stack(want_grads), "grad"))
    for got, low, exact, what in pairs:
        err, lp_err, scale = max_err(got, exact), max_err(low, exact), scale_of(exact)
        assert err <= lp_err + 1e-4 * scale, f"{what}: error {err:.3e} > plain {dtype} path's {lp_err:.3e}"


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 1, 1, 37), (1, 3, 7, 100), (2, 1, 13, 16), (2, 5, 3, 130)])
def test_odd_shapes(impl, shape):
    L, B, T, D = shape
    hidden, ref, mask = make_case(L, B, T, D, torch.float32, seed=sum(shape), p_mask=0.7)
    mask.view(-1)[0] = True
    g = upstream(L, seed=5)
    out, grads = run(hidden, ref, mask, impl, g, stacked=True)
    check_fp32(out, grads, *f64_reference(list(hidden), ref, mask_to_rows(mask), g))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("which", ["empty", "full", "int01"])
def test_masks(impl, which):
    L, B, T, D = 2, 2, 3, 20
    hidden, ref, mask = make_case(L, B, T, D, torch.float32, seed=7)
    if which == "empty":
        mask = torch.zeros(B, T, dtype=torch.bool)
    elif which == "full":
        mask = torch.ones(B, T, dtype=torch.bool)
    else:
        mask = mask.to(torch.int64)
    g = upstream(L)
    out, grads = run(hidden, ref, mask, impl, g, stacked=True)
    want, want_grads = f64_reference(list(hidden), ref, mask_to_rows(mask), g)
    assert out.count.item() == int(mask.sum())
    if which == "empty":
        for k in FIELDS:
            assert torch.equal(getattr(out, k).cpu(), torch.zeros(L))
        assert torch.equal(torch.stack(grads), torch.zeros(L, B, T, D))
    check_fp32(out, grads, want, want_grads)


@pytest.mark.parametrize("impl", IMPLS)
def test_hidden_equal_to_ref_gives_zero_l2_gradient(impl):
    """LoRA's first step: hidden == ref exactly. l2 = sq = 0, cos = relu_cos = 1, and the gradient is 0, not NaN."""
    L, B, T, D = 2, 2, 3, 24
    _, ref, mask = make_case(L, B, T, D, torch.float32, seed=9)
    mask[0, 0] = True
    leaf = on_device(ref).requires_grad_()
    out = rep_distance(leaf, on_device(ref), on_device(mask), impl=impl)
    n = float(mask.sum())
    assert torch.equal(out.l2.cpu(), torch.zeros(L)) and torch.equal(out.sq.cpu(), torch.zeros(L))
    assert torch.allclose(out.cos.cpu(), torch.full((L,), n), rtol=1e-6)
    assert torch.allclose(out.relu_cos.cpu(), torch.full((L,), n), rtol=1e-6)
    for k, exact in (("l2", True), ("sq", True), ("cos", False), ("relu_cos", False)):
        (g,) = torch.autograd.grad(getattr(out, k).sum(), leaf, retain_graph=True)
        if exact:
            assert torch.equal(g, torch.zeros_like(g)), k
        else:
            assert torch.isfinite(g).all() and g.abs().max() < 1e-6, k  # d cos / dh = 0 at h = r


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_tiny_and_zero_norm_rows_match_cosine_similarity(impl):
    """Rows with |h| or |r| below cosine_similarity's eps (1e-8), and h = 0, against F.cosine_similarity in float64."""
    B, T, D = 1, 5, 8
    g = torch.Generator().manual_seed(11)
    h = torch.randn(B, T, D, generator=g)
    r = torch.randn(B, T, D, generator=g)
    h[0, 0] *= 1e-10 / h[0, 0].norm()
    r[0, 1] *= 1e-10 / r[0, 1].norm()
    h[0, 2] *= 1e-9 / h[0, 2].norm()
    r[0, 2] *= 1e-9 / r[0, 2].norm()
    h[0, 3] = 0.0
    mask = torch.ones(B, T, dtype=torch.bool)
    leaf = on_device(h).requires_grad_()
    out = rep_distance([leaf], [on_device(r)], on_device(mask), impl=impl)
    (grad,) = torch.autograd.grad(out.cos.sum(), leaf)
    grad = grad.cpu()
    h64 = h.double().requires_grad_()
    want = F.cosine_similarity(h64, r.double(), dim=-1)
    (want_grad,) = torch.autograd.grad(want.sum(), h64)
    assert math.isclose(out.cos.item(), want.sum().item(), rel_tol=1e-5, abs_tol=1e-6)
    # per row, relative to that row's gradient scale (the tiny rows have gradients ~1e8)
    for t in range(T):
        err = max_err(grad[0, t], want_grad[0, t])
        assert err <= 1e-5 * scale_of(want_grad[0, t]), (t, grad[0, t], want_grad[0, t])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("stacked", [True, False], ids=["stacked", "list"])
def test_gathered_ref(impl, stacked):
    L, B, T, D = 3, 3, 4, 33
    hidden, ref, mask = make_case(L, B, T, D, torch.float32, seed=13)
    ref_g = torch.stack([r[mask] for r in ref])  # [L, N, D], row-major (b, t)
    g = upstream(L)
    out, grads = run(hidden if stacked else list(hidden), ref_g, mask, impl, g, stacked)
    check_fp32(out, grads, *f64_reference(list(hidden), ref, mask_to_rows(mask), g))


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_non_contiguous_inputs(impl):
    """Transposed views, strided slices, layers with different strides, a non-contiguous gathered ref and mask."""
    L, B, T, D = 2, 2, 5, 19
    gen = torch.Generator().manual_seed(17)
    base = torch.randn(B, L, D, T, generator=gen)
    hidden = base.permute(1, 0, 3, 2)  # [L, B, T, D] view, stride_d = T
    ref = torch.randn(L, B, T, 2 * D, generator=gen)[..., ::2]  # strided slice, stride_d = 2
    mask = (torch.rand(T, B, generator=gen) < 0.6).t()  # non-contiguous mask
    mask[0, 0] = True
    g = upstream(L)
    want, want_grads = f64_reference(list(hidden.unbind(0)), ref, mask_to_rows(mask), g)

    leaf = on_device(base).requires_grad_()
    out = rep_distance(leaf.permute(1, 0, 3, 2), on_device(ref), on_device(mask), impl=impl)
    (grad,) = torch.autograd.grad(weighted(out, g), leaf)
    for k in FIELDS:
        assert_fp32_close(getattr(out, k), want[k], k)
    assert_fp32_close(grad.cpu().permute(1, 0, 3, 2), torch.stack(want_grads), "grad")

    # list whose layers have different strides, and a gathered ref that is a view
    layers = [hidden[0].contiguous(), hidden[1].transpose(0, 1).contiguous().transpose(0, 1)]
    ref_g = torch.stack([r[mask] for r in ref]).transpose(0, 1).contiguous().transpose(0, 1)
    out, grads = run(layers, ref_g, mask, impl, g, stacked=False)
    check_fp32(out, grads, want, want_grads, "list ")


@pytest.mark.parametrize("gathered", [False, True], ids=["full_ref", "gathered_ref"])
@pytest.mark.parametrize("stacked", [True, False], ids=["stacked", "list"])
def test_triton_reads_no_unmasked_row(gathered, stacked):
    """NaN in every unmasked row of hidden and ref: the Triton path's outputs and gradients stay finite and exact."""
    L, B, T, D = 2, 3, 4, 21
    hidden, ref, mask = make_case(L, B, T, D, torch.float32, seed=19)
    g = upstream(L)
    want, want_grads = f64_reference(list(hidden), ref, mask_to_rows(mask), g)
    poisoned_h, poisoned_r = hidden.clone(), ref.clone()
    poisoned_h[:, ~mask] = float("nan")
    poisoned_r[:, ~mask] = float("nan")
    ref_arg = torch.stack([r[mask] for r in ref]) if gathered else (poisoned_r if stacked else list(poisoned_r))
    out, grads = run(poisoned_h if stacked else list(poisoned_h), ref_arg, mask, "triton", g, stacked)
    grads = torch.stack(grads)
    assert all(torch.isfinite(getattr(out, k)).all() for k in FIELDS) and torch.isfinite(grads).all()
    assert torch.equal(grads[:, ~mask], torch.zeros_like(grads[:, ~mask]))
    check_fp32(out, list(grads), want, want_grads)


def test_auto_on_cpu_runs_eager(monkeypatch):
    import importlib

    mod = importlib.import_module("repbend.kernels.rep_distance")  # the package re-exports a function of that name

    def boom(*a, **k):
        raise AssertionError("auto on a CPU tensor must not run the Triton path")

    monkeypatch.setattr(mod, "rep_distance_fwd", boom)
    hidden, ref, mask = make_case(2, 2, 3, 8, torch.float32)
    out = rep_distance(hidden, ref, mask, impl="auto")
    want = rep_distance(hidden, ref, mask, impl="torch")
    assert all(torch.equal(getattr(out, k), getattr(want, k)) for k in FIELDS)


def test_layers_without_grad_and_module():
    """A layer that needs no gradient (e.g. the embedding output) gets none; the nn.Module wraps the function."""
    L, B, T, D = 3, 2, 3, 10
    hidden, ref, mask = make_case(L, B, T, D, torch.float32, seed=23)
    leaves = [on_device(hidden[0])] + [on_device(h).requires_grad_() for h in hidden[1:]]
    mod = RepDistanceLoss(impl="triton")
    out = mod(leaves, on_device(list(ref)), on_device(mask))
    g = upstream(L, seed=24)
    grads = torch.autograd.grad(weighted(out, g), leaves[1:])
    _, want_grads = f64_reference(list(hidden), ref, mask_to_rows(mask), g)
    assert_fp32_close(torch.stack(grads), torch.stack(want_grads[1:]), "grad")
    assert "triton" in repr(mod)


def test_errors():
    hidden, ref, mask = make_case(2, 2, 3, 8, torch.float32)
    with pytest.raises(ValueError, match="impl"):
        rep_distance(hidden, ref, mask, impl="cuda")
    with pytest.raises(ValueError, match="mask"):
        rep_distance(hidden, ref, mask[:, :2])
    with pytest.raises(ValueError, match="ref"):
        rep_distance(hidden, ref[:, :, :2], mask)
    with pytest.raises(ValueError, match="gathered"):
        rep_distance(hidden, torch.randn(2, int(mask.sum()) + 1, 8), mask, impl="triton")
    with pytest.raises(ValueError, match="hidden\\[1\\]"):
        rep_distance([hidden[0], hidden[1, :, :2]], ref, mask)
    with pytest.raises(TypeError, match="float32"):
        rep_distance(hidden.double(), ref, mask)
    with pytest.raises(TypeError, match="mask"):
        rep_distance(hidden, ref, mask.float())


def test_launch_config_d4096():
    for dtype in (torch.float32, torch.bfloat16):
        cfg = launch_config(4096, dtype)
        assert cfg["BLOCK_D"] * cfg["NUM_CHUNKS"] == 4096 and cfg["num_warps"] in (4, 8, 16)
    cfg = launch_config(37, torch.float32)
    assert cfg["BLOCK_D"] == 64 and cfg["NUM_CHUNKS"] == 1
    assert launch_config(5000, torch.bfloat16)["NUM_CHUNKS"] == 3
