"""`repbend plan` against measurement, on the CPU: for the step benchmark's `tiny` and `small` models the plan
predicts the peak that `repbend bench` measures within 15%, and counts the FLOPs of a step within 2% of an analytic
count (matmuls of both passes and the backward, attention, and the fused ops' formulas).

The bench measures the resident set of its worker process (its allocator made to return freed tensors); the plan
counts tensor bytes. So the prediction of the measured peak is the plan's peak plus the worker's memory that is not
tensors (its resident set before the steps less the model the plan counts), and the step's own memory (peak less
what was there before the steps) is compared as well.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import step_workload as sw  # noqa: E402

from repbend.loss.batch import collate  # noqa: E402
from repbend.plan import plan_variant  # noqa: E402
from repbend.plan.bench import bench_setup  # noqa: E402

TOLERANCE = 0.15


def _bench(tmp_path, model, variants):
    out = tmp_path / model
    proc = subprocess.run([sys.executable, str(BENCH / "bench_step.py"), "--model", model, "--variants", variants,
                           "--warmup", "1", "--steps", "1", "--device", "cpu", "--output", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "results.json").read_text()), proc.stdout


def _check_peaks(results, floor=0):
    for v, e in results.items():
        assert e["status"] == "ok" and e["plan_peak_bytes"], (v, e.get("error"), e.get("plan_error"))
        measured, before = e["peak_mem_bytes"], e["mem_before_steps"]
        model = e["plan_kinds"]["parameters"]
        predicted = e["plan_peak_bytes"] + (before - model)
        step_measured, step_planned = measured - before, e["plan_peak_bytes"] - model
        print(f"{v}: peak measured {measured / 2**20:.0f} MiB, predicted {predicted / 2**20:.0f} MiB; the step's own "
              f"{step_measured / 2**20:.0f} vs {step_planned / 2**20:.0f} MiB")
        assert abs(predicted - measured) <= TOLERANCE * measured, (v, predicted, measured)
        assert abs(step_planned - step_measured) <= max(TOLERANCE * step_measured, floor), (v, step_planned,
                                                                                          step_measured)


def test_plan_predicts_the_measured_peak_tiny(tmp_path):
    results, text = _bench(tmp_path, "tiny", "repbend,reference")
    _check_peaks(results)
    assert "GFLOP/tok" in text and "plan GiB" in text
    assert results["repbend"]["plan_flops_vs_reference"] < 1


def test_plan_predicts_the_measured_peak_small(tmp_path):
    results, _ = _bench(tmp_path, "small", "repbend")
    _check_peaks(results)


# ---------------------------------------------------------------- FLOPs against an analytic count
def analytic_repbend_flops(spec, cfg, batch, fused: bool, r: int = 16) -> int:
    """One RepBend step as `repbend bench` runs it (both passes over all decoder layers: L_KL reads the final
    output; no checkpointing; adapters on every layer of these models): 2 x in x out per position for every
    projection in the reference pass, the trained pass (plus LoRA's 2 r (in + out)) and the backward (the same
    again for the activations' gradients, LoRA's weight gradients twice over, none for layer 0's q, k, v inputs,
    which do not require grad); attention 4 T^2 D per row forward and 10 T^2 D backward (scores recomputed);
    linear_kl's 4 N D V + N D + 26 N V + 2 N V D; with `fused` (the GPU path) rep_distance's 9 L N D + 6 L' N D
    and pairwise_cosine's 12 L N D."""
    n, D, I, H, KV = spec.layers, spec.hidden, spec.intermediate, spec.heads, spec.kv_heads
    Dkv = KV * (D // H)
    R, T = batch.shape
    P = R * T
    proj = [(D, D), (D, Dkv), (D, Dkv), (D, D), (D, I), (D, I), (I, D)]
    base = sum(2 * i * o for i, o in proj)
    lora = sum(2 * r * (i + o) for i, o in proj)
    assert sw.adapter_layers("repbend", n) == list(range(n))
    attn_f, attn_b = 4 * R * T * T * D, 10 * R * T * T * D
    reference = n * (P * base + attn_f)
    trained = n * (P * (base + lora) + attn_f)
    backward = n * (P * (base + 2 * lora) + attn_b) - P * (2 * D * D + 4 * D * Dkv) - P * 3 * 2 * r * D
    N, V = batch.index["retain"].numel(), spec.vocab
    kl = 4 * N * D * V + N * D + 26 * N * V + 2 * N * V * D
    total = reference + trained + backward + kl
    if fused:
        S, U = n + 1, len(cfg.target_layers)
        n_safe, n_unsafe, n_cos = (batch.index[k].numel() for k in ("safe", "unsafe", "cos"))
        total += 9 * S * n_safe * D + 6 * (S - 1) * n_safe * D + 15 * U * n_unsafe * D + 12 * U * n_cos * D
    return total


@pytest.mark.parametrize("model,device", [("tiny", "cpu"), ("small", "cpu"), ("tiny", "cuda")])
def test_plan_counts_the_flops_of_an_analytic_step(model, device):
    spec = sw.MODELS[model]
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    setup = bench_setup(model, "repbend", device, dtype, False, 2, 1, 42)
    plan = plan_variant(setup, "repbend")
    micro = sw.micro_batches(spec.vocab, 2, 42, 1, method="repbend")[0]
    batch = collate(micro, setup.loss_cfg, sw.PAD_ID, sw.PACK_LENGTH)
    want = analytic_repbend_flops(spec, setup.loss_cfg, batch, fused=device == "cuda")
    got = plan.steps_flops[0]
    print(f"{model} ({device}): planned {got / 1e9:.3f} GFLOP, analytic {want / 1e9:.3f} GFLOP, "
          f"{got / want - 1:+.3%}")
    assert abs(got - want) <= 0.02 * want, (got, want)
    assert not plan.uncounted_ops
