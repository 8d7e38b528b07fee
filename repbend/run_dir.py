"""The output directory of a run: who may use it, what a fresh run may find there, what a resume compares
(docs/checkpoints.md).

- One run at a time: a run holds `repbend.run_lock.RunLock` on the directory until it ends.
- A directory holds a run when it holds a step: a checkpoint, a logged step, an adapter, a merged model or
  fenced checkpoints (`abandoned/`). A failure before step 1 leaves none of these, and the rerun starts there as if
  the directory were empty.
- A fresh run (no resume, or resume with no checkpoint to resume from) refuses a directory that holds a run,
  unless `train.overwrite` is true. A resume from a checkpoint of another directory starts a new branch here:
  refused the same way. Nothing is removed by `plan`, which only decides and refuses; `begin` removes or fences,
  once the run is sure to start (its checks passed, its model and data loaded).
- A resume from a checkpoint that is not the newest branches there: the newer checkpoints (and the adapter of that
  abandoned future, and its log rows) are moved into `abandoned/after-step-N-TIME/`, so a later `--train.resume
  true` cannot pick them and log.jsonl holds one trajectory. Newer incomplete checkpoints are removed.
- A resume compares the checkpoint's settings with the new ones. Settings that change the training trajectory
  (the model and its weights, data, LoRA, loss, optimizer, schedule, seed, batch size, the row layout, grad_accum
  x processes, the data's contents) stop it with one line naming each changed key and both values, unless
  `train.allow_config_change` is true. `SAFE_TO_CHANGE` lists what may change freely (raising max_steps, logging,
  saving and evaluation cadence, execution details such as the device or the attention backend). Every change that
  goes through is appended to `config_changes.jsonl` with the step it took effect.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from . import checkpoint as ckpt
from .errors import TrainingError
from .metrics import logged_steps, truncate_after

log = logging.getLogger("repbend")

RUN_OUTPUTS = ("checkpoints", "log.jsonl", "adapter", "merged", "tb", "config_changes.jsonl", "wandb_id.txt",
               "config.yaml", "wandb", "abandoned")
CHANGES = "config_changes.jsonl"
ABANDONED = "abandoned"

SAFE_TO_CHANGE = {
    "train.max_steps", "train.save_every", "train.keep_checkpoints", "train.eval_every", "train.eval_heldout",
    "train.progress", "train.tensorboard", "train.report_to", "train.wandb_project", "train.resume",
    "train.overwrite", "train.allow_config_change", "train.output_dir", "train.max_bad_steps", "train.merge",
    "model.device", "model.attn_implementation", "model.gradient_checkpointing", "model.liger",
    "distributed.strategy", "distributed.backend",
    "train.grad_accum",  # compared as grad_accum x processes ("run.micro_batches_per_step")
}
# not here: train.packing and train.pack_length. The loss is the same in every layout, but LoRA dropout draws one
# mask per row position, so at dropout > 0 another layout gives other masks and another trajectory.


def previous_run(out: Path) -> list[str]:
    """The outputs of an earlier run found in `out` that hold a step (a checkpoint, a logged step, an adapter, a
    merged model, fenced checkpoints); [] when `out` holds no run."""
    found = []
    if ckpt.list_checkpoints(out):
        found.append("checkpoints/")
    if logged_steps(out / "log.jsonl"):
        found.append("log.jsonl")
    for name in ("adapter", "merged", ABANDONED):
        if (out / name).exists():
            found.append(name + ("/" if (out / name).is_dir() else ""))
    return found


def clear(out: Path) -> None:
    for name in RUN_OUTPUTS:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


@dataclass
class StartPlan:
    """How a run starts in its output directory (`plan`), carried out by `begin` once the run is sure to start."""
    resume_from: Path | None = None      # the checkpoint to resume from; None = a fresh start
    clear: bool = False                  # remove what an earlier run left (RUN_OUTPUTS)
    fence_after: int | None = None       # fence or remove the checkpoints (and log rows) after this step
    log_from: Path | None = None         # a new branch: the log of the run its checkpoint came from


def plan(out: Path, resume, overwrite: bool) -> StartPlan:
    """Decide how the run starts in `out`, refusing what must not happen; removes nothing (see `begin`)."""
    point = resume_point(out, resume)
    if point is not None and point.parent.resolve() == ckpt.checkpoint_dir(out).resolve():
        return StartPlan(point, fence_after=_step_of(point))
    found = previous_run(out)
    if point is not None:  # another directory's checkpoint: a new branch in `out`
        if _inside(point, out):
            raise TrainingError(f"train.resume: {point} lies inside train.output_dir {out} but not in its "
                                "checkpoints/: copy it out of the directory first")
        if found and not overwrite:
            raise TrainingError(f"train.resume: {point} is not a checkpoint of train.output_dir {out}, which holds "
                                f"another run ({', '.join(found)}): resuming it there starts a new branch; choose an "
                                "empty --train.output_dir, or pass --train.overwrite true to replace that run")
        log_file = point.parent.parent / "log.jsonl" if point.parent.name == "checkpoints" else None
        return StartPlan(point, clear=True, log_from=log_file)
    if found and not overwrite:
        raise TrainingError(f"train.output_dir {out} holds another run ({', '.join(found)}); pass "
                            "--train.resume true to continue it, --train.overwrite true to replace it, or choose "
                            "another --train.output_dir")
    return StartPlan(None, clear=True)


def begin(out: Path, start: StartPlan) -> None:
    """Carry out `start` (rank 0, once the checks passed and the model and data loaded): remove an earlier run,
    copy a branch's earlier log rows, fence the checkpoints after the resume point."""
    if start.clear:
        clear(out)
    step = _step_of(start.resume_from) if start.resume_from is not None else None
    if start.log_from is not None and start.log_from.is_file():
        shutil.copyfile(start.log_from, out / "log.jsonl")
        truncate_after(out / "log.jsonl", step)
    if start.fence_after is not None:
        fence(out, start.fence_after)


