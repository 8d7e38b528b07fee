"""RMU (representation misdirection for unlearning) on the plain HF model (docs/method.md, "RMU"):

    L = L_unlearn + rmu_alpha * L_retain

    L_unlearn = sum_{forget tokens} ||h'_L - c||_2^2 / (B_f * T_f * D)
    L_retain  = sum_{retain tokens} ||h'_L - h_L||_2^2 / (B_r * T_r * D)

L = `rmu_layer`, one hidden-state index (7 = output of decoder layer 6); h' = the model being trained, h = the
original model (eval mode, no_grad); D = the hidden size; B_f, B_r = the rows of each set and T_f, T_r = each set's
longest row in the micro-batch (the mean over a per-set padded [B, T, D] tensor, padding counted as zeros). Forget
tokens: every token of the unsafe rows; retain tokens: every token of the safe and retain rows.

c = the control vector, fixed for the run: u = torch.rand(1, 1, D) from a CPU generator seeded with `rmu_seed`,
cast to bfloat16, then c = u / ||u|| * steering_coeff, all in bfloat16 (so every entry is >= 0).

Trained tensors: full weights, no LoRA. `prepare(model)` returns, in layer order, the parameters named
`rmu_trainable` (relative to a decoder layer, e.g. mlp.down_proj.weight) of the decoder layers `rmu_update_layers`,
freezes every other parameter, keeps a frozen copy of just those tensors (the original weights) and draws c.
One model serves both passes: the reference pass swaps the frozen copies in (an O(1) exchange of the parameters'
storage, no copy) and back. A decoder layer at or past L never runs, so its tensors get no gradient.

Passes: the trained pass runs decoder layers 0 .. L-1 over every row; the reference pass runs the same layers over
the retain rows only (the batch lays the retain set out in its leading rows, `repbend.loss.batch.laid_apart`).

Data: as Circuit Breakers' (repbend/methods/forget_retain.py and circuit_breakers.py). Neither runs the
LM head. Both terms come out of `rep_distance` (its `sq` sums; c is passed as one row expanded with stride 0).

Output: `save_weights` writes the trained tensors as `rmu_weights.safetensors` (names as in the base model's
state dict) and `rmu_weights.json` (how to load them: `load_rmu_weights(model, dir)`); `merged_model` is the
model itself, whose trained tensors are already in place.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from repbend.kernels import rep_distance

from ..config_fields import Group, Layers
from ..errors import ConfigError
from ..loss.batch import leading_rows
from ..loss.passes import HiddenCapture, run_backbone, trained_pass
from ..loss.terms import LossTerms
from ..model import decoder_layers, unwrap
from .forget_retain import ForgetRetain, ForgetRetainBatch
from .layers import influenced, scaled, scaled_span

log = logging.getLogger("repbend")

WEIGHTS_FILE = "rmu_weights.safetensors"
INFO_FILE = "rmu_weights.json"
FORMAT = "repbend-rmu-v1"


def control_vector(hidden_size: int, steering_coeff: float, seed: int) -> torch.Tensor:
    """c: bfloat16 [hidden_size] (module docstring), on the CPU."""
    u = torch.rand(1, 1, hidden_size, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    return (u / torch.norm(u) * steering_coeff).view(hidden_size)


@dataclass
class RMUSettings(Group):
    NAME = "loss"

    rmu_layer: int | None = None
    """The hidden-state index whose activations are steered (7 = output of decoder layer 6). null = the published 7
    of 32 at the model's depth (at least 1)."""
    rmu_update_layers: Layers | None = None
    """Decoder layers whose rmu_trainable tensors are trained (full weights, no LoRA). null = the published 5-7 of 32
    at the model's depth."""
    rmu_trainable: list[str] = field(default_factory=lambda: ["mlp.down_proj.weight"])
    """Parameter names, relative to a decoder layer, that train."""
    rmu_alpha: float = 1200.0
    """Weight of the retain term."""
    steering_coeff: float = 6.5
    """Norm of the control vector c."""
    rmu_seed: int = 42
    """Seed of the generator that draws c (once per run)."""

    def validate(self) -> None:
        self.check(self.rmu_layer is None or self.rmu_layer >= 1, "rmu_layer", "be >= 1 (a decoder layer's output)")
        self.check(self.rmu_update_layers is None or len(self.rmu_update_layers) > 0, "rmu_update_layers",
                   "name at least one decoder layer (or be null)")
        self.check(len(self.rmu_trainable) > 0, "rmu_trainable", "name at least one parameter")
        self.check(self.steering_coeff > 0, "steering_coeff", "be positive")
        self.check(0 <= self.rmu_seed <= 2 ** 64 - 1, "rmu_seed", "be in [0, 2**64 - 1] (torch.Generator's seed range)")


