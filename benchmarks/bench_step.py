"""End-to-end training step of each method against its re-creation of the reference code: useful tokens/s,
peak memory, MFU, and the same loss.

    python benchmarks/bench_step.py --model small --steps 3 --output bench_out/step_small     # CPU, ~12 min
    repbend bench --model llama3-8b --steps 3 --output bench_out/step_llama3                 # one GPU
    repbend bench --model small --methods rmu --variants rmu,rmu_reference                   # a subset

Variants (benchmarks/step_variants.py), on the same model (random weights from a config), the same micro-batches and
the same seed; --methods picks the methods (default all three), --variants a subset of their variants:
  repbend           the trainer's step as shipped: collate (sequences packed into rows of at most 1024 tokens,
                    train.packing) + RepBendLoss (one reference pass, one LoRA pass) + backward + clip + AdamW step on
                    the LoRA parameters; one micro-batch per step (grad_accum 1)
  repbend+padded    the same with one row per sequence, padded to the micro-batch's longest (train.packing false)
  reference         benchmarks/reference_recipe.py: six forwards, 512/512 request/response and 1024 retain
                    padding, stacked hidden states, fp32 full-vocabulary logits, gc + empty_cache between terms
  reference+dynpad  the same padded to each set's longest row (separates padding from the two-pass design)
  circuit_breakers  the shipped Circuit Breakers step (LoRA; progress = (k+1)/150 at step k)
  cb_reference      benchmarks/reference_baselines.py: four full forwards, 1024/1024 and 2048 padding, stacked states
  rmu               the shipped RMU step (full down_proj weights of three layers; passes stop at the read layer)
  rmu_reference     benchmarks/reference_baselines.py: the model cut to L+1 layers and a frozen copy, three full
                    forwards, gradients for every weight
Recipes per method and model depth: benchmarks/step_workload.py. bf16 + autocast + tf32 on GPU (gradient
checkpointing for the 7B/8B shapes), fp32 on CPU with 1 torch thread unless --threads. Micro-batch B per set:
--batch-size, else 2 on CPU and the recipes' 4 / 4 / 16 (repbend / circuit_breakers / rmu) on GPU.

Each variant runs in its own subprocess (peak memory isolation): --warmup steps, then --steps timed steps. Step k
uses micro-batch k of the trainer's MicroBatchSampler for the method (group_by_length) over synthetic pools
(LENGTHS, seeded by --seed); step 0 runs with dropout off and its loss is the variant's `loss` (same batch, same
initial weights: a method's variants must agree). LoRA B starts from N(0, LORA_B_STD) instead of 0, and RMU's
trained tensors off their initial value (step_variants.perturb), so that every term is non-zero.

Measures (results.json, results.csv, run.json, table.txt, step_bench.png in --output; with --jsonl FILE one JSON
line per variant appended to FILE as soon as it ends):
  step_s          median wall time of the timed steps (torch.cuda.synchronize before and after each; no other
                  host sync in the timed region); step_cpu_s: the same in process CPU time (CPU runs)
  tokens_per_s    median over the timed steps of useful tokens / step time (useful = non-padding tokens of every
                  set; the same for every variant of a method)
                  (the table adds each variant's speed over its reference from the timed steps' summed times:
                  with a few steps of unequal length the two can differ)
  peak_mem_bytes  GPU: torch.cuda.max_memory_allocated over the steps after step 0 (which runs without dropout,
                  for the loss check: not a training step's memory), with peak_reserved_bytes and the device's other
                  use beside it; CPU: the process's peak resident set over the same steps (VmHWM, reset via
                  /proc/self/clear_refs; falls back to ru_maxrss of the whole process where that is not writable;
                  the allocator made to return freed tensors, see _steady_rss)
  mfu             GPU only, repbend and circuit_breakers methods: 6 * N * tokens_per_s / (--peak-tflops, default
                  989: H200 dense bf16), N = the decoder layers' parameters (neither embedding table); 6 = reference
                  forward 2 + trained forward 2 + backward to the activations 2 (the frozen base needs no weight
                  gradients); gradient checkpointing's recompute and attention's T^2 FLOPs are not counted.
                  mfu_vs_matmul: the same over the rate of an 8192^3 bf16 matmul measured in the same run. RMU's
                  passes stop at layer L: no MFU.
  positions_per_useful_32  positions per pass / useful tokens of each layout over the first 32 micro-batches
                  (no model): the padding, steadier than the few timed steps.
Phase times (collate, passes, terms, backward, gc, optimizer) are in results.json: always on CPU, on GPU with
--phases (which adds a synchronize per phase). An OOM is recorded as status "oom" and the run goes on.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from step_variants import Phases, dropout_off, make_step, positions_of, timed_passes  # noqa: F401
from step_workload import (  # noqa: F401
    BATCH_GPU, EOS_ID, LENGTHS, LORA_B_STD, METHOD_OF, METHODS, MODELS, PACK_LENGTH, PAD_ID, REFERENCE_OF, VARIANTS,
    LengthDist, ModelSpec, _device, _dtype, build_model, loss_config, lora_layers, micro_batches, synthetic_pools,
    target_layers)

import step_args  # noqa: E402
from step_memory import _is_oom, _peak, _peak_reserved, _reset_peak, _status_kb, _steady_rss  # noqa: E402,F401


# ---------------------------------------------------------------- one variant (the worker)
def run_variant(a: argparse.Namespace, variant: str, measure_matmul: bool = False,
                models: dict | None = None) -> dict:
    """One variant's steps. `models` (a dict kept by the caller): the model of each method is built once and reused
    by the method's next variants, its trained tensors put back as built (see `_model_for`)."""
    import torch

    from repbend.model import resolve_attention

    method = METHOD_OF[variant]
    device = torch.device(a.device)
    dtype = _dtype(a.dtype, device)
    spec = MODELS[a.model]
    checkpointing = spec.checkpointing if a.gradient_checkpointing == "auto" else a.gradient_checkpointing == "on"
    attn = resolve_attention(a.attn, device, dtype)
    B = batch_size(a, method)
    res = {"variant": variant, "method": method, "status": "ok", "error": None, "attn": attn,
           "checkpointing": checkpointing, "batch_size": B, "threads": torch.get_num_threads()}
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # the recipe: bf16 + tf32
        torch.backends.cudnn.allow_tf32 = True
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    phases = Phases(sync if (device.type == "cpu" or a.phases) else (lambda: None))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    times, cpu_times, rates, useful, positions, phase_log = [], [], [], [], [], []
    kind = None
    try:
        model, n_layers, res["n_params"], res["model_reused"] = _model_for(
            models, method, lambda: build_model(spec, device, dtype, attn, checkpointing, a.lora_dropout, a.seed,
                                                method=method))
        loss_cfg = loss_config(method, n_layers, a.scale, a.eta)
        micros = micro_batches(spec.vocab, B, a.seed, a.warmup + a.steps, a.scale, method=method)
        step = make_step(variant, model, loss_cfg, n_layers, device, autocast, phases, a.scale)
        model.train()
        kind = res["peak_mem_kind"] = _reset_peak(device)
        res["mem_before_steps"] = (torch.cuda.memory_allocated(device) if device.type == "cuda"
                                   else _status_kb("VmRSS"))
        timing = timed_passes(phases, method) if variant == method else contextlib.nullcontext()
        with timing:
            for k, micro in enumerate(micros):
                phases.acc = {}
                sync()
                t0, c0 = time.perf_counter(), time.process_time()
                with dropout_off(model) if k == 0 else contextlib.nullcontext():
                    loss, parts, n_useful, n_pos = step(micro, k)
                sync()
                dt, cpu = time.perf_counter() - t0, time.process_time() - c0
                if k == 0:  # host reads only outside the timed region
                    res["loss"] = float(loss)
                    res["terms"] = {t: (None if v is None else float(v.detach())) for t, v in parts.items()}
                    if len(micros) > 1:  # the peak of training steps: step 0 ran without dropout (the loss check)
                        del loss, parts
                        _reset_peak(device)
                        continue
                if k >= a.warmup:
                    times.append(dt)
                    cpu_times.append(cpu)
                    rates.append(n_useful / dt)
                    useful.append(n_useful)
                    positions.append(n_pos)
                    phase_log.append(dict(phases.acc))
                del loss, parts
            if a.profile:
                _profile_one_step(step, micros[-1], device, Path(a.output) / f"profile_{_slug(variant)}.txt")
    except Exception as e:  # noqa: BLE001 - an OOM is a result; anything else is reported as a failure
        res["status"] = "oom" if _is_oom(e) else "failed"
        res["error"] = f"{type(e).__name__}: {str(e)[:500]}"
        if res["status"] == "failed":
            import traceback
            traceback.print_exc()
    res["peak_mem_bytes"] = _peak(device, kind) if kind else None
    if kind:
        res.update(_peak_reserved(device))
    res["step_s"] = statistics.median(times) if times and res["status"] == "ok" else None
    res["step_s_all"] = times
    res["step_cpu_s"] = statistics.median(cpu_times) if cpu_times else None
    res["tokens_per_s"] = statistics.median(rates) if rates and res["status"] == "ok" else None
    res["tokens_per_step"] = statistics.mean(useful) if useful else None
    res["positions_per_pass"] = statistics.mean(positions) if positions else None
    if phase_log and (device.type == "cpu" or a.phases):
        res["phases_s"] = {n: statistics.median(p.get(n, 0.0) for p in phase_log) for n in phase_log[0]}
    if measure_matmul and device.type == "cuda":
        try:
            model = step = None  # noqa: F841 - free the variant's memory first
            torch.cuda.empty_cache()
            res["bf16_matmul_tflops"] = bf16_matmul_tflops(device)
        except Exception as e:  # noqa: BLE001
            res["matmul_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    return res


def _model_for(models: dict | None, method: str, build) -> tuple:
    """(model, n_layers, n_params, reused): the method's model from `models` when a variant built it before, with
    the tensors that train (LoRA) restored to their values as built; else a new build (kept there when it has
    frozen weights: a model whose every weight may train, as RMU's plain model, is rebuilt, since its variants
    change and cut it)."""
    import gc

    import torch

    if models is not None and method in models:
        model, n_layers, n_params, saved = models[method]
        with torch.no_grad():
            for p, value in saved:
                p.copy_(value)
                p.grad = None
        return model, n_layers, n_params, True
    if models:  # another method's model: free it first
        models.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    model, n_layers, n_params = build()
    if models is not None:
        params = [p for p in model.parameters() if p.requires_grad]
        if len(params) < len(list(model.parameters())):  # adapters on a frozen model
            models[method] = (model, n_layers, n_params, [(p, p.detach().clone()) for p in params])
    return model, n_layers, n_params, False


def batch_size(a: argparse.Namespace, method: str) -> int:
    return a.batch_size or (BATCH_GPU[method] if a.device.startswith("cuda") else 2)


def _profile_one_step(step, micro, device, path: Path):
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        step(micro, 0)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    path.write_text(prof.key_averages().table(sort_by=key, row_limit=30))


def bf16_matmul_tflops(device, n: int = 8192, iters: int = 20) -> float:
    """The device's bf16 matmul rate (TFLOP/s) on an n^3 product, CUDA events."""
    import torch
    x = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    y = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        x @ y
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        x @ y
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 * iters / (start.elapsed_time(end) / 1e3) / 1e12


# ---------------------------------------------------------------- the parent: isolation, results, reports
def layout_overhead(a: argparse.Namespace, variants: list[str], n_batches: int = 32) -> dict[str, float]:
    """Positions per pass / useful tokens of each variant's layout, over the first `n_batches` micro-batches of its
    method (no model: a steadier view of the padding than the few timed steps)."""
    spec = MODELS[a.model]
    out = {}
    for method in dict.fromkeys(METHOD_OF[v] for v in variants):
        cfg = loss_config(method, spec.layers, a.scale, a.eta)
        micros = micro_batches(spec.vocab, batch_size(a, method), a.seed, n_batches, a.scale, method=method)
        useful = sum(sum(len(s) for s in m.safe + m.unsafe + m.retain) for m in micros)
        for v in variants:
            if METHOD_OF[v] == method:
                out[v] = sum(positions_of(v, m, cfg, a.scale) for m in micros) / useful
    return out


def run_isolated(a: argparse.Namespace, argv: list[str], jobs: list[str], timeout: float | None = None,
                 extra: tuple[str, ...] = ()) -> dict:
    """Run `jobs` (consecutive variants of one method) in one Python process, which builds the method's model once;
    {variant: its JSON result, or a failure record}. The worker writes its results file after each variant, so a
    timeout keeps what finished."""
    out = Path(a.output)
    name = _slug(jobs[0]) + (f"_and_{len(jobs) - 1}" if len(jobs) > 1 else "")
    result_file, log_file = out / f".worker_{name}.json", out / f"worker_{name}.log"
    result_file.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--device", a.device, "--worker", ",".join(jobs),
           "--result-file", str(result_file), *extra]
    why = None
    try:
        with open(log_file, "w") as log:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        rc, why = None, ("timeout", f"stopped after {timeout:.0f} s (--worker-timeout / --time-budget)")
    done = json.loads(result_file.read_text()) if result_file.exists() else {}
    result_file.unlink(missing_ok=True)
    if why is None and rc != 0:
        tail = log_file.read_text()[-800:] if log_file.exists() else ""
        sig = f"killed by signal {-rc} (out of memory?)" if rc < 0 else f"exit code {rc}"
        why = ("failed", f"{sig}; see {log_file}: ...{tail}")
    out_results = {}
    for job in jobs:
        if job in done:
            out_results[job] = done[job]
        else:
            status, error = why or ("failed", f"the worker ended without a result; see {log_file}")
            out_results[job] = {"variant": job, "method": METHOD_OF[job], "status": status, "error": error}
    return out_results


