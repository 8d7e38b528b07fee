"""What the stage scripts of benchmarks/gpu_check.sh share: one JSON line per result, written as soon as it exists.

    rec = Records("out/results.jsonl", stage="parity")
    rec.write(name="rep_distance/list33/bf16", ok=True, err=1.2e-6)   # appended, flushed and fsynced at once

Every line is a JSON object with at least `stage`, `name`, `status` ("ok" | "fail" | "error" | "oom" | "skipped" |
"timeout") and `t` (seconds since the stage script started). A stage that is killed mid-way has written every
result it finished; the summary (benchmarks/gpu_summary.py) reads whatever lines are there.
"""
from __future__ import annotations

import json
import math
import os
import time
import traceback

STATUSES = ("ok", "fail", "error", "oom", "skipped", "timeout")
QUIET = ("traceback", "errs")  # in the JSON line, not on the console


def _clean(x):
    """JSON-safe values: NaN/inf as strings, tensors and numpy scalars as floats."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if hasattr(x, "item") and callable(x.item) and getattr(x, "ndim", 0) == 0:
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


class Records:
    """Appends result lines to `path` (None: print only). Each line is also printed, shortened, for the log."""

    def __init__(self, path: str | None, stage: str):
        self.path, self.stage, self.t0 = path, stage, time.monotonic()
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write(self, name: str, status: str = "ok", **fields) -> dict:
        if status not in STATUSES:
            raise ValueError(f"status {status!r} is not one of {STATUSES}")
        line = {"stage": self.stage, "name": name, "status": status, "t": round(time.monotonic() - self.t0, 2),
                **_clean(fields)}
        text = json.dumps(line)
        if self.path:
            with open(self.path, "a") as fh:
                fh.write(text + "\n")
                fh.flush()
                os.fsync(fh.fileno())
        print(f"[{self.stage}] {name}: {status}" + "".join(
            f" {k}={_short(v)}" for k, v in fields.items() if k not in QUIET and v is not None), flush=True)
        return line

    def error(self, name: str, exc: BaseException, **fields) -> dict:
        """An exception as a result: "oom" for out-of-memory, else "error" with its last traceback lines."""
        status = "oom" if is_oom(exc) else "error"
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)[-3:])
        return self.write(name, status, error=f"{type(exc).__name__}: {str(exc)[:400]}", traceback=tb[-1500:],
                          **fields)

    def elapsed(self) -> float:
        return time.monotonic() - self.t0


def _short(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    s = str(v)
    return s if len(s) <= 80 else s[:77] + "..."


def is_oom(e: BaseException) -> bool:
    text = str(e).lower()
    return type(e).__name__ == "OutOfMemoryError" or "out of memory" in text or "can't allocate memory" in text


def rel_err(got, want, scale: float | None = None) -> float:
    """||got - want|| / max(||want||, scale) in float64 (scale None and an all-zero `want`: the absolute norm)."""
    import torch
    g, w = got.detach().double(), want.detach().to(got.device, torch.float64)  # on the device: GBs on a GPU
    diff = float(torch.linalg.vector_norm((g - w).reshape(-1)))
    denom = max(float(torch.linalg.vector_norm(w.reshape(-1))), scale or 0.0)
    return diff / denom if denom > 0 else diff


class Deadline:
    """A soft time limit: `left()` seconds remain; `over(need)` when fewer than `need` do."""

    def __init__(self, seconds: float | None):
        self.end = None if not seconds else time.monotonic() + seconds

    def left(self) -> float:
        return float("inf") if self.end is None else self.end - time.monotonic()

    def over(self, need: float = 0.0) -> bool:
        return self.left() < need
