"""The training loop: reference pass, trained pass, loss, backward, step. Nothing else hides here.

    from repbend import RepBendConfig, train
    result = train(RepBendConfig.load("repbend/configs/llama3_8b_instruct.yaml", ["--train.max_steps", "10"]))

The loss of every method comes from `repbend.loss.RepBendLoss`; the run directory's rules (fresh, overwrite,
resume and what it compares) from `repbend.run_dir`; checkpoints from `repbend.checkpoint`.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import checkpoint as ckpt
from . import run_dir
from .build import (build_data, check_before_load, check_data, check_model_fits, load_model, make_sampler,
                    prepare_model)
from .config import RepBendConfig
from .distributed import DistState, init_distributed, wrap_model
from .errors import TrainingError
from .loss import RepBendLoss
from .loss.layout import layout_kind
from .metrics import StepLogger, peak_memory_bytes
from .roles import ROLES
from .model import model_depth, unwrap
from .run_lock import RunLock
from .train_guard import TrainingGuard

log = logging.getLogger("repbend")

__all__ = ["train", "TrainResult", "TrainingError", "lr_factor"]


@dataclass
class TrainResult:
    output_dir: str
    adapter_dir: str
    steps: int
    history: list[dict] = field(default_factory=list)
    stopped: str | None = None       # why the run ended before max_steps, if it did


def lr_factor(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    """The multiplier of the base learning rate at optimizer step `s`: transformers' schedule of that name
    (`get_scheduler`), with `warmup` linear warm-up steps; "constant" keeps the warm-up (transformers'
    constant_with_warmup)."""
    from transformers import get_scheduler

    name = "constant_with_warmup" if schedule == "constant" else schedule
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)  # only its LambdaLR's factor is kept
    return get_scheduler(name, probe, num_warmup_steps=warmup, num_training_steps=total).lr_lambdas[0]


def seed_everything(seed: int) -> None:
    import random
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def micro_batch_rng(seed: int, index: int, device: torch.device):
    """The torch generators seeded by (seed, micro-batch index) for one micro-step, then restored: LoRA dropout
    draws the same masks for micro-batch `index` whatever the process, world size or resume point."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(np.random.SeedSequence([seed, 0x5EED, index]).generate_state(1)[0]))
        yield


def data_fingerprint(pools) -> str:
    """A short hash of every tokenized row of the pools (a resume compares it: same files, same contents)."""
    h = hashlib.sha256()
    for role in ROLES:
        h.update(role.encode())
        for item in pools.role(role):
            for s in (item if isinstance(item, tuple) else (item,)):
                h.update(np.asarray(s.input_ids, dtype=np.int64).tobytes())
                h.update(int(s.request_len).to_bytes(8, "little"))
    return h.hexdigest()[:16]


def train(cfg: RepBendConfig, *, model=None, tokenizer=None, pools=None,
          evaluate: Callable[[object, int], dict] | None = None) -> TrainResult:
    """Train with `cfg.loss.method`. `model`/`tokenizer`/`pools` may be given (the demo and tests do); otherwise
    they come from `cfg`. `evaluate(model, step) -> dict` runs every `train.eval_every` steps; its dict is logged,
    and a true `stop` key in it ends the run there (the weights of that step are kept).

    A run that trained nothing (`repbend.train_guard`) raises `TrainingError` after keeping what it wrote; rank 0
    holds the output directory's lock (`repbend.run_lock`) from before the model loads until it returns or raises."""
    check_before_load(cfg, model_given=model is not None, evaluate_given=evaluate is not None)
    with contextlib.ExitStack() as held:
        return _train(cfg, held, model=model, tokenizer=tokenizer, pools=pools, evaluate=evaluate)


