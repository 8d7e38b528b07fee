"""torchrun support: process group, data-parallel LoRA (ddp) or FSDP2 sharding (fsdp), reductions, rank-0 I/O.

One node, 8 GPUs (one process per GPU; `LOCAL_RANK` picks the GPU; NCCL on CUDA, gloo on CPU):

    torchrun --nproc_per_node 8 -m repbend train --config configs/llama3_8b.yaml --distributed.strategy ddp

Without torchrun (WORLD_SIZE unset or 1) everything here is a no-op single process.

Data order: rank r of W at optimizer step s, micro-step k, takes micro-batch index (s*grad_accum + k)*W + r.
One process with grad_accum W*A therefore sees exactly the micro-batches that W processes with grad_accum A, and
(each micro-loss divided by grad_accum, gradients averaged over ranks) takes the same step:
    1 rank:  sum_{j<W*A} g_j / (W*A)      W ranks:  mean_r sum_{k<A} g_{r,k} / A  = the same sum / (W*A).

Strategies (the frozen base is never updated; only the LoRA tensors train):
- ddp: the whole model on every rank; after the last micro-step's backward the LoRA gradients are averaged
  with bucketed all-reduces (`no_sync_unless`). Not torch's DistributedDataParallel wrapper: it expects every
  parameter reachable from the forward's output to get a gradient, but the RepBend loss reads intermediate
  layers, so the adapters of layers past the last one read (e.g. alpha_mode=target without the KL term) get
  none and DDP stops with "Expected to have finished reduction". LoRA gradients are small (Llama-3-8B, r 16,
  7 modules x 31 layers: 41M values), so one reduction after the backward costs little next to the step.
- fsdp: FSDP2 `fully_shard` on every decoder layer and on the decoder stack (embeddings + final norm): frozen
  and LoRA tensors become sharded DTensors; the reduce-scatter averages the LoRA gradients. The LM head (read
  only by the KL term) stays whole on every rank (a head tied to the embeddings is left unsharded).
  Checkpoints and adapters hold the full tensors, gathered by every rank and written by rank 0.

Ranks: every rank starts from the same seed, so the fresh adapters are identical (rank 0's are broadcast anyway).
LoRA dropout draws its masks from generators seeded by (seed, micro-batch index) (`repbend.trainer`), so the
masks of a micro-batch are the same whichever rank computes it: W processes with grad_accum A give the losses and
weights of one process with grad_accum W*A, dropout included, and a resume is exact.

Test hooks (documented, read once at start, checked once per step): REPBEND_FAULT_AT_STEP=N makes the ranks in
REPBEND_FAULT_RANK (comma-separated; default all) fail at the start of step N, by raising `InjectedFault`, or
with REPBEND_FAULT_KIND=exit by `os._exit(17)` (an abrupt death: no cleanup, no traceback).
REPBEND_DIST_TIMEOUT (seconds, default 900) bounds how long a rank waits in a collective for a dead peer.
"""
from __future__ import annotations

import contextlib
import datetime
import importlib
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import NoReturn

import torch
import torch.distributed as tdist

from .model import backbone, lm_head, resolve_device, unwrap

log = logging.getLogger("repbend")

_GROUP_LEFT = False  # this process left a process group with `leave_process_group` (`left_group`)
BUCKET_NUMEL = 1 << 25  # values per gradient all-reduce (128 MiB in fp32)
DEFAULT_TIMEOUT_S = 900


class InjectedFault(RuntimeError):
    """Raised by the REPBEND_FAULT_AT_STEP test hook."""