def variant_plans(a: argparse.Namespace, variants: list[str]) -> dict | None:
    """Each variant planned on fake tensors with this run's settings and micro-batches (repbend.plan.bench), or
    read from --plan-from; None with --plan off."""
    if a.plan_from:
        path, waited = Path(a.plan_from), 0.0
        while not path.exists() and waited < a.plan_wait:  # written (renamed into place) when the planner ends
            time.sleep(1.0)
            waited += 1.0
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as e:
            print(f"[bench] no plans from {a.plan_from}: {e}", flush=True)
            return None
    if a.plan == "off":
        return None
    import torch

    from repbend.plan.bench import bench_setup, plan_runs

    device = "cuda" if a.device.startswith("cuda") else "cpu"
    dtype = _dtype(a.dtype, _device(a.device))
    ckpt = None if a.gradient_checkpointing == "auto" else a.gradient_checkpointing == "on"
    threads = torch.get_num_threads()
    try:
        return plan_runs(variants, lambda m: bench_setup(a.model, m, device, dtype, ckpt, batch_size(a, m),
                                                         a.warmup + a.steps, a.seed, a.scale, a.eta),
                         a.warmup, log=lambda m: print(f"[bench] {m}", flush=True))
    finally:
        torch.set_num_threads(threads)


def worker_groups(a: argparse.Namespace, variants: list[str]) -> list[list[str]]:
    """Consecutive variants of one method share a worker (and its model) when --share-model is on."""
    groups: list[list[str]] = []
    for v in variants:
        if a.share_model and groups and METHOD_OF[groups[-1][-1]] == METHOD_OF[v]:
            groups[-1].append(v)
        else:
            groups.append([v])
    return groups


