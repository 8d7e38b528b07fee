"""The Triton kernels compile for Hopper (sm_90) at the block sizes their launchers pick for D = 4096, with zero
register spills. No GPU needed: tests/hopper.py drives the ptxas bundled in the triton wheel.

Signatures describe a launch on the production shapes (Llama-3-8B: D = 4096, B*T = 8 x 1024, contiguous per-layer
hidden states): unit strides are specialised to constants and the 16-multiples are marked divisible, as Triton's
launcher would do.
"""
import importlib

import pytest
import torch

from hopper import hopper_resources_many, requires_ptxas

rep_distance_mod = importlib.import_module("repbend.kernels.rep_distance")
pairwise_mod = importlib.import_module("repbend.kernels.pairwise_cosine")

D = 4096
TRITON_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def _rep_distance_specs():
    specs = {}
    for dtype, ty in TRITON_DTYPE.items():
        block_d, num_warps = rep_distance_mod._launch_config(D, dtype)
        for gathered in (False, True):
            strides = dict(h_stride_b="i32", h_stride_t="i32", r_stride_b="i32", r_stride_t="i32")
            const = dict(h_stride_d=1, r_stride_d=1, R_GATHERED=gathered, ALIGNED=True, BLOCK_D=block_d)
            fwd = dict(h_ptr=f"*{ty}", r_ptr=f"*{ty}", tab_ptr="*i64", keep_ptr="*i32", ref_row_ptr="*i32",
                       out_ptr="*fp32", coef_ptr="*fp32", BT="i32", T="i32", D="i32", **strides, eps="fp32")
            bwd = dict(h_ptr=f"*{ty}", r_ptr=f"*{ty}", g_ptr=f"*{ty}", tab_ptr="*i64", keep_ptr="*i32",
                       ref_row_ptr="*i32", coef_ptr="*fp32", grad_l2_ptr="*fp32", grad_cos_ptr="*fp32",
                       BT="i32", T="i32", D="i32", **strides)
            ref = "gathered" if gathered else "full"
            for name, kernel, sig in [("fwd", rep_distance_mod._rep_distance_fwd_kernel, fwd),
                                      ("bwd", rep_distance_mod._rep_distance_bwd_kernel, bwd)]:
                divisible = [k for k, v in sig.items() if v.startswith("*")] + ["BT", "T", "D", *strides]
                specs[f"rep_distance_{name}-{ty}-{ref}_ref"] = dict(
                    kernel=kernel, signature=sig, constexprs=const, num_warps=num_warps, divisible=divisible)
    return specs


def _pairwise_specs():
    specs = {}
    for dtype, ty in TRITON_DTYPE.items():
        for n in (8, 64):  # N = 2B unsafe rows: B = 4 (the recipe) and a large batch
            block_n, block_d, num_warps = pairwise_mod._launch_config(n, D)
            const = dict(stride_d=1, BLOCK_N=block_n, BLOCK_D=block_d)
            strides = dict(stride_l="i32", stride_n="i32")
            fwd = dict(x_ptr=f"*{ty}", loss_ptr="*fp32", s_ptr="*fp32", norm_ptr="*fp32", N="i32", D="i32",
                       **strides, eps="fp32")
            bwd = dict(x_ptr=f"*{ty}", dx_ptr=f"*{ty}", s_ptr="*fp32", norm_ptr="*fp32", grad_ptr="*fp32",
                       L="i32", N="i32", D="i32", **strides, eps="fp32")
            for name, kernel, sig in [("fwd", pairwise_mod._pairwise_cosine_fwd_kernel, fwd),
                                      ("bwd", pairwise_mod._pairwise_cosine_bwd_kernel, bwd)]:
                divisible = [k for k, v in sig.items() if v.startswith("*")] + ["D", *strides]
                specs[f"pairwise_cosine_{name}-{ty}-N{n}"] = dict(
                    kernel=kernel, signature=sig, constexprs=const, num_warps=num_warps, divisible=divisible)
    return specs


SPECS = {**_rep_distance_specs(), **_pairwise_specs()}


@pytest.fixture(scope="module")
def resources():
    """All kernels compiled in one child process (pays the torch/triton import once)."""
    names = list(SPECS)
    return dict(zip(names, hopper_resources_many([SPECS[n] for n in names])))


@requires_ptxas
@pytest.mark.parametrize("name", list(SPECS))
def test_compiles_for_sm90_without_spills(resources, name):
    res = resources[name]
    assert res["spill_stores"] == 0 and res["spill_loads"] == 0, f"{name} spills: {res}"
    assert 0 < res["registers"] <= 255, res
    if name.startswith("rep_distance"):
        # the row loads must be vectorised (16-byte); this is a bandwidth-bound kernel
        assert res["vector_loads"], f"{name}: no vector loads in the PTX"
