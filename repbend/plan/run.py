"""One planned step: a variant of the step benchmark run under FakeTensorMode with a `StepMeter`, and what it says
per GPU: peak memory by kind, FLOPs, positions and useful tokens.

Kinds of the bytes live at the peak (by the phase that allocated them, `benchmarks/step_variants.Phases` names):
    parameters      what exists before the first step: weights, adapters, frozen copies (RMU), buffers
    gradients       the trained tensors' .grad
    optimizer       what the optimizer step allocates and keeps (AdamW's two moments, its step counters)
    activations     allocated by a trained forward pass ("lora_forward") and kept for the backward
    reference       allocated by a reference pass ("ref_forward") and kept: RepBend's gathered rows, the reference
                    code's stacked hidden states and logits
    temporaries     everything else: the terms, the backward's temporaries and recompute, fused ops' buffers
Sharding (`strategy="fsdp"` over `gpus` GPUs, FSDP2 per decoder layer as repbend/distributed.py does): parameters,
gradients and optimizer state divided by the GPU count, plus two decoder layers' unsharded weights (the one running
and the one prefetched); activations and the rest as planned; the decoder stack runs whole (FSDP2 cannot stop at a
layer), which the fake step reproduces.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field

import torch

from ..kernels._dispatch import planned_device
from ..model import LoraSettings, decoder_layers
from . import workload
from .fake import BoundedSizes, fake_mode, fake_model
from .meter import MODEL, StepMeter

KIND_OF_PHASE = {MODEL: "parameters", "gradients": "gradients", "optimizer": "optimizer",
                 "lora_forward": "activations", "ref_forward": "reference"}
KINDS = ("parameters", "gradients", "optimizer", "activations", "reference", "temporaries")


@dataclass
class Setup:
    """What to plan: the model config, dtype and device kind it runs on, the method's loss settings, the batch."""
    name: str
    config: object                      # transformers config
    method: str
    loss_cfg: object                    # repbend.loss.LossConfig
    batch_size: int
    device: str = "cuda"                # the device the plan is for: cuda (bf16 autocast, Triton ops) or cpu
    dtype: torch.dtype = torch.bfloat16
    checkpointing: bool = True
    pack_length: int = 1024             # 0: one row per sequence (train.packing false)
    lora: LoraSettings = field(default_factory=LoraSettings)
    lora_layers: list[int] | None = None  # None: the benchmark's recipe layers
    steps: int = 1                      # micro-batches planned (0, 1, ...); the peak is the largest
    seed: int = 42
    scale: float = 1.0                  # the step benchmark's --scale (sequence lengths, padding, pack length)
    peak_from: int = 0                  # the first micro-batch whose peak counts (the bench measures from 1)
    gpus: int = 1
    strategy: str = "ddp"


@dataclass
class VariantPlan:
    variant: str
    method: str
    peak_bytes: int                     # per GPU, allocated (sharded under fsdp)
    kinds: dict[str, int]               # the peak's bytes by kind (KINDS)
    flops_per_step: float               # mean over the planned micro-batches
    useful_tokens: float                # mean per micro-batch
    positions: float                    # mean positions per pass
    flops_by_phase: dict[str, float]
    flops_by_op: dict[str, float]
    uncounted_ops: list[str]
    fused_buffers: tuple                # (op, bytes) of the fused op holding internal buffers at the peak
    unsharded_peak_bytes: int
    steps_flops: list[int] = field(default_factory=list)      # per planned micro-batch
    steps_useful: list[int] = field(default_factory=list)
    steps_positions: list[int] = field(default_factory=list)
    steps_peak_bytes: list[int] = field(default_factory=list)  # unsharded

    @property
    def flops_per_token(self) -> float:
        return self.flops_per_step / self.useful_tokens

    @property
    def positions_per_token(self) -> float:
        return self.positions / self.useful_tokens


class _Phases:
    """benchmarks/step_variants.Phases for a planned step: each mark names the meter's allocations; after the
    backward, the trained tensors' gradients are noted."""

    def __init__(self, meter: StepMeter, model):
        self.meter, self.model, self.acc, self.sync = meter, model, {}, (lambda: None)

    def start(self):
        pass

    def mark(self, name):
        self.meter.mark(name)
        if name == "backward":
            self.meter.note_gradients(self.model.parameters())


