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

Data (repbend/methods/forget_retain.py): forget = unsafe rows + harmful answers, retain = safe rows + refusals +
retain chats, B of each per micro-batch; every assistant turn with the template's end-of-turn markup, and every
row but the harmful answers drawn with an empty instruction with probability data.empty_request_p; the unsafe rows
are not capped.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from repbend.kernels import rep_distance

from ..config_fields import Group, Layers
from ..errors import ConfigError, TrainingError
from ..loss.passes import gathered_reference, trained_pass
from ..loss.terms import LossTerms, check_layers
from ..model import decoder_layers
from .forget_retain import ForgetRetain, ForgetRetainBatch
from .layers import influenced, scaled, scaled_span


@dataclass
class CircuitBreakersSettings(Group):
    NAME = "loss"

    target_layers: Layers | None = None
    """Hidden-state indices of the rerouting term C (0 = embeddings, i = output of decoder layer i-1), an ordered
    list with its duplicates kept. null = the published list "18,29,20-30" of 32 at the model's depth."""
    retain_layers: Layers | str = "all"
    """Hidden-state indices of the retain term; all = 0 .. n_layers."""
    cb_alpha: float = 10.0
    """Overall coefficient; the retain term gets cb_alpha*s, the rerouting term cb_alpha*(1-s)."""
    cb_progress_scale: float = 0.5
    """s = cb_progress_scale * progress (progress = optimizer step / max_steps)."""
    cb_retain_pad_length: int = 2048
    """P in the retain term's denominator (n_retain_rows * P); a longer retain row is an error."""

    def validate(self) -> None:
        if self.target_layers is not None:
            self.check(len(self.target_layers) > 0, "target_layers", "name at least one layer (or be null)")
            self.check(all(i >= 0 for i in self.target_layers), "target_layers", "hold indices >= 0")
        if isinstance(self.retain_layers, str):
            self.check(self.retain_layers == "all", "retain_layers", "be 'all' or layer indices")
        self.check(self.cb_retain_pad_length >= 1, "cb_retain_pad_length", "be >= 1")


class CircuitBreakers(ForgetRetain):
    """Circuit Breakers on a PEFT model: the reference pass is the same model with its adapters disabled."""

    NAME = "circuit_breakers"
    SUMMARY = "Circuit Breakers (representation rerouting with a LoRA), the paper's baseline"
    Settings = CircuitBreakersSettings
    TERMS = ("retain", "cb")

    data_spec = ForgetRetain.marked_up_spec

    def check_data(self, pools, describe) -> None:
        super().check_data(pools, describe)
        longest = max(self.retain_side(pools), key=len)
        if len(longest) > self.cfg.cb_retain_pad_length:
            raise TrainingError(
                f"{longest.origin}: a retain row of {len(longest)} tokens is longer than loss.cb_retain_pad_length "
                f"= {self.cfg.cb_retain_pad_length}, the length the retain term divides by: raise it, or lower "
                "data.max_retain_tokens (UltraChat) or data.max_request_tokens + data.max_response_tokens")

    def layer_sets(self, n_layers: int) -> tuple[list[int], list[int]]:
        """(R, C): the hidden-state indices of L_retain and of L_cb (C in its given order, duplicates kept)."""
        C = self.cfg.target_layers
        if C is None:
            C = [scaled(18, n_layers), scaled(29, n_layers)] + scaled_span(20, 30, n_layers)
        else:
            C = check_layers(C, n_layers, "loss.target_layers")
        if self.cfg.retain_layers == "all":
            R = list(range(n_layers + 1))
        else:
            R = check_layers(self.cfg.retain_layers, n_layers, "loss.retain_layers")
        return R, C

    def check_model(self, n_layers: int, lora_layers: list[int] | None = None) -> None:
        R, C = self.layer_sets(n_layers)
        if lora_layers is not None:
            influenced({"L_retain": (self.cfg.cb_alpha, R), "L_cb": (self.cfg.cb_alpha, C)}, lora_layers,
                       "lora.layers_to_transform")

    def lora_layers(self, n_layers: int) -> list[int]:
        """Decoder layers 0 .. max(C) (the published adapters end at the last rerouting layer)."""
        _, C = self.layer_sets(n_layers)
        return list(range(min(max(C), n_layers - 1) + 1))

    def weights(self, progress: float) -> dict[str, float]:
        """Each term's coefficient at `progress` (= optimizer step / max_steps)."""
        s = self.cfg.cb_progress_scale * progress
        return {"retain": self.cfg.cb_alpha * s, "cb": self.cfg.cb_alpha * (1.0 - s)}

    def collate(self, micro, pad_id: int, pack_length: int | None = None) -> ForgetRetainBatch:
        return self.collate_sets(micro, pad_id, pack_length)

    def __call__(self, model, batch: ForgetRetainBatch, progress: float | None = None) -> LossTerms:
        if progress is None:
            raise ValueError("circuit_breakers: the coefficients follow a schedule; call the loss with "
                             "progress = optimizer step / max_steps")
        cfg, ix = self.cfg, batch.index
        P = cfg.cb_retain_pad_length
        if batch.retain_longest > P:
            raise ConfigError(f"loss.cb_retain_pad_length = {P}, but a retain row of this micro-batch has "
                              f"{batch.retain_longest} tokens: the retain term divides by the padded length, so "
                              "raise loss.cb_retain_pad_length or lower data.max_retain_tokens / max_request_tokens "
                              "+ max_response_tokens")
        R, C = self.layer_sets(len(decoder_layers(model)))
        weights = self.weights(progress)
        has = {"retain": ix["retain"].numel() > 0, "cb": ix["forget"].numel() > 0}
        use = {t: weights[t] != 0 and has[t] for t in self.TERMS}
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
            parts["retain"] = d.l2.sum() / (len(R) * batch.retain_rows * P)
        if use["cb"]:
            d = rep_distance([hs[i] for i in C_once], torch.stack([ref["cb"][i] for i in C_once]), ix["forget"],
                             impl=self.impl)
            mult = torch.tensor([float(times[i]) for i in C_once], device=d.relu_cos.device)
            parts["cb"] = (d.relu_cos * mult).sum() / (len(C) * ix["forget"].numel())
        return self.total(parts, weights, has)
