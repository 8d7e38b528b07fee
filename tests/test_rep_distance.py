"""rep_distance: every impl against a float64 formula written out here, forward and gradient.

Tolerances: float32 inputs: forward and gradient within 2e-5 relative to the largest magnitude (fp32 arithmetic on
rows of <= 100 features). bf16 / fp16 inputs (judged as cut-cross-entropy does): the error against float64 (computed
from the same low-precision values) must be no worse than that of the plain low-precision PyTorch path (the same
formula run in bf16 / fp16 by autograd) plus 1e-4 of the largest magnitude.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from repbend.kernels.rep_distance import RepDistance, RepDistanceLoss, _launch_config, rep_distance

IMPLS = ["torch", "triton", "auto"]
EPS = 1e-8


# ------------------------------------------------------------------------------------------------------------------
# float64 formula
# ------------------------------------------------------------------------------------------------------------------
def f64_rep_distance(hidden, ref, mask):
    """hidden: L x [B, T, D] float64 leaves; ref: L x [B, T, D] or [L, N, D] gathered; mask [B, T].

    Per masked row: l2 = ||h - r||; cos = <h, r> / (max(|h|, eps) max(|r|, eps)), where, as in
    torch.nn.functional.cosine_similarity, the clamp carries no gradient (the gradient flows through |h|).
    Norms by vector_norm, whose gradient at 0 is 0 (checked below).
    """
    keep = mask.ne(0)
    gathered = isinstance(ref, torch.Tensor) and ref.dim() == 3
    l2s, coss = [], []
    for layer in range(len(hidden)):
        h = hidden[layer].double()[keep]
        r = (ref[layer] if gathered else ref[layer][keep]).double().detach()
        l2 = torch.linalg.vector_norm(h - r, dim=-1)
        nh = torch.linalg.vector_norm(h, dim=-1)
        nr = torch.linalg.vector_norm(r, dim=-1)
        nh_c = nh + (nh.clamp_min(EPS) - nh).detach()
        cos = (h * r).sum(-1) / (nh_c * nr.clamp_min(EPS))
        l2s.append(l2.sum())
        coss.append(cos.sum())
    return torch.stack(l2s), torch.stack(coss), keep.sum()


def lowp_rep_distance(hidden, ref, mask):
    """The plain low-precision PyTorch path: the same formula in the inputs' dtype."""
    keep = mask.ne(0)
    l2s, coss = [], []
    for layer in range(len(hidden)):
        h, r = hidden[layer][keep], ref[layer][keep].detach()
        l2s.append(torch.linalg.vector_norm(h - r, dim=-1).sum())
        coss.append(F.cosine_similarity(h, r, dim=-1).sum())
    return torch.stack(l2s), torch.stack(coss)


# ------------------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------------------
def make_case(L, B, T, D, dtype, seed=0, p_mask=0.6, close=True):
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(L, B, T, D, generator=g).to(dtype)
    # LoRA-like: hidden close to ref (plus a few exactly equal rows), or independent
    noise = torch.randn(L, B, T, D, generator=g) * (0.3 if close else 1.0)
    hidden = (ref.float() + noise).to(dtype)
    mask = torch.rand(B, T, generator=g) < p_mask
    return hidden, ref, mask