@dataclass
class DistState:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    strategy: str = "none"
    owns_group: bool = False            # this process created the process group (and destroys it at the end)
    fault_at_step: int | None = None    # the REPBEND_FAULT_* test hook, for this rank
    fault_kind: str = "raise"
    params: list = field(default_factory=list, repr=False)  # the trainable tensors (set by wrap_model)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def sharded(self) -> bool:
        return self.active and self.strategy == "fsdp"

    # ------------------------------------------------------------ reductions
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
        """Each float averaged over the ranks that have it (None where no rank has it): the logged loss terms are
        those of the global batch. One all-reduce of [values, presence]; every rank must pass the same keys."""
        if not self.active:
            return dict(values)
        keys = list(values)
        have = [values[k] is not None for k in keys]
        t = torch.tensor([float(values[k]) if h else 0.0 for k, h in zip(keys, have)] + [float(h) for h in have],
                         dtype=torch.float64, device=self._comm_device())
        tdist.all_reduce(t)
        n = len(keys)
        return {k: (float(t[i] / t[n + i]) if t[n + i] > 0 else None) for i, k in enumerate(keys)}

    def any_of(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any rank (a decision all ranks must share)."""
        if not self.active:
            return bool(flag)
        t = torch.tensor([int(bool(flag))], dtype=torch.int32, device=self._comm_device())
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return bool(t)

    def check_same(self, value, what: str) -> None:
        """Stop with a clear error (on every rank) unless `value` is the same on all ranks."""
        if not self.active:
            return
        values = self.gather_objects(value)
        if any(v != values[0] for v in values):
            raise RuntimeError(f"the ranks disagree on {what}: " + ", ".join(f"rank {r}: {v}" for r, v in
                                                                          enumerate(values)))

    def broadcast_object(self, obj):
        """Rank 0's `obj` on every rank (single process: the object itself)."""
        if not self.active:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_objects(self, obj) -> object:
        """Every rank's `obj` as a list on all ranks (single process: the object itself)."""
        if not self.active:
            return obj
        out = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out

    # ------------------------------------------------------------ gradients
    @contextlib.contextmanager
    def no_sync_unless(self, runner, sync: bool):
        """Wrap one micro-step's forward and backward. `sync=False` (non-final micro-steps of an accumulation):
        no gradient communication. `sync=True`: ddp averages the LoRA gradients when the block ends; fsdp
        reduce-scatters them during the backward as usual."""
        if not self.active:
            yield
        elif self.strategy == "fsdp":
            if sync:
                yield
            else:
                runner.set_requires_gradient_sync(False)
                try:
                    yield
                finally:
                    runner.set_requires_gradient_sync(True)
        else:
            yield  # an exception skips the reduction below: the job is going down anyway
            if sync:
                self._average_gradients()

    @torch.no_grad()
    def _average_gradients(self) -> None:
        """All-reduce-mean the trainable gradients in flat buckets. A tensor without a gradient on every rank
        keeps none (AdamW then skips it, as in one process); one with a gradient on some ranks counts zeros
        from the others (DDP's semantics)."""
        params = self.params
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=self._comm_device())
        tdist.all_reduce(has)
        live = [p for p, h in zip(params, has.tolist()) if h]
        buckets, bucket, numel = [], [], 0
        for p in live:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if bucket and (numel + p.numel() > BUCKET_NUMEL or p.grad.dtype != bucket[0].grad.dtype):
                buckets.append(bucket)
                bucket, numel = [], 0
            bucket.append(p)
            numel += p.numel()
        for b in buckets + ([bucket] if bucket else []):
            self._reduce_bucket(b)

    def _reduce_bucket(self, bucket) -> None:
        flat = torch.cat([p.grad.reshape(-1) for p in bucket])
        tdist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for p in bucket:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
            offset += p.numel()

    def clip_grad_norm_(self, params, max_norm: float) -> torch.Tensor:
        """`torch.nn.utils.clip_grad_norm_` that also takes FSDP2's sharded gradients: the returned total norm
        (a plain 0-d tensor) is that of the whole gradient. `max_norm <= 0` only measures."""
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.device)
        total = torch.nn.utils.get_total_norm(grads, 2.0)
        if hasattr(total, "full_tensor"):
            total = total.full_tensor()
        if max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return total

    # ------------------------------------------------------------ state
    def full_trainable_state(self, model, local_state_fn) -> dict:
        """The trainable tensors, whole, on the CPU (FSDP2 shards are gathered: every rank must call this)."""
        return _gather_trainable(model) if self.sharded else local_state_fn(model)

    def adapter_state(self, model) -> dict | None:
        """The full LoRA state for `save_pretrained(state_dict=...)` under FSDP (every rank must call this);
        None otherwise (PEFT then reads the model itself)."""
        return _gather_trainable(model) if self.sharded else None

    @torch.no_grad()
    def load_trainable(self, model, state: dict, local_load_fn) -> None:
        """Copy the full tensors of `state` into the (possibly sharded) trainable parameters."""
        if not self.sharded:
            return local_load_fn(model, state)
        from torch.distributed.tensor import distribute_tensor

        params = dict(model.named_parameters())
        missing = [n for n in state if n not in params]
        if missing:
            raise ValueError(f"checkpoint does not match the model: unknown parameters {missing[:3]}...")
        for n, v in state.items():
            p = params[n]
            if hasattr(p, "device_mesh"):
                v = distribute_tensor(v.to(p.device, p.dtype), p.device_mesh, p.placements, src_data_rank=None)
            p.copy_(v)

    def optimizer_state(self, model, optimizer) -> dict:
        """The optimizer state to checkpoint (every rank must call this under FSDP: rank 0 gets it whole)."""
        if not self.sharded:
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        return get_optimizer_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_optimizer_state(self, model, optimizer, state: dict) -> None:
        if not self.sharded:
            return optimizer.load_state_dict(state)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))

    def restore_rng(self, saved) -> None:
        """Set this rank's generators from a checkpoint's RNG states (one dict, or a list with one per rank)."""
        from .checkpoint import set_rng_state
        if not isinstance(saved, list):
            return set_rng_state(saved)
        if len(saved) != self.world_size:  # tests/test_distributed.py: 2 processes resumed on 1 is bit-exact
            log.info("the checkpoint was written by %d processes and this run has %d: each micro-batch and its "
                     "dropout masks are a function of the micro-batch index alone, so with the same grad_accum x "
                     "processes (checked above) the run takes the same steps, weights bit for bit (the logged loss "
                     "and terms are means summed in another order: float32's last bit may differ); rank r takes "
                     "rank r mod %d's saved RNG state, which no training step draws from", len(saved),
                     self.world_size, len(saved))
        set_rng_state(saved[self.rank % len(saved)])

    # ------------------------------------------------------------ faults and shutdown
    def fault_point(self, step: int) -> None:
        """The REPBEND_FAULT_AT_STEP test hook (see the module docstring); `step` counts from 1."""
        if self.fault_at_step is None or step != self.fault_at_step:
            return
        if self.fault_kind == "exit":
            os._exit(17)
        raise InjectedFault(f"REPBEND_FAULT_AT_STEP={step}: injected failure on rank {self.rank}")

    def shutdown(self) -> None:
        """Leave the process group this process created (a caller's own group is left alone)."""
        if self.owns_group and tdist.is_initialized():
            leave_process_group()
            self.owns_group = False

    def _comm_device(self):
        return self.device if self.device.type == "cuda" else torch.device("cpu")


