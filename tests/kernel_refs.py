"""Shared by the kernel tests: the device the Triton kernels run on, and rep_distance's float64 formula.

DEVICE is CUDA where torch sees one (conftest.py then leaves TRITON_INTERPRET off, so impl="triton" runs the compiled
kernels), else the CPU (the Triton interpreter). Inputs are made on the CPU from seeded generators and moved there;
the float64 references are computed on the CPU from the same (rounded) values.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
EPS = 1e-8  # F.cosine_similarity's eps

FIELDS = ("l2", "cos", "relu_cos", "sq")


def on_device(x):
    """A copy of a tensor, or of each tensor of a list, on DEVICE (a copy: tests may mark it requires_grad)."""
    if isinstance(x, torch.Tensor):
        return x.to(DEVICE, copy=True)
    return [t.to(DEVICE, copy=True) for t in x]


def f64_rep_distance(hidden, ref, rows):
    """hidden: L x [B, T, D] float64 tensors (leaves or not); ref: L x [B, T, D] or gathered [L, N, D]; rows: int64
    [N] flat positions. Returns {field: [L] float64}, differentiable in hidden.

    Per selected row: l2 = ||h - r||; cos = <h, r> / (max(|h|, eps) max(|r|, eps)) where, as in
    F.cosine_similarity, the clamp carries no gradient (it flows through |h|); relu_cos = relu(cos) (gradient 0 at
    0); sq = sum (h - r)^2. Norms by vector_norm, whose gradient at 0 is 0.
    """
    gathered = isinstance(ref, torch.Tensor) and ref.dim() == 3
    out = {k: [] for k in FIELDS}
    for layer in range(len(hidden)):
        B, T, D = hidden[layer].shape
        h = hidden[layer].double().reshape(B * T, D)[rows]
        r = (ref[layer] if gathered else ref[layer].reshape(B * T, D)[rows]).double().detach()
        nh = torch.linalg.vector_norm(h, dim=-1)
        nr = torch.linalg.vector_norm(r, dim=-1)
        nh_c = nh + (nh.clamp_min(EPS) - nh).detach()
        cos = (h * r).sum(-1) / (nh_c * nr.clamp_min(EPS))
        out["l2"].append(torch.linalg.vector_norm(h - r, dim=-1).sum())
        out["cos"].append(cos.sum())
        out["relu_cos"].append(torch.relu(cos).sum())
        out["sq"].append((h - r).square().sum())
    return {k: torch.stack(v) for k, v in out.items()}


def lowp_rep_distance(hidden, ref, rows):
    """The plain low-precision PyTorch path: the same formulas in the inputs' dtype, by autograd."""
    out = {k: [] for k in FIELDS}
    for layer in range(len(hidden)):
        B, T, D = hidden[layer].shape
        h = hidden[layer].reshape(B * T, D)[rows]
        r = (ref[layer] if ref[layer].dim() == 2 else ref[layer].reshape(B * T, D)[rows]).detach()
        cos = F.cosine_similarity(h, r, dim=-1)
        out["l2"].append(torch.linalg.vector_norm(h - r, dim=-1).sum())
        out["cos"].append(cos.sum())
        out["relu_cos"].append(torch.relu(cos).sum())
        out["sq"].append((h - r).square().sum())
    return {k: torch.stack(v) for k, v in out.items()}


def mask_to_rows(mask: torch.Tensor) -> torch.Tensor:
    return mask.reshape(-1).nonzero().squeeze(1)


def upstream(L, seed=1):
    """Random upstream gradients {field: [L] float32}, one per output field."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(L, generator=g) for k in FIELDS}


def weighted(out, g):
    """sum over fields of <g[field], out[field]> (out: a RepDistance or a dict)."""
    get = (lambda k: out[k]) if isinstance(out, dict) else (lambda k: getattr(out, k))
    total = 0
    for k in FIELDS:
        total = total + (get(k) * g[k].to(get(k).device, get(k).dtype)).sum()
    return total


def f64_reference(hidden_layers, ref, rows, g):
    """(values {field: [L]}, gradients L x [B, T, D]) in float64 for upstream gradients g."""
    h64 = [h.detach().cpu().double().requires_grad_() for h in hidden_layers]
    ref = ref.cpu() if isinstance(ref, torch.Tensor) else [r.cpu() for r in ref]
    vals = f64_rep_distance(h64, ref, rows.cpu())
    grads = torch.autograd.grad(weighted(vals, {k: v.double() for k, v in g.items()}), h64)
    return {k: v.detach() for k, v in vals.items()}, [gr.detach() for gr in grads]


def max_err(a, b):
    return (a.detach().cpu().double() - b.detach().cpu().double()).abs().max().item() if a.numel() else 0.0


def scale_of(*ts):
    return max([t.detach().abs().max().item() for t in ts if t.numel()] + [1e-30])


def assert_fp32_close(got, want, what, rtol=2e-5):
    err, scale = max_err(got, want), scale_of(want)
    assert err <= rtol * scale + 1e-6, f"{what}: max error {err:.3e} vs scale {scale:.3e}"