def upstream(L, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(L, generator=g), torch.randn(L, generator=g)


def run(hidden_leaves, ref, mask, impl, g_l2, g_cos, stacked):
    """Returns (l2, cos, count, grads as a list of per-layer tensors)."""
    out = rep_distance(hidden_leaves[0] if stacked else hidden_leaves, ref, mask, impl=impl)
    loss = (out.l2 * g_l2).sum() + (out.cos * g_cos).sum()
    inputs = [hidden_leaves[0]] if stacked else list(hidden_leaves)
    grads = torch.autograd.grad(loss, inputs)
    grads = list(grads[0].unbind(0)) if stacked else list(grads)
    return out, grads


def reference(hidden_layers, ref, mask, g_l2, g_cos):
    h64 = [h.detach().double().requires_grad_() for h in hidden_layers]
    l2, cos, count = f64_rep_distance(h64, ref, mask)
    grads = torch.autograd.grad((l2 * g_l2.double()).sum() + (cos * g_cos.double()).sum(), h64)
    return l2.detach(), cos.detach(), count, [g.detach() for g in grads]


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def scale_of(*ts):
    return max([t.abs().max().item() for t in ts if t.numel()] + [1e-30])


def assert_fp32_close(got, want, what, rtol=2e-5):
    err, scale = max_err(got, want), scale_of(want)
    assert err <= rtol * scale + 1e-6, f"{what}: max error {err:.3e} vs scale {scale:.3e}"


# ------------------------------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------------------------------
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
        one = torch.ones(1, 1, dtype=torch.bool)
        _, mine_cos, _ = f64_rep_distance([h1.view(1, 1, 4)], [r.view(1, 1, 4)], one)
        (gm,) = torch.autograd.grad(mine_cos.sum(), h1)
        assert math.isclose(mine_cos.item(), c.item(), rel_tol=1e-12, abs_tol=1e-300)
        assert torch.allclose(gm, gt, rtol=1e-10, atol=0), (sh, sr, gm, gt)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("stacked", [True, False], ids=["stacked", "list"])
def test_fp32_matches_float64(impl, stacked):
    L, B, T, D = 3, 2, 5, 37
    hidden, ref, mask = make_case(L, B, T, D, torch.float32)
    hidden[1, 0, 1] = ref[1, 0, 1]  # a row exactly at the reference (LoRA's first step)
    mask[0, 1] = True
    g_l2, g_cos = upstream(L)
    leaves = [hidden.clone().requires_grad_()] if stacked else [h.clone().requires_grad_() for h in hidden]
    ref_arg = ref if stacked else list(ref.unbind(0))
    out, grads = run(leaves, ref_arg, mask, impl, g_l2, g_cos, stacked)
    l2, cos, count, ref_grads = reference(list(hidden.unbind(0)), ref, mask, g_l2, g_cos)
    assert isinstance(out, RepDistance)
    assert out.l2.dtype == out.cos.dtype == torch.float32 and out.l2.shape == out.cos.shape == (L,)
    assert out.count.dim() == 0 and out.count.item() == int(mask.sum())
    assert_fp32_close(out.l2, l2, "l2")
    assert_fp32_close(out.cos, cos, "cos")
    for i, (g, gr) in enumerate(zip(grads, ref_grads)):
        assert g.dtype == torch.float32 and torch.isfinite(g).all()
        assert_fp32_close(g, gr, f"grad layer {i}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_no_worse_than_plain_torch(impl, dtype):
    L, B, T, D = 2, 3, 4, 100
    hidden, ref, mask = make_case(L, B, T, D, dtype, seed=3)
    g_l2, g_cos = upstream(L, seed=4)
    leaves = [hidden.clone().requires_grad_()]
    out, grads = run(leaves, ref, mask, impl, g_l2, g_cos, stacked=True)
    l2, cos, _, ref_grads = reference(list(hidden.unbind(0)), ref, mask, g_l2, g_cos)

    lp_leaf = hidden.clone().requires_grad_()
    lp_l2, lp_cos = lowp_rep_distance(lp_leaf, ref, mask)
    (lp_grad,) = torch.autograd.grad((lp_l2 * g_l2.to(dtype)).sum() + (lp_cos * g_cos.to(dtype)).sum(), lp_leaf)

    assert out.l2.dtype == out.cos.dtype == torch.float32
    assert grads[0].dtype == dtype
    for got, lp, want, what in [(out.l2, lp_l2, l2, "l2"), (out.cos, lp_cos, cos, "cos"),
                                (torch.stack(grads), lp_grad, torch.stack(ref_grads), "grad")]:
        err, lp_err, scale = max_err(got, want), max_err(lp, want), scale_of(want)
        assert err <= lp_err + 1e-4 * scale, f"{what}: error {err:.3e} > plain {dtype} path's {lp_err:.3e}"


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 1, 1, 37), (1, 3, 7, 100), (2, 1, 13, 16), (2, 5, 3, 130)])
def test_odd_shapes(impl, shape):
    L, B, T, D = shape
    hidden, ref, mask = make_case(L, B, T, D, torch.float32, seed=sum(shape), p_mask=0.7)
    mask.view(-1)[0] = True
    g_l2, g_cos = upstream(L, seed=5)
    out, grads = run([hidden.clone().requires_grad_()], ref, mask, impl, g_l2, g_cos, stacked=True)
    l2, cos, _, ref_grads = reference(list(hidden.unbind(0)), ref, mask, g_l2, g_cos)
    assert_fp32_close(out.l2, l2, "l2")
    assert_fp32_close(out.cos, cos, "cos")
    assert_fp32_close(torch.stack(grads), torch.stack(ref_grads), "grad")


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
    g_l2, g_cos = upstream(L)
    out, grads = run([hidden.clone().requires_grad_()], ref, mask, impl, g_l2, g_cos, stacked=True)
    l2, cos, count, ref_grads = reference(list(hidden.unbind(0)), ref, mask, g_l2, g_cos)
    assert out.count.item() == count.item()
    if which == "empty":
        assert torch.equal(out.l2, torch.zeros(L)) and torch.equal(out.cos, torch.zeros(L))
        assert torch.equal(torch.stack(grads), torch.zeros(L, B, T, D))
    assert_fp32_close(out.l2, l2, "l2")
    assert_fp32_close(out.cos, cos, "cos")
    assert_fp32_close(torch.stack(grads), torch.stack(ref_grads), "grad")


