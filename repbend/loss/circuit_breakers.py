"""Circuit Breakers (representation rerouting, RR) on a PEFT model (docs/method.md, "Circuit Breakers"):

    L = cb_alpha * s * L_retain + cb_alpha * (1 - s) * L_cb,      s = cb_progress_scale * progress

    L_retain = sum_{i in R} sum_{retain tokens} ||h'_i - h_i||_2      / (|R| * n_retain_rows * P)
    L_cb     = sum_{i in C} sum_{forget tokens} relu(cos(h'_i, h_i))  / (|C| * n_forget_tokens)

h' = trained pass (adapters on, train mode), h = reference pass (adapters off, eval mode, no_grad); hidden-state
index i as everywhere (0 = embeddings, i = output of decoder layer i-1, n_layers = final normed output).
R = `retain_layers` (all = 0 .. n_layers), C = `target_layers` taken as an ordered list with its duplicates (a layer
listed twice counts twice, in the sum and in |C|). Retain tokens: every token of the safe and retain rows; forget
tokens: every token of the unsafe rows. P = `cb_retain_pad_length`: the retain term divides by the length every
retain row would have been padded to, so its scale does not depend on how long the rows are (a longer row is an
error). cos(h', h) = h'.h / (max(|h'|, 1e-8) * max(|h|, 1e-8)), in fp32. progress = optimizer step / max_steps, the
1-based step shared by the micro-batches of one step. A term whose coefficient is 0 is not computed (None).

Shapes: the passes keep `[R, T, D]` outputs (trained) and gathered `[n, D]` rows (reference) in the model's dtype;
every term is float32; both come out of one fused `rep_distance` call per term (its `l2` and `relu_cos` sums).
"""
from __future__ import annotations

from collections import Counter

import torch

from repbend.kernels import rep_distance

from ..errors import ConfigError
from ..model import decoder_layers
from .batch import StepBatch
from .config import LossConfig
from .passes import gathered_reference, trained_pass
from .terms import LossTerms, check_layers, trainable_parameters


class CircuitBreakersObjective:
    """Circuit Breakers on a PEFT model: the reference pass is the same model with its adapters disabled."""

    TERMS = ("retain", "cb")

    def __init__(self, cfg: LossConfig, impl: str = "auto"):
        self.cfg, self.impl = cfg, impl

    def prepare(self, model) -> list[torch.nn.Parameter]:
        """The tensors that train: the LoRA adapters (PEFT marks them requires_grad)."""
        return trainable_parameters(model)

    def layer_sets(self, n_layers: int) -> tuple[list[int], list[int]]:
        """(R, C): the hidden-state indices of L_retain and of L_cb (C in its given order, duplicates kept)."""
        C = check_layers(self.cfg.target_layers, n_layers, "loss.target_layers")
        if self.cfg.retain_layers == "all":
            R = list(range(n_layers + 1))
        else:
            R = check_layers(self.cfg.retain_layers, n_layers, "loss.retain_layers")
        return R, C

    def weights(self, progress: float) -> dict[str, float]:
        """Each term's coefficient at `progress` (= optimizer step / max_steps)."""
        s = self.cfg.cb_progress_scale * progress
        return {"retain": self.cfg.cb_alpha * s, "cb": self.cfg.cb_alpha * (1.0 - s)}

    def __call__(self, model, batch: StepBatch, progress: float | None = None) -> LossTerms:
        if progress is None:
            raise ValueError("circuit_breakers: the coefficients follow a schedule; call the loss with "
                             "progress = optimizer step / max_steps")
        cfg, ix, meta = self.cfg, batch.index, batch.meta
        P = cfg.cb_retain_pad_length
        if meta["retain_longest"] > P:
            raise ConfigError(f"loss.cb_retain_pad_length = {P}, but a retain row of this micro-batch has "
                              f"{meta['retain_longest']} tokens: the retain term divides by the padded length, so "
                              "raise loss.cb_retain_pad_length or lower data.max_retain_tokens / max_request_tokens "
                              "+ max_response_tokens")
        R, C = self.layer_sets(len(decoder_layers(model)))
        weights = self.weights(progress)
        use = {"retain": weights["retain"] != 0 and ix["retain"].numel() > 0,
               "cb": weights["cb"] != 0 and ix["forget"].numel() > 0}
        # C's duplicates are computed once and weighted by their multiplicity
        times = Counter(C)
        C_once = sorted(times)
        reads = {"retain": (R, "retain"), "cb": (C_once, "forget")}
        ref = gathered_reference(model, batch, {t: (layers, ix[key]) for t, (layers, key) in reads.items() if use[t]})
        needed = sorted({i for t, (layers, _) in reads.items() if use[t] for i in layers})
        hs = trained_pass(model, batch, needed) if needed else {}

        parts: dict[str, torch.Tensor | None] = dict.fromkeys(self.TERMS)
        if use["retain"]:
            d = rep_distance([hs[i] for i in R], torch.stack([ref["retain"][i] for i in R]), ix["retain"],
                             impl=self.impl)
            parts["retain"] = d.l2.sum() / (len(R) * meta["retain_rows"] * P)
        if use["cb"]:
            d = rep_distance([hs[i] for i in C_once], torch.stack([ref["cb"][i] for i in C_once]), ix["forget"],
                             impl=self.impl)
            mult = torch.tensor([float(times[i]) for i in C_once], device=d.relu_cos.device)
            parts["cb"] = (d.relu_cos * mult).sum() / (len(C) * ix["forget"].numel())
        return LossTerms.weighted(parts, weights)
