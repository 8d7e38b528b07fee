"""torchrun support: process-group setup, DDP / FSDP2 wrapping, reductions and rank-0 I/O.

Launch with torchrun (one process per GPU; `LOCAL_RANK` picks the GPU, NCCL on CUDA and gloo on CPU):

    torchrun --nproc_per_node 8 -m repbend train --config configs/llama3_8b.yaml --distributed.strategy ddp

Without torchrun (no WORLD_SIZE in the environment) everything here is a no-op single process.

Data order: rank r of W at optimizer step s, micro-step k, takes micro-batch index (s*grad_accum + k)*W + r.
One process with grad_accum W*A therefore sees exactly the micro-batches that W processes with grad_accum A.

What is wrapped is the decoder stack (the model without its LM head), because the step calls the stack directly
(it never computes logits): DDP wraps it and its gradients (the LoRA tensors) are averaged across ranks; FSDP2
(`fully_shard`) shards each decoder layer and the stack itself. The frozen LM head stays whole on every rank.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from .model import backbone, resolve_device, unwrap


@dataclass
class DistState:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    strategy: str = "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.active:
            tdist.barrier()

    def sum_of(self, x: float) -> float:
        if not self.active:
            return x
        t = torch.tensor([float(x)], dtype=torch.float64, device=self._comm_device())
        tdist.all_reduce(t)
        return float(t)

    def mean_of(self, values: dict) -> dict:
        """Average each (non-None) float across ranks: the logged loss terms are those of the global batch."""
        if not self.active:
            return dict(values)
        keys = [k for k, v in values.items() if v is not None]
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self._comm_device())
        tdist.all_reduce(t)
        t /= self.world_size
        out = dict(values)
        out.update({k: float(v) for k, v in zip(keys, t)})
        return out

    def gather_objects(self, obj) -> object:
        """Every rank's `obj` as a list on all ranks (single process: the object itself)."""
        if not self.active:
            return obj
        out = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out

    def full_trainable_state(self, model, local_state_fn) -> dict:
        """The trainable tensors, whole (FSDP2 shards are gathered) — every rank must call this."""
        if self.strategy != "fsdp":
            return local_state_fn(model)
        state = {}
        for n, p in model.named_parameters():
            if p.requires_grad:
                full = p.full_tensor() if hasattr(p, "full_tensor") else p
                state[n] = full.detach().cpu().clone()
        return state

    @contextlib.contextmanager
    def no_sync_unless(self, runner, sync: bool):
        """Skip the gradient all-reduce on the non-final micro-steps of an accumulation."""
        if sync or not self.active:
            yield
        elif self.strategy == "ddp":
            with runner.no_sync():
                yield
        else:  # fsdp2
            runner.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                runner.set_requires_gradient_sync(True)

    def _comm_device(self):
        return self.device if self.device.type == "cuda" else torch.device("cpu")


def init_distributed(cfg, device: str = "auto") -> DistState:
    """Join the torchrun process group when WORLD_SIZE > 1; pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistState(device=resolve_device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if dev.type == "cuda" else "gloo")
    if not tdist.is_initialized():
        timeout = datetime.timedelta(seconds=int(os.environ.get("REPBEND_DIST_TIMEOUT", "1800")))
        tdist.init_process_group(backend=backend, timeout=timeout)
    return DistState(rank=rank, world_size=world, local_rank=local_rank, device=dev, strategy=cfg.strategy)


def wrap_model(model, cfg, dist: DistState):
    """The module each pass calls: the decoder stack, wrapped for DDP or sharded with FSDP2 when distributed."""
    stack = backbone(model)
    if not dist.active:
        return stack
    if dist.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [dist.device.index] if dist.device.type == "cuda" else None
        # LoRA tensors of layers past the last index a step reads get no gradient: let DDP find them
        return DDP(stack, device_ids=ids, find_unused_parameters=True)
    from torch.distributed.fsdp import fully_shard

    for layer in stack.layers:
        fully_shard(layer)
    fully_shard(stack)
    return stack


def unwrap_for_save(model):
    """The PEFT model to call `save_pretrained` on."""
    m = model
    if isinstance(m, torch.nn.parallel.DistributedDataParallel):
        m = m.module
    return m


def destroy() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()


__all__ = ["DistState", "init_distributed", "wrap_model", "unwrap_for_save", "destroy", "unwrap"]
