"""`repbend plan`: the command line.

    repbend plan [--model NAME|CONFIG.json|MODEL_DIR] [--config RECIPE.yaml] [--method M] [--batch-size B]
                 [--gpus N] [--distributed.strategy ddp|fsdp] [--gpu-mem GiB] [--mfu F] [--json] ...

Settings come from the recipe (--config: loss, LoRA, batch size, packing, checkpointing, strategy, and the model
directory of model.path when it holds a config.json), then from the flags. Each flag also has the recipe's
dotted name (`--train.batch_size`, `--loss.method`, `--distributed.strategy`, `--train.pack_length`,
`--model.gradient_checkpointing`). Without a recipe: the step benchmark's recipe of the method at the model's
depth (benchmarks/step_workload.py), its per-GPU batch, and the model's own checkpointing setting.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

import torch

from ..errors import ConfigError
from ..model import LoraSettings
from . import workload
from .report import GIB, Report, Verdict, combined_table, needed_bytes
from .run import Setup, plan_variant

DEFAULT_MFU = 0.40
H100_BF16_TFLOPS = 989.0  # dense bf16 peak of an H100 SXM (an H200's is the same)


def _bool(text: str) -> bool:
    t = str(text).strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="repbend plan", description=__doc__.split("\n\n")[0].split(": ", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="a known shape (llama3-8b, mistral-7b, llama3-70b, and the benchmark's tiny, small), an HF "
                        "config.json or a model directory (default: the recipe's model.path, else llama3-8b)")
    p.add_argument("--config", default=None, help="a recipe YAML (repbend train --config)")
    p.add_argument("--method", "--loss.method", dest="method", default=None,
                   help="the method, or all (every method of the step benchmark; default: the recipe's, else "
                        "repbend)")
    p.add_argument("--batch-size", "--train.batch_size", dest="batch_size", type=int, default=None,
                   help="rows per set per micro-batch and GPU (default: the recipe's, else the benchmark's)")
    p.add_argument("--gpus", type=int, default=1, help="GPUs the run uses (memory is per GPU)")
    p.add_argument("--distributed.strategy", "--strategy", dest="strategy", choices=("ddp", "fsdp"), default=None)
    p.add_argument("--gpu-mem", type=float, default=None, help="GiB of one GPU: say whether it fits, what to change")
    p.add_argument("--mfu", type=float, default=DEFAULT_MFU, help="model FLOPs utilisation for tokens/s (0.4)")
    p.add_argument("--peak-tflops", type=float, default=H100_BF16_TFLOPS, help="the GPU's dense bf16 TFLOP/s")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="the device planned for: cuda (bf16 autocast, the Triton ops) or cpu (fp32, eager ops)")
    p.add_argument("--dtype", "--model.dtype", dest="dtype", choices=("bf16", "fp32"), default=None,
                   help="model dtype (default bf16 on cuda, fp32 on cpu)")
    p.add_argument("--checkpointing", "--model.gradient_checkpointing", dest="checkpointing", type=_bool,
                   default=None, help="gradient checkpointing true/false (default: the recipe's / the model's)")
    p.add_argument("--pack-length", "--train.pack_length", dest="pack_length", type=int, default=None,
                   help="packed row length (default 1024)")
    p.add_argument("--packing", "--train.packing", dest="packing", type=_bool, default=None,
                   help="pack sequences into rows (default true)")
    p.add_argument("--steps", type=int, default=1, help="micro-batches to plan (the peak is the largest)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--no-reference", action="store_true", help="plan only the shipped step, not the reference")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return p


def setup_from_args(a: argparse.Namespace) -> Setup:
    sw, _ = workload.bench_modules()
    recipe = None
    if a.config:
        from ..config import RepBendConfig
        recipe = RepBendConfig.load(a.config, [])
    model = a.model or (recipe.model.path if recipe and recipe.model.path else "llama3-8b")
    name, config, model_ckpt = workload.load_model_config(model)
    n_layers = workload.n_layers_of(config)
    if recipe is not None:
        loss_cfg = recipe.loss if not a.method else dataclasses.replace(recipe.loss, method=a.method)
        if a.method:
            loss_cfg.validate()
        method = loss_cfg.method
        lora = LoraSettings(recipe.lora.r, recipe.lora.alpha, recipe.lora.dropout, recipe.lora.target_modules)
        lora_layers = recipe.lora.layers_to_transform
        if lora_layers is None and workload.lora_layers_for(method, n_layers) is not None:
            from ..build import adapter_layers
            lora_layers = adapter_layers(recipe, n_layers)
        batch = recipe.train.batch_size
        pack = recipe.train.pack_length if recipe.train.packing else 0
        ckpt = recipe.model.gradient_checkpointing
        strategy = recipe.distributed.strategy
    else:
        method = a.method or "repbend"
        if method not in sw.METHODS:
            raise ConfigError(f"--method {method}: choose from {', '.join(sw.METHODS)}")
        loss_cfg = workload.recipe_loss(method, n_layers)
        lora, lora_layers = LoraSettings(), None
        batch = sw.BATCH_GPU[method]
        pack, ckpt, strategy = sw.PACK_LENGTH, bool(model_ckpt), "ddp"
    if method not in sw.REFERENCE_OF:
        raise ConfigError(f"loss.method {method}: the step benchmark has no workload for it (methods: "
                          f"{', '.join(sw.METHODS)})")
    from ..methods import method_class
    supported = getattr(method_class(method), "STRATEGIES", ("ddp", "fsdp"))
    if a.pack_length is not None:
        pack = a.pack_length
    if a.packing is not None and not a.packing:
        pack = 0
    gpus = a.gpus
    strategy = a.strategy or strategy
    if strategy not in supported:
        raise ConfigError(f"distributed.strategy {strategy}: loss.method {method} supports {', '.join(supported)} "
                          "only (as repbend train)")
    if gpus < 1 or a.steps < 1 or (a.batch_size is not None and a.batch_size < 1):
        raise ConfigError("--gpus, --steps and --batch-size must be at least 1")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype or ("bf16" if a.device == "cuda" else "fp32")]
    return Setup(name=name, config=config, method=method, loss_cfg=loss_cfg, batch_size=a.batch_size or batch,
                 device=a.device, dtype=dtype, checkpointing=bool(ckpt if a.checkpointing is None else a.checkpointing),
                 pack_length=pack, lora=lora, lora_layers=lora_layers, steps=a.steps, seed=a.seed, gpus=gpus,
                 strategy=strategy)


def settings_of(s: Setup) -> dict:
    return {"model": s.name, "method": s.method, "batch_size": s.batch_size, "gpus": s.gpus, "strategy": s.strategy,
            "device": s.device, "dtype": str(s.dtype).replace("torch.", ""), "checkpointing": s.checkpointing,
            "pack_length": s.pack_length, "steps": s.steps, "seed": s.seed, "layers": workload.n_layers_of(s.config),
            "hidden": s.config.hidden_size, "vocab": s.config.vocab_size}


def plan(s: Setup, reference: bool = True, mfu: float = DEFAULT_MFU, peak_tflops: float = H100_BF16_TFLOPS,
         gpu_mem: float | None = None, log=None) -> Report:
    """Plan the method's shipped step (and its reference re-creation); with `gpu_mem`, the verdict and advice."""
    sw, _ = workload.bench_modules()
    ref = sw.REFERENCE_OF[s.method]
    names = [s.method] + ([ref] if reference and ref != s.method else [])
    variants = {}
    for v in names:
        if log:
            log(f"planning {v} ...")
        variants[v] = plan_variant(s, v)
    rep = Report(settings_of(s), variants, {v: ref for v in names}, mfu, peak_tflops)
    if gpu_mem is not None:
        rep.verdict = verdict(s, variants[s.method], gpu_mem, log)
    return rep


