"""The rep_distance and pairwise_cosine kernels compile for Hopper (sm_90) at the block sizes their launchers pick
for the production shapes, with zero register spills and no fp64 instruction; rep_distance's forward in at most 64
registers with 16-byte row loads. No GPU needed: tests/hopper.py drives the ptxas bundled in the triton wheel.

Signatures describe a launch on the production shapes (Llama-3-8B: D = 4096, B*T = 16 x 1024, contiguous per-layer
hidden states, a gathered or full ref): unit strides are specialised to constants and the 16-multiples are marked
divisible, as Triton's launcher does. Every variant the launchers can pick is compiled: table (a list of layers) or
strides (one tensor), gathered or full ref, bf16 or fp32. `pytest -s` prints registers and spills.
"""
import importlib

import pytest
import torch

from hopper import hopper_resources_many, requires_ptxas

rep_mod = importlib.import_module("repbend.kernels._rep_distance_triton")
pairwise_mod = importlib.import_module("repbend.kernels.pairwise_cosine")

D = 4096
TRITON_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16"}
REP_FWD_MAX_REGISTERS = 64


def _rep_distance_specs():
    specs = {}
    strides = dict(h_stride_l="i32", h_stride_b="i32", h_stride_t="i32", r_stride_l="i32", r_stride_b="i32",
                   r_stride_t="i32")
    for dtype, ty in TRITON_DTYPE.items():
        cfg = rep_mod.launch_config(D, dtype)
        num_warps = cfg["num_warps"]
        for table in (True, False):
            for gathered in (False, True):
                const = dict(h_stride_d=1, r_stride_d=1, TABLE=table, ALIGNED=True, R_GATHERED=gathered,
                             BLOCK_D=cfg["BLOCK_D"], NUM_CHUNKS=cfg["NUM_CHUNKS"])
                fwd = dict(h_ptr=f"*{ty}", r_ptr=f"*{ty}", tab_ptr="*i64", rows_ptr="*i64", slot_ptr="*i32",
                           buf_ptr="*fp32", N="i32", BT="i32", T="i32", D="i32", **strides, eps="fp32")
                bwd = dict(h_ptr=f"*{ty}", r_ptr=f"*{ty}", g_ptr=f"*{ty}", tab_ptr="*i64", slot_ptr="*i32",
                           buf_ptr="*fp32", gsum_ptr="*fp32", N="i32", L="i32", BT="i32", T="i32", D="i32",
                           **strides)
                tag = f"{ty}-{'table' if table else 'strides'}-{'gathered' if gathered else 'full'}_ref"
                for name, kernel, sig in [("fwd", rep_mod._rep_distance_fwd_kernel, fwd),
                                          ("bwd", rep_mod._rep_distance_bwd_kernel, bwd)]:
                    divisible = [k for k, v in sig.items() if v.startswith("*")] + ["BT", "T", "D", *strides]
                    specs[f"rep_distance_{name}-{tag}"] = dict(
                        kernel=kernel, signature=sig, constexprs=const, num_warps=num_warps, divisible=divisible)
    return specs


def _pairwise_specs():
    specs = {}
    for dtype, ty in TRITON_DTYPE.items():
        for n in (8, 64):  # N = 2B unsafe rows: B = 4 (the recipe) and a large batch
            cfg = pairwise_mod._launch_config(n, D)
            const = dict(stride_d=1, BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"], NUM_CHUNKS=cfg["NUM_CHUNKS"])
            strides = dict(stride_l="i32", stride_n="i32")
            fwd = dict(x_ptr=f"*{ty}", loss_ptr="*fp32", s_ptr="*fp32", norm_ptr="*fp32", N="i32", D="i32",
                       **strides, eps="fp32")
            bwd = dict(x_ptr=f"*{ty}", dx_ptr=f"*{ty}", s_ptr="*fp32", norm_ptr="*fp32", grad_ptr="*fp32",
                       N="i32", D="i32", **strides, eps="fp32")
            for name, kernel, sig in [("fwd", pairwise_mod._pairwise_cosine_fwd_kernel, fwd),
                                      ("bwd", pairwise_mod._pairwise_cosine_bwd_kernel, bwd)]:
                divisible = [k for k, v in sig.items() if v.startswith("*")] + ["D", *strides]
                specs[f"pairwise_cosine_{name}-{ty}-N{n}"] = dict(
                    kernel=kernel, signature=sig, constexprs=const, num_warps=cfg["num_warps"], divisible=divisible)
    return specs


SPECS = {**_rep_distance_specs(), **_pairwise_specs()}


@pytest.fixture(scope="module")
def resources():
    """All kernels compiled in one child process (pays the torch/triton import once); the figures printed."""
    names = list(SPECS)
    res = dict(zip(names, hopper_resources_many([SPECS[n] for n in names])))
    for n in names:
        r = res[n]
        print(f"{n:50s} {r['registers']:3d} registers, spills {r['spill_stores']}/{r['spill_loads']} B, "
              f"vector loads {r['vector_loads']}, fp64 {r['fp64']}")
    return res


@requires_ptxas
@pytest.mark.parametrize("name", list(SPECS))
def test_compiles_for_sm90_without_spills(resources, name):
    res = resources[name]
    assert res["spill_stores"] == 0 and res["spill_loads"] == 0, f"{name} spills: {res}"
    assert 0 < res["registers"] <= 255, res
    assert not res["fp64"], f"{name}: fp64 in the PTX"
    if name.startswith("rep_distance"):
        # a bandwidth-bound kernel: 16-byte row loads, and registers low enough for many resident warps
        assert res["vector_loads"], f"{name}: no vector loads in the PTX"
    if name.startswith("rep_distance_fwd"):
        assert res["registers"] <= REP_FWD_MAX_REGISTERS, f"{name}: {res['registers']} registers"
