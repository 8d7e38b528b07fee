"""Each method's part of the step benchmark, registered in one place: its variants (the shipped step in its layouts,
and its cost-faithful re-creations of the reference code), the recipe's per-device batch, its recipe at a model's
depth, and how its reference re-creation lays out, sets up and computes a step. bench_step, step_workload,
step_variants and `repbend plan` read them from here; a new method adds one entry (and its reference module).

    method            shipped variants           reference variants            reference module
    repbend           repbend, repbend+padded    reference, reference+dynpad   reference_recipe.py
    circuit_breakers  circuit_breakers           cb_reference                  reference_baselines.py
    rmu               rmu                        rmu_reference                 reference_baselines.py
    npo               npo                        npo_reference                 reference_preference.py
    dpo               dpo                        dpo_reference                 reference_preference.py

A shipped variant ending in "+padded" lays out one row per sequence; the others pack. The first reference variant
of a method is the one its ratios are measured against.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

PAD_ID, FIRST_ID = 0, 1   # token 0 pads; data ids are drawn from [FIRST_ID, vocab)
EOS_ID = FIRST_ID + 1     # the models' EOS: Circuit Breakers' reference pads with it (its embedding is not the zero
                          # row of PAD_ID, so its left padding gives no zero hidden state, whose cos would be 0/0)


@dataclass(frozen=True)
class BenchMethod:
    variants: tuple[str, ...]
    references: tuple[str, ...]
    batch_gpu: int                           # the recipe's per-device micro-batch B
    recipe: Callable[[int, float, float], dict]   # (n_layers, scale, eta) -> the method's loss keys
    reference: Callable                      # (variant, loss_cfg, n_layers, scale) -> a reference step's parts
    mfu: bool = True                         # 6 x non-embedding params per token is its FLOPs (passes run full depth)
    tiny: dict | None = None                 # its loss keys on the GPU check's 3-layer test model (every term read)


# ---------------------------------------------------------------- recipes at n decoder layers
def target_layers(n_layers: int) -> list[int]:
    """RepBend's U = 20..30 of 32 at the same relative span: floor(20n/32) .. floor(30n/32) (8 layers: 5..7)."""
    return list(range(20 * n_layers // 32, 30 * n_layers // 32 + 1))


def cb_layers(n_layers: int) -> list[int]:
    """Circuit Breakers' C: the published "18,29,20-30" of 32 at the same relative depth (duplicates kept)."""
    n = n_layers
    return [18 * n // 32, 29 * n // 32] + list(range(20 * n // 32, 30 * n // 32 + 1))


def rmu_layer(n_layers: int) -> int:
    """RMU's hidden-state index L: 7 of 32 (at least 3, so that two layers below it train)."""
    return min(n_layers, max(3, 7 * n_layers // 32))


def rmu_update_layers(n_layers: int) -> list[int]:
    """RMU's trained decoder layers: L-2 .. L (5, 6, 7 of 32; layer L never runs, the reference's quirk)."""
    L = rmu_layer(n_layers)
    return [i for i in range(L - 2, L + 1) if 0 <= i < n_layers]


# ---------------------------------------------------------------- reference steps
class ReferenceStep:
    """One reference variant's pieces: `prepare(model)` (the tensors its optimizer updates, or None: the model's
    trainable ones), `batch(micro)` (its layout: `.to(device)`, `.positions`, `.useful_tokens`),
    `loss(model, batch, progress, mark)` -> (total, parts), and `gc` (free memory after the step, as it does)."""

    gc = False

    def __init__(self, variant: str, cfg, n_layers: int, scale: float):
        self.variant, self.cfg, self.n_layers, self.scale = variant, cfg, n_layers, scale

    def prepare(self, model):
        return None


class RepBendReference(ReferenceStep):
    gc = True

    def __init__(self, *args):
        super().__init__(*args)
        from reference_recipe import DYNAMIC, FIXED, Padding
        self.padding = DYNAMIC if self.variant.endswith("+dynpad") else Padding(
            *(round(w * self.scale) for w in (FIXED.request, FIXED.response, FIXED.retain)))

    def batch(self, micro):
        from reference_recipe import build_reference_batch
        return build_reference_batch(micro, self.cfg, PAD_ID, self.padding)

    def loss(self, model, batch, progress, mark):
        from reference_recipe import reference_loss
        return reference_loss(model, batch, self.cfg, self.n_layers, mark=mark)


class CBReference(ReferenceStep):
    gc = True

    def batch(self, micro):
        from reference_baselines import CBWidths, build_cb_batch
        widths = CBWidths(*(max(1, round(w * self.scale)) for w in (CBWidths.request, CBWidths.response)))
        return build_cb_batch(micro, self.cfg, EOS_ID, widths)  # the reference pads with EOS

    def loss(self, model, batch, progress, mark):
        from reference_baselines import cb_reference_loss
        return cb_reference_loss(model, batch, self.cfg, self.n_layers, progress, mark=mark)


class RMUReferenceStep(ReferenceStep):
    def prepare(self, model):
        from reference_baselines import RMUReference
        self.rmu = RMUReference(self.cfg)
        return self.rmu.prepare(model)

    def batch(self, micro):
        from reference_baselines import build_rmu_batch
        return build_rmu_batch(micro, PAD_ID)

    def loss(self, model, batch, progress, mark):
        return self.rmu.loss(model, batch, mark=mark)


class NPOReference(ReferenceStep):
    def batch(self, micro):
        from reference_preference import build_npo_batch
        return build_npo_batch(micro, PAD_ID)

    def loss(self, model, batch, progress, mark):
        from reference_preference import npo_reference_loss
        return npo_reference_loss(model, batch, self.cfg, mark=mark)


class DPOReference(ReferenceStep):
    def batch(self, micro):
        from reference_preference import build_dpo_batch
        return build_dpo_batch(micro, PAD_ID)

    def loss(self, model, batch, progress, mark):
        from reference_preference import dpo_reference_loss
        return dpo_reference_loss(model, batch, self.cfg, mark=mark)


BENCH = {
    "repbend": BenchMethod(("repbend", "repbend+padded"), ("reference", "reference+dynpad"), 4,
                           lambda n, scale, eta: {"target_layers": target_layers(n), "eta": eta}, RepBendReference,
                           tiny={"target_layers": "1-3", "eta": 0.5}),
    "circuit_breakers": BenchMethod(("circuit_breakers",), ("cb_reference",), 4,
                                    lambda n, scale, eta: {"target_layers": cb_layers(n),
                                                           "cb_retain_pad_length": max(2, round(2048 * scale))},
                                    CBReference, tiny={"target_layers": "1,3,2,3", "cb_retain_pad_length": 512}),
    "rmu": BenchMethod(("rmu",), ("rmu_reference",), 16,
                       lambda n, scale, eta: {"rmu_layer": rmu_layer(n), "rmu_update_layers": rmu_update_layers(n)},
                       RMUReferenceStep, mfu=False, tiny={"rmu_layer": 2, "rmu_update_layers": "0-1"}),
    "npo": BenchMethod(("npo",), ("npo_reference",), 4, lambda n, scale, eta: {}, NPOReference, tiny={}),
    "dpo": BenchMethod(("dpo",), ("dpo_reference",), 16, lambda n, scale, eta: {}, DPOReference, tiny={}),
}


def tiny_config(method: str):
    """The method's LossConfig on the GPU check's 3-layer test model."""
    from repbend.loss import LossConfig
    return LossConfig(method=method, **BENCH[method].tiny)


def shipped(variant: str) -> bool:
    return any(variant in m.variants for m in BENCH.values())


def method_of(variant: str) -> str:
    for name, m in BENCH.items():
        if variant in m.variants + m.references:
            return name
    raise KeyError(f"unknown variant {variant!r}")