@pytest.mark.parametrize("impl", IMPLS)
def test_hidden_equal_to_ref_gives_zero_l2_gradient(impl):
    """LoRA's first step: hidden == ref exactly. l2 = 0, cos = 1, and the gradient is 0, not NaN."""
    L, B, T, D = 2, 2, 3, 24
    _, ref, mask = make_case(L, B, T, D, torch.float32, seed=9)
    mask[0, 0] = True
    leaf = ref.clone().requires_grad_()
    out = rep_distance(leaf, ref, mask, impl=impl)
    (g_l2,) = torch.autograd.grad(out.l2.sum(), leaf, retain_graph=True)
    (g_cos,) = torch.autograd.grad(out.cos.sum(), leaf)
    assert torch.equal(out.l2, torch.zeros(L))
    assert torch.allclose(out.cos, torch.full((L,), float(mask.sum())), rtol=1e-6)
    assert torch.equal(g_l2, torch.zeros_like(g_l2))
    assert torch.isfinite(g_cos).all() and g_cos.abs().max() < 1e-6  # d cos / dh = 0 at h = r


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
    leaf = h.clone().requires_grad_()
    out = rep_distance([leaf], [r], mask, impl=impl)
    (grad,) = torch.autograd.grad(out.cos.sum(), leaf)
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
    g_l2, g_cos = upstream(L)
    leaves = [hidden.clone().requires_grad_()] if stacked else [h.clone().requires_grad_() for h in hidden]
    out, grads = run(leaves, ref_g, mask, impl, g_l2, g_cos, stacked)
    l2, cos, _, ref_grads = reference(list(hidden.unbind(0)), ref, mask, g_l2, g_cos)
    assert_fp32_close(out.l2, l2, "l2")
    assert_fp32_close(out.cos, cos, "cos")
    assert_fp32_close(torch.stack(grads), torch.stack(ref_grads), "grad")


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_non_contiguous_inputs(impl):
    """Transposed views, strided slices, layers with different strides, a non-contiguous gathered ref and mask."""
    L, B, T, D = 2, 2, 5, 19
    g = torch.Generator().manual_seed(17)
    base = torch.randn(B, L, D, T, generator=g)
    hidden = base.permute(1, 0, 3, 2)  # [L, B, T, D] view, stride_d = T
    ref = torch.randn(L, B, T, 2 * D, generator=g)[..., ::2]  # strided slice, stride_d = 2
    mask = (torch.rand(T, B, generator=g) < 0.6).t()  # non-contiguous mask
    mask[0, 0] = True
    g_l2, g_cos = upstream(L)
    want = reference(list(hidden.unbind(0)), ref, mask, g_l2, g_cos)

    leaf = base.clone().requires_grad_()
    out = rep_distance(leaf.permute(1, 0, 3, 2), ref, mask, impl=impl)
    (grad,) = torch.autograd.grad((out.l2 * g_l2).sum() + (out.cos * g_cos).sum(), leaf)
    assert_fp32_close(out.l2, want[0], "l2")
    assert_fp32_close(out.cos, want[1], "cos")
    assert_fp32_close(grad.permute(1, 0, 3, 2), torch.stack(want[3]), "grad")

    # list whose layers have different strides, and a gathered ref that is a view
    leaves = [hidden[0].contiguous().requires_grad_(), hidden[1].clone().requires_grad_()]
    leaves[1] = leaves[1].detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    ref_g = torch.stack([r[mask] for r in ref]).transpose(0, 1).contiguous().transpose(0, 1)
    out, grads = run(leaves, ref_g, mask, impl, g_l2, g_cos, stacked=False)
    assert_fp32_close(out.l2, want[0], "l2 list")
    assert_fp32_close(out.cos, want[1], "cos list")
    assert_fp32_close(torch.stack(grads), torch.stack(want[3]), "grad list")


