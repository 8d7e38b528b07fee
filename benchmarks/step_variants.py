"""One training step of each variant of benchmarks/bench_step.py, on the same model, micro-batch and optimizer
settings (AdamW lr 1e-5, clip 1.0, over the method's trained tensors):

  a shipped variant (repbend, circuit_breakers, ...)  the trainer's step as shipped: `RepBendLoss(cfg)` collate
                                  (sequences packed into rows of at most PACK_LENGTH tokens) + loss + backward + clip
                                  + AdamW step; "+padded": one row per sequence, padded to the micro-batch's longest
  a reference variant             the method's re-creation of the reference code (benchmarks/methods.py)
Circuit Breakers' coefficient schedule reads progress = (k + 1) / CB_MAX_STEPS at step k, the same in both of its
variants (the other methods ignore it). A step returns (loss tensor, {term: tensor}, useful tokens, positions per
pass).
"""
from __future__ import annotations

import contextlib
import time

from methods import BENCH
from step_workload import METHOD_OF, PACK_LENGTH, PAD_ID

CB_MAX_STEPS = 150  # the published recipe's step count
RMU_START_SEED = 1234
RMU_START_STD = 0.05


def perturb(params, seed: int) -> None:
    """RMU's trained tensors start at w + N(0, (RMU_START_STD * std(w))^2), drawn the same in both RMU variants (as
    LoRA B starts off zero): with w untouched h' == h and the retain term would be 0 at the checked step."""
    import torch
    from torch._subclasses.fake_tensor import is_fake

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            if is_fake(p):  # a planned step (repbend plan): no values to move
                continue
            noise = torch.randn(p.shape, generator=g) * (RMU_START_STD * float(p.float().std()))
            p.add_(noise.to(p.device, p.dtype))


class Phases:
    """Host-side time per phase of a step; `sync` makes it meaningful on GPU (and costs a little there)."""

    def __init__(self, sync):
        self.sync, self.acc, self.t = sync, {}, time.perf_counter()

    def start(self):
        self.sync()
        self.t = time.perf_counter()

    def mark(self, name):
        self.sync()
        now = time.perf_counter()
        self.acc[name] = self.acc.get(name, 0.0) + now - self.t
        self.t = now


def make_step(variant: str, model, loss_cfg, n_layers: int, device, autocast, phases: Phases, scale: float = 1.0,
              pack_length: int | None = None):
    """A function (micro, k) -> (loss, parts, useful tokens, positions per pass) doing one full step of `variant`.
    Builds the optimizer over the variant's trained tensors (RMU: `prepare` runs here, before any update).
    pack_length: the shipped steps' row length (None: PACK_LENGTH x scale; 0: one row per sequence)."""
    import torch

    from repbend.loss import RepBendLoss

    method = METHOD_OF[variant]
    loss_fn = RepBendLoss(loss_cfg)
    shipped = variant in BENCH[method].variants
    ref = None if shipped else BENCH[method].reference(variant, loss_cfg, n_layers, scale)
    params = loss_fn.prepare(model) if shipped else ref.prepare(model)
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
    if loss_fn.method.TRAINS == "full":
        perturb(params, RMU_START_SEED)
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)  # the recipes

    def finish():
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # the optimizer's tensors only (RMU's reference keeps the others')
        phases.mark("optimizer")

    def progress(k):
        return (k + 1) / CB_MAX_STEPS

    if shipped:
        pack = round(PACK_LENGTH * scale) if pack_length is None else (pack_length or None)
        if variant.endswith("+padded"):
            pack = None

        def step(micro, k):
            phases.start()
            batch = loss_fn.collate(micro, PAD_ID, pack).to(device)
            phases.mark("collate")
            with autocast:
                terms = loss_fn(model, batch, progress=progress(k))
                phases.mark("loss_terms")
                terms.total.backward()
            phases.mark("backward")
            finish()
            return terms.total.detach(), terms.parts, batch.useful_tokens, batch.input_ids.numel()
        return step

    from reference_recipe import free_memory

    def step(micro, k):
        phases.start()
        rb = ref.batch(micro).to(device)
        phases.mark("collate")
        with autocast:
            total, parts = ref.loss(model, rb, progress(k), phases.mark)
            total.backward()
        phases.mark("backward")
        if ref.gc:
            free_memory(device)
            phases.mark("gc")
        finish()
        return total.detach(), parts, rb.useful_tokens, rb.positions
    return step


def positions_of(variant: str, micro, loss_cfg, scale: float) -> int:
    """Positions one pass of `variant` computes for `micro` (no model): its layout's padding."""
    from repbend.loss import RepBendLoss

    method = METHOD_OF[variant]
    if variant in BENCH[method].variants:
        pack = None if variant.endswith("+padded") else round(PACK_LENGTH * scale)
        return RepBendLoss(loss_cfg).collate(micro, PAD_ID, pack).input_ids.numel()
    return BENCH[method].reference(variant, loss_cfg, 0, scale).batch(micro).positions


@contextlib.contextmanager
def dropout_off(model):
    """Dropout p = 0 (train mode kept): step 0 gives the same loss in every variant of a method."""
    import torch
    saved = [(m, m.p) for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    for m, _ in saved:
        m.p = 0.0
    try:
        yield
    finally:
        for m, p in saved:
            m.p = p


@contextlib.contextmanager
def timed_passes(phases: Phases, method: str):
    """Split the loss of the shipped objective into its reference pass, trained pass and terms in the phase timers
    (restored on exit)."""
    import importlib

    from repbend.methods import REGISTRY

    module_name, _, cls_name = REGISTRY[method].partition(":")
    module = importlib.import_module(module_name)

    def wrap(fn, name):
        def timed(*a, **k):
            phases.mark("loss_terms")
            out = fn(*a, **k)
            phases.mark(name)
            return out
        return timed
    targets = [(module, "trained_pass", "lora_forward")]
    cls = getattr(module, cls_name)
    if hasattr(cls, "_reference"):  # a method with its own reference pass (RMU swaps its frozen tensors in)
        targets.append((cls, "_reference", "ref_forward"))
    else:
        targets.append((module, "gathered_reference", "ref_forward"))
    saved = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in targets]
    for owner, attr, name in targets:
        setattr(owner, attr, wrap(getattr(owner, attr), name))
    try:
        yield
    finally:
        for owner, attr, fn in saved:
            setattr(owner, attr, fn)
