"""Speed and memory of linear_logprob (per-row log p of the labels through the LM head) against the full-logit path.

    python benchmarks/bench_linear_logprob.py [--device cpu|cuda] [--output DIR] [--quick] [--interpret] [--compile]

Each provider computes logp_n = log_softmax(c(hidden_n W^T))[label_n] for N rows and is timed in three modes:
forward (hidden requires grad), backward of L = sum_n g_n logp_n (g: fixed random per-row weights, as a masked and
weighted DPO / NPO sum gives) on one retained forward, and full (forward + backward). The LM head is frozen (LoRA
leaves it alone), so only grad_hidden is computed. Time: median over --repeats after a warm-up (CUDA events on a
GPU, perf_counter on the CPU). Memory: peak bytes above the starting point (torch.cuda.max_memory_allocated on a
GPU; on the CPU the growth of the resident set, with glibc told to map every block over 64 KiB on its own, see
MALLOC_MMAP_THRESHOLD_ below, so that a freed buffer leaves the resident set at once).

Providers
  triton        linear_logprob(impl="triton"): chunked cuBLAS matmuls + Triton row kernels (GPU; on the CPU only
                with --interpret, at tiny shapes)
  torch         linear_logprob(impl="torch"): the same chunks in eager PyTorch
  eager_full    the plain path: [N, V] logits in the input dtype, upcast to fp32, (capped,) log_softmax, gather,
                autograd
  compile_full  torch.compile of eager_full (GPU, or the CPU with --compile)
The `vs full` columns are eager_full's time and peak memory divided by the provider's, measured in the same run;
`max |dlogp|` is the largest difference of the provider's log-probs from eager_full's.

Writes DIR/bench_linear_logprob.csv (one row per shape, provider, mode) and prints a table.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

from kernel_timing import Device, _is_oom, device_from_args, run_case, write_csv  # this folder is on sys.path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available, else cpu")
    p.add_argument("--output", default="bench_out", help="folder for bench_linear_logprob.csv")
    p.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    p.add_argument("--interpret", action="store_true",
                   help="CPU: also run the Triton kernels in Triton's interpreter (tiny shapes)")
    p.add_argument("--compile", action="store_true", help="CPU: also run torch.compile (always on for cuda)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per mode (default 10 cuda, 3 cpu)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default 1 on cpu)")
    p.add_argument("--chunk-rows", type=int, default=None, help="linear_logprob's chunk_rows (default: its budget)")
    return p.parse_args(argv)


def shapes(device: str, quick: bool, interpret: bool) -> list[dict]:
    """GPU: Llama-3 8B's head (D = 4096, V = 128256, bf16) and a Gemma-2 9B-like capped one; CPU: modest sizes."""
    if device == "cuda":
        llama = [dict(N=n, D=4096, V=128256, dtype="bfloat16", softcap=None)
                 for n in ([4096, 16384] if quick else [1024, 4096, 16384])]
        return llama + [dict(N=4096, D=3584, V=256000, dtype="bfloat16", softcap=30.0)]
    if interpret:  # the interpreter runs one program at a time
        return [dict(N=32, D=64, V=1024, dtype="float32", softcap=s) for s in (None, 30.0)]
    return [dict(N=n, D=128, V=32000, dtype="float32", softcap=s)
            for n in ([512] if quick else [512, 2048]) for s in (None, 30.0)]


@dataclass
class Case:
    provider: str
    shape: dict
    forward: Callable  # () -> 0-dim loss sum_n g_n logp_n
    logp: Callable  # () -> [N] log-probs, no grad
    params: list  # tensors that receive gradients (reset between repeats)
    note: str = ""


def logprob_full(hidden, weight, labels, softcap):
    """The plain path: full [N, V] logits in the input dtype, upcast to fp32, capped, log_softmax, gather."""
    import torch

    z = (hidden @ weight.t()).float()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return torch.log_softmax(z, dim=-1).gather(1, labels.unsqueeze(1)).squeeze(1)


def make_cases(shape: dict, providers: list[str], device, chunk_rows, compile_cache: dict) -> list[Case]:
    import torch

    from repbend.kernels import linear_logprob

    dtype = getattr(torch, shape["dtype"])
    n, d, v, cap = shape["N"], shape["D"], shape["V"], shape["softcap"]
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(n, d, generator=g, device=device, dtype=dtype).requires_grad_(True)
    weight = torch.randn(v, d, generator=g, device=device, dtype=dtype).mul_(3 * d**-0.5)  # frozen head
    labels = torch.randint(0, v, (n,), generator=g, device=device)
    row_weight = torch.randn(n, generator=g, device=device)
    cases = []
    for prov in providers:
        if prov in ("triton", "torch"):
            def fn(h, w, y, c, impl=prov):
                return linear_logprob(h, w, y, softcap=c, impl=impl, chunk_rows=chunk_rows)
            note = f"chunk_rows={chunk_rows}" if chunk_rows else ""
        elif prov == "eager_full":
            fn, note = logprob_full, "[N, V] fp32 logits"
        elif prov == "compile_full":
            if "full" not in compile_cache:
                compile_cache["full"] = torch.compile(logprob_full)
            fn, note = compile_cache["full"], "torch.compile of eager_full"
        else:
            continue

        def forward(fn=fn):
            return (fn(hidden, weight, labels, cap) * row_weight).sum()

        def logp(fn=fn):
            with torch.no_grad():
                return fn(hidden, weight, labels, cap)
        cases.append(Case(prov, shape, forward, logp, [hidden], note))
    return cases