def _train(cfg: RepBendConfig, held: contextlib.ExitStack, *, model, tokenizer, pools, evaluate) -> TrainResult:
    t = cfg.train
    dist = init_distributed(cfg.distributed, cfg.model.device)
    out = Path(t.output_dir)
    if dist.is_main:
        held.enter_context(RunLock(out))  # one run per directory, released however this call ends
    loss_fn = RepBendLoss(cfg.loss)
    if t.merge and dist.sharded:
        raise TrainingError("train.merge is not supported with distributed.strategy fsdp; merge the saved weights "
                            "afterwards, or use ddp")
    if dist.sharded:
        loss_fn.method.check_strategy(cfg.distributed.strategy)
    if model is None and cfg.model.path is not None:  # the settings against the model's depth, before its weights
        check_model_fits(cfg, loss_fn.method, model_depth(cfg.model.path))

    # the run directory: a resume point (its settings compared before anything is loaded), or a fresh start;
    # nothing in it is removed or fenced before the model and data have loaded (run_dir.begin below)
    start = dist.broadcast_object(run_dir.plan(out, t.resume, t.overwrite) if dist.is_main else None)
    resume_from = start.resume_from
    saved = ckpt.load_config(resume_from) if resume_from is not None else None
    changes: list[tuple] = []
    facts = {"run.model_fingerprint": run_dir.model_fingerprint(cfg.model.path)}
    if dist.is_main and saved is not None:
        changes = _compare_resume(cfg, saved, resume_from, facts, dist.world_size)
    dist.barrier()

    seed_everything(t.seed)
    if model is None:
        model, tokenizer = load_model(cfg, dist.device)
    model, params = prepare_model(cfg, model, loss_fn)
    model.to(dist.device)
    if pools is None:
        pools = build_data(cfg, tokenizer, loss_fn)
    if dist.is_main:
        log.info("data:\n%s", pools.report.summary())
    check_data(cfg, pools, loss_fn)
    sampler = make_sampler(cfg, pools, loss_fn)
    if dist.is_main:
        log.info("micro-batch: %s", loss_fn.method.composition(pools, t.batch_size))
    late = _facts_after_load(cfg, facts, pools)
    if dist.is_main:
        if saved is not None:  # the same files may hold other rows now (and a hub model is only now in the cache)
            changes += _compare_loaded(cfg, saved, resume_from, facts, late)
        run_dir.begin(out, start)  # only now: overwrite's removal, a branch's fencing
        if saved is not None:
            run_dir.record_changes(out, resume_from, saved["step"], changes)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(_yaml(cfg.to_dict()), encoding="utf-8")  # the settings that now run
    dist.barrier()

    runner = wrap_model(model, cfg.distributed, dist, params)  # before the optimizer: FSDP2 swaps the parameters
    params = dist.params
    if evaluate is None and t.eval_every and t.eval_heldout:
        from .heldout import heldout_evaluator
        evaluate = heldout_evaluator(t.eval_heldout, tokenizer)

    optimizer = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(t.schedule, t.warmup, t.max_steps))
    step, bad_in_row, zero_grad_steps = 0, 0, 0
    if resume_from is not None:
        state = ckpt.load_state(resume_from)
        dist.load_trainable(model, state["trainable"], _load_trainable)
        dist.load_optimizer_state(model, optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        for group in optimizer.param_groups:  # the settings of this run (a resume may change them, when allowed)
            group.update(lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
        factor = lr_factor(t.schedule, t.warmup, t.max_steps)
        scheduler.base_lrs = [t.lr] * len(optimizer.param_groups)
        scheduler.lr_lambdas = [factor] * len(optimizer.param_groups)
        for group in optimizer.param_groups:
            group["lr"] = t.lr * factor(scheduler.last_epoch)
        dist.restore_rng(state["rng"])
        step, bad_in_row = state["step"], state["bad_in_row"]
        zero_grad_steps = state.get("zero_grad_steps", 0)  # older checkpoints: past the window of that rule
        if dist.is_main:
            log.info("resumed from %s at step %d", resume_from, step)

    device = dist.device
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else torch.autocast("cpu", enabled=False))
    varlen = layout_kind(getattr(unwrap(model).config, "_attn_implementation", None)) == "varlen"
    pack_length = (sys.maxsize if varlen else t.pack_length) if t.packing else None  # flash-attn: one row
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    logger = StepLogger(out, enabled=dist.is_main, progress=t.progress, sinks=t.sinks, total=t.max_steps,
                        initial=step, config=cfg.to_dict(), project=t.wandb_project)
    held.callback(logger.close)  # also when a step raises
    guard = TrainingGuard(params, step, zero_grad_steps, t.max_steps, t.max_bad_steps, out)
    history, stopped = [], None
    model.train()
    while step < t.max_steps:
        dist.fault_point(step + 1)  # REPBEND_FAULT_AT_STEP test hook (repbend.distributed)
        t0 = time.perf_counter()
        acc: dict[str, torch.Tensor] = {}  # the micro-batches' mean of each term, read once per step
        tokens = positions = 0
        for k in range(t.grad_accum):  # micro index: a pure function of (step, k, rank), see the sampler
            index = (step * t.grad_accum + k) * dist.world_size + dist.rank
            batch = loss_fn.collate(sampler(index), pad_id, pack_length).to(device)
            with autocast, dist.no_sync_unless(runner, k == t.grad_accum - 1), \
                    micro_batch_rng(t.seed, index, device):
                terms = loss_fn(model, batch, progress=(step + 1) / t.max_steps)
                (terms.total / t.grad_accum).backward()
            for name, v in terms.detached().items():
                acc[name] = acc[name] + v / t.grad_accum if name in acc else v / t.grad_accum
            tokens += batch.useful_tokens
            positions += batch.input_ids.numel()
        sums = dict.fromkeys(("loss",) + loss_fn.terms)
        sums.update(zip(acc, torch.stack(list(acc.values())).float().tolist()))  # the step's one host sync
        sums = dist.mean_of(sums)
        grad_norm = dist.clip_grad_norm_(params, t.max_grad_norm)
        finite = math.isfinite(sums["loss"]) and bool(torch.isfinite(grad_norm))
        lr = optimizer.param_groups[0]["lr"]  # this step's (the scheduler's get_last_lr is the next step's after it)
        if finite:
            optimizer.step()
            bad_in_row = 0
        else:
            bad_in_row += 1
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step += 1
        elapsed = time.perf_counter() - t0
        record = {"step": step, **sums, "lr": lr,
                  "grad_norm": float(grad_norm), "skipped": not finite,
                  "tokens": dist.sum_of(tokens), "padded_positions": dist.sum_of(positions),
                  "tokens_per_s": dist.sum_of(tokens) / elapsed, "step_s": elapsed,
                  "peak_mem_bytes": peak_memory_bytes(device)}
        if not finite and dist.is_main:
            log.warning("step %d: non-finite loss or gradient (loss=%s, grad_norm=%s); update skipped (%d in a row)",
                        step, sums["loss"], float(grad_norm), bad_in_row)
        if not finite and bad_in_row >= max(1, t.max_bad_steps):
            logger.write(record)
            logger.close()
            last = ckpt.latest_checkpoint(out)
            raise TrainingError(f"{bad_in_row} steps in a row had a non-finite loss or gradient (last at step {step}); "
                                f"stopping. The last good checkpoint is {last or 'none (no checkpoint was saved)'}; "
                                "lower train.lr or the loss weights, or check the data")
        if evaluate is not None and t.eval_every and step % t.eval_every == 0:
            model.eval()
            metrics = evaluate(model, step)
            model.train()
            record["eval"] = {k: v for k, v in metrics.items() if k != "stop"}
            if dist.any_of(metrics.get("stop")):  # every rank must leave the loop at the same step
                stopped = f"the periodic evaluation asked to stop at step {step}"
        logger.write(record)
        history.append(record)
        problem = guard.after_step(record)
        if (t.save_every and step % t.save_every == 0) or step == t.max_steps or stopped or problem:
            _save(out, step, model, loss_fn, optimizer, scheduler, bad_in_row, cfg, dist, facts,
                  guard.zero_grad_steps)
        if problem:
            raise TrainingError(problem)
        if stopped:
            break
    logger.close()
    adapter_dir = out / "adapter"
    full = dist.adapter_state(model)
    if dist.is_main:
        tmp = out / f"adapter.tmp{id(model)}"
        ckpt.write_new_dir(tmp, lambda d: _save_weights(model, loss_fn, d, full), f"the adapter {adapter_dir}")
        ckpt.replace_dir(tmp, adapter_dir)
        if t.merge:
            _save_merged(model, loss_fn, tokenizer, out / "merged")
    dist.barrier()
    problem = guard.at_end(step, bad_in_row, dist.any_of)
    dist.shutdown()
    if problem:
        raise TrainingError(problem)
    return TrainResult(str(out), str(adapter_dir), step, history, stopped)


# ---------------------------------------------------------------- helpers
def _trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def _load_trainable(model, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n in state if n not in params]
    if missing:
        raise TrainingError(f"the checkpoint does not match the model: unknown parameters {missing[:3]}")
    with torch.no_grad():
        for n, v in state.items():
            params[n].copy_(v)


def _save_weights(model, loss_fn, path: Path, state: dict | None = None) -> None:
    """The trained weights in their loadable form, as the method writes them (PEFT's adapter files; `state` = the full
    tensors when the model's are sharded)."""
    loss_fn.method.save_weights(model, path, state)


def _compare_resume(cfg, saved: dict, resume_from: Path, facts: dict, world_size: int) -> list[tuple]:
    """Before loading: the checkpoint's settings against these (and the model's fingerprint where it was taken)."""
    old = saved["settings"]
    new = run_dir.settings_of(cfg.to_dict(), world_size, {k: v for k, v in facts.items() if k in old})
    new.update({k: old[k] for k in ("run.data_fingerprint", "run.model_fingerprint") if k in old and k not in new})
    return run_dir.check_resume(resume_from, saved["step"], old, new, cfg.train.allow_config_change,
                                cfg.train.max_steps)


def _facts_after_load(cfg, facts: dict, pools) -> list[str]:
    """Add the run facts known only once the model and data loaded: the data's fingerprint, and the model's when its
    files were not found before (a hub model, in the cache only now). Returns the keys added."""
    facts["run.data_fingerprint"] = data_fingerprint(pools)
    late = ["run.data_fingerprint"]
    if facts.get("run.model_fingerprint") is None and cfg.model.path is not None:
        facts["run.model_fingerprint"] = run_dir.model_fingerprint(cfg.model.path)
        late.append("run.model_fingerprint")
    return late


def _compare_loaded(cfg, saved: dict, resume_from: Path, facts: dict, late: list[str]) -> list[tuple]:
    """After loading: the facts of `_facts_after_load` against the checkpoint's (the data's always; the model's
    where the checkpoint has one)."""
    old = saved["settings"]
    keys = [k for k in late if k == "run.data_fingerprint" or k in old]
    return run_dir.check_resume(resume_from, saved["step"], {k: old.get(k) for k in keys},
                                {k: facts.get(k) for k in keys}, cfg.train.allow_config_change, cfg.train.max_steps)


def _save(out, step, model, loss_fn, optimizer, scheduler, bad_in_row, cfg, dist: DistState, facts,
          zero_grad_steps: int = 0) -> None:
    rng = dist.gather_objects(ckpt.rng_state())
    trainable = dist.full_trainable_state(model, _trainable_state)
    optim_state = dist.optimizer_state(model, optimizer)
    if dist.is_main:
        state = {"step": step, "bad_in_row": bad_in_row, "trainable": trainable, "optimizer": optim_state,
                 "scheduler": scheduler.state_dict(), "rng": rng, "world_size": dist.world_size,
                 "zero_grad_steps": zero_grad_steps}
        info = {"step": step, "settings": run_dir.settings_of(cfg.to_dict(), dist.world_size, facts),
                "config": cfg.to_dict()}
        weights = trainable if dist.sharded else None  # FSDP: PEFT cannot read sharded tensors itself
        ckpt.save_checkpoint(out, step, save_adapter=lambda d: _save_weights(model, loss_fn, d, weights), state=state,
                             config=info, keep=cfg.train.keep_checkpoints)
    dist.barrier()


def _save_merged(model, loss_fn, tokenizer, path: Path) -> None:
    merged = loss_fn.method.merged_model(model)
    tmp = path.with_name(path.name + ".tmp")
    merged.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    ckpt.replace_dir(tmp, path)


def _yaml(d: dict) -> str:
    import yaml
    return yaml.safe_dump(json.loads(json.dumps(d)), sort_keys=False)
