"""Per-step records: the JSONL log, the progress bar and TensorBoard (when installed)."""
from __future__ import annotations

import json
import logging
import resource
import secrets
import string
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
    """Appends one JSON object per optimizer step to `<out>/log.jsonl` (rank 0 only), and mirrors the numbers to
    the progress bar and to the sinks asked for: "tensorboard" (`<out>/tb`) and "wandb" (Weights & Biases, whose
    run id is kept in `<out>/wandb_id.txt` so that a resumed run continues the same W&B run). A sink whose package
    is not installed gets one warning and is left out; log.jsonl is always written."""

    def __init__(self, out: Path, *, enabled: bool, progress: bool, sinks: list[str], total: int, initial: int = 0,
                 config: dict | None = None, project: str = "repbend"):
        self.enabled = enabled
        self.out = Path(out)
        self.path = self.out / "log.jsonl"
        self._fh = self._bar = self._tb = self._wandb = None
        if not enabled:
            return
        if initial == 0 and self.path.exists():
            self.path.unlink()  # a fresh run; a resumed one appends
        elif initial > 0 and self.path.exists():
            truncate_after(self.path, initial)  # drop steps logged after the checkpoint we resume from
        self._fh = open(self.path, "a", encoding="utf-8")
        if progress:  # a bar on a terminal, a line per tenth of the run in a log file
            from .progress import progress_bar
            self._bar = progress_bar(total, "repbend", unit="step", initial=initial)
        if "tensorboard" in sinks:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.warning("train.tensorboard true but the tensorboard package is not installed: no TensorBoard "
                            "scalars (pip install tensorboard); log.jsonl has every number")
            else:
                self._tb = SummaryWriter(str(self.out / "tb"))
        if "wandb" in sinks:
            self._wandb = _start_wandb(self.out, project, config, resuming=initial > 0)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
        scalars = {k: v for k, v in record.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
        scalars.update({f"eval/{k}": v for k, v in (record.get("eval") or {}).items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)})
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, record["step"])
        if self._wandb is not None:
            self._wandb.log(scalars, step=record["step"])

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._fh is not None:
            self._fh.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._fh = self._bar = self._tb = self._wandb = None


def _start_wandb(out: Path, project: str, config: dict | None, resuming: bool):
    try:
        import wandb
    except ImportError:
        log.warning("train.report_to has wandb but the wandb package is not installed: no W&B logging "
                    "(pip install wandb); log.jsonl has every number")
        return None
    id_file = out / "wandb_id.txt"
    run_id = id_file.read_text(encoding="utf-8").strip() if resuming and id_file.is_file() else None
    if run_id is None:  # W&B's own id helper moved between releases: 8 lowercase letters and digits, as it made
        run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
        id_file.write_text(run_id + "\n", encoding="utf-8")
    return wandb.init(project=project, id=run_id, resume="allow", dir=str(out), config=config,
                      name=out.name)


def logged_steps(path: Path) -> bool:
    """Whether the log at `path` records at least one step (a failure before step 1 leaves it empty)."""
    try:
        with open(path, "rb") as fh:
            for raw in fh:
                try:
                    rec = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    continue
                if isinstance(rec, dict) and isinstance(rec.get("step"), int):
                    return True
    except (FileNotFoundError, IsADirectoryError):
        return False
    return False


def truncate_after(path: Path, step: int) -> None:
    """Keep the records of steps <= `step`. Lines that are not whole JSON records (a line torn by a crash, a
    stray byte) are dropped on their own; every valid earlier record stays."""
    keep = []
    for raw in path.read_bytes().splitlines():
        try:
            rec = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step:
            keep.append(json.dumps(rec))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(x + "\n" for x in keep), encoding="utf-8")
    tmp.replace(path)
