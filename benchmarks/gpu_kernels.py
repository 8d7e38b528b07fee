"""Stage 3 of benchmarks/gpu_check.sh: rep_distance's bandwidth, forward + backward, against a measured device copy.

    python benchmarks/gpu_kernels.py --device cuda --jsonl OUT/results.jsonl --csv-out OUT [--time-limit S]

Two measurements, each written as JSON lines (stage "kernels") as soon as it exists:
1. benchmarks/bench_kernels.py's own measurement, its sweep cut to its BANDWIDTH_CONFIG (L = 11, BT = 16384
   positions, 1/5 selected, D = 4096, bf16) and its providers to triton and torch (torch.compile's build would take
   tens of seconds); the whole quick rep_distance sweep where it has no such config, and on the CPU;
   in a subprocess given the time left; its CSV is copied to --csv-out and each rep_distance row becomes a line.
2. Our own, the trainer's call at L = 11 target layers, D = 4096, bf16: the trained pass's L outputs [R, T, D]
   (R*T ~ 16k positions: synthetic Llama-3 micro-batches of B = 8, packed into rows of 1024 as the trainer does),
   a gathered reference [L, N, D] and the flat indices of the unsafe rows' response tokens (the "realistic mask":
   about a fifth of the positions). Timed with CUDA events around BATCH calls back to back (the host's launch work
   overlaps the device's, as in training; one call on an idle device would count ~0.6 ms of host time against
   ~1 ms of traffic), median of --repeats after warm-up; and the kernels' own device time from torch.profiler
   (kernel_* fields):
     forward   l2 of rep_distance(...)                      bytes = 2 L N D s (hidden and reference rows read)
     fwd+bwd   l2.sum().backward() included                 bytes = 4 L N D s + L R T D s (rows read again, and
                                                            the gradient of every position written)
   GB/s = bytes / time, as a fraction of the copy's 2 x bytes / time of dst.copy_(src) over 2 GiB.
On the CPU (the dry run) the shapes are tiny and the figures mean nothing; the code paths are what is exercised.
"""
from __future__ import annotations

import argparse
import csv
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gpu_records import Deadline, Records

HERE = Path(__file__).resolve().parent
RUNNER = """
import sys
sys.path.insert(0, {here!r})
import bench_kernels as bk
config = getattr(bk, "BANDWIDTH_CONFIG", None)
if config is not None and {only!r}:
    bk.sweeps = lambda device, quick, interpret: {{"rep_distance": [dict(config)]}}
    chosen = bk.providers_for  # the goal is the Triton kernel's: no torch.compile build (tens of seconds)
    bk.providers_for = lambda *a, **k: tuple(
        [p for p in chosen(*a, **k)[0] if p in ("triton", "torch")] if i == 0 else x
        for i, x in enumerate(chosen(*a, **k)))
print("bench_kernels: bandwidth configuration", config, flush=True)
sys.exit(bk.main({args!r}))
"""


def run_bench_kernels(rec: Records, py: str, device: str, csv_out: Path | None, seconds: float) -> None:
    """bench_kernels.py's main in a subprocess: on CUDA its sweep cut to its BANDWIDTH_CONFIG (where it has one),
    on the CPU its quick rep_distance sweep."""
    work = Path(tempfile.mkdtemp(prefix="bench_kernels_"))
    args = ["--device", device, "--ops", "rep_distance", "--output", str(work)] + (["--quick"] if device == "cpu"
                                                                                    else [])
    code = RUNNER.format(here=str(HERE), only=device != "cpu", args=args)
    print(f"[kernels] bench_kernels.py {' '.join(args)}", flush=True)
    sys.stdout.flush()
    try:
        rc = subprocess.run([py, "-c", code], timeout=max(10.0, seconds)).returncode
    except subprocess.TimeoutExpired:
        rec.write("bench_kernels", "timeout", args=args, error=f"stopped after {seconds:.0f} s")
        return
    path = work / "bench_kernels.csv"
    if rc != 0 or not path.exists():
        rec.write("bench_kernels", "error", args=args, error=f"exit code {rc}, no CSV")
        return
    if csv_out is not None:
        csv_out.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, csv_out / "bench_kernels.csv")
    rows = list(csv.DictReader(open(path)))
    rec.write("bench_kernels", "ok", args=args, rows=len(rows), columns=list(rows[0]) if rows else [])
    for r in rows:
        if r.get("op") != "rep_distance":
            continue
        shape = "/".join(f"{k}={r[k]}" for k in ("L", "BT", "N", "D") if r.get(k))
        csv_status = r.get("status", "")
        status = "ok" if csv_status == "ok" else ("oom" if "OOM" in csv_status else "error")
        rec.write(f"bench_kernels/{r.get('provider')}/{r.get('mode')}/{shape}", status, source="bench_kernels",
                  csv_status=csv_status, **{k: _num(v) for k, v in r.items() if v not in ("", None) and k != "status"})
    shutil.rmtree(work, ignore_errors=True)


def _num(v):
    try:
        return float(v) if any(c in v for c in ".en") else int(v)
    except (TypeError, ValueError):
        return v


def copy_gbps(torch, device, nbytes: int, repeats: int) -> float:
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = _time_ms(torch, device, lambda: dst.copy_(src), repeats)
    return 2 * nbytes / (ms * 1e-3) / 1e9