@pytest.mark.parametrize("gathered", [False, True], ids=["full_ref", "gathered_ref"])
@pytest.mark.parametrize("stacked", [True, False], ids=["stacked", "list"])
def test_triton_reads_no_unmasked_row(gathered, stacked):
    """NaN in every unmasked row of hidden and ref: the Triton path's outputs and gradients stay finite and exact."""
    L, B, T, D = 2, 3, 4, 21
    hidden, ref, mask = make_case(L, B, T, D, torch.float32, seed=19)
    g_l2, g_cos = upstream(L)
    clean = reference(list(hidden.unbind(0)), ref, mask, g_l2, g_cos)
    poisoned_h, poisoned_r = hidden.clone(), ref.clone()
    poisoned_h[:, ~mask] = float("nan")
    poisoned_r[:, ~mask] = float("nan")
    ref_arg = torch.stack([r[mask] for r in ref]) if gathered else (poisoned_r if stacked else list(poisoned_r))
    leaves = [poisoned_h.clone().requires_grad_()] if stacked else [h.clone().requires_grad_() for h in poisoned_h]
    out, grads = run(leaves, ref_arg, mask, "triton", g_l2, g_cos, stacked)
    grads = torch.stack(grads)
    assert torch.isfinite(out.l2).all() and torch.isfinite(out.cos).all() and torch.isfinite(grads).all()
    assert torch.equal(grads[:, ~mask], torch.zeros_like(grads[:, ~mask]))
    assert_fp32_close(out.l2, clean[0], "l2")
    assert_fp32_close(out.cos, clean[1], "cos")
    assert_fp32_close(grads, torch.stack(clean[3]), "grad")


def test_auto_on_cpu_runs_eager(monkeypatch):
    import importlib

    mod = importlib.import_module("repbend.kernels.rep_distance")  # the package re-exports a function of that name

    def boom(*a, **k):
        raise AssertionError("auto on a CPU tensor must not run the Triton path")

    monkeypatch.setattr(mod._RepDistanceFunction, "apply", boom)
    hidden, ref, mask = make_case(2, 2, 3, 8, torch.float32)
    out = rep_distance(hidden, ref, mask, impl="auto")
    want = rep_distance(hidden, ref, mask, impl="torch")
    assert torch.equal(out.l2, want.l2) and torch.equal(out.cos, want.cos)


def test_layers_without_grad_and_module():
    """A layer that needs no gradient (e.g. the embedding output) gets none; the nn.Module wraps the function."""
    L, B, T, D = 3, 2, 3, 10
    hidden, ref, mask = make_case(L, B, T, D, torch.float32, seed=23)
    leaves = [hidden[0]] + [h.clone().requires_grad_() for h in hidden[1:]]
    mod = RepDistanceLoss(impl="triton")
    out = mod(leaves, list(ref), mask)
    grads = torch.autograd.grad(out.l2.sum() + out.cos.sum(), leaves[1:])
    want = reference(list(hidden.unbind(0)), ref, mask, torch.ones(L), torch.ones(L))
    assert_fp32_close(torch.stack(grads), torch.stack(want[3][1:]), "grad")
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
        block_d, num_warps = _launch_config(4096, dtype)
        assert block_d == 4096 and num_warps in (4, 8, 16)
    assert _launch_config(37, torch.float32)[0] == 64