class RMU(ForgetRetain):
    """RMU on the plain model: the reference pass swaps the frozen copies of the trained tensors in."""

    NAME = "rmu"
    SUMMARY = "RMU (representation misdirection: full weights of a few layers, no LoRA), the paper's baseline"
    Settings = RMUSettings
    TERMS = ("unlearn", "retain")
    TRAINS = "full"
    STRATEGIES = ("ddp",)  # its reference pass swaps whole tensors in and out: not under FSDP's sharding

    def __init__(self, settings=None, impl: str = "auto", allow_empty_terms: bool = False):
        super().__init__(settings, impl, allow_empty_terms)
        self.params: list[torch.nn.Parameter] | None = None
        self.names: list[str] = []
        self.control_vector: torch.Tensor | None = None
        self._frozen: list[torch.Tensor] = []
        self._c_on: torch.Tensor | None = None  # c on the device of the last call
        self.L: int | None = None               # the hidden-state index read, and the decoder layers updated,
        self._update: list[int] = []            # at the model's depth (`prepare`)

    # ------------------------------------------------------------ data and model
    data_spec = ForgetRetain.marked_up_spec

    def layer_settings(self, n_layers: int) -> tuple[int, list[int]]:
        """(L, the decoder layers to update) at the model's depth, checked."""
        cfg = self.cfg
        L = max(1, scaled(7, n_layers)) if cfg.rmu_layer is None else cfg.rmu_layer
        if not 1 <= L <= n_layers:
            raise ConfigError(f"loss.rmu_layer = {L}: the model has hidden-state indices 1..{n_layers} after its "
                              f"embeddings ({n_layers} decoder layers)")
        update = scaled_span(5, 7, n_layers) if cfg.rmu_update_layers is None else list(cfg.rmu_update_layers)
        bad = [i for i in update if not 0 <= i < n_layers]
        if bad:
            raise ConfigError(f"loss.rmu_update_layers {bad} out of range: the model has decoder layers "
                              f"0..{n_layers - 1}")
        return L, sorted(set(update))

    def check_model(self, n_layers: int, lora_layers: list[int] | None = None) -> None:
        L, update = self.layer_settings(n_layers)
        influenced({"L_unlearn": (1.0, [L]), "L_retain": (self.cfg.rmu_alpha, [L])}, update,
                   "loss.rmu_update_layers")

    def lora_layers(self, n_layers: int) -> None:
        return None

    def prepare(self, model) -> list[torch.nn.Parameter]:
        """Freeze everything but the listed tensors, copy them, draw c; returns them in layer order."""
        cfg = self.cfg
        if self.params is not None:
            raise RuntimeError("rmu: prepare(model) was already called; it copies the original weights, so call it "
                               "once, before any update")
        if hasattr(model, "disable_adapter") or hasattr(model, "peft_config"):
            raise ConfigError("loss.method rmu trains full weights: give it the plain model, not a PEFT model")
        layers = decoder_layers(model)
        L, update = self.layer_settings(len(layers))
        self.check_model(len(layers))
        self.L = L
        params = []
        for i in update:
            for name in cfg.rmu_trainable:
                try:
                    params.append(layers[i].get_parameter(name))
                except AttributeError:
                    have = ", ".join(n for n, _ in layers[i].named_parameters())
                    raise ConfigError(f"loss.rmu_trainable: decoder layer {i} has no parameter {name!r} (it has "
                                      f"{have})") from None
        if len({id(p) for p in params}) != len(params):
            raise ConfigError("loss.rmu_trainable names the same tensor twice")
        past = [i for i in update if i >= L]
        if past:
            log.warning("rmu: decoder layer(s) %s come at or after hidden-state index %d (loss.rmu_layer), which the "
                        "loss reads: they never run, so their tensors get no gradient and do not change "
                        "(loss.rmu_layer %d would train them)", past, L, max(past) + 1)
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        by_id = {id(p): n for n, p in unwrap(model).named_parameters(remove_duplicate=False)}
        self.names = [by_id[id(p)] for p in params]
        self._update = update
        self._frozen = [p.detach().clone() for p in params]
        self.params = params
        self.control_vector = control_vector(unwrap(model).config.hidden_size, cfg.steering_coeff, cfg.rmu_seed)
        return list(params)

    def _swap(self) -> None:
        """Exchange the trained tensors' storage with the frozen copies (twice = back exactly as before)."""
        for k, p in enumerate(self.params):
            f = self._frozen[k]
            if f.device != p.device or f.dtype != p.dtype:  # the model moved or changed dtype after prepare
                f = f.to(p.device, p.dtype)
            self._frozen[k] = p.data
            p.data = f

    # ------------------------------------------------------------ the loss
    def collate(self, micro, pad_id: int, pack_length: int | None = None) -> ForgetRetainBatch:
        return self.collate_sets(micro, pad_id, pack_length, apart=True)

    def _reference(self, model, batch: ForgetRetainBatch, L: int) -> torch.Tensor:
        """h_L at the retain tokens [N_r, D]: the original weights, eval mode, no_grad, leading rows only."""
        sub = SimpleNamespace(rows=leading_rows(batch.rows, batch.reference_rows))
        was_training = model.training
        model.eval()
        self._swap()
        try:
            with torch.no_grad(), HiddenCapture(model, {L: batch.index["retain"]}, sub.rows) as cap:
                run_backbone(model, sub, L)
        finally:
            self._swap()
            model.train(was_training)
            # autocast caches its casts of the (same) parameter objects: those of the frozen weights must not serve
            # the trained pass
            torch.clear_autocast_cache()
        return cap.captured[L]

    def __call__(self, model, batch: ForgetRetainBatch, progress: float | None = None) -> LossTerms:
        if self.params is None:
            raise RuntimeError("rmu: call RepBendLoss.prepare(model) first (it sets up the trained tensors and c)")
        cfg, ix = self.cfg, batch.index
        if not isinstance(batch, ForgetRetainBatch) or (batch.retain_rows and not batch.reference_rows):
            raise ValueError("rmu: the batch was not collated for rmu (use RepBendLoss(cfg).collate)")
        L = self.L
        n_forget, n_retain = ix["forget"].numel(), ix["retain"].numel()
        use_retain = cfg.rmu_alpha != 0 and n_retain > 0
        ref = self._reference(model, batch, L) if use_retain else None
        hs = trained_pass(model, batch, [L])[L]
        D = hs.shape[-1]
        parts: dict[str, torch.Tensor | None] = dict.fromkeys(self.TERMS)
        if n_forget:
            c = self._control_on(hs.device)
            d = rep_distance([hs], c.view(1, 1, D).expand(1, n_forget, D), ix["forget"], impl=self.impl)
            parts["unlearn"] = d.sq[0] / (batch.forget_rows * batch.forget_longest * D)
        if use_retain:
            d = rep_distance([hs], ref.unsqueeze(0), ix["retain"], impl=self.impl)
            parts["retain"] = d.sq[0] / (batch.retain_rows * batch.retain_longest * D)
        return self.total(parts, {"unlearn": 1.0, "retain": cfg.rmu_alpha},
                          {"unlearn": n_forget > 0, "retain": n_retain > 0})

    def _control_on(self, device) -> torch.Tensor:
        if self._c_on is None or self._c_on.device != device:
            self._c_on = self.control_vector.to(device)
        return self._c_on

    # ------------------------------------------------------------ output
    def save_weights(self, model, path, state: dict | None = None) -> None:
        """Write the trained tensors and how to load them into `path` (a directory)."""
        from safetensors.torch import save_file

        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        state = state or {}
        tensors = {n: (state[n] if n in state else p).detach().cpu().contiguous()
                   for n, p in zip(self.names, self.params)}
        save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": FORMAT})
        info = {"format": FORMAT, "base_model": getattr(unwrap(model).config, "_name_or_path", None),
                "tensors": self.names, "dtype": str(next(iter(tensors.values())).dtype).replace("torch.", ""),
                "rmu_layer": self.L, "rmu_update_layers": self._update,
                "load": "repbend.methods.rmu.load_rmu_weights(model, this_directory), or copy each tensor of "
                        f"{WEIGHTS_FILE} into the base model's parameter of the same name"}
        (out / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")

    def merged_model(self, model):
        """The plain model with the trained tensors in place (nothing to merge)."""
        return unwrap(model)


def load_rmu_weights(model, path) -> list[str]:
    """Copy the tensors `save_weights` wrote in `path` into `model` (the same base model); returns their names."""
    from safetensors.torch import load_file

    path = Path(path)
    info_file = path / INFO_FILE
    if not info_file.is_file():
        raise ConfigError(f"{path}: no {INFO_FILE}: not an RMU weights directory")
    info = json.loads(info_file.read_text(encoding="utf-8"))
    if info.get("format") != FORMAT:
        raise ConfigError(f"{info_file}: format {info.get('format')!r}, expected {FORMAT!r}")
    tensors = load_file(str(path / WEIGHTS_FILE))
    params = dict(unwrap(model).named_parameters())
    with torch.no_grad():
        for name in info["tensors"]:
            if name not in params or name not in tensors:
                raise ConfigError(f"{path}: tensor {name} is not in the model or not in {WEIGHTS_FILE}")
            if params[name].shape != tensors[name].shape:
                raise ConfigError(f"{path}: tensor {name} has shape {tuple(tensors[name].shape)}, the model's "
                                  f"{tuple(params[name].shape)}")
            params[name].copy_(tensors[name])
    return list(info["tensors"])
