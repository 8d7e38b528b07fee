"""The command line of benchmarks/bench_step.py (`repbend bench`): its flags, with `repbend train`'s spelling for
the settings the two share, and the defaults that depend on the device."""
from __future__ import annotations

import argparse

from step_workload import METHOD_OF, METHODS, MODELS, VARIANTS

H200_BF16_TFLOPS = 989.0


def _dtype_name(text: str) -> str:
    """bf16 | fp32 | auto, also spelled as `repbend train --model.dtype` spells them."""
    t = str(text).strip().lower()
    return {"bfloat16": "bf16", "float32": "fp32", "fp32": "fp32", "bf16": "bf16"}.get(t, t)


def _on_off(text: str) -> str:
    """on | off | auto, also as `repbend train --model.gradient_checkpointing` spells them (true / false)."""
    t = str(text).strip().lower()
    return "on" if t in ("true", "1", "yes", "on") else "off" if t in ("false", "0", "no", "off") else t


def parse_args(argv, description: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="repbend bench", allow_abbrev=False, description=description,
                                epilog="Settings shared with `repbend train` take its spelling too: --train.batch_size, "
                                       "--train.seed, --model.dtype, --model.attn_implementation, "
                                       "--model.gradient_checkpointing, --loss.eta, --lora.dropout.")
    p.add_argument("--model", choices=tuple(MODELS), default="small")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    p.add_argument("--variants", default=None,
                   help="comma-separated subset of " + ", ".join(VARIANTS) + " (default: every variant of --methods)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant (after --warmup)")
    p.add_argument("--output", default="bench_out/step", help="folder for results.json/.csv, table.txt, the PNG")
    p.add_argument("--jsonl", default=None, help="append one JSON line per variant to this file as it ends")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps, at least 1 (default 1 CPU, 2 GPU)")
    p.add_argument("--batch-size", "--train.batch_size", dest="batch_size", type=int, default=None,
                   help="B rows per set (default 2 CPU; GPU: 4 repbend, 4 circuit_breakers, 16 rmu)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dtype", "--model.dtype", dest="dtype", type=_dtype_name, choices=("auto", "bf16", "fp32"),
                   default="auto", help="auto: bf16 on GPU, fp32 CPU (bfloat16 and float32 are the same names)")
    p.add_argument("--attn", "--model.attn_implementation", dest="attn", default="auto", help="auto (flash-attn 2 on GPU when installed, else sdpa) | sdpa | eager")
    p.add_argument("--gradient-checkpointing", "--model.gradient_checkpointing", dest="gradient_checkpointing",
                   type=_on_off, choices=("auto", "on", "off"), default="auto",
                   help="auto: on for llama3-8b and mistral-7b (the recipe), off for tiny and small")
    p.add_argument("--seed", "--train.seed", dest="seed", type=int, default=42)
    p.add_argument("--eta", "--loss.eta", dest="eta", type=float, default=0.0, help="RepBend's L_pair weight (the recipe: 0)")
    p.add_argument("--lora-dropout", "--lora.dropout", dest="lora_dropout", type=float, default=0.05)
    p.add_argument("--peak-tflops", type=float, default=H200_BF16_TFLOPS,
                   help="the device's dense bf16 peak for the MFU (default 989: H200)")
    p.add_argument("--loss-rtol", type=float, default=None,
                   help="loss agreement tolerance (default 1e-4 fp32, 5e-2 bf16)")
    p.add_argument("--worker-timeout", type=float, default=None,
                   help="seconds per variant before it is recorded as timeout")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds for the whole run: variants that no longer fit are recorded as skipped")
    p.add_argument("--in-process", action="store_true",
                   help="run the variants in this process (peak memory not isolated)")
    p.add_argument("--plan", choices=("on", "off"), default="on",
                   help="plan every variant on fake tensors (repbend plan) for its FLOPs per useful token and "
                        "predicted peak, printed beside the measurement")
    p.add_argument("--plan-from", default=None, help="read those plans from this JSON (python -m repbend.plan.bench)")
    p.add_argument("--plan-wait", type=float, default=0.0, help="seconds to wait for --plan-from to appear")
    p.add_argument("--share-model", choices=("auto", "on", "off"), default="auto",
                   help="run consecutive variants of a method in one worker that builds the model once (auto: on "
                        "a GPU, where each variant's peak is reset; on the CPU every variant gets its own process)")
    p.add_argument("--phases", action="store_true", help="GPU: synchronize at phase boundaries to time them")
    p.add_argument("--profile", action="store_true", help="write a torch.profiler table of one extra step per variant")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default 1 on CPU, as bench_kernels.py: steady on a shared machine; "
                        "torch's own choice on GPU)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply every sequence length, the references' padding and the pack length (quick runs)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--result-file", help=argparse.SUPPRESS)
    p.add_argument("--measure-matmul", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.device == "auto":
        import torch
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = a.device.startswith("cuda")
    a.warmup = a.warmup if a.warmup is not None else (2 if gpu else 1)
    a.threads = a.threads or (None if gpu else 1)
    a.share_model = a.share_model == "on" or (a.share_model == "auto" and gpu)
    if a.warmup < 1 or a.steps < 1:
        p.error("--warmup and --steps must be at least 1 (step 0 is the loss check)")
    methods = [m for m in a.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        p.error(f"unknown methods {bad}; choose from {', '.join(METHODS)}")
    if a.variants is None:
        a.variants = ",".join(v for v in VARIANTS if METHOD_OF[v] in methods)
    bad = [v for v in a.variants.split(",") if v not in VARIANTS]
    if bad:
        p.error(f"unknown variants {bad}; choose from {', '.join(VARIANTS)}")
    return a
