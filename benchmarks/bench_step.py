"""End-to-end training step of `repbend` against the reference recipe: useful tokens/s, peak memory, MFU, loss.

    python benchmarks/bench_step.py --model small --steps 3 --output bench_out/step_small     # CPU, ~8 min
    repbend bench --model llama3-8b --steps 3 --output bench_out/step_llama3                 # one GPU

Variants, on the same model (random weights from a config), the same micro-batches and the same seed:
  repbend           the trainer's step as shipped: collate (default layout: sequences packed into rows of at most
                    1024 tokens, train.packing) + RepBendLoss (one reference pass, one LoRA pass) + backward
                    + clip + AdamW step on the LoRA parameters; one micro-batch per step (grad_accum 1)
  repbend+padded    the same with one row per sequence, padded to the micro-batch's longest (train.packing false)
  reference         benchmarks/reference_recipe.py: six forwards, 512/512 request/response and 1024 retain
                    padding, stacked hidden states, fp32 full-vocabulary logits, gc + empty_cache between terms
  reference+dynpad  the same padded to each set's longest row (separates padding from the two-pass design)

Setup: the recipe's loss (response_all, alpha_mode all, alpha 0.5, beta 0.5, gamma 0.1, epsilon 0.3, eta 0, T 2),
target layers at the recipe's relative span (`target_layers`: 20..30 of 32, 5..7 of 8), LoRA r 16 / alpha 16 /
dropout 0.05 on q,k,v,o,gate,up,down of layers 0..max(U), AdamW lr 1e-5, clip 1.0; bf16 + autocast + tf32 on GPU
(gradient checkpointing for the 7B/8B shapes), fp32 on CPU with 1 torch thread unless --threads.

Each variant runs in its own subprocess (peak memory isolation): --warmup steps, then --steps timed steps. Step k
uses micro-batch k of a MicroBatchSampler (group_by_length, as the trainer) over synthetic pools (LENGTHS, seeded
by --seed); step 0 runs with dropout off and its loss is the variant's `loss` (same batch, same initial weights:
the variants must agree). LoRA B starts from N(0, LORA_B_STD) instead of 0 so that every term is non-zero.

Measures (results.json, results.csv, run.json, table.txt, step_bench.png in --output):
  step_s          median wall time of the timed steps (torch.cuda.synchronize before and after each; no other
                  host sync in the timed region); step_cpu_s: the same in process CPU time (CPU runs)
  tokens_per_s    median over the timed steps of useful tokens / step time (useful = non-padding tokens of the
                  safe, unsafe and retain sets; the same for every variant)
  peak_mem_bytes  GPU: torch.cuda.max_memory_allocated over the steps (reset after model setup);
                  CPU: the process's peak resident set over the steps (VmHWM, reset via /proc/self/clear_refs
                  after setup; falls back to ru_maxrss of the whole process where that is not writable)
  mfu             GPU only: c * N * tokens_per_s / R, N = base-model parameters except the input embedding
                  table (decoder layers, final norm, LM head), c = 6 (reference forward 2 + LoRA forward 2 +
                  backward to the activations 2; the frozen base needs no weight gradients) + 2 with gradient
                  checkpointing (the recompute); attention's T^2 FLOPs are not counted. R = bf16 rate of an
                  8192^3 matmul measured in the same run.
  positions_per_useful_32  positions per pass / useful tokens of each layout over the first 32 micro-batches
                  (no model): the padding, steadier than the few timed steps.
Phase times (collate, passes, terms, backward, gc, optimizer) are in results.json: always on CPU, on GPU with
--phases (which adds a synchronize per phase). An OOM is recorded as status "oom" and the run goes on.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from step_workload import (  # noqa: E402,F401
    _device, _dtype,
    VARIANTS, PAD_ID, FIRST_ID, PACK_LENGTH, LORA_B_STD, ModelSpec, MODELS, target_layers, lora_layers, build_model, LengthDist,
    LENGTHS, synthetic_pools, micro_batches)


class Phases:
    """Host-side time per phase of a step; `sync` makes it meaningful on GPU (and costs a little there)."""

    def __init__(self, sync):
        self.sync, self.acc, self.t = sync, {}, time.perf_counter()

    def start(self):
        self.sync()
        self.t = time.perf_counter()

    def mark(self, name):
        self.sync()
        now = time.perf_counter()
        self.acc[name] = self.acc.get(name, 0.0) + now - self.t
        self.t = now


def make_step(variant: str, model, loss_cfg, n_layers: int, device, autocast, phases: Phases, scale: float = 1.0):
    """A function micro -> (loss tensor, {term: tensor}, useful tokens, positions per pass) doing one full step."""
    import torch

    from repbend.loss import RepBendLoss
    from repbend.loss.batch import collate

    loss_fn = RepBendLoss(loss_cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)  # the recipe

    def finish():
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        phases.mark("optimizer")

    if variant.startswith("repbend"):
        pack = None if variant == "repbend+padded" else round(PACK_LENGTH * scale)

        def step(micro):
            phases.start()
            batch = collate(micro, loss_cfg, PAD_ID, pack).to(device)
            phases.mark("collate")
            with autocast:
                terms = loss_fn(model, batch)
                phases.mark("loss_terms")
                terms.total.backward()
            phases.mark("backward")
            finish()
            return terms.total.detach(), terms.parts, batch.useful_tokens, batch.input_ids.numel()
        return step

    from reference_recipe import DYNAMIC, FIXED, Padding, build_reference_batch, free_memory, reference_loss
    padding = DYNAMIC if variant == "reference+dynpad" else Padding(*(round(w * scale) for w in
                                                                      (FIXED.request, FIXED.response, FIXED.retain)))

    def step(micro):
        phases.start()
        rb = build_reference_batch(micro, loss_cfg, PAD_ID, padding).to(device)
        phases.mark("collate")
        with autocast:
            total, parts = reference_loss(model, rb, loss_cfg, n_layers, mark=phases.mark)
            total.backward()
        phases.mark("backward")
        free_memory(device)                                                  # 8
        phases.mark("gc")
        finish()
        return total.detach(), parts, rb.useful_tokens, rb.positions
    return step


@contextlib.contextmanager
def dropout_off(model):
    """LoRA dropout p = 0 (train mode kept): step 0 gives the same loss in every variant."""
    import torch
    saved = [(m, m.p) for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    for m, _ in saved:
        m.p = 0.0
    try:
        yield
    finally:
        for m, p in saved:
            m.p = p


@contextlib.contextmanager
def timed_passes(phases: Phases):
    """Split the RepBend loss into its reference pass, LoRA pass and terms in the phase timers (restored on exit)."""
    from repbend.loss import objective, passes

    def wrap(fn, name):
        def timed(*a, **k):
            phases.mark("loss_terms")
            out = fn(*a, **k)
            phases.mark(name)
            return out
        return timed
    saved = objective.reference_pass, objective.trained_pass
    objective.reference_pass = wrap(passes.reference_pass, "ref_pass")
    objective.trained_pass = wrap(passes.trained_pass, "lora_pass")
    try:
        yield
    finally:
        objective.reference_pass, objective.trained_pass = saved


# ---------------------------------------------------------------- memory
def _reset_peak(device) -> str:
    import torch
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return "cuda_max_memory_allocated"
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        return "rss_peak_of_steps"
    except OSError:
        return "rss_peak_of_process"


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _peak(device, kind: str) -> int:
    import torch
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    if kind == "rss_peak_of_steps":
        return _status_kb("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _is_oom(e: BaseException) -> bool:
    import torch
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e) or "can't allocate memory" in str(e)


# ---------------------------------------------------------------- one variant (the worker)
def run_variant(a: argparse.Namespace, variant: str) -> dict:
    import torch

    from repbend.config import LossConfig
    from repbend.model import resolve_attention

    device = torch.device(a.device)
    dtype = _dtype(a.dtype, device)
    spec = MODELS[a.model]
    checkpointing = spec.checkpointing if a.gradient_checkpointing == "auto" else a.gradient_checkpointing == "on"
    attn = resolve_attention(a.attn, device, dtype)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # the recipe: bf16 + tf32
        torch.backends.cudnn.allow_tf32 = True
    model, n_layers, n_params = build_model(spec, device, dtype, attn, checkpointing, a.lora_dropout, a.seed)
    loss_cfg = LossConfig(target_layers=target_layers(n_layers), eta=a.eta)  # the recipe's other settings
    micros = micro_batches(spec.vocab, a.batch_size, a.seed, a.warmup + a.steps, a.scale)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    phases = Phases(sync if (device.type == "cpu" or a.phases) else (lambda: None))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    step = make_step(variant, model, loss_cfg, n_layers, device, autocast, phases, a.scale)
    model.train()

    res = {"variant": variant, "status": "ok", "error": None, "attn": attn, "checkpointing": checkpointing,
           "n_params": n_params, "threads": torch.get_num_threads()}
    kind = _reset_peak(device)
    res["peak_mem_kind"] = kind
    res["mem_before_steps"] = (torch.cuda.memory_allocated(device) if device.type == "cuda" else _status_kb("VmRSS"))
    times, cpu_times, rates, useful, positions, phase_log = [], [], [], [], [], []
    timing = timed_passes(phases) if variant.startswith("repbend") else contextlib.nullcontext()
    try:
        with timing:
            for k, micro in enumerate(micros):
                phases.acc = {}
                sync()
                t0, c0 = time.perf_counter(), time.process_time()
                with dropout_off(model) if k == 0 else contextlib.nullcontext():
                    loss, parts, n_useful, n_pos = step(micro)
                sync()
                dt, cpu = time.perf_counter() - t0, time.process_time() - c0
                if k == 0:  # host reads only outside the timed region
                    res["loss"] = float(loss)
                    res["terms"] = {t: (None if v is None else float(v.detach())) for t, v in parts.items()}
                if k >= a.warmup:
                    times.append(dt)
                    cpu_times.append(cpu)
                    rates.append(n_useful / dt)
                    useful.append(n_useful)
                    positions.append(n_pos)
                    phase_log.append(dict(phases.acc))
                del loss, parts
            if a.profile:
                _profile_one_step(step, micros[-1], device, Path(a.output) / f"profile_{variant}.txt")
    except Exception as e:  # noqa: BLE001 - an OOM is a result; anything else is reported as a failure
        res["status"] = "oom" if _is_oom(e) else "failed"
        res["error"] = f"{type(e).__name__}: {str(e)[:500]}"
        if res["status"] == "failed":
            import traceback
            traceback.print_exc()
    res["peak_mem_bytes"] = _peak(device, kind)
    res["step_s"] = statistics.median(times) if times and res["status"] == "ok" else None
    res["step_s_all"] = times
    res["step_cpu_s"] = statistics.median(cpu_times) if cpu_times else None
    res["tokens_per_s"] = statistics.median(rates) if rates and res["status"] == "ok" else None
    res["tokens_per_step"] = statistics.mean(useful) if useful else None
    res["positions_per_pass"] = statistics.mean(positions) if positions else None
    if phase_log and (device.type == "cpu" or a.phases):
        res["phases_s"] = {n: statistics.median(p.get(n, 0.0) for p in phase_log) for n in phase_log[0]}
    return res


def _profile_one_step(step, micro, device, path: Path):
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        step(micro)
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
def layout_overhead(a: argparse.Namespace, n_batches: int = 32) -> dict[str, float]:
    """Positions per pass / useful tokens of each variant's layout, over the first `n_batches` micro-batches
    (no model: a steadier view of the padding than the few timed steps)."""
    from repbend.config import LossConfig
    from repbend.loss.batch import collate
    from reference_recipe import DYNAMIC, FIXED, Padding, build_reference_batch

    spec = MODELS[a.model]
    cfg = LossConfig(target_layers=target_layers(spec.layers))
    fixed = Padding(*(round(w * a.scale) for w in (FIXED.request, FIXED.response, FIXED.retain)))
    micros = micro_batches(spec.vocab, a.batch_size, a.seed, n_batches, a.scale)
    useful = sum(sum(len(s) for s in m.safe + m.unsafe + m.retain) for m in micros)
    count = {
        "repbend": lambda m: collate(m, cfg, PAD_ID, round(PACK_LENGTH * a.scale)).input_ids.numel(),
        "repbend+padded": lambda m: collate(m, cfg, PAD_ID).input_ids.numel(),
        "reference": lambda m: build_reference_batch(m, cfg, PAD_ID, fixed).positions,
        "reference+dynpad": lambda m: build_reference_batch(m, cfg, PAD_ID, DYNAMIC).positions,
    }
    return {v: sum(f(m) for m in micros) / useful for v, f in count.items()}


def run_isolated(a: argparse.Namespace, argv: list[str], job: str, timeout: float | None = None) -> dict:
    """Run `job` (a variant, or "matmul") in its own Python process; its JSON result, or a failure record."""
    out = Path(a.output)
    result_file, log_file = out / f".worker_{_slug(job)}.json", out / f"worker_{_slug(job)}.log"
    result_file.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--device", a.device, "--worker", job,
           "--result-file", str(result_file)]
    try:
        with open(log_file, "w") as log:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        return {"variant": job, "status": "timeout", "error": f"stopped after {timeout:.0f} s (--worker-timeout / "
                                                              "--time-budget)"}
    if rc == 0 and result_file.exists():
        res = json.loads(result_file.read_text())
        result_file.unlink()
        return res
    tail = log_file.read_text()[-800:] if log_file.exists() else ""
    why = f"killed by signal {-rc} (out of memory?)" if rc < 0 else f"exit code {rc}"
    return {"variant": job, "status": "failed", "error": f"{why}; see {log_file}: ...{tail}"}


def _slug(s: str) -> str:
    return s.replace("+", "_")


from step_report import format_table, summarize, write_outputs  # noqa: E402



def parse_args(argv):
    p = argparse.ArgumentParser(prog="repbend bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=tuple(MODELS), default="small")
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant (after --warmup)")
    p.add_argument("--output", default="bench_out/step", help="folder for results.json/.csv, table.txt, the PNG")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps, at least 1 (default 1 CPU, 2 GPU)")
    p.add_argument("--batch-size", type=int, default=None, help="B rows per set (default 4 GPU, 2 CPU)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto", help="auto: bf16 on GPU, fp32 CPU")
    p.add_argument("--attn", default="auto", help="auto (flash-attn 2 on GPU when installed, else sdpa) | sdpa | eager")
    p.add_argument("--gradient-checkpointing", choices=("auto", "on", "off"), default="auto",
                   help="auto: on for llama3-8b and mistral-7b (the recipe), off for tiny and small")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--eta", type=float, default=0.0, help="L_pair weight (the recipe: 0)")
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--loss-rtol", type=float, default=None,
                   help="loss agreement tolerance (default 1e-4 fp32, 5e-2 bf16)")
    p.add_argument("--worker-timeout", type=float, default=None,
                   help="seconds per variant before it is recorded as timeout")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds for the whole run: variants that no longer fit are recorded as skipped")
    p.add_argument("--in-process", action="store_true",
                   help="run the variants in this process (peak memory not isolated)")
    p.add_argument("--phases", action="store_true", help="GPU: synchronize at phase boundaries to time them")
    p.add_argument("--profile", action="store_true", help="write a torch.profiler table of one extra step per variant")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default 1 on CPU, as bench_kernels.py: steady on a shared machine; "
                        "torch's own choice on GPU)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply every sequence length, the reference padding and the pack length (quick runs)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--result-file", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.device == "auto":
        import torch
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = a.device.startswith("cuda")
    a.warmup = a.warmup if a.warmup is not None else (2 if gpu else 1)
    a.batch_size = a.batch_size or (4 if gpu else 2)
    a.threads = a.threads or (None if gpu else 1)
    if a.warmup < 1 or a.steps < 1:
        p.error("--warmup and --steps must be at least 1 (step 0 is the loss check)")
    bad = [v for v in a.variants.split(",") if v not in VARIANTS]
    if bad:
        p.error(f"unknown variants {bad}; choose from {', '.join(VARIANTS)}")
    return a


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # reference_recipe, also when imported as a module
    import torch
    threads = torch.get_num_threads()
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        if a.worker:
            res = ({"tflops": bf16_matmul_tflops(torch.device(a.device))} if a.worker == "matmul"
                   else run_variant(a, a.worker))
            Path(a.result_file).write_text(json.dumps(res))
            return 0
        return run_all(a, argv)
    finally:
        torch.set_num_threads(threads)  # in-process callers (the tests) get their setting back


def run_all(a: argparse.Namespace, argv: list[str]) -> int:
    """Every variant (each in its own process unless --in-process), then the table, files and chart."""
    t_start = time.monotonic()
    Path(a.output).mkdir(parents=True, exist_ok=True)
    tflops = None
    if a.device.startswith("cuda"):
        tflops = (bf16_matmul_tflops(_device(a.device)) if a.in_process
                  else run_isolated(a, argv, "matmul", a.worker_timeout).get("tflops"))
    results = {}
    for v in a.variants.split(","):
        timeout = a.worker_timeout
        if a.time_budget:
            left = a.time_budget - (time.monotonic() - t_start)
            if left < 20:
                results[v] = {"variant": v, "status": "skipped", "error": f"--time-budget {a.time_budget:g} s spent"}
                continue
            timeout = min(timeout or left, left)
        print(f"[bench] {a.model}: {v} ...", flush=True)
        results[v] = run_variant(a, v) if a.in_process else run_isolated(a, argv, v, timeout)
        r = results[v]
        print(f"[bench] {v}: {r.get('status')} step {r.get('step_s')} s, loss {r.get('loss')}", flush=True)
    table = summarize(a, results, tflops, layout_overhead(a))
    text = format_table(a, table, tflops)
    write_outputs(a, table, tflops, text)
    print(text)
    mismatch = any(e["loss_ok"] is False for e in table.values())
    failed = any(e["status"] in ("failed", "timeout") for e in table.values())
    return 1 if mismatch or failed else 0


if __name__ == "__main__":
    sys.exit(main())
