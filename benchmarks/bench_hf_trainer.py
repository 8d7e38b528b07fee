"""What the Hugging Face Trainer integration (`repbend.integrations.hf.RepBendTrainer`) costs against repbend's own
training loop: useful tokens/s and peak memory, side by side in one run.

    python benchmarks/bench_hf_trainer.py --model small --steps 3 --output bench_out/hf_small    # CPU, ~5 min

Variants, each in its own process (peak memory isolated), on the step benchmark's workload (step_workload.py): the
same model (random weights from a config, LoRA r 16 on layers 0..max(U), B ~ N(0, LORA_B_STD)), the same
micro-batches (the trainer's sampler over the synthetic pools, B rows per set, seeded by --seed), the recipe's loss,
AdamW lr 1e-5 without weight decay, clipping at 1.0, one micro-batch per optimizer step:
  loop            repbend train's inner loop: sampler(k) -> RepBendLoss.collate (packed into rows of 1024 tokens) ->
                  the loss under micro_batch_rng -> backward -> one host read of the terms -> clip -> AdamW
  trainer         RepBendTrainer over micro_batch_dataset rows of the same sampler: the Trainer's DataLoader (no
                  workers), RepBendCollator (packed, 1024), compute_loss, accelerate's backward and clipping, AdamW
                  (optim adamw_torch), constant LR, a log record every step (the terms included), no checkpoints
  trainer+padded  the same with pack_length None: one row per sequence, padded to the micro-batch's longest
sdpa attention; fp32 with one torch thread on the CPU (--threads), bf16 autocast on a GPU.

Measures (results.json and table.txt in --output):
  step_s        median, over the --steps timed steps (after --warmup), of the wall time between consecutive
                optimizer-step ends: data preparation, logging and the Trainer's bookkeeping are all inside it
  cpu_s         the same in process CPU time (steadier than wall time on a shared machine; one thread)
  data_s        median host time per step spent making the model input (loop: sampler + collate; trainer: the
                dataset row + the collator)
  tokens_per_s  median of useful (non-padding) tokens / step_s (tok/cpu-s: / cpu_s); pos/pass = positions per
                pass (padding included)
  peak_mem      CPU: the process's peak resident set over the steps (VmHWM, reset after setup); GPU: peak allocated
  loss          step 0 runs with dropout off: every variant must give the same loss on the same batch
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_workload import (LORA_B_STD, MODELS, PACK_LENGTH, PAD_ID, _dtype, build_model,  # noqa: E402
                           synthetic_pools, target_layers)
from bench_step import _peak, _reset_peak  # noqa: E402  (the same measurement as the step benchmark)
from step_variants import dropout_off  # noqa: E402

VARIANTS = ("loop", "trainer", "trainer+padded")


# ---------------------------------------------------------------- one variant (the worker)
def run_variant(a: argparse.Namespace, variant: str) -> dict:
    import torch

    from repbend.data.sampler import MicroBatchSampler
    from repbend.loss import LossConfig

    device = torch.device(a.device)
    dtype = _dtype(a.dtype, device)
    model, n_layers, _ = build_model(MODELS[a.model], device, dtype, "sdpa", False, a.lora_dropout, a.seed)
    cfg = LossConfig(target_layers=target_layers(n_layers))  # the recipe's other settings
    pools = synthetic_pools(MODELS[a.model].vocab, a.batch_size, a.seed, a.scale)
    n = a.warmup + a.steps
    pack = None if variant == "trainer+padded" else round(PACK_LENGTH * a.scale)
    sampler = MicroBatchSampler(pools, a.batch_size, a.seed, group_by_length=True)
    useful = [sum(len(s) for s in m.safe + m.unsafe + m.retain) for m in map(sampler, range(n))]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    res = {"variant": variant, "status": "ok", "error": None, "threads": torch.get_num_threads()}
    run = _run_loop if variant == "loop" else _run_trainer
    try:
        ends, data_s, positions, loss = run(a, model, cfg, sampler, pools, pack, n, device, dtype, sync, res)
        cpu = [c for _, c in ends]
        ends = [w for w, _ in ends]
    except Exception as e:  # noqa: BLE001 - reported as the variant's failure
        import traceback
        traceback.print_exc()
        res.update(status="failed", error=f"{type(e).__name__}: {str(e)[:500]}")
        return res
    res["peak_mem_bytes"] = _peak(device, res["peak_mem_kind"])
    times = [ends[k] - ends[k - 1] for k in range(a.warmup, n)]
    cpu_times = [cpu[k] - cpu[k - 1] for k in range(a.warmup, n)]
    res.update(loss=loss, step_s=statistics.median(times), step_s_all=times, cpu_s=statistics.median(cpu_times),
               cpu_s_all=cpu_times,
               tokens_per_s=statistics.median(useful[k] / t for k, t in zip(range(a.warmup, n), times)),
               tokens_per_cpu_s=statistics.median(useful[k] / t for k, t in zip(range(a.warmup, n), cpu_times)),
               data_s=statistics.median(data_s[a.warmup:n]), tokens_per_step=statistics.mean(useful[a.warmup:n]),
               positions_per_pass=statistics.mean(positions[a.warmup:n]))
    return res


def _run_loop(a, model, cfg, sampler, pools, pack, n, device, dtype, sync, res):
    import torch

    from repbend.loss import RepBendLoss
    from repbend.trainer import micro_batch_rng

    loss_fn = RepBendLoss(cfg)
    params = loss_fn.prepare(model)
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if dtype == torch.bfloat16
                else contextlib.nullcontext())
    model.train()
    res["peak_mem_kind"] = _reset_peak(device)
    ends, data_s, positions, loss = [], [], [], None
    for k in range(n):
        with dropout_off(model) if k == 0 else contextlib.nullcontext():
            t0 = time.perf_counter()
            batch = loss_fn.collate(sampler(k), PAD_ID, pack).to(device)
            data_s.append(time.perf_counter() - t0)
            with autocast, micro_batch_rng(a.seed, k, device):
                terms = loss_fn(model, batch, progress=(k + 1) / n)
                terms.total.backward()
            logged = torch.stack(list(terms.detached().values())).float().tolist()  # the loop's one host sync
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        sync()
        ends.append((time.perf_counter(), time.process_time()))
        positions.append(batch.input_ids.numel())
        loss = logged[0] if k == 0 else loss
    return ends, data_s, positions, loss


def _run_trainer(a, model, cfg, sampler, pools, pack, n, device, dtype, sync, res):
    import torch
    from transformers import TrainerCallback, TrainingArguments

    from repbend.integrations.hf import MicroBatchDataset, RepBendCollator, RepBendTrainer

    data_s, positions, ends = [0.0] * n, [], []

    class TimedRows(MicroBatchDataset):
        def __getitem__(self, i):
            t0 = time.perf_counter()
            row = super().__getitem__(i)
            data_s[i] += time.perf_counter() - t0
            return row

    collator = RepBendCollator(cfg, PAD_ID, pack)

    def collate(features):
        t0 = time.perf_counter()
        out = collator(features)
        data_s[out["rows"][0].item()] += time.perf_counter() - t0
        positions.append(out["input_ids"].numel())
        return out

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.off = dropout_off(model)  # step 0: dropout off, for the loss check
            self.off.__enter__()
            res["peak_mem_kind"] = _reset_peak(device)

        def on_step_end(self, args, state, control, **kw):
            sync()
            ends.append((time.perf_counter(), time.process_time()))
            if len(ends) == 1:
                self.off.__exit__(None, None, None)

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, max_steps=n, per_device_train_batch_size=1, gradient_accumulation_steps=1,
            learning_rate=1e-5, weight_decay=0.0, lr_scheduler_type="constant", max_grad_norm=1.0, optim="adamw_torch",
            logging_steps=1, save_strategy="no", report_to="none", use_cpu=device.type == "cpu",
            bf16=dtype == torch.bfloat16, seed=a.seed, disable_tqdm=True, dataloader_num_workers=0)
        trainer = RepBendTrainer(model=model, args=args, train_dataset=TimedRows(sampler, n), loss=cfg,
                                 data_collator=collate, callbacks=[Clock()])
        trainer.train()
    loss = next(r["loss"] for r in trainer.state.log_history if "loss" in r)
    return ends, data_s, positions, loss


# ---------------------------------------------------------------- the parent
def run_isolated(a: argparse.Namespace, argv: list[str], variant: str) -> dict:
    out = Path(a.output)
    result, log = out / f".worker_{variant}.json", out / f"worker_{variant.replace('+', '_')}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--worker", variant, "--result-file", str(result)]
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc == 0 and result.exists():
        res = json.loads(result.read_text())
        result.unlink()
        return res
    return {"variant": variant, "status": "failed", "error": f"exit code {rc}; see {log}"}


def format_table(a, results: dict) -> str:
    base = results.get("loop", {})
    head = (f"{'variant':<16}{'status':<8}{'step s':>9}{'cpu s':>9}{'data s':>8}{'useful tok/s':>14}{'x loop':>8}"
            f"{'tok/cpu-s':>11}{'x loop':>8}{'pos/pass':>10}{'peak GiB':>10}{'x loop':>8}{'loss':>14}{'rel diff':>10}")
    lines = [head]

    def ratio(r, key):
        return f"{r[key] / base[key]:.2f}" if base.get("status") == "ok" and r.get(key) and base.get(key) else "-"
    for v, r in results.items():
        if r.get("status") != "ok":
            lines.append(f"{v:<16}{r.get('status', '?'):<8}  {r.get('error')}")
            continue
        diff = abs(r["loss"] - base["loss"]) / abs(base["loss"]) if base.get("status") == "ok" else None
        lines.append(f"{v:<16}{'ok':<8}{r['step_s']:>9.3f}{r['cpu_s']:>9.3f}{r['data_s']:>8.3f}"
                     f"{r['tokens_per_s']:>14,.0f}{ratio(r, 'tokens_per_s'):>8}{r['tokens_per_cpu_s']:>11,.0f}"
                     f"{ratio(r, 'tokens_per_cpu_s'):>8}{r['positions_per_pass']:>10,.0f}"
                     f"{r['peak_mem_bytes'] / 2**30:>10.2f}{ratio(r, 'peak_mem_bytes'):>8}{r['loss']:>14.8f}"
                     f"{'-' if diff is None else f'{diff:.1e}':>10}")
    lines.append(f"{a.model}, {a.device}, {a.dtype}, B={a.batch_size} per set, {a.warmup} warm-up + {a.steps} timed "
                 f"steps, {a.threads or 'default'} thread(s), scale {a.scale:g}")
    return "\n".join(lines)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=tuple(MODELS), default="small")
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (at least 1: step 0 is the loss check)")
    p.add_argument("--batch-size", type=int, default=2, help="B rows per set")
    p.add_argument("--output", default="bench_out/hf_trainer")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto", help="auto: bf16 on GPU, fp32 CPU")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1 on the CPU)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every sequence length and the pack length")
    p.add_argument("--in-process", action="store_true", help="run the variants in this process (memory not isolated)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--result-file", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.threads = a.threads or (1 if a.device == "cpu" else None)
    bad = [v for v in a.variants.split(",") if v not in VARIANTS]
    if bad or a.warmup < 1 or a.steps < 1:
        p.error(f"unknown variants {bad}" if bad else "--warmup and --steps must be at least 1")
    return a


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    import torch
    threads = torch.get_num_threads()
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        if a.worker:
            Path(a.result_file).write_text(json.dumps(run_variant(a, a.worker)))
            return 0
        Path(a.output).mkdir(parents=True, exist_ok=True)
        results = {}
        for v in a.variants.split(","):
            print(f"[bench_hf_trainer] {a.model}: {v} ...", flush=True)
            results[v] = run_variant(a, v) if a.in_process else run_isolated(a, argv, v)
        text = format_table(a, results)
        (Path(a.output) / "results.json").write_text(json.dumps(
            {"args": vars(a), "lora_b_std": LORA_B_STD, "results": results}, indent=1))
        (Path(a.output) / "table.txt").write_text(text + "\n")
        print(text)
        losses = [r["loss"] for r in results.values() if r.get("status") == "ok"]
        agree = all(abs(x - losses[0]) <= 1e-4 * abs(losses[0]) for x in losses) if losses else False
        return 0 if agree and all(r.get("status") == "ok" for r in results.values()) else 1
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    sys.exit(main())
