"""The linear_kl row kernel compiles for Hopper (sm_90) without register spills at the production vocabulary.

Compiled with the block size and warps the launcher picks for Llama-3's V = 128256, for both dtypes and with and
without the gradient pass (see tests/hopper.py for how this works without a GPU).
"""
import importlib

import pytest

from hopper import hopper_resources_many, requires_ptxas

# the module itself: `repbend.kernels.linear_kl` as an attribute is the re-exported function
lk = importlib.import_module("repbend.kernels.linear_kl")

V = 128256


@requires_ptxas
def test_kl_rows_kernel_compiles_for_sm90_without_spills():
    cfg = lk.kl_rows_launch_config(V)
    assert cfg == {"BLOCK_V": lk.MAX_BLOCK_V, "num_warps": 8}
    cases = [(dtype, grad) for dtype in ("bf16", "fp32") for grad in (True, False)]
    specs = [
        {
            "kernel": lk._kl_rows_kernel,
            "signature": {"ref_ptr": f"*{dtype}", "delta_ptr": f"*{dtype}", "loss_ptr": "*fp32",
                          "stride_ref": "i32", "stride_delta": "i32", "V": "i32", "temperature": "fp32"},
            "constexprs": {"BLOCK_V": cfg["BLOCK_V"], "COMPUTE_GRAD": grad},
            "num_warps": cfg["num_warps"],
        }
        for dtype, grad in cases
    ]
    results = hopper_resources_many(specs)
    for (dtype, grad), res in zip(cases, results):
        print(f"{dtype} grad={grad}: {res['registers']} registers, spills {res['spill_stores']}/{res['spill_loads']}")
        assert res["spill_stores"] == 0 and res["spill_loads"] == 0, (dtype, grad, res)
        assert res["registers"] <= 255, (dtype, grad, res)


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__, "-s"])
