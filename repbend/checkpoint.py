"""Atomic, verified checkpoints and exact resume (docs/checkpoints.md).

A checkpoint is a directory `<output_dir>/checkpoints/step-NNNNNN/` holding
- `adapter/`: the trained weights in their loadable form (a PEFT adapter, or RMU's tensors);
- `state.pt`: the trained tensors, the optimizer and scheduler states, the RNG states, the step counter (which is
  also the data position: micro-batches are a pure function of their index), the count of bad steps in a row and
  of leading steps with a zero gradient (`repbend.train_guard`);
- `config.json`: the run's settings, compared by a resume;
- `manifest.json`, written last: the size and SHA-256 of every other file.

It is written into a temporary sibling directory and renamed into place, so that a crash leaves either a whole
checkpoint or none (a leftover `*.tmp*` directory is removed by the next save). A write that fails removes its
temporary directory at once, and a full disk is a `TrainingError` saying "no space left on device" with the path.
A checkpoint whose manifest is missing or does not match its files (a truncated `state.pt`, say) is incomplete:
`latest_checkpoint` skips it with a warning that names it, and resumes from the newest complete one. Rotation
(`train.keep_checkpoints`) counts complete checkpoints only.
"""
from __future__ import annotations

import hashlib
import io
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


def is_checkpoint_name(name: str) -> bool:
    return _NAME.match(name) is not None


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
    """Write checkpoint `step` atomically. `save_adapter(dir)` writes the loadable weights; `state` is pickled.
    A write that fails removes its partial temporary directory; a full disk is a `TrainingError` that says so."""
    root = checkpoint_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob("*.tmp*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step-{step:06d}"
    tmp = root / f"step-{step:06d}.tmp{os.getpid()}"

    def write(tmp: Path) -> None:
        save_adapter(tmp / "adapter")
        save_torch(state, tmp / "state.pt")
        (tmp / "config.json").write_text(json.dumps(config, indent=1, default=str), encoding="utf-8")
        write_manifest(tmp)
        _fsync_dir(tmp)

    write_new_dir(tmp, write, f"the checkpoint {final}")
    if final.exists():  # the same step saved again (e.g. the end coincides with a periodic save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    if keep > 0:
        rotate(output_dir, step, keep)
    return final


class _Recorder(io.RawIOBase):
    """The file `torch.save` writes through: it keeps the OSError of a failed write, which torch reports (if at all)
    as "[enforce fail at inline_container.cc] unexpected pos"."""

    def __init__(self, fh):
        super().__init__()
        self.fh = fh
        self.error: OSError | None = None

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        try:
            return self.fh.write(b)
        except OSError as e:
            self.error = e
            raise


def save_torch(obj, path: Path) -> None:
    """`torch.save(obj, path)`, where a failed write (a full disk) raises its own OSError."""
    with open(path, "wb") as fh:
        rec = _Recorder(fh)
        try:
            torch.save(obj, rec)
        except Exception:
            if rec.error is not None:
                raise rec.error from None
            raise


def rotate(output_dir: str | Path, newest: int, keep: int) -> None:
    """Keep the `keep` newest complete checkpoints up to step `newest` (the one just written, and the newest older
    ones that pass `verify`); remove every other checkpoint up to `newest`, complete or not. Only complete ones
    count: a corrupt checkpoint never pushes a good one out. Checkpoints after `newest` are no part of this
    trajectory and are left to `repbend.run_dir.fence`."""
    kept = 0
    for step, path in reversed(list_checkpoints(output_dir)):
        if step > newest:
            continue
        if kept < keep and (step == newest or verify(path) is None):
            kept += 1
            continue
        shutil.rmtree(path, ignore_errors=True)


def write_new_dir(tmp: Path, write, what: str) -> None:
    """Create the directory `tmp` and fill it with `write(tmp)`. If that fails, `tmp` is removed (a partial write
    would keep the disk space), and a full disk or quota becomes a `TrainingError` naming `what`."""
    from .errors import TrainingError

    try:
        tmp.mkdir()
        write(tmp)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = _disk_full(e)
        if reason is None:
            raise
        raise TrainingError(f"{reason} while writing {what} (under {tmp.parent}); the partial write was removed. "
                            "Free some space (or lower train.keep_checkpoints), then resume with --train.resume "
                            "true") from None


def _disk_full(e: BaseException) -> str | None:
    """'no space left on device' / 'disk quota exceeded' when `e` (or what it wraps) says so, else None."""
    import errno

    while e is not None:
        code = getattr(e, "errno", None)
        text = str(e)
        if code == errno.ENOSPC or "No space left on device" in text or "os error 28" in text:
            return "no space left on device"
        if code == errno.EDQUOT or "Disk quota exceeded" in text:
            return "disk quota exceeded"
        e = e.__cause__ or e.__context__
    return None


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