def fence(out: Path, step: int) -> None:
    """Make step `step` the newest of `out`: newer incomplete checkpoints are removed; newer complete ones, with the
    adapter and merged model they led to and the log rows after `step`, are moved into
    `abandoned/after-step-NNNNNN-TIME/` (named in a warning), where no resume looks."""
    newer = [p for s, p in ckpt.list_checkpoints(out) if s > step]
    complete = []
    for p in newer:
        problem = ckpt.verify(p)
        if problem is None:
            complete.append(p)
        else:
            log.warning("removing the incomplete checkpoint %s, newer than the resume point step %d (%s)", p, step,
                        problem)
            shutil.rmtree(p, ignore_errors=True)
    logfile = out / "log.jsonl"
    if complete:
        dest = out / ABANDONED / f"after-step-{step:06d}-{time.strftime('%Y%m%d-%H%M%S')}"
        n = 1
        while dest.exists():  # a second branch from the same step within the same second
            n += 1
            dest = dest.with_name(dest.name.split("+")[0] + f"+{n}")
        (dest / "checkpoints").mkdir(parents=True)
        for p in complete:
            os.replace(p, dest / "checkpoints" / p.name)
        for name in ("adapter", "merged"):
            if (out / name).exists():
                os.replace(out / name, dest / name)
        if logfile.is_file():
            later = [line for line in logfile.read_text(encoding="utf-8", errors="replace").splitlines()
                     if _step_of_line(line) is not None and _step_of_line(line) > step]
            (dest / "log.jsonl").write_text("".join(x + "\n" for x in later), encoding="utf-8")
        log.warning("resuming from step %d, before the newest checkpoint: this run branches there; the newer "
                    "checkpoints (%s) and what they led to are moved to %s (no resume reads them; delete it when it "
                    "is no longer needed)", step, ", ".join(p.name for p in complete), dest)
    if logfile.is_file():
        truncate_after(logfile, step)


def _step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-", 1)[1])


def _step_of_line(line: str) -> int | None:
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    return rec.get("step") if isinstance(rec, dict) and isinstance(rec.get("step"), int) else None


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


def resume_point(out: Path, resume) -> Path | None:
    """The checkpoint `train.resume` names: "auto" = the newest complete one in `out` (None if there is none), a
    path = that one, which must be complete."""
    if resume in (None, False):
        return None
    if resume == "auto":
        found = ckpt.latest_checkpoint(out)
        if found is None and ckpt.list_checkpoints(out):
            raise TrainingError(f"train.resume: {ckpt.checkpoint_dir(out)} holds no complete checkpoint (each one "
                                "lacks a manifest that matches its files, see the warnings above); pass "
                                "--train.overwrite true and no --train.resume to start over")
        return found
    p = Path(str(resume))
    if not p.is_dir():
        raise TrainingError(f"train.resume: {p} is not a directory (give a checkpoint directory, or true)")
    if not ckpt.is_checkpoint_name(p.name):
        raise TrainingError(f"train.resume: {p} is not a checkpoint directory (those are named step-NNNNNN, in "
                            "<output_dir>/checkpoints/)")
    problem = ckpt.verify(p)
    if problem is not None:
        raise TrainingError(f"train.resume: {p} is not a complete checkpoint: {problem}")
    return p