BATCH = 10  # calls back to back per timed sample on a GPU


def _time_ms(torch, device, fn, repeats: int, warmup: int = 2) -> float:
    """Milliseconds per call: on a GPU the mean of BATCH calls back to back between two events, median over
    `repeats`; on a CPU one call each."""
    for _ in range(warmup):  # and compilation
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            a.record()
            for _ in range(BATCH):
                fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / BATCH)
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def realistic_rows(small: bool):
    """(R, T, unsafe flat indices) of a trainer micro-batch: Llama-3 lengths, B = 8, packed into rows of 1024."""
    from step_workload import PAD_ID, loss_config, micro_batches
    from repbend.loss.batch import collate

    scale, vocab, B = (0.03, 1000, 1) if small else (1.0, 128256, 8)
    cfg = loss_config("repbend", 32)
    micro = micro_batches(vocab, B, 42, 1, scale)[0]
    batch = collate(micro, cfg, PAD_ID, max(16, round(1024 * scale)))
    R, T = batch.shape
    return R, T, batch.index["unsafe"]


def own_measurement(rec: Records, device_name: str, small: bool, repeats: int) -> None:
    import torch

    from repbend.kernels import rep_distance

    device = torch.device(device_name)
    L, D = (2, 32) if small else (11, 4096)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    copy = copy_gbps(torch, device, (64 if small else 2048) * 2**20, repeats)
    rec.write("copy", "ok", gbps=copy, nbytes=(64 if small else 2048) * 2**20)
    R, T, rows = realistic_rows(small)
    rows = rows.to(device)
    N, P, s = rows.numel(), R * T, torch.finfo(dtype).bits // 8
    g = torch.Generator(device=device).manual_seed(0)
    hidden = [torch.randn(R, T, D, generator=g, device=device, dtype=dtype).requires_grad_(True) for _ in range(L)]
    ref = torch.randn(L, N, D, generator=g, device=device, dtype=dtype)
    shape = dict(L=L, R=R, T=T, D=D, N=N, positions=P, selected_frac=N / P, dtype=str(dtype).replace("torch.", ""))
    impls = ("triton", "torch") if (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1") else ("torch",)
    for impl in impls:
        def fwd():
            with torch.no_grad():
                return rep_distance([h.detach() for h in hidden], ref, rows, impl=impl).l2

        def full():
            for h in hidden:
                h.grad = None
            rep_distance(hidden, ref, rows, impl=impl).l2.sum().backward()
        try:  # small (the dry run): one call of each, no warm-up (the interpreter's figures mean nothing)
            ms_f = _time_ms(torch, device, fwd, repeats, 0 if small else 2)
            ms_fb = _time_ms(torch, device, full, repeats, 0 if small else 2)
        except Exception as e:  # noqa: BLE001
            rec.error(f"rep_distance/{impl}", e, **shape)
            continue
        bytes_f = 2 * L * N * D * s
        bytes_fb = 4 * L * N * D * s + L * P * D * s
        gb_f, gb_fb = bytes_f / (ms_f * 1e-3) / 1e9, bytes_fb / (ms_fb * 1e-3) / 1e9
        kernel = {}
        if device.type == "cuda":
            from kernel_timing import Device, kernel_ms
            k_ms = kernel_ms(Device("cuda"), full)
            if k_ms == k_ms:
                k_gb = bytes_fb / (k_ms * 1e-3) / 1e9
                kernel = dict(kernel_fwd_bwd_ms=k_ms, kernel_fwd_bwd_gbps=k_gb, kernel_fwd_bwd_frac_copy=k_gb / copy)
        rec.write(f"rep_distance/{impl}", "ok", source="gpu_kernels", fwd_ms=ms_f, fwd_bwd_ms=ms_fb, fwd_gbps=gb_f,
                  fwd_bwd_gbps=gb_fb, fwd_frac_copy=gb_f / copy, fwd_bwd_frac_copy=gb_fb / copy,
                  bytes_fwd=bytes_f, bytes_fwd_bwd=bytes_fb, back_to_back=BATCH if device.type == "cuda" else 1,
                  **kernel, **shape)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--jsonl", default=None)
    p.add_argument("--csv-out", default=None, help="folder to copy bench_kernels.csv into")
    p.add_argument("--small", action="store_true", help="tiny shapes (the CPU dry run)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--time-limit", type=float, default=None)
    p.add_argument("--skip-bench-kernels", action="store_true")
    a = p.parse_args(argv)
    rec = Records(a.jsonl, "kernels")
    deadline = Deadline(a.time_limit)
    repeats = a.repeats or (1 if a.small else 20)
    try:  # ours first: a few seconds, and the goal's figure
        own_measurement(rec, a.device, a.small, repeats)
    except Exception as e:  # noqa: BLE001
        rec.error("rep_distance/own", e)
    if a.skip_bench_kernels:
        rec.write("bench_kernels", "skipped", error="--skip-bench-kernels")
    elif deadline.over(15):
        rec.write("bench_kernels", "skipped", error="stage time limit reached")
    else:
        try:
            run_bench_kernels(rec, sys.executable, a.device, Path(a.csv_out) if a.csv_out else None,
                              min(deadline.left() - 5, 1e9))
        except Exception as e:  # noqa: BLE001
            rec.error("bench_kernels", e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