def _slug(s: str) -> str:
    return s.replace("+", "_").replace("/", "_")


from step_report import format_table, jsonl_record, summarize, write_outputs  # noqa: E402


def parse_args(argv) -> argparse.Namespace:
    """The command line (step_args.py), described by this module's first paragraph."""
    return step_args.parse_args(argv, __doc__.split("\n\n")[0])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling modules, also when imported as a module
    import torch
    threads = torch.get_num_threads()
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        if a.worker:
            models, done = {}, {}
            for i, v in enumerate(a.worker.split(",")):
                done[v] = run_variant(a, v, a.measure_matmul and i == 0, models)
                Path(a.result_file).write_text(json.dumps(done))
            return 0
        return run_all(a, argv)
    finally:
        torch.set_num_threads(threads)  # in-process callers (the tests) get their setting back


def run_all(a: argparse.Namespace, argv: list[str]) -> int:
    """Every variant (each in its own process unless --in-process), then the table, files and chart."""
    t_start = time.monotonic()
    Path(a.output).mkdir(parents=True, exist_ok=True)
    variants = a.variants.split(",")
    results, tflops = {}, None
    models = {} if a.in_process else None
    for group in worker_groups(a, variants):
        timeout = a.worker_timeout * len(group) if a.worker_timeout else None
        if a.time_budget:
            left = a.time_budget - (time.monotonic() - t_start)
            if left < 20:
                for v in group:
                    results[v] = {"variant": v, "method": METHOD_OF[v], "status": "skipped",
                                  "error": f"--time-budget {a.time_budget:g} s spent"}
                    jsonl_record(a, v, results[v], None)
                continue
            timeout = min(timeout or left, left)
        print(f"[bench] {a.model}: {', '.join(group)} ...", flush=True)
        matmul = tflops is None and a.device.startswith("cuda")  # once, in the first worker, after its steps
        if a.in_process:
            got = {v: run_variant(a, v, matmul and i == 0, models) for i, v in enumerate(group)}
        else:
            got = run_isolated(a, argv, group, timeout, ("--measure-matmul",) if matmul else ())
        for v in group:
            r = results[v] = got[v]
            tflops = tflops or r.get("bf16_matmul_tflops")
            jsonl_record(a, v, r, tflops)
            print(f"[bench] {v}: {r.get('status')} step {r.get('step_s')} s, loss {r.get('loss')}", flush=True)
    spent = time.monotonic() - t_start
    late = a.time_budget is not None and a.time_budget - spent < 15  # the padding figures are the first to go
    plans = None if late else variant_plans(a, variants)
    table = summarize(a, results, tflops, None if late else layout_overhead(a, variants), plans)
    text = format_table(a, table, tflops)
    write_outputs(a, table, tflops, text)
    jsonl_record(a, "summary", None, tflops, table)
    print(text)
    mismatch = any(e["loss_ok"] is False for e in table.values())
    failed = any(e["status"] in ("failed", "timeout") for e in table.values())
    return 1 if mismatch or failed else 0


if __name__ == "__main__":
    sys.exit(main())