# ---------------------------------------------------------------- what a resume compares
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_MIB = 1 << 20


def model_fingerprint(path: str | None) -> str | None:
    """A short hash of the base model at `path` (a local directory, or a hub name already in the local hub cache;
    None when neither): the whole of config.json and of every *.index.json, and for each weight file its name, size
    and the SHA-256 of its first and last MiB. Cheap (2 MiB read per weight file) and it sees weights replaced at
    the same path, which the path alone (and sizes and mtimes) would not."""
    root = _model_dir(path)
    if root is None:
        return None
    h = hashlib.sha256()
    for f in sorted(root.iterdir()):
        if not f.is_file():
            continue
        if f.name == "config.json" or f.name.endswith(".index.json"):
            h.update(f"{f.name}\0".encode())
            h.update(f.read_bytes())
        elif f.name.endswith(WEIGHT_SUFFIXES):
            size = f.stat().st_size
            h.update(f"{f.name}\0{size}\0".encode())
            with open(f, "rb") as fh:
                h.update(fh.read(_MIB))
                if size > _MIB:
                    fh.seek(max(_MIB, size - _MIB))
                    h.update(fh.read(_MIB))
    return h.hexdigest()[:16]


def _model_dir(path: str | None) -> Path | None:
    if not path:
        return None
    local = Path(os.path.expanduser(path))
    if local.is_dir():
        return local
    try:  # a hub name: the snapshot from_pretrained reads, if it is cached (never the network)
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(path, local_files_only=True))
    except Exception:
        return None


def flatten(config: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def settings_of(config: dict, world_size: int, facts: dict | None = None) -> dict:
    """The flat settings a resume compares: the config plus the run facts that shape the trajectory
    (`run.micro_batches_per_step`, and from `facts` `run.data_fingerprint` and `run.model_fingerprint`; a fact that
    is None is left out)."""
    flat = flatten(config)
    flat["run.micro_batches_per_step"] = flat.get("train.grad_accum", 1) * world_size
    flat.update({k: v for k, v in (facts or {}).items() if v is not None})
    return flat


def compare(old: dict, new: dict) -> tuple[list[tuple], list[tuple]]:
    """(changes that alter the trajectory, changes that are safe) as (key, old, new) triples."""
    risky, safe = [], []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if _same(a, b):
            continue
        (safe if key in SAFE_TO_CHANGE else risky).append((key, a, b))
    return risky, safe


def _same(a, b) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def check_resume(checkpoint: Path, step: int, old: dict, new: dict, allow: bool, max_steps: int) -> list[tuple]:
    """Stop a resume whose settings change the trajectory (unless `allow`); return every change that goes on, as
    (key, old, new, changes_trajectory), for `record_changes` once the run is sure to start."""
    if max_steps < step:
        raise TrainingError(f"train.max_steps {max_steps} is below the step of the checkpoint to resume from "
                            f"({checkpoint.name}, step {step})")
    risky, safe = compare(old, new)
    if risky and not allow:
        listed = "; ".join(f"{k} {_show(a)} -> {_show(b)}" for k, a, b in risky)
        raise TrainingError(f"train.resume: {checkpoint} was trained with other settings: {listed}. Resume with the "
                            "checkpoint's settings, or pass --train.allow_config_change true (the change is recorded "
                            f"in {CHANGES})")
    return [(k, a, b, True) for k, a, b in risky] + [(k, a, b, False) for k, a, b in safe]


def record_changes(out: Path, checkpoint: Path, step: int, changes: list[tuple]) -> None:
    """Append the changes a resume went on with to `config_changes.jsonl`."""
    if not changes:
        return
    with open(out / CHANGES, "a", encoding="utf-8") as fh:
        for k, a, b, changes_trajectory in changes:
            fh.write(json.dumps({"step": step, "checkpoint": checkpoint.name, "key": k, "old": a, "new": b,
                                 "changes_trajectory": changes_trajectory}, default=str) + "\n")


def _show(v) -> str:
    text = json.dumps(v, default=str)
    return text if len(text) <= 60 else text[:57] + "..."