def providers_for(device: str, interpret: bool, use_compile: bool) -> tuple[list[str], list[str]]:
    provs, skipped = [], []
    if device == "cuda" or interpret:
        provs.append("triton")
    else:
        skipped.append("triton: needs CUDA (or --interpret)")
    provs += ["torch", "eager_full"]
    if use_compile:
        provs.append("compile_full")
    else:
        skipped.append("compile_full: off on CPU (--compile)")
    return provs, skipped


CSV_FIELDS = ["provider", "mode", "device", "dtype", "N", "D", "V", "softcap", "ms", "peak_mib", "max_abs_dlogp",
              "status", "note"]


def fmt(x: float, digits: int = 2) -> str:
    return "-" if x != x else f"{x:.{digits}f}"  # NaN -> "-"


def print_table(rows: list[dict]) -> None:
    """One line per (shape, provider): ms of each mode, peak MiB of forward and full, ratios against eager_full."""
    keyed: dict[tuple, dict] = {}
    for r in rows:
        shape = f"N={r['N']} D={r['D']} V={r['V']} {r['dtype']}" + (f" cap={r['softcap']}" if r["softcap"] else "")
        keyed.setdefault((shape, r["provider"]), {"row": r})[r["mode"]] = r

    def ok(r):
        return r is not None and r["status"] == "ok"

    header = ["shape", "provider", "fwd ms", "bwd ms", "full ms", "fwd MiB", "full MiB", "vs full: time",
              "memory", "max |dlogp|", "note"]
    lines = [header]
    for (shape, prov), modes in keyed.items():
        base = keyed.get((shape, "eager_full"), {})
        cells = [shape, prov]
        for m in ("forward", "backward", "full"):
            r = modes.get(m)
            cells.append("-" if r is None else (fmt(r["ms"]) if ok(r) else r["status"][:12]))
        for m in ("forward", "full"):
            cells.append(fmt(modes[m]["peak_mib"], 1) if ok(modes.get(m)) else "-")
        full, bfull = modes.get("full"), base.get("full")
        both = ok(full) and ok(bfull)
        cells.append(f"{bfull['ms'] / full['ms']:.2f}x" if both else "-")
        mem = both and full["peak_mib"] > 0 and bfull["peak_mib"] == bfull["peak_mib"]
        cells.append(f"{bfull['peak_mib'] / full['peak_mib']:.1f}x" if mem else "-")
        cells.append(f"{modes['row']['max_abs_dlogp']:.2g}")
        cells.append(modes["row"]["note"])
        lines.append([str(c) for c in cells])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for i, line in enumerate(lines):
        print("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def _reexec_with_mmap_threshold(argv) -> None:
    """On the CPU, run again with MALLOC_MMAP_THRESHOLD_ set (glibc reads it at start-up): every block over 64 KiB
    is mapped on its own and unmapped when freed, so the resident set's peak measures live memory rather than
    what the heap kept from earlier chunks (glibc otherwise raises its mmap threshold after the first large free)."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") or not sys.platform.startswith("linux"):
        return
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    os.execv(sys.executable, [sys.executable, os.path.abspath(__file__)] + list(argv))


def main(argv=None, reexec: bool = False) -> int:
    """reexec: on the CPU, start again with MALLOC_MMAP_THRESHOLD_ set (the script does; a caller in-process not)."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    device, repeats = device_from_args(args, "bench_linear_logprob")
    if device is None:
        print(repeats, file=sys.stderr)
        return 2
    import torch
    if device == "cpu" and reexec:
        _reexec_with_mmap_threshold(argv)
        torch.set_num_threads(args.threads or 1)
    elif args.threads:
        torch.set_num_threads(args.threads)
    dev = Device(device)
    provs, skipped = providers_for(device, args.interpret, device == "cuda" or args.compile)

    t_start = time.perf_counter()
    name = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"bench_linear_logprob: {name}, torch {torch.__version__}, repeats {repeats}")
    rows, compile_cache = [], {}
    for shape in shapes(device, args.quick, args.interpret):
        try:
            cases = make_cases(shape, provs, dev.device, args.chunk_rows, compile_cache)
        except Exception as e:  # noqa: BLE001
            print(f"  {shape}: inputs not built ({'OOM' if _is_oom(e) else f'{type(e).__name__}: {e}'})")
            dev.clean()
            continue
        base = next(c for c in cases if c.provider == "eager_full")
        try:
            want = base.logp()
        except Exception as e:  # noqa: BLE001 - no agreement column, the timings still run
            print(f"  {shape}: eager_full failed ({'OOM' if _is_oom(e) else type(e).__name__})")
            want = None
        for case in cases:
            diff = float("nan")
            if want is not None:
                try:
                    diff = (case.logp() - want).abs().max().item()
                except Exception:  # noqa: BLE001 - reported by its timed modes below
                    pass
            for r in run_case(case, dev, repeats):
                rows.append({"provider": case.provider, "mode": r["mode"], "device": device, "dtype": shape["dtype"],
                             "N": shape["N"], "D": shape["D"], "V": shape["V"], "softcap": shape["softcap"] or "",
                             "ms": r["ms"], "peak_mib": r["peak_mib"], "max_abs_dlogp": diff,
                             "status": r["status"], "note": case.note})
            print(f"  {case.provider:12s} {shape}  full {fmt(rows[-1]['ms'])} ms ({rows[-1]['status']})", flush=True)
        del cases, want
        dev.clean()

    out_csv = write_csv(args.output, "bench_linear_logprob.csv", CSV_FIELDS, rows)
    print()
    print_table(rows)
    for s in skipped:
        print(f"skipped {s}")
    if device == "cpu":
        print("CPU memory = peak RSS growth with MALLOC_MMAP_THRESHOLD_=65536; GPU numbers need --device cuda")
    print(f"wrote {out_csv} ({len(rows)} rows) in {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(reexec=True))
