"""The linear_kl row kernel compiles for Hopper (sm_90) without register spills or fp64 at the production vocabulary.

Compiled with the tile and warps the launcher picks for Llama-3's V = 128256 (a multiple of 16, which Triton's
launcher marks divisible, as here), for both dtypes, with and without the gradient pass, with and without logit
soft-capping (see tests/hopper.py for how this works without a GPU). `pytest -s` prints registers and spills.
"""
import importlib

import pytest

from hopper import hopper_resources_many, requires_ptxas

# the module itself: `repbend.kernels.linear_kl` as an attribute is the re-exported function
lk = importlib.import_module("repbend.kernels.linear_kl")

V = 128256


@requires_ptxas
def test_kl_rows_kernel_compiles_for_sm90_without_spills():
    cfgs = {cap: lk.kl_rows_launch_config(V, cap) for cap in (False, True)}
    assert cfgs[False] == {"BLOCK_V": lk.MAX_BLOCK_V, "NUM_TILES": 32, "num_warps": 8}
    assert cfgs[True] == {"BLOCK_V": lk.MAX_BLOCK_V // 2, "NUM_TILES": 63, "num_warps": 8}
    cases = [(dtype, grad, cap) for dtype in ("bf16", "fp32") for grad in (True, False) for cap in (False, True)]
    signature = {"ref_ptr": "*{}", "delta_ptr": "*{}", "loss_ptr": "*fp32", "stride_ref": "i32", "stride_delta": "i32",
                 "V": "i32", "temperature": "fp32", "softcap": "fp32"}
    specs = [
        {
            "kernel": lk._kl_rows_kernel,
            "signature": {k: v.format(dtype) for k, v in signature.items()},
            "constexprs": {"BLOCK_V": cfgs[cap]["BLOCK_V"], "NUM_TILES": cfgs[cap]["NUM_TILES"],
                           "COMPUTE_GRAD": grad, "SOFTCAP": cap},
            "num_warps": cfgs[cap]["num_warps"],
            # the row strides of [C, V] buffers are V: 16-multiples, like V itself
            "divisible": ["ref_ptr", "delta_ptr", "loss_ptr", "stride_ref", "stride_delta", "V"],
        }
        for dtype, grad, cap in cases
    ]
    results = hopper_resources_many(specs)
    for (dtype, grad, cap), res in zip(cases, results):
        print(f"kl_rows {dtype} grad={grad} softcap={cap}: {res['registers']} registers, spills "
              f"{res['spill_stores']}/{res['spill_loads']} B, vector loads {res['vector_loads']}, fp64 {res['fp64']}")
        assert res["spill_stores"] == 0 and res["spill_loads"] == 0, (dtype, grad, cap, res)
        assert res["registers"] <= 128, (dtype, grad, cap, res)  # at least 2 programs of 8 warps per SM
        assert not res["fp64"], (dtype, grad, cap, "fp64 in the PTX")
        assert res["vector_loads"], (dtype, grad, cap, "no vector loads")


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__, "-s"])