def verdict(s: Setup, v, gpu_mem: float, log=None) -> Verdict:
    """Whether the shipped step fits `gpu_mem` GiB; if not, the first change that fits (checkpointing on, a smaller
    batch, a shorter packing length); if it fits with checkpointing on, whether it would without (no recompute)."""
    need = needed_bytes(v.peak_bytes) / GIB
    out = Verdict(gpu_mem, need, need <= gpu_mem)

    def tried(what, **changes):
        if log:
            log(f"planning {what} ...")
        p = plan_variant(dataclasses.replace(s, **changes), s.method)
        return p, needed_bytes(p.peak_bytes) / GIB

    if out.fits:
        if s.checkpointing:
            p, n = tried("checkpointing off", checkpointing=False)
            saved = 1 - p.flops_per_token / v.flops_per_token
            out.advice.append(
                f"checkpointing off: needs about {n:.1f} GiB, "
                + ("fits" if n <= gpu_mem else "does not fit") + f"; it would save {saved:.0%} of the FLOPs "
                "(the recompute)" + (": set --model.gradient_checkpointing false" if n <= gpu_mem else ""))
        return out
    candidates = []
    if not s.checkpointing:
        candidates.append(("--model.gradient_checkpointing true", {"checkpointing": True}))
    b = s.batch_size // 2
    while b >= 1:
        candidates.append((f"--train.batch_size {b}", {"batch_size": b}))
        b //= 2
    if s.pack_length and s.pack_length > 512:
        candidates.append(("--train.pack_length 512", {"pack_length": 512}))
    for flag, changes in candidates:
        p, n = tried(flag, **changes)
        out.advice.append(f"{flag}: needs about {n:.1f} GiB ({p.flops_per_token / 1e9:.3g} GFLOP per useful token)")
        if n <= gpu_mem:
            out.advice[-1] += " -> fits: change this"
            break
    else:
        out.advice.append("nothing tried fits: more GPUs with --distributed.strategy fsdp, or a larger card")
    return out


EVERY_METHOD = "all"  # --method all: not a method's name, the word for every method of the step benchmark


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    log = None if a.json else (lambda m: print(f"[plan] {m}", file=sys.stderr, flush=True))
    if a.method == EVERY_METHOD:
        sw, _ = workload.bench_modules()
        reports, skipped = [], {}
        for m in sw.METHODS:
            a.method = m
            try:
                s = setup_from_args(a)
            except ConfigError as e:  # e.g. a strategy the method does not support: said, the others planned
                skipped[m] = str(e)
                continue
            if log:
                log(f"{m}:")
            reports.append(plan(s, reference=not a.no_reference, mfu=a.mfu, peak_tflops=a.peak_tflops,
                                gpu_mem=a.gpu_mem, log=log))
        if not reports:
            raise ConfigError("; ".join(skipped.values()))
        if a.json:
            import json
            out = {r.settings["method"]: r.to_json() for r in reports}
            out.update({m: {"not_planned": why} for m, why in skipped.items()})
            print(json.dumps(out, indent=2, default=str))
        else:
            print(combined_table(reports))
            for m, why in skipped.items():
                print(f"{m}: not planned: {why}")
        return 0
    s = setup_from_args(a)
    rep = plan(s, reference=not a.no_reference, mfu=a.mfu, peak_tflops=a.peak_tflops, gpu_mem=a.gpu_mem, log=log)
    print(rep.dumps() if a.json else rep.table())
    return 0
