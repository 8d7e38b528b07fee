"""Atomic checkpoints and exact resume.

A checkpoint is a directory `<output_dir>/checkpoints/step-NNNNNN/` holding
- `adapter/`: the PEFT adapter as `PeftModel.from_pretrained` loads it;
- `state.pt`: the trainable (LoRA) tensors, the optimizer and scheduler states, the RNG states of every
  generator the step uses, the step counter (which is also the data position: micro-batches are a pure
  function of their index, see `repbend.data.sampler`), the count of bad steps in a row and the config.

It is written into a temporary sibling directory and renamed into place, so that a crash leaves either a
whole checkpoint or none (a leftover `*.tmp*` directory is ignored and removed by the next save).
"""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

_NAME = re.compile(r"^step-(\d{6,})$")


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and (p / "state.pt").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def save_checkpoint(output_dir: str | Path, step: int, *, save_adapter, state: dict, keep: int = 2) -> Path:
    """Write checkpoint `step` atomically. `save_adapter(dir)` writes the PEFT adapter; `state` is pickled."""
    root = checkpoint_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob("*.tmp*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step-{step:06d}"
    tmp = root / f"step-{step:06d}.tmp{os.getpid()}"
    tmp.mkdir()
    save_adapter(tmp / "adapter")
    torch.save(state, tmp / "state.pt")
    _fsync_dir(tmp)
    if final.exists():  # the same step saved again (e.g. the end coincides with a periodic save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    if keep > 0:
        for _, old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_state(path: str | Path) -> dict:
    path = Path(path)
    f = path / "state.pt"
    if not f.is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint: {f} is missing")
    return torch.load(f, map_location="cpu", weights_only=False)


def _fsync_dir(path: Path) -> None:
    for p in [path, *path.rglob("*")]:
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
    try:
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    except OSError:
        pass
