"""The RepBend training loop: reference pass, LoRA pass, loss, backward, step. Nothing else hides here.

    from repbend import RepBendConfig, train
    result = train(RepBendConfig.load("configs/llama3_8b.yaml", ["--train.max_steps", "10"]))
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import checkpoint as ckpt
from .batching import collate
from .config import RepBendConfig, parse_layers
from .distributed import DistState, init_distributed, wrap_model
from .metrics import StepLogger, peak_memory_bytes
from .model import LoraSettings, attach_lora, decoder_layers, load_model_and_tokenizer
from .objective import TERMS, repbend_loss

log = logging.getLogger("repbend")


class TrainingError(RuntimeError):
    pass


@dataclass
class TrainResult:
    output_dir: str
    adapter_dir: str
    steps: int
    history: list[dict] = field(default_factory=list)
    stopped: str | None = None       # why the run ended before max_steps, if it did


def lr_factor(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    """The multiplier of the base learning rate at optimizer step `s` (HF's warm-up conventions)."""
    def f(s: int) -> float:
        if s < warmup:
            return s / max(1, warmup)
        if schedule == "constant":
            return 1.0
        progress = (s - warmup) / max(1, total - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return f


def seed_everything(seed: int) -> None:
    import random

    import numpy as np
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_model(cfg: RepBendConfig, model=None, tokenizer=None, dist: DistState | None = None):
    """Load the base model (unless given), attach fresh LoRA adapters and set the training switches."""
    if model is None:
        if cfg.model.path is None:
            raise TrainingError("model.path is not set: give --model.path DIR (an HF model directory or hub name)")
        device = dist.device if dist else cfg.model.device
        model, tokenizer = load_model_and_tokenizer(
            cfg.model.path, dtype=cfg.model.dtype, device=str(device),
            attn_implementation=cfg.model.attn_implementation, liger=cfg.model.liger)
    n_layers = len(decoder_layers(model))
    U = cfg.loss.target_layers
    if max(U) > n_layers:
        raise TrainingError(f"loss.target_layers goes up to {max(U)} but the model has hidden-state indices "
                            f"0..{n_layers} ({n_layers} decoder layers)")
    if cfg.lora.layers_to_transform is None:  # the recipe: decoder layers 0 .. the last target index
        layers = list(range(min(max(U), n_layers - 1) + 1))
    else:
        layers = parse_layers(cfg.lora.layers_to_transform)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraSettings(cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules)
    model = attach_lora(model, lora, layers)
    return model, tokenizer, n_layers


def build_data(cfg: RepBendConfig, tokenizer):
    from .data.chat import Limits
    from .data.pools import build_pools

    d = cfg.data
    if not (d.wildguardmix or d.wildjailbreak):
        raise TrainingError("no safe/unsafe data: give --data.wildguardmix FILE and/or --data.wildjailbreak FILE")
    if cfg.loss.epsilon and not d.ultrachat:
        raise TrainingError("loss.epsilon > 0 needs retain data: give --data.ultrachat FILE (or set --loss.epsilon 0)")
    limits = Limits(d.max_request_tokens, d.max_response_tokens, d.max_retain_tokens)
    pools = build_pools(tokenizer, d.wildguardmix, d.wildjailbreak, d.ultrachat, request_only=cfg.loss.request_only,
                        limits=limits, max_examples_per_pool=d.max_examples_per_pool, skip_invalid=d.skip_invalid,
                        seed=cfg.train.seed)
    return pools


def train(cfg: RepBendConfig, *, model=None, tokenizer=None, pools=None,
          evaluate: Callable[[object, int], dict] | None = None) -> TrainResult:
    """Train LoRA adapters with RepBend. `model`/`tokenizer`/`pools` may be given (the demo and tests do);
    otherwise they come from `cfg`. `evaluate(model, step) -> dict` runs every `train.eval_every` steps; its
    dict is logged, and a true `stop` key in it ends the run there (the adapter of that step is kept)."""
    t = cfg.train
    dist = init_distributed(cfg.distributed, cfg.model.device)
    seed_everything(t.seed)
    out = Path(t.output_dir)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(_yaml(cfg.to_dict()), encoding="utf-8")
    model, tokenizer, n_layers = prepare_model(cfg, model, tokenizer, dist)
    model.to(dist.device)
    if pools is None:
        pools = build_data(cfg, tokenizer)
    if dist.is_main:
        log.info("data:\n%s", pools.report.summary())
    from .data.sampler import MicroBatchSampler
    sampler = MicroBatchSampler(pools, t.batch_size, t.seed, request_only=cfg.loss.request_only,
                                group_by_length=cfg.data.group_by_length)

    if t.merge and dist.sharded:
        raise TrainingError("train.merge is not supported with distributed.strategy fsdp; merge the saved adapter "
                            "afterwards, or use ddp")
    runner = wrap_model(model, cfg.distributed, dist)  # before the optimizer: FSDP2 swaps the parameters
    dist.seed_per_rank(t.seed)
    if evaluate is None and t.eval_every and t.eval_heldout:
        from .heldout import heldout_evaluator
        evaluate = heldout_evaluator(t.eval_heldout, tokenizer)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(t.schedule, t.warmup_steps, t.max_steps))

    step, bad_in_row = 0, 0
    resume_from = _resume_path(t)
    dist.check_same(resume_from and resume_from.name, "the checkpoint to resume from (train.output_dir must be on "
                    "a filesystem that every node shares)")
    if resume_from is not None:
        state = ckpt.load_state(resume_from)
        dist.load_trainable(model, state["trainable"], _load_trainable)
        dist.load_optimizer_state(model, optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        dist.restore_rng(state["rng"])
        step, bad_in_row = state["step"], state["bad_in_row"]
        if dist.is_main:
            log.info("resumed from %s at step %d", resume_from, step)

    device = dist.device
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else torch.autocast("cpu", enabled=False))
    logger = StepLogger(out, enabled=dist.is_main, progress=t.progress, tensorboard=t.tensorboard,
                        total=t.max_steps, initial=step)
    history, stopped = [], None
    model.train()
    while step < t.max_steps:
        dist.fault_point(step + 1)  # REPBEND_FAULT_AT_STEP test hook (repbend.distributed)
        t0 = time.perf_counter()
        acc: dict[str, torch.Tensor] = {}  # the micro-batches' mean of each term, read once per step
        tokens = positions = 0
        for k in range(t.grad_accum):  # micro index: a pure function of (step, k, rank), see the sampler
            index = (step * t.grad_accum + k) * dist.world_size + dist.rank
            micro = sampler(index)
            batch = collate(micro, cfg.loss, tokenizer.pad_token_id,
                            t.pack_length if t.packing else None).to(device)
            with autocast, dist.no_sync_unless(runner, k == t.grad_accum - 1):
                terms = repbend_loss(model, batch, cfg.loss, n_layers, runner=runner)
                (terms.total / t.grad_accum).backward()
            for name, v in terms.detached().items():
                acc[name] = acc[name] + v / t.grad_accum if name in acc else v / t.grad_accum
            tokens += batch.useful_tokens
            positions += batch.input_ids.numel()
        sums = dict.fromkeys(("loss",) + TERMS)
        sums.update(zip(acc, torch.stack(list(acc.values())).float().tolist()))  # the step's one host sync
        sums = dist.mean_of(sums)
        grad_norm = dist.clip_grad_norm_(params, t.max_grad_norm)
        finite = math.isfinite(sums["loss"]) and bool(torch.isfinite(grad_norm))
        if finite:
            optimizer.step()
            bad_in_row = 0
        else:
            bad_in_row += 1
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step += 1
        elapsed = time.perf_counter() - t0
        record = {"step": step, **sums, "lr": scheduler.get_last_lr()[0],
                  "grad_norm": float(grad_norm), "skipped": not finite,
                  "tokens": dist.sum_of(tokens), "padded_positions": dist.sum_of(positions),
                  "tokens_per_s": dist.sum_of(tokens) / elapsed, "step_s": elapsed,
                  "peak_mem_bytes": peak_memory_bytes(device)}
        if not finite and dist.is_main:
            log.warning("step %d: non-finite loss or gradient (loss=%s, grad_norm=%s); update skipped (%d in a row)",
                        step, sums["loss"], float(grad_norm), bad_in_row)
        if bad_in_row >= t.max_bad_steps:
            logger.write(record)
            logger.close()
            last = ckpt.latest_checkpoint(out)
            raise TrainingError(f"{bad_in_row} steps in a row had a non-finite loss or gradient (last at step {step}); "
                                f"stopping. The last good checkpoint is {last or 'none (no checkpoint was saved)'}; "
                                "lower train.lr or loss.beta, or check the data")
        if evaluate is not None and t.eval_every and step % t.eval_every == 0:
            model.eval()
            metrics = evaluate(model, step)
            model.train()
            record["eval"] = {k: v for k, v in metrics.items() if k != "stop"}
            if dist.any_of(metrics.get("stop")):  # every rank must leave the loop at the same step
                stopped = f"the periodic evaluation asked to stop at step {step}"
        logger.write(record)
        history.append(record)
        if (t.save_every and step % t.save_every == 0) or step == t.max_steps or stopped:
            _save(out, step, model, optimizer, scheduler, bad_in_row, cfg, dist)
        if stopped:
            break
    logger.close()
    adapter_dir = out / "adapter"
    full = dist.adapter_state(model)
    if dist.is_main:
        _save_adapter(model, adapter_dir, full)
        if t.merge:
            _save_merged(model, tokenizer, out / "merged")
    dist.barrier()
    dist.shutdown()
    return TrainResult(str(out), str(adapter_dir), step, history, stopped)


# ---------------------------------------------------------------- helpers
def _resume_path(t) -> Path | None:
    if t.resume in (None, False, "", "false", "none"):
        return None
    if t.resume in (True, "auto", "true", "latest"):
        return ckpt.latest_checkpoint(t.output_dir)  # None: nothing to resume, start fresh
    p = Path(str(t.resume))
    if not (p / "state.pt").is_file():
        raise TrainingError(f"train.resume: {p} is not a checkpoint directory (no state.pt in it)")
    return p


def _trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def _load_trainable(model, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n in state if n not in params]
    if missing:
        raise TrainingError(f"checkpoint does not match the model: unknown parameters {missing[:3]}...")
    with torch.no_grad():
        for n, v in state.items():
            params[n].copy_(v)


def _save_adapter(model, path: Path, state: dict | None = None) -> None:
    """PEFT's adapter files; `state` = the full LoRA tensors when the model's are sharded (FSDP)."""
    from .distributed import unwrap_for_save
    unwrap_for_save(model).save_pretrained(str(path), state_dict=state)


def _save(out, step, model, optimizer, scheduler, bad_in_row, cfg, dist: DistState) -> None:
    rng = dist.gather_objects(ckpt.rng_state())
    trainable = dist.full_trainable_state(model, _trainable_state)
    optim_state = dist.optimizer_state(model, optimizer)
    if dist.is_main:
        state = {"step": step, "bad_in_row": bad_in_row, "trainable": trainable, "optimizer": optim_state,
                 "scheduler": scheduler.state_dict(), "rng": rng, "config": cfg.to_dict(), "world_size": dist.world_size}
        adapter = trainable if dist.sharded else None  # FSDP: PEFT cannot read sharded tensors itself
        ckpt.save_checkpoint(out, step, save_adapter=lambda d: _save_adapter(model, d, adapter), state=state,
                             keep=cfg.train.keep_checkpoints)
    dist.barrier()


def _save_merged(model, tokenizer, path: Path) -> None:
    merged = model.merge_and_unload()
    merged.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))


def _yaml(d: dict) -> str:
    import yaml
    return yaml.safe_dump(json.loads(json.dumps(d)), sort_keys=False)
