"""pairwise_cosine_loss: every impl against a float64 formula over explicit pairs, forward and gradient.

Tolerances: float32 inputs within 2e-5 relative to the largest magnitude (forward: absolute 2e-6 on a loss of
order 1). bf16 / fp16 inputs: error against float64 (from the same low-precision values) no worse than the plain
low-precision PyTorch path's (the same formula run in that dtype) plus 1e-4 of the largest magnitude.
"""
import importlib

import pytest
import torch

from repbend.kernels.pairwise_cosine import PairwiseCosineLoss, pairwise_cosine_loss

IMPLS = ["torch", "triton", "auto"]


def f64_pairwise(x):
    """mean_l mean_{i != j} (1 - <u_i, u_j>), u_i = x_i / max(||x_i||, 1e-12), over an explicit N x N matrix."""
    L, N, D = x.shape
    u = x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-12)
    off_diagonal = ~torch.eye(N, dtype=torch.bool)
    cos = u @ u.transpose(1, 2)  # (L, N, N)
    return (1.0 - cos[:, off_diagonal]).mean(dim=-1).mean()


def lowp_pairwise(x):
    """The plain low-precision path: the same explicit-pair formula in x's dtype."""
    return f64_pairwise(x)


def reference(x, g):
    x64 = x.detach().double().requires_grad_()
    loss = f64_pairwise(x64)
    (grad,) = torch.autograd.grad(loss * g, x64)
    return loss.detach(), grad


def run(x, impl, g):
    leaf = x.detach().clone().requires_grad_()
    loss = pairwise_cosine_loss(leaf, impl=impl)
    (grad,) = torch.autograd.grad(loss * g, leaf)
    return loss, grad


def make(L, N, D, dtype=torch.float32, seed=0, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(1, 1, D, generator=g)
    return (common + spread * torch.randn(L, N, D, generator=g)).to(dtype)


def err_of(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close(got, want, what, rtol=2e-5):
    scale = want.abs().max().item() if want.numel() else 0.0
    err = err_of(got, want)
    assert err <= rtol * scale + 2e-6, f"{what}: max error {err:.3e} vs scale {scale:.3e}"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("spread", [1.0, 0.05], ids=["spread", "aligned"])
def test_fp32_matches_float64(impl, spread):
    x = make(3, 6, 37, spread=spread)
    loss, grad = run(x, impl, 1.7)
    want, want_grad = reference(x, 1.7)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert grad.dtype == torch.float32
    assert_close(loss, want, "loss")
    assert_close(grad, want_grad, "grad")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_no_worse_than_plain_torch(impl, dtype):
    x = make(2, 8, 100, dtype=dtype, seed=1, spread=0.5)
    loss, grad = run(x, impl, -0.8)
    want, want_grad = reference(x, -0.8)
    lp_leaf = x.clone().requires_grad_()
    lp_loss = lowp_pairwise(lp_leaf)
    (lp_grad,) = torch.autograd.grad(lp_loss * -0.8, lp_leaf)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    for got, lp, ref, what in [(loss, lp_loss, want, "loss"), (grad, lp_grad, want_grad, "grad")]:
        err, lp_err, scale = err_of(got, ref), err_of(lp, ref), ref.abs().max().item()
        assert err <= lp_err + 1e-4 * scale, f"{what}: error {err:.3e} > plain {dtype} path's {lp_err:.3e}"


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("shape", [(1, 2, 1), (1, 9, 16), (2, 3, 100), (4, 5, 130), (2, 33, 7)])
def test_odd_shapes(impl, shape):
    x = make(*shape, seed=sum(shape))
    loss, grad = run(x, impl, 0.9)
    want, want_grad = reference(x, 0.9)
    assert_close(loss, want, "loss")
    assert_close(grad, want_grad, "grad")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("N", [0, 1])
def test_fewer_than_two_vectors_gives_differentiable_zero(impl, N):
    x = make(3, N, 8)
    leaf = x.clone().requires_grad_()
    loss = pairwise_cosine_loss(leaf, impl=impl)
    assert loss.dtype == torch.float32 and loss.dim() == 0 and loss.item() == 0.0
    (grad,) = torch.autograd.grad(loss, leaf)
    assert torch.equal(grad, torch.zeros_like(x))


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_identical_directions_give_zero(impl):
    v = torch.randn(1, 1, 24)
    x = torch.cat([v * 0.5, v * 2.0, v * 3.0]).reshape(1, 3, 24).repeat(2, 1, 1)
    loss, grad = run(x, impl, 1.0)
    assert abs(loss.item()) < 1e-6
    assert grad.abs().max() < 1e-5


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_non_contiguous(impl):
    g = torch.Generator().manual_seed(5)
    base = torch.randn(6, 2, 2 * 21, generator=g)
    x = base.transpose(0, 1)[..., ::2]  # [2, 6, 21], strides (2*21, 2*2*21, 2)
    leaf = base.clone().requires_grad_()
    loss = pairwise_cosine_loss(leaf.transpose(0, 1)[..., ::2], impl=impl)
    (grad,) = torch.autograd.grad(loss, leaf)
    want, want_grad = reference(x, 1.0)
    assert_close(loss, want, "loss")
    assert_close(grad.transpose(0, 1)[..., ::2], want_grad, "grad")
    assert torch.equal(grad[..., 1::2], torch.zeros_like(grad[..., 1::2]))


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_tiny_and_zero_rows_match_normalize(impl):
    """Rows below F.normalize's eps (1e-12) and an all-zero row: gradients as autograd gives for F.normalize."""
    x = make(1, 5, 8, seed=7)
    x[0, 0] *= 1e-14 / x[0, 0].norm()
    x[0, 1] = 0.0
    x[0, 2] *= 1e-11 / x[0, 2].norm()
    loss, grad = run(x, impl, 1.0)
    x64 = x.double().requires_grad_()
    u = torch.nn.functional.normalize(x64, dim=-1)
    off = ~torch.eye(5, dtype=torch.bool)
    want = (1 - (u @ u.transpose(1, 2))[:, off]).mean()
    (want_grad,) = torch.autograd.grad(want, x64)
    assert abs(loss.item() - want.item()) < 2e-6
    for i in range(5):  # per row: tiny rows have gradients ~1e12
        assert err_of(grad[0, i], want_grad[0, i]) <= 2e-5 * want_grad[0, i].abs().max().item() + 1e-6, i


def test_auto_on_cpu_runs_eager(monkeypatch):
    mod = importlib.import_module("repbend.kernels.pairwise_cosine")

    def boom(*a, **k):
        raise AssertionError("auto on a CPU tensor must not run the Triton path")

    monkeypatch.setattr(mod, "pairwise_cosine_fwd", boom)
    x = make(2, 4, 8)
    assert torch.equal(pairwise_cosine_loss(x, impl="auto"), pairwise_cosine_loss(x, impl="torch"))


def test_module_and_errors():
    x = make(2, 4, 8)
    mod = PairwiseCosineLoss(impl="triton")
    assert torch.allclose(mod(x), pairwise_cosine_loss(x, impl="torch"), atol=1e-6)
    assert "triton" in repr(mod)
    with pytest.raises(ValueError, match=r"\[L, N, D\]"):
        pairwise_cosine_loss(x[0])
    with pytest.raises(TypeError, match="float32"):
        pairwise_cosine_loss(x.double())
    with pytest.raises(ValueError, match="impl"):
        pairwise_cosine_loss(x, impl="gpu")
    with pytest.raises(ValueError, match="L = 0"):
        pairwise_cosine_loss(x[:0])
