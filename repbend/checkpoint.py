"""Atomic, verified checkpoints and exact resume (docs/checkpoints.md).

A checkpoint is a directory `<output_dir>/checkpoints/step-NNNNNN/` holding
- `adapter/`: the trained weights in their loadable form (a PEFT adapter, or RMU's tensors);
- `state.pt`: the trained tensors, the optimizer and scheduler states, the RNG states, the step counter (which is
  also the data position: micro-batches are a pure function of their index), the count of bad steps in a row;
- `config.json`: the run's settings, compared by a resume;
- `manifest.json`, written last: the size and SHA-256 of every other file.

It is written into a temporary sibling directory and renamed into place, so that a crash leaves either a whole
checkpoint or none (a leftover `*.tmp*` directory is removed by the next save). A checkpoint whose manifest is
missing or does not match its files (a truncated `state.pt`, say) is incomplete: `latest_checkpoint` skips it
with a warning that names it, and resumes from the newest complete one.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("repbend")

_NAME = re.compile(r"^step-(\d{6,})$")
MANIFEST = "manifest.json"


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
    """Every `step-N` directory (complete or not), oldest first."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return sorted(found)


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(root: Path) -> None:
    entries = {str(p.relative_to(root)): {"size": p.stat().st_size, "sha256": _digest(p)} for p in _files(root)}
    (root / MANIFEST).write_text(json.dumps({"files": entries}, indent=1), encoding="utf-8")


def verify(path: str | Path) -> str | None:
    """None when the checkpoint at `path` is complete; else what is wrong with it."""
    root = Path(path)
    try:
        listed = json.loads((root / MANIFEST).read_text(encoding="utf-8"))["files"]
    except FileNotFoundError:
        return f"no {MANIFEST} (the save did not finish)"
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        return f"{MANIFEST} is unreadable"
    for rel, want in listed.items():
        f = root / rel
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != want["size"]:
            return f"{rel} has {f.stat().st_size} bytes, the manifest says {want['size']}"
        if _digest(f) != want["sha256"]:
            return f"{rel} does not match its checksum"
    if "state.pt" not in listed:
        return "the manifest lists no state.pt"
    return None


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint; each newer incomplete one is skipped with a warning naming it."""
    for _, path in reversed(list_checkpoints(output_dir)):
        problem = verify(path)
        if problem is None:
            return path
        log.warning("skipping the incomplete checkpoint %s: %s", path, problem)
    return None


def save_checkpoint(output_dir: str | Path, step: int, *, save_adapter, state: dict, config: dict,
                    keep: int = 2) -> Path:
    """Write checkpoint `step` atomically. `save_adapter(dir)` writes the loadable weights; `state` is pickled."""
    root = checkpoint_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob("*.tmp*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step-{step:06d}"
    tmp = root / f"step-{step:06d}.tmp{os.getpid()}"
    tmp.mkdir()
    save_adapter(tmp / "adapter")
    torch.save(state, tmp / "state.pt")
    (tmp / "config.json").write_text(json.dumps(config, indent=1, default=str), encoding="utf-8")
    write_manifest(tmp)
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
    return torch.load(Path(path) / "state.pt", map_location="cpu", weights_only=False)


def load_config(path: str | Path) -> dict:
    return json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))


def replace_dir(tmp: Path, final: Path) -> None:
    """Put the finished directory `tmp` at `final` (replacing what was there) so that `final` is never half
    written: the old one is renamed aside first and removed after."""
    aside = final.with_name(f"{final.name}.old{os.getpid()}")
    if final.exists():
        os.replace(final, aside)
    os.replace(tmp, final)
    shutil.rmtree(aside, ignore_errors=True)
    _fsync_dir(final)


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
