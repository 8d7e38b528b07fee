"""The fused kernels compile for Hopper (sm_90) through their real launchers, at the shapes and argument forms every
method gives them at production size (Llama-3-8B: D = 4096, V = 128256; 33, 12, 11 and 1 layers; bf16 and fp32),
with zero register spills, no fp64 instruction, 16-byte row loads and rep_distance's forward in at most 64
registers; and a new micro-batch shape after the warm-up compiles nothing new. No GPU needed: tests/hopper.py runs
the launchers on meta tensors under a fake sm_90 driver, so Triton specialises the arguments exactly as on a device
(an int equal to 1 becomes a constant, multiples of 16 are marked), then reads registers and spills with the ptxas
bundled in the triton wheel. `pytest -s` prints the table.

The argument forms are those of repbend/loss: a list of L per-layer [R, T, D] outputs with a gathered [L, N, D]
reference (RepBend's L_safe over all 33 indices and L_unsafe / L_pair over 11, Circuit Breakers' retain term over
33 and rerouting term over 12), RMU's single layer (L = 1) against its control vector expanded with row stride 0 and
against its gathered reference, the stacked [L, B, T, D] forms of the public API, pairwise_cosine over N = 2B unsafe
rows, and linear_kl's row kernel over the vocabulary with and without soft-capping.
"""
import importlib

import pytest
import torch

from hopper import hopper_launches, requires_ptxas

D, V = 4096, 128256
DTYPES = (torch.bfloat16, torch.float32)
REP_FWD_MAX_REGISTERS = 64
MODULES = ["repbend.kernels._rep_distance_triton", "repbend.kernels.pairwise_cosine", "repbend.kernels.linear_kl"]
# (rows R, row length T, selected N) of successive micro-batches: packed rows of 1024, a padded micro-batch of odd
# length, a single row and token, N on and off multiples of 16
WARMUP_SHAPE = (8, 1024, 2000)
STEP_SHAPES = [(9, 1018, 1999), (16, 1024, 16), (1, 1, 1), (3, 7, 17), (8, 1024, 1024)]
# layers per call: RepBend's S (all 33 indices) and U (11), Circuit Breakers' C once (12), RMU's one layer
LAYER_COUNTS = (33, 12, 11, 1)


def _meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype, device="meta")


def _rep_distance_calls(shape, dtype):
    """rep_distance's forward and backward launchers, once per argument form the methods and the API produce."""
    rd = importlib.import_module("repbend.kernels._rep_distance_triton")
    R, T, N = shape
    rows = _meta(N, dtype=torch.int64)
    for L in LAYER_COUNTS:
        hidden = [_meta(R, T, D, dtype=dtype) for _ in range(L)]
        forms = [([_meta(L, N, D, dtype=dtype)], True)]                      # gathered reference rows
        if L == 1:                                                          # RMU's c.view(1, 1, D).expand(1, N, D)
            forms.append(([_meta(D, dtype=dtype).view(1, 1, D).expand(1, N, D)], True))
        if L == 11:                                                         # the API's full-shape forms
            forms.append(([_meta(R, T, D, dtype=dtype) for _ in range(L)], False))
            forms.append(([_meta(L, R, T, D, dtype=dtype)], False))
        for ref, gathered in forms:
            _, buf, slot = rd._forward(hidden, ref, rows, gathered)
            rd._backward(_meta(4, L, dtype=torch.float32), buf, slot, hidden, ref, gathered, list(range(L)))
            # a plain backward writes one layer at a time, added to the gradient from the layers above
            rd._backward(_meta(4, L, dtype=torch.float32), buf, slot, hidden, ref, gathered, [L - 1],
                         _meta(1, R, T, D, dtype=dtype))
        stacked = [_meta(L, R, T, D, dtype=dtype)]
        _, buf, slot = rd._forward(stacked, [_meta(L, N, D, dtype=dtype)], rows, True)
        rd._backward(_meta(4, L, dtype=torch.float32), buf, slot, stacked, [_meta(L, N, D, dtype=dtype)], True,
                     list(range(L)))


def _pairwise_calls(n, dtype):
    pc = importlib.import_module("repbend.kernels.pairwise_cosine")
    x = _meta(11, n, D, dtype=dtype)
    _, s, norm = pc.pairwise_cosine_fwd._init_fn(x)  # the op's own implementation (the launcher), not its fake
    pc.pairwise_cosine_bwd._init_fn(_meta(11, dtype=torch.float32), x, s, norm)


