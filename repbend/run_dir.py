"""The output directory of a run: what a fresh run may find there, what a resume compares (docs/checkpoints.md).

- A fresh run (no resume, or resume with no checkpoint to resume from) refuses an output_dir that holds another
  run's checkpoints, log or adapter, unless `train.overwrite` is true, which removes them first.
- A resume compares the checkpoint's settings with the new ones. Settings that change the training trajectory
  (the model, data, LoRA, loss, optimizer, schedule, seed, batch size, grad_accum x processes, the data's
  contents) stop it with one line naming each changed key and both values, unless `train.allow_config_change`
  is true. `SAFE_TO_CHANGE` lists what may change freely (raising max_steps, logging, saving and evaluation
  cadence, execution details such as the device or the attention backend). Every change that goes through is
  appended to `config_changes.jsonl` with the step it took effect.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from . import checkpoint as ckpt
from .errors import TrainingError

RUN_OUTPUTS = ("checkpoints", "log.jsonl", "adapter", "merged", "tb", "config_changes.jsonl", "wandb_id.txt",
               "config.yaml", "wandb")
CHANGES = "config_changes.jsonl"

SAFE_TO_CHANGE = {
    "train.max_steps", "train.save_every", "train.keep_checkpoints", "train.eval_every", "train.eval_heldout",
    "train.progress", "train.tensorboard", "train.report_to", "train.wandb_project", "train.resume",
    "train.overwrite", "train.allow_config_change", "train.output_dir", "train.max_bad_steps", "train.merge",
    "train.packing", "train.pack_length",  # layouts give the same loss
    "model.device", "model.attn_implementation", "model.gradient_checkpointing", "model.liger",
    "distributed.strategy", "distributed.backend",
    "train.grad_accum",  # compared as grad_accum x processes ("run.micro_batches_per_step")
}


def previous_run(out: Path) -> list[str]:
    """The outputs of an earlier run found in `out` (checkpoints, log, adapter)."""
    found = []
    if ckpt.list_checkpoints(out):
        found.append("checkpoints/")
    for name in ("log.jsonl", "adapter", "merged"):
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


def start_fresh(out: Path, overwrite: bool) -> None:
    """Refuse, or (overwrite) clear, an output directory holding an earlier run."""
    found = previous_run(out)
    if not found:
        return
    if not overwrite:
        raise TrainingError(f"train.output_dir {out} holds another run ({', '.join(found)}); pass "
                            "--train.resume true to continue it, --train.overwrite true to replace it, or choose "
                            "another --train.output_dir")
    clear(out)


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
    problem = ckpt.verify(p)
    if problem is not None:
        raise TrainingError(f"train.resume: {p} is not a complete checkpoint: {problem}")
    return p


def flatten(config: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def settings_of(config: dict, world_size: int, data_fingerprint: str | None = None) -> dict:
    """The flat settings a resume compares: the config plus the run facts that shape the trajectory."""
    flat = flatten(config)
    flat["run.micro_batches_per_step"] = flat.get("train.grad_accum", 1) * world_size
    if data_fingerprint is not None:
        flat["run.data_fingerprint"] = data_fingerprint
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
