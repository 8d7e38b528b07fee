"""Peak memory of a step-benchmark worker (benchmarks/bench_step.py): on a GPU torch.cuda's allocated peak, with the
allocator's peak reservation and the rest of the device's use (the CUDA context); on a CPU the process's peak resident
set after a reset (/proc/self/clear_refs), with glibc made to return freed tensors so that it follows the live ones.
"""
from __future__ import annotations

import resource
from pathlib import Path


def _reset_peak(device) -> str:
    import torch
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return "cuda_max_memory_allocated"
    _steady_rss()
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


def _steady_rss() -> None:
    """glibc raises its mmap threshold to the size of every mmapped block freed (up to 32 MiB), after which freed
    tensors stay in the heap and the resident set keeps the high-water mark of everything ever allocated. Fixing
    the threshold at 128 KiB (which also stops the raising) returns each tensor's pages when it is freed, so that
    the resident set follows the live tensors (what `repbend plan` predicts)."""
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: the resident set as it comes
        pass


def _peak_reserved(device) -> dict:
    """GPU: the caching allocator's peak reservation and what the device holds besides (CUDA context, library
    workspaces, other processes): together, what a card of that size must hold."""
    import torch
    if device.type != "cuda":
        return {}
    free, total = torch.cuda.mem_get_info(device)
    reserved_now = torch.cuda.memory_reserved(device)
    return {"peak_reserved_bytes": int(torch.cuda.max_memory_reserved(device)),
            "device_other_bytes": int(total - free - reserved_now), "device_total_bytes": int(total)}


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