def _as_fsdp(on: bool):
    """Under FSDP2 the decoder stack runs whole (repbend.loss.passes.run_backbone cannot stop at a layer of a
    sharded stack): the same here, by running the backbone without its stop for the duration."""
    if not on:
        return contextlib.nullcontext()
    import sys

    from ..loss import passes

    original = passes.run_backbone

    def whole(model, batch, upto=None):
        return original(model, batch, None)

    @contextlib.contextmanager
    def patched():
        owners = [m for name, m in list(sys.modules.items())
                  if name.startswith("repbend.loss") and getattr(m, "run_backbone", None) is original]
        for m in owners:
            m.run_backbone = whole
        try:
            yield
        finally:
            for m in owners:
                m.run_backbone = original
    return patched()


def plan_variant(setup: Setup, variant: str) -> VariantPlan:
    """Run `setup.steps` micro-batches of `variant` (a benchmark variant of setup.method) on a fake model."""
    sw, sv = workload.bench_modules()
    n_layers = workload.n_layers_of(setup.config)
    layers = workload.lora_layers_for(setup.method, n_layers, setup.lora_layers)
    # a copy: a variant may change the config (the RMU reference cuts the model to L+1 layers)
    model = workload.meta_model(copy.deepcopy(setup.config), setup.dtype, setup.checkpointing, setup.lora, layers)
    mode = fake_mode()
    fake_model(model, mode)
    micros = workload.micro_batches(setup.config.vocab_size, setup.batch_size, setup.seed, setup.steps, setup.method,
                                    setup.scale)
    meter = StepMeter()
    phases = _Phases(meter, model)
    gpu = setup.device == "cuda"
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if gpu and setup.dtype != torch.float32
                else contextlib.nullcontext())
    fsdp = setup.strategy == "fsdp" and setup.gpus > 1
    flops, useful, positions = [], [], []
    meter.adopt(list(model.parameters()) + list(model.buffers()))
    with planned_device(setup.device), _as_fsdp(fsdp), mode, BoundedSizes(), meter:
        step = sv.make_step(variant, model, setup.loss_cfg, n_layers, torch.device("cpu"), autocast, phases,
                            setup.scale, pack_length=setup.pack_length)
        meter.mark(MODEL)  # what make_step set up: the trained tensors, frozen copies
        model.train()
        passes = contextlib.nullcontext()
        if variant == setup.method:
            with contextlib.suppress(Exception):  # the shipped objective's passes named in the phases
                passes = sv.timed_passes(phases, setup.method)
        peaks = []
        with passes:
            for k, micro in enumerate(micros):
                before, start = sum(meter.flops_by_op.values()), meter.events
                meter.reset_peak()
                loss, parts, n_useful, n_pos = step(micro, k)
                meter.mark("optimizer")
                del loss, parts
                # the first step's peak comes before the optimizer has its state: as every later step, it holds
                # the state the first step leaves behind
                state = meter.live_bytes("optimizer", born_after=start) if k == 0 else 0
                peaks.append((meter.peak.bytes + state, state, meter.peak))
                flops.append(sum(meter.flops_by_op.values()) - before)
                useful.append(n_useful)
                positions.append(n_pos)
    counted = peaks[setup.peak_from:] or peaks
    total, state, worst = max(counted, key=lambda p: p[0])
    rep = meter.report(worst)
    kinds = dict.fromkeys(KINDS, 0)
    for phase, nbytes in rep.peak_by_phase.items():
        kinds[KIND_OF_PHASE.get(phase, "temporaries")] += nbytes
    kinds["optimizer"] += state
    peak = total
    if fsdp:
        kinds, peak = _sharded(kinds, peak, model, setup.gpus)
    steps = len(micros)
    return VariantPlan(
        variant=variant, method=setup.method, peak_bytes=peak, kinds=kinds, flops_per_step=sum(flops) / steps,
        useful_tokens=sum(useful) / steps, positions=sum(positions) / steps,
        flops_by_phase={k: v / steps for k, v in rep.flops_by_phase.items()},
        flops_by_op={k: v / steps for k, v in rep.flops_by_op.items()}, uncounted_ops=rep.uncounted,
        fused_buffers=rep.peak_transient, unsharded_peak_bytes=total, steps_flops=flops, steps_useful=useful,
        steps_positions=positions, steps_peak_bytes=[p[0] for p in peaks])


def _sharded(kinds: dict, peak: int, model, gpus: int) -> tuple[dict, int]:
    """Per-GPU bytes under FSDP2 over `gpus` GPUs (module docstring)."""
    layer_bytes = max(sum(p.numel() * p.element_size() for p in layer.parameters())
                      for layer in decoder_layers(model))
    out = dict(kinds)
    for k in ("parameters", "gradients", "optimizer"):
        out[k] = -(-kinds[k] // gpus)
    out["parameters"] += 2 * layer_bytes
    return out, peak - sum(kinds.values()) + sum(out.values())
