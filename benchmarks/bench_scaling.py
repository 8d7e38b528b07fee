"""Data-parallel scaling of `repbend train` under torchrun: useful tokens/s against the number of processes.

    python benchmarks/bench_scaling.py --output bench_out/scaling            # CPU, gloo: 1 and 2 processes, ~5 min

On 8 GPUs of one node (a real model and data: everything after `--` goes to `repbend train`):

    python benchmarks/bench_scaling.py --device cuda --procs 1 2 4 8 --strategies ddp fsdp --steps 12 \\
        --output bench_out/scaling_8gpu -- --config repbend/configs/llama3_8b_instruct.yaml \\
        --model.path meta-llama/Meta-Llama-3-8B-Instruct --data.wildguardmix WGM.jsonl \\
        --data.wildjailbreak WJ.jsonl --data.ultrachat UC.jsonl

which runs, per row, `torchrun --standalone --nproc_per_node P -m repbend train ... --distributed.strategy S`.

Each row is one launch: per-process batch B, grad_accum 1, --steps optimizer steps (weak scaling: P processes
take P micro-batches a step). tokens_per_s = the median, over the steps after the first (warm-up), of the
trainer's logged global rate (useful tokens summed over ranks / rank 0's step time); step_s the median step
time; speedup = tokens_per_s / that of the 1-process, 1-thread row; efficiency = speedup / cores used
(processes x threads). The load average of the machine is printed with the table: other work on the cores
distorts the CPU rows.
Without `--model.path` after `--`, the run uses the bundled tiny Llama (--layers x --hidden, random weights) and
the demo data, built once into --output/assets.

On the CPU each process gets --threads intra-op threads (OMP_NUM_THREADS); with 1 thread, P processes use P
cores, so on a 2-core machine the row "1 process, 2 threads" is the other way to use both cores. The CPU rows
measure the overheads of the data-parallel path (gloo all-reduce or FSDP2 all-gather/reduce-scatter of a tiny
model), not what GPUs with NVLink would show. Writes scaling.csv and table.txt in --output.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

FIELDS = ("procs", "strategy", "threads_per_proc", "batch_per_proc", "steps", "tokens_per_s", "step_s",
          "speedup", "efficiency", "final_loss", "wall_s")


def build_assets(root: Path, layers: int, hidden: int) -> list[str]:
    """The tiny model and the demo data (once), as `repbend train` options."""
    from repbend.demo.assets import save_tiny_model_dir
    from repbend.demo.synthetic import corpus, write_demo_data

    model = root / "model"
    paths = write_demo_data(root / "data", seed=0, n_train=200, n_heldout=8)
    if not (model / "config.json").is_file():
        save_tiny_model_dir(model, corpus=corpus(), layers=layers, hidden=hidden, heads=max(1, hidden // 64),
                            kv_heads=max(1, hidden // 128))
    return ["--model.path", str(model), "--data.wildguardmix", paths["wildguardmix"],
            "--data.wildjailbreak", paths["wildjailbreak"], "--data.ultrachat", paths["ultrachat"],
            "--loss.target_layers", f"1-{layers}", "--loss.eta", "0.3", "--lora.r", "8",
            "--data.max_response_tokens", "128", "--data.max_retain_tokens", "256"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(procs: int, strategy: str, threads: int, args: argparse.Namespace, base: list[str], out: Path) -> dict:
    run_dir = out / f"p{procs}_{strategy}_t{threads}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "repbend", "train",
           *base, "--train.output_dir", str(run_dir), "--train.max_steps", str(args.steps),
           "--train.batch_size", str(args.batch_size), "--train.grad_accum", "1", "--train.save_every", "0",
           "--train.progress", "false", "--train.tensorboard", "false", "--lora.dropout", "0",
           "--distributed.strategy", strategy, "--model.device", args.device, *args.train_args]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"bench_scaling: {procs} x {strategy} failed (exit {p.returncode}):\n{p.stdout[-3000:]}"
                         f"\n{p.stderr[-3000:]}")
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    timed = log[1:] or log
    return {"procs": procs, "strategy": strategy if procs > 1 else "none", "threads_per_proc": threads,
            "batch_per_proc": args.batch_size, "steps": args.steps,
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
            "step_s": statistics.median(r["step_s"] for r in timed), "final_loss": log[-1]["loss"],
            "wall_s": wall}


def table(rows: list[dict]) -> str:
    head = f"{'procs':>5} {'strategy':>8} {'threads':>7} {'B/proc':>6} {'tokens/s':>10} {'step s':>8} " \
           f"{'speedup':>7} {'eff.':>5}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['procs']:>5} {r['strategy']:>8} {r['threads_per_proc']:>7} {r['batch_per_proc']:>6} "
                     f"{r['tokens_per_s']:>10.0f} {r['step_s']:>8.3f} {r['speedup']:>7.2f} {r['efficiency']:>5.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--strategies", nargs="+", default=["ddp", "fsdp"], choices=["ddp", "fsdp"])
    ap.add_argument("--threads", type=int, nargs="+", default=None,
                    help="intra-op threads per process (CPU); default 1, plus 2 for the 1-process row on the CPU")
    ap.add_argument("--device", default="cpu", help="cpu | cuda (each rank takes cuda:LOCAL_RANK)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--output", default="bench_out/scaling")
    args = ap.parse_args(argv)
    args.train_args = train_args
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    base = [] if "--model.path" in train_args else build_assets(out / "assets", args.layers, args.hidden)

    load_before = os.getloadavg()[0]
    rows = []
    for procs in args.procs:
        threads = args.threads or ([1, 2] if args.device == "cpu" and procs == 1 else [1])
        for strategy in (["ddp"] if procs == 1 else args.strategies):  # one process: no strategy applies
            for th in threads:
                row = launch(procs, strategy, th, args, base, out)
                rows.append(row)
                print(f"  {procs} x {row['strategy']} ({th} thread(s)): {row['tokens_per_s']:.0f} tokens/s, "
                      f"{row['step_s']:.3f} s/step, launch {row['wall_s']:.0f} s", flush=True)
    one = next((x for x in rows if x["procs"] == 1 and x["threads_per_proc"] == 1), None)
    for r in rows:
        r["speedup"] = r["tokens_per_s"] / one["tokens_per_s"] if one else float("nan")
        r["efficiency"] = r["speedup"] / (r["procs"] * r["threads_per_proc"])
    with open(out / "scaling.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS)
        w.writeheader()
        w.writerows({k: r[k] for k in FIELDS} for r in rows)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    text = (f"repbend data-parallel scaling on {args.device} ({cores} CPU cores visible), per-process batch "
            f"{args.batch_size}, {args.steps} steps, median after the first; load average (1 min) "
            f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after\n{table(rows)}\n\n8 GPUs of one node:\n"
            "  torchrun --nproc_per_node 8 -m repbend train --config repbend/configs/llama3_8b_instruct.yaml "
            "--distributed.strategy ddp   # or fsdp\n")
    (out / "table.txt").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
