"""Stage 5 of benchmarks/gpu_check.sh: `ddp` and `fsdp` training runs of a few steps on one device, under torchrun.

    python -m torch.distributed.run --standalone --nproc_per_node 1 benchmarks/gpu_dist.py --jsonl OUT/results.jsonl

With one rank, `repbend.distributed.init_distributed` treats the job as a single process (WORLD_SIZE 1), and none of
the data-parallel code would run. This script joins torchrun's process group itself (nccl on CUDA, gloo on the CPU)
and hands the trainer a `DistState` that counts as active with one rank, so that what two or more ranks run does
run, on a world of one: ddp's bucketed all-reduce of the trained gradients; fsdp's FSDP2 sharding (DTensor
parameters on a mesh of one), reduce-scatter, the clip over sharded gradients, and the gathered checkpoint and
adapter. Each (method, strategy) run trains the tiny demo Llama (3 layers) for --steps steps from the demo data and
its losses and gradient norms are compared with a plain single-process run of the same settings (the same
micro-batches: one rank takes indices step*grad_accum + k): rel 1e-4 in fp32 (CPU), 1e-2 in bf16 (GPU). Its
adapter (or RMU weights) must be written. One JSON line per run (stage "dist").
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import tempfile
import time
from pathlib import Path

from gpu_records import Deadline, Records
from methods import BENCH, tiny_config

def _plan() -> dict[str, tuple[str, ...]]:
    """method -> strategies checked against the plain run: every strategy for the first method (RepBend), the most
    demanding one each other method supports (fsdp where it can, else ddp) for the rest."""
    from repbend.loss import RepBendLoss

    out = {}
    for k, method in enumerate(BENCH):
        strategies = RepBendLoss(tiny_config(method)).method.STRATEGIES
        out[method] = tuple(strategies) if k == 0 else (strategies[-1],)
    return out


def _loss_args(method: str) -> list[str]:
    args = ["--loss.method", method]
    for key, value in BENCH[method].tiny.items():
        args += [f"--loss.{key}", str(value)]
    return args


PLAN = _plan()
LOSS_ARGS = {method: _loss_args(method) for method in BENCH}


def assets(root: Path) -> tuple[str, dict]:
    from repbend.demo.assets import save_tiny_model_dir
    from repbend.demo.synthetic import corpus, write_demo_data

    paths = write_demo_data(root / "data", seed=0, n_train=48, n_heldout=8)
    model_dir = save_tiny_model_dir(root / "model", corpus=corpus(), layers=3, hidden=64, heads=4, kv_heads=2)
    return model_dir, paths


def config(model_dir: str, paths: dict, out: Path, method: str, strategy: str, steps: int):
    from repbend import RepBendConfig

    from repbend.data.pools import SOURCES
    from repbend.loss import RepBendLoss

    roles = set(RepBendLoss(tiny_config(method)).data_spec().roles)  # only the files the method reads
    data = [arg for name, given in SOURCES.items() if set(given) & roles for arg in (f"--data.{name}", paths[name])]
    args = ["--model.path", model_dir, *data, "--train.output_dir", str(out), "--train.overwrite", "true", "--train.max_steps", str(steps),
            "--train.batch_size", "2", "--train.grad_accum", "1", "--train.lr", "1e-3", "--lora.r", "4",
            "--train.progress", "false", "--train.tensorboard", "false", "--train.save_every", "0",
            "--data.max_response_tokens", "48", "--data.max_retain_tokens", "96",
            "--distributed.strategy", strategy, *LOSS_ARGS[method]]
    return RepBendConfig.load(None, args)


@contextlib.contextmanager
def one_rank_active(strategy: str, device, seen: dict):
    """The trainer's `init_distributed` replaced by one returning a one-rank DistState that counts as active;
    `seen` gets what ran: the ddp gradient averages, and the trained tensors that are FSDP2 DTensors."""
    import repbend.trainer as trainer
    from repbend.distributed import DistState

    class OneRank(DistState):
        @property
        def active(self) -> bool:  # a world of one, run as if it were several
            return True

        def _average_gradients(self) -> None:
            seen["ddp_gradient_averages"] = seen.get("ddp_gradient_averages", 0) + 1
            super()._average_gradients()

    def init(cfg, dev="auto"):
        state = OneRank(rank=0, world_size=1, local_rank=0, device=device, strategy=strategy, owns_group=False)
        seen["state"] = state
        return state

    saved = trainer.init_distributed
    trainer.init_distributed = init
    try:
        yield
    finally:
        trainer.init_distributed = saved


def train_once(cfg, strategy: str | None, device) -> dict:
    import torch

    from repbend import train

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    seen: dict = {}
    with one_rank_active(strategy, device, seen) if strategy else contextlib.nullcontext():
        result = train(cfg)
    out = Path(result.output_dir)
    saved = sorted(p.name for p in (out / "adapter").iterdir()) if (out / "adapter").is_dir() else []
    state = seen.pop("state", None)
    return {"losses": [h["loss"] for h in result.history], "grad_norms": [h["grad_norm"] for h in result.history],
            "tokens_per_s": [h["tokens_per_s"] for h in result.history], "wall_s": time.perf_counter() - t0,
            "steps": result.steps, "saved": saved,
            "dtensor_params": None if state is None else sum(hasattr(p, "device_mesh") for p in state.params),
            "trained_tensors": None if state is None else len(state.params), **seen,
            "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}


def compare(got: dict, want: dict, rtol: float) -> list[str]:
    problems = []
    if got["steps"] != want["steps"]:
        problems.append(f"{got['steps']} steps, the plain run {want['steps']}")
    for key in ("losses", "grad_norms"):
        for i, (x, y) in enumerate(zip(got[key], want[key])):
            if not (math.isfinite(x) and abs(x - y) <= rtol * max(abs(y), 1e-6)):
                problems.append(f"{key}[{i}] {x:.6g} vs plain {y:.6g} (rtol {rtol:g})")
    if not got["saved"]:
        problems.append("no adapter/weights written")
    return problems


def evidence(strategy: str, got: dict) -> list[str]:
    """That the strategy's own code ran: ddp averaged gradients every step, fsdp made the trained tensors DTensors."""
    if strategy == "ddp" and got.get("ddp_gradient_averages", 0) < got["steps"]:
        return [f"ddp: {got.get('ddp_gradient_averages', 0)} gradient averages in {got['steps']} steps"]
    if strategy == "fsdp" and not got.get("dtensor_params"):
        return ["fsdp: no trained tensor is a DTensor"]
    return []


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jsonl", default=None)
    p.add_argument("--methods", default=",".join(PLAN))
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--work", default=None, help="folder for the model, data and run directories (default: a temp)")
    p.add_argument("--time-limit", type=float, default=None)
    a = p.parse_args(argv)

    import torch
    import torch.distributed as tdist

    from repbend.distributed import bind_world_defaults, leave_process_group

    rec = Records(a.jsonl, "dist")
    deadline = Deadline(a.time_limit)
    if "WORLD_SIZE" not in os.environ:
        rec.write("torchrun", "error", error="run me under torchrun (python -m torch.distributed.run "
                                             "--nproc_per_node 1 ...)")
        return 1
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    t0 = time.perf_counter()
    bind_world_defaults()
    tdist.init_process_group("nccl" if cuda else "gloo", **({"device_id": device} if cuda else {}))
    rec.write("process_group", "ok", backend=tdist.get_backend(), world_size=tdist.get_world_size(),
              init_s=time.perf_counter() - t0, device=str(device))
    rtol = 1e-2 if cuda else 1e-4
    root = Path(a.work or tempfile.mkdtemp(prefix="repbend_dist_"))
    model_dir, paths = assets(root)
    bad = 0
    try:
        for method in [m for m in a.methods.split(",") if m]:
            plain = None
            for strategy in (None,) + PLAN[method]:
                name = f"{method}/{strategy or 'plain'}"
                if deadline.over(10):
                    rec.write(name, "skipped", error="stage time limit reached")
                    continue
                try:
                    cfg = config(model_dir, paths, root / "runs" / name.replace("/", "_"), method,
                                 strategy or "ddp", a.steps)
                    got = train_once(cfg, strategy, device)
                    if strategy is None:
                        plain = got
                        line = rec.write(name, "ok", **got)
                    else:
                        problems = compare(got, plain, rtol) if plain else ["no plain run to compare with"]
                        problems += evidence(strategy, got)
                        line = rec.write(name, "fail" if problems else "ok", problems=problems or None, **got)
                except Exception as e:  # noqa: BLE001
                    line = rec.error(name, e)
                bad += line["status"] != "ok"
    finally:
        leave_process_group()
    print(f"dist: {'OK' if not bad else f'{bad} run(s) not ok'}")
    return 1 if bad else 0


if __name__ == "__main__":
    code = main()
    from repbend.distributed import end_process
    end_process(code)  # the group left and the records written: without the interpreter's teardown