def _linear_kl_calls(n, dtype):
    lk = importlib.import_module("repbend.kernels.linear_kl")
    for softcap in (None, 30.0):
        lk._linear_kl_forward(_meta(n, D, dtype=dtype), _meta(n, D, dtype=dtype), _meta(V, D, dtype=dtype), 2.0,
                              softcap, "triton", None, True, False)
        with torch.no_grad():
            lk._linear_kl_forward(_meta(n, D, dtype=dtype), _meta(n, D, dtype=dtype), _meta(V, D, dtype=dtype), 2.0,
                                  softcap, "triton", None, False, False)


def launch_production():
    """Run in the fake-driver child (tests/hopper.py): warm-up at one micro-batch shape, then the other shapes."""
    for dtype in DTYPES:
        _rep_distance_calls(WARMUP_SHAPE, dtype)
        _pairwise_calls(8, dtype)   # N = 2B unsafe rows: B = 4, the recipe
        _pairwise_calls(64, dtype)  # and a large batch
        _linear_kl_calls(WARMUP_SHAPE[2], dtype)
    yield "warmup"
    for shape in STEP_SHAPES:
        for dtype in DTYPES:
            _rep_distance_calls(shape, dtype)
            _linear_kl_calls(shape[2], dtype)
    yield "steps"


@pytest.fixture(scope="module")
def launched():
    out = hopper_launches("test_kernel_compile", "launch_production", MODULES)
    for v in out["variants"]:
        print(f"{v['function'].split(':')[1]:32s} {v['num_warps']} warps {v['registers']:4d} registers, spills "
              f"{v['spill_stores']}/{v['spill_loads']} B, vector loads {v['vector_loads']}, fp64 {v['fp64']}; "
              f"{v['constants']}")
    return out


@requires_ptxas
def test_every_launch_compiles_for_sm90_without_spills(launched):
    variants = launched["variants"]
    by_fn = {}
    for v in variants:
        by_fn.setdefault(v["function"].split(":")[1], []).append(v)
    # every kernel was compiled, in both dtypes
    assert set(by_fn) == {"_rep_distance_fwd_kernel", "_rep_distance_bwd_kernel", "_pairwise_cosine_fwd_kernel",
                          "_pairwise_cosine_bwd_kernel", "_kl_rows_kernel"}, set(by_fn)
    for v in variants:
        name = f"{v['function']} {v['signature']}"
        assert v["spill_stores"] == 0 and v["spill_loads"] == 0, f"{name} spills: {v}"
        assert 0 < v["registers"] <= 255, v
        assert not v["fp64"], f"{name}: fp64 in the PTX"
        assert v["vector_loads"], f"{name}: no vector loads in the PTX"
        if "_rep_distance_fwd" in name:
            assert v["registers"] <= REP_FWD_MAX_REGISTERS, f"{name}: {v['registers']} registers"
        if "_kl_rows" in name:
            assert v["registers"] <= 128, f"{name}: {v['registers']} registers"  # 2 programs of 8 warps per SM
    assert launched["launches"], "nothing was launched"


@requires_ptxas
def test_rmu_single_layer_compiles(launched):
    """L = 1 (RMU reads one layer): Triton specialises an int argument equal to 1 into a constant, which the
    backward once called .to() on; the launch must compile and launch."""
    bwd = [v for v in launched["variants"] if v["function"].endswith("_rep_distance_bwd_kernel")]
    assert bwd and all(v["signature"].get("L") != "constexpr" for v in bwd)
    assert launched["launches"].get("_rep_distance_bwd_kernel", 0) >= len(LAYER_COUNTS)


@requires_ptxas
def test_no_recompilation_after_warmup(launched):
    """Micro-batches change N, T and B*T every step: after the first micro-batch's shapes nothing compiles again
    (each new variant costs 0.3-0.5 s inside a timed step on a GPU)."""
    phases = {p["phase"]: set(p["variants"]) for p in launched["phases"]}
    new = phases["steps"] - phases["warmup"]
    names = sorted({v["function"].split(":")[1] for v in launched["variants"] if v["key"] in new})
    assert not new, f"{len(new)} variants compiled after the warm-up, in {names}"
    # one variant per kernel, dtype and argument form (a table of per-layer addresses with a gathered or a full
    # reference; one stacked tensor; the backward also with an upstream gradient added), whatever the layer count
    fwd = [v for v in launched["variants"] if v["function"].endswith("_rep_distance_fwd_kernel")]
    bwd = [v for v in launched["variants"] if v["function"].endswith("_rep_distance_bwd_kernel")]
    assert len(fwd) == len(DTYPES) * 3, [v["constants"] for v in fwd]
    assert len(bwd) == len(DTYPES) * 5, [v["constants"] for v in bwd]
