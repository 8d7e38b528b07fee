"""Timing and memory of one kernel case, for benchmarks/bench_kernels.py: CUDA events or perf_counter, the
median over repeats after a warm-up; peak memory from torch.cuda on a GPU, from the process's resident set
(VmHWM after a reset through /proc/self/clear_refs) on a CPU; and a device copy's bandwidth, the yardstick of the
memory-bound kernels.

On a GPU a call is timed back to back: BATCH calls between two events, divided by BATCH, so that the host's launch
work (hundreds of microseconds a call for the list-of-layers ops) overlaps the device's work instead of being
counted on an idle device; and the kernels' own device time comes from torch.profiler (`kernel_ms`), the figure
that says what the kernels do, whatever the host costs."""
from __future__ import annotations

import gc
import statistics
import time

BATCH = 10  # back-to-back calls per timed sample on a GPU


def device_from_args(args, prog: str):
    """The device and repeat count of a kernel benchmark's command line (--device, --interpret, --repeats, --quick),
    TRITON_INTERPRET set before any kernel module is imported; (None, message) when the flags cannot hold here."""
    import os
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports a module with @triton.jit kernels
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        return None, f"{prog}: --device cuda but torch sees no CUDA device"
    if device == "cuda" and args.interpret:
        return None, f"{prog}: --interpret is for --device cpu"
    return device, args.repeats or max(1, (10 if device == "cuda" else 3) // (2 if args.quick else 1))


def write_csv(out_dir, name: str, fields, rows) -> "Path":
    """rows (dicts) as OUT_DIR/NAME with the header `fields`; the folder is made if missing. Returns the path."""
    import csv
    from pathlib import Path
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return path


class Device:
    def __init__(self, kind: str):
        import torch

        self.torch = torch
        self.kind = kind
        self.device = torch.device(kind)

    def sync(self):
        if self.kind == "cuda":
            self.torch.cuda.synchronize()

    def time_ms(self, fn, setup=None, batch: int = 1) -> float:
        """Milliseconds of one fn(): on a GPU the mean of `batch` calls back to back between two events (setup()
        runs before each, host-side work such as dropping gradients), on a CPU one call (setup first, untimed)."""
        if self.kind == "cuda":
            start = self.torch.cuda.Event(enable_timing=True)
            end = self.torch.cuda.Event(enable_timing=True)
            if setup is not None:
                setup()
            self.sync()
            start.record()
            for i in range(batch):
                if i and setup is not None:
                    setup()
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / batch
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    def clean(self):
        gc.collect()
        if self.kind == "cuda":
            self.torch.cuda.empty_cache()
        elif _LIBC is not None:
            _LIBC.malloc_trim(0)  # hand freed heap back to the OS, so that RSS growth sees the next peak

    def peak_mib(self, fn, setup=None) -> float:
        """Peak memory above the starting point while fn() runs (MiB); NaN where it cannot be measured."""
        if setup is not None:
            setup()
        self.sync()
        if self.kind == "cuda":
            self.torch.cuda.reset_peak_memory_stats()
            base = self.torch.cuda.memory_allocated()
            fn()
            self.sync()
            return (self.torch.cuda.max_memory_allocated() - base) / 2**20
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
        except OSError:
            return float("nan")
        base = _status_kib("VmRSS")
        fn()
        return (_status_kib("VmHWM") - base) / 1024


def kernel_ms(dev: "Device", fn, setup=None, calls: int = 3) -> float:
    """The device time of the CUDA kernels one fn() launches (torch.profiler, the mean over `calls`); NaN on a CPU
    or when the profiler sees no kernel."""
    if dev.kind != "cuda":
        return float("nan")
    from torch.profiler import ProfilerActivity, profile

    dev.sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            if setup is not None:
                setup()
            fn()
        dev.sync()
    total_us = 0.0
    for e in prof.events():
        if str(getattr(e, "device_type", "")).endswith("CUDA"):
            total_us += getattr(e, "device_time", None) or getattr(e, "cuda_time", 0.0) or 0.0
    return total_us / 1e3 / calls if total_us else float("nan")


def _load_libc():
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 - glibc only
        return libc
    except Exception:  # noqa: BLE001 - not glibc: RSS numbers are rougher
        return None


_LIBC = _load_libc()


def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


def _is_oom(e: BaseException) -> bool:
    return "out of memory" in str(e).lower() or type(e).__name__ == "OutOfMemoryError"


def run_case(case, dev: Device, repeats: int) -> list[dict]:
    """Rows (one per mode) with ms, peak MiB and status for one case (a bench_kernels.Case)."""
    state: dict = {}

    def reset_grads():
        for p in case.params:
            p.grad = None

    def prepare_backward():  # one forward, retained; each timed backward reuses it
        reset_grads()
        if "loss" not in state:
            state["loss"] = case.forward()
        dev.sync()

    modes = {
        "forward": (lambda: case.forward(), reset_grads),
        "backward": (lambda: state["loss"].backward(retain_graph=True), prepare_backward),
        "full": (lambda: case.forward().backward(), reset_grads),
    }
    rows = []
    batch = BATCH if dev.kind == "cuda" else 1
    for mode, (fn, setup) in modes.items():
        row = {"mode": mode, "ms": float("nan"), "kernel_ms": float("nan"), "peak_mib": float("nan"), "status": "ok"}
        try:
            dev.time_ms(fn, setup)  # warm-up (and compilation)
            dev.clean()
            times = []
            row["peak_mib"] = dev.peak_mib(lambda: times.append(dev.time_ms(fn)), setup)
            times += [dev.time_ms(fn, setup, batch) for _ in range(repeats - 1)]
            row["ms"] = statistics.median(times[1:] or times)  # the first (in the peak measurement) is alone
            row["kernel_ms"] = kernel_ms(dev, fn, setup)
        except Exception as e:  # noqa: BLE001 - an OOM or a failing provider is a result, not a crash
            first_line = (str(e).splitlines() or [""])[0][:120]
            row["status"] = "OOM" if _is_oom(e) else f"error: {type(e).__name__}: {first_line}"
        state.clear()
        reset_grads()
        dev.clean()
        rows.append(row)
    return rows


def copy_bandwidth_gbps(dev: Device, nbytes: int = 2 * 2**30, repeats: int = 10) -> float:
    """Device copy bandwidth, counting the bytes read and written: 2 * nbytes / time."""
    torch = dev.torch
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=dev.device).normal_()
    dst = torch.empty_like(src)
    dev.time_ms(lambda: dst.copy_(src))
    ms = statistics.median(dev.time_ms(lambda: dst.copy_(src)) for _ in range(repeats))
    src = dst = None  # free before the next measurement
    dev.clean()
    return 2 * nbytes / (ms * 1e-3) / 1e9


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------
