"""Per-step records: the JSONL log, the progress bar and TensorBoard (when installed)."""
from __future__ import annotations

import json
import logging
import resource
import sys
from pathlib import Path

import torch

log = logging.getLogger("repbend")


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated GPU memory on CUDA; peak resident set size of the process on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


class StepLogger:
    """Appends one JSON object per optimizer step to `<out>/log.jsonl` (rank 0 only)."""

    def __init__(self, out: Path, *, enabled: bool, progress: bool, tensorboard: bool, total: int, initial: int = 0):
        self.enabled = enabled
        self.path = Path(out) / "log.jsonl"
        self._fh = None
        self._bar = None
        self._tb = None
        if not enabled:
            return
        if initial == 0 and self.path.exists():
            self.path.unlink()  # a fresh run; a resumed one appends
        elif initial > 0 and self.path.exists():
            _truncate_after(self.path, initial)  # drop steps logged after the checkpoint we resume from
        self._fh = open(self.path, "a", encoding="utf-8")
        if progress:
            from tqdm.auto import tqdm
            self._bar = tqdm(total=total, initial=initial, desc="repbend", unit="step", dynamic_ncols=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(str(Path(out) / "tb"))
            except Exception:  # tensorboard not installed: the JSONL log is the record
                self._tb = None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                    self._tb.add_scalar(k, v, record["step"])
            for k, v in (record.get("eval") or {}).items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(f"eval/{k}", v, record["step"])

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _truncate_after(path: Path, step: int) -> None:
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            break  # a torn last line from a crash
    path.write_text("".join(x + "\n" for x in keep), encoding="utf-8")
