"""The plan of a step-benchmark run: each variant planned with the benchmark's own settings (model, device, dtype,
checkpointing, batch, --scale, seed) over the same micro-batches (warm-up and timed), so that `repbend bench` can
print each variant's FLOPs per useful token beside its tokens/s and the predicted peak beside the measured one.

    python -m repbend.plan.bench --model llama3-8b --device cuda --warmup 1 --steps 2 --output plan.json

(what benchmarks/gpu_check.sh runs on the CPUs while the GPU measures). The output is JSON:
{variant: {"peak_bytes", "kinds", "flops_per_token" (timed micro-batches), "steps_*" per micro-batch, ...}}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict

import torch

from . import workload
from .run import Setup, plan_variant


def bench_setup(model: str, method: str, device: str, dtype: torch.dtype, checkpointing: bool | None,
                batch_size: int, count: int, seed: int, scale: float = 1.0, eta: float = 0.0) -> Setup:
    sw, _ = workload.bench_modules()
    spec = workload.known_models()[model]
    name, config, ckpt = workload.load_model_config(model)
    return Setup(name=name, config=config, method=method,
                 loss_cfg=sw.loss_config(method, spec.layers, scale, eta), batch_size=batch_size, device=device,
                 dtype=dtype, checkpointing=ckpt if checkpointing is None else checkpointing,
                 pack_length=round(sw.PACK_LENGTH * scale), steps=count, seed=seed, scale=scale,
                 peak_from=1 if count > 1 else 0)  # as the bench: step 0 (dropout off, the loss check) not counted


def plan_runs(variants: list[str], setup_of, warmup: int, log=None) -> dict:
    """{variant: plan record} with `setup_of(method)` giving each method's Setup (its `steps` = warm-up + timed
    micro-batches); FLOPs per useful token over the timed ones. A variant that cannot be planned gets "error"."""
    sw, _ = workload.bench_modules()
    out = {}
    for v in variants:
        if log:
            log(f"planning {v} ...")
        try:
            p = plan_variant(setup_of(sw.METHOD_OF[v]), v)
        except Exception as e:  # noqa: BLE001 - a plan that fails is reported beside the measurement
            out[v] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            continue
        timed = slice(warmup, None) if len(p.steps_useful) > warmup else slice(None)
        rec = asdict(p)
        rec["flops_per_token"] = sum(p.steps_flops[timed]) / sum(p.steps_useful[timed])
        rec["positions_per_token"] = sum(p.steps_positions[timed]) / sum(p.steps_useful[timed])
        out[v] = rec
    return out


def main(argv=None) -> int:
    sw, _ = workload.bench_modules()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama3-8b")
    p.add_argument("--variants", default=",".join(sw.VARIANTS))
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--output", required=True)
    a = p.parse_args(argv)
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32

    def setup_of(method):
        b = a.batch_size or (sw.BATCH_GPU[method] if a.device == "cuda" else 2)
        return bench_setup(a.model, method, a.device, dtype, None, b, a.warmup + a.steps, a.seed, a.scale)
    plans = plan_runs(a.variants.split(","), setup_of, a.warmup,
                      log=lambda m: print(f"[plan] {m}", file=sys.stderr, flush=True))
    tmp = a.output + ".part"
    with open(tmp, "w") as fh:  # renamed into place: a reader never sees half a file
        json.dump(plans, fh, default=str)
    os.replace(tmp, a.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