def left_group() -> bool:
    """Whether this process left a process group with `leave_process_group` (a run that joined one of its own does
    when it ends; `end_process` then exits without the interpreter's teardown)."""
    return _GROUP_LEFT


def leave_process_group() -> None:
    """`destroy_process_group`, after emptying the DTensor caches that would keep the group alive past it."""
    global _GROUP_LEFT
    _release_meshes()
    tdist.destroy_process_group()
    _GROUP_LEFT = True


def end_process(code: int) -> NoReturn:
    """`sys.exit(code)`; a process that has left its process group (`left_group`), with everything it wrote closed,
    ends with `os._exit(code)` once its output is flushed, without the interpreter's teardown. torch can keep the
    group's backend and its threads alive until the C++ teardown (on torch 2.11, an FSDP2 strategy cache that
    `_release_meshes` does not reach holds it), where gloo now and then aborts a finished rank (SIGABRT, "terminate
    called without an active exception") and torchrun fails the whole job."""
    if _GROUP_LEFT:
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


def _gather_trainable(model) -> dict[str, torch.Tensor]:
    """name -> full CPU tensor of every trainable parameter; DTensor shards are all-gathered one tensor at a time."""
    state = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            state[n] = full.detach().cpu().clone()
    return state


def _fault_hook(rank: int) -> tuple[int | None, str]:
    at = os.environ.get("REPBEND_FAULT_AT_STEP")
    if not at:
        return None, "raise"
    ranks = os.environ.get("REPBEND_FAULT_RANK")
    if ranks and rank not in {int(r) for r in ranks.split(",")}:
        return None, "raise"
    kind = os.environ.get("REPBEND_FAULT_KIND", "raise")
    if kind not in ("raise", "exit"):
        raise ValueError(f"REPBEND_FAULT_KIND must be raise or exit; got {kind!r}")
    return int(at), kind


def bind_world_defaults() -> None:
    """Call before `init_process_group`. Imports the torch modules whose functions take `group=group.WORLD` as a
    default argument before the process group exists, so that the default they bind is None and not the group. Imported later (transformers and FSDP
    import `torch.distributed.nn.functional` on the way), they keep the default group alive past
    `destroy_process_group`: its backend and threads then live on into the interpreter's C++ teardown, where gloo
    now and then aborts a rank that has finished ("terminate called without an active exception", SIGABRT) and
    torchrun reports the whole job as failed. tests/test_distributed.py checks that the group is gone."""
    try:
        import torch.distributed.nn.functional  # noqa: F401
    except ImportError:  # pragma: no cover - a torch without it: nothing binds the group
        pass


def _release_meshes() -> None:
    """DTensor's caches (sharding strategies and propagation, redistribution plans) keep every device mesh they saw,
    and with it the process group: empty them before `destroy_process_group` (`bind_world_defaults` says why a
    group that outlives it matters). Which caches exist changes between torch releases, so every functools cache of
    `torch.distributed` is emptied, and the two that are not functools caches by name where they exist (a cache
    costs only its next first call). tests/test_distributed.py checks that the group is gone."""
    import functools
    import gc
    import warnings

    with warnings.catch_warnings():  # isinstance() on torch's deprecated aliases warns
        warnings.simplefilter("ignore")
        caches = [obj for obj in gc.get_objects() if isinstance(obj, functools._lru_cache_wrapper)
                  and str(getattr(obj, "__module__", "")).startswith("torch.distributed.")]
    for cache in caches:
        cache.cache_clear()
    for module, name in (("torch.distributed.tensor._redistribute", "clear_redistribute_planner_cache"),
                         ("torch._C", "_clear_DTensor_sharding_propagator_cache")):
        try:
            fn = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
        fn()


def init_distributed(cfg, device: str = "auto") -> DistState:
    """Join the torchrun process group when WORLD_SIZE > 1; pick this rank's device (cuda:LOCAL_RANK)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        at, kind = _fault_hook(0)
        return DistState(device=resolve_device(device), fault_at_step=at, fault_kind=kind)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if dev.type == "cuda" else "gloo")
    owns = not tdist.is_initialized()
    if owns:
        bind_world_defaults()
        seconds = int(os.environ.get("REPBEND_DIST_TIMEOUT", getattr(cfg, "timeout_s", None) or DEFAULT_TIMEOUT_S))
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        tdist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=seconds), **kwargs)
    at, kind = _fault_hook(rank)
    if rank != 0:  # one copy of the logs and progress bars: rank 0's (warnings and errors still show)
        logging.getLogger("repbend").setLevel(logging.WARNING)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        try:
            from transformers.utils import logging as hf_logging
            hf_logging.set_verbosity_warning()
            hf_logging.disable_progress_bar()
        except ImportError:
            pass
    return DistState(rank=rank, world_size=world, local_rank=local_rank, device=dev, strategy=cfg.strategy,
                     owns_group=owns, fault_at_step=at, fault_kind=kind)


def wrap_model(model, cfg, dist: DistState, params=None):
    """Prepare `model` (on `dist.device`) for data parallelism and return its decoder stack (the module whose
    gradient sync `no_sync_unless` controls). Call it before building the optimizer: FSDP2 replaces the parameters
    by DTensors. Records the trained tensors in `dist.params` (`params`: the method's, or every tensor that
    requires grad)."""
    stack = backbone(model)
    ids = {id(p) for p in params} if params is not None else None
    trained = {n for n, p in model.named_parameters() if p.requires_grad and (ids is None or id(p) in ids)}
    if dist.active:
        with torch.no_grad():  # identical starting adapters on every rank
            for p in model.parameters():
                if p.requires_grad:
                    tdist.broadcast(p.data, src=0)
    if dist.sharded:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(dist.device.type, (dist.world_size,))
        head = lm_head(model).weight
        ignored = {p for p in stack.parameters() if p is head}  # a tied head stays whole for the KL term
        for layer in stack.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(stack, mesh=mesh, ignored_params=ignored or None)
    dist.params = [p for n, p in model.named_parameters() if n in trained]  # by name: FSDP2 made new tensors
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


__all__ = ["DistState", "InjectedFault", "init_distributed", "wrap_model", "unwrap_for_save", "destroy", "unwrap"]
