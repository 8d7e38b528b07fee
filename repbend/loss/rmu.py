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
the retain rows only (the batch lays the retain set out in its leading rows, `repbend.loss.batch`). Neither runs the
LM head. Both terms come out of `rep_distance` (its `sq` sums; c is passed as one row expanded with stride 0).

Output: `save_weights` writes the trained tensors as `rmu_weights.safetensors` (names as in the base model's
state dict) and `rmu_weights.json` (how to load them: `load_rmu_weights(model, dir)`); `merged_model` is the
model itself, whose trained tensors are already in place.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import torch

from repbend.kernels import rep_distance

from ..errors import ConfigError
from ..model import decoder_layers, unwrap
from .batch import StepBatch
from .config import LossConfig
from .layout import Rows
from .passes import HiddenCapture, run_backbone, trained_pass
from .terms import LossTerms

log = logging.getLogger("repbend")

WEIGHTS_FILE = "rmu_weights.safetensors"
INFO_FILE = "rmu_weights.json"
FORMAT = "repbend-rmu-v1"


def control_vector(hidden_size: int, steering_coeff: float, seed: int) -> torch.Tensor:
    """c: bfloat16 [hidden_size] (module docstring), on the CPU."""
    u = torch.rand(1, 1, hidden_size, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    return (u / torch.norm(u) * steering_coeff).view(hidden_size)


def leading_rows(rows: Rows, n: int) -> Rows:
    """The first `n` rows of a layout, with the sequences that lie in them (flat indices below n*T keep naming the
    same tokens)."""
    T = rows.row_len
    inside = [p for p in rows.placements if p.row < n]
    per_row: dict[int, int] = {}
    for p in inside:
        per_row[p.row] = per_row.get(p.row, 0) + 1
    starts = [c for c in rows.cu_seqlens[:-1] if c < n * T]
    return Rows(rows.input_ids[:n], rows.position_ids[:n], rows.doc_ids[:n], inside, starts + [n * T],
                any(k > 1 for k in per_row.values()))


class RMUObjective:
    """RMU on the plain model: the reference pass swaps the frozen copies of the trained tensors in."""

    TERMS = ("unlearn", "retain")

    def __init__(self, cfg: LossConfig, impl: str = "auto"):
        self.cfg, self.impl = cfg, impl
        self.params: list[torch.nn.Parameter] | None = None
        self.names: list[str] = []
        self.control_vector: torch.Tensor | None = None
        self._frozen: list[torch.Tensor] = []
        self._c_on: torch.Tensor | None = None  # c on the device of the last call

    # ------------------------------------------------------------ setup
    def prepare(self, model) -> list[torch.nn.Parameter]:
        """Freeze everything but the listed tensors, copy them, draw c; returns them in layer order."""
        cfg = self.cfg
        if self.params is not None:
            raise RuntimeError("rmu: prepare(model) was already called; it copies the original weights, so call it "
                               "once, before any update")
        if hasattr(model, "disable_adapter") or hasattr(model, "peft_config"):
            raise ConfigError("loss.method rmu trains full weights: give it the plain model, not a PEFT model")
        layers = decoder_layers(model)
        n_layers = len(layers)
        if not 1 <= cfg.rmu_layer <= n_layers:
            raise ConfigError(f"loss.rmu_layer = {cfg.rmu_layer}: the model has hidden-state indices 1..{n_layers} "
                              f"after its embeddings ({n_layers} decoder layers)")
        bad = [i for i in cfg.rmu_update_layers if not 0 <= i < n_layers]
        if bad:
            raise ConfigError(f"loss.rmu_update_layers {bad} out of range: the model has decoder layers "
                              f"0..{n_layers - 1}")
        update = sorted(set(cfg.rmu_update_layers))
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
        past = [i for i in update if i >= cfg.rmu_layer]
        if past:
            log.warning("rmu: decoder layer(s) %s come at or after hidden-state index %d (loss.rmu_layer), which the "
                        "loss reads: they never run, so their tensors get no gradient and do not change "
                        "(loss.rmu_layer %d would train them)", past, cfg.rmu_layer, max(past) + 1)
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        by_id = {id(p): n for n, p in unwrap(model).named_parameters(remove_duplicate=False)}
        self.names = [by_id[id(p)] for p in params]
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
    def _reference(self, model, batch: StepBatch, L: int) -> torch.Tensor:
        """h_L at the retain tokens [N_r, D]: the original weights, eval mode, no_grad, leading rows only."""
        sub = SimpleNamespace(rows=leading_rows(batch.rows, batch.meta["reference_rows"]))
        was_training = model.training
        model.eval()
        self._swap()
        try:
            with torch.no_grad(), HiddenCapture(model, {L: batch.index["retain"]}) as cap:
                run_backbone(model, sub, L)
        finally:
            self._swap()
            model.train(was_training)
            # autocast caches its casts of the (same) parameter objects: those of the frozen weights must not serve
            # the trained pass
            torch.clear_autocast_cache()
        return cap.kept[L]

    def __call__(self, model, batch: StepBatch, progress: float | None = None) -> LossTerms:
        if self.params is None:
            raise RuntimeError("rmu: call RepBendLoss.prepare(model) first (it sets up the trained tensors and c)")
        cfg, ix, meta = self.cfg, batch.index, batch.meta
        if "reference_rows" not in meta:
            raise ValueError("rmu: the batch was not collated for rmu (use RepBendLoss(cfg).collate)")
        L = cfg.rmu_layer
        n_forget, n_retain = ix["forget"].numel(), ix["retain"].numel()
        use_retain = cfg.rmu_alpha != 0 and n_retain > 0
        ref = self._reference(model, batch, L) if use_retain else None
        hs = trained_pass(model, batch, [L])[L]
        D = hs.shape[-1]
        parts: dict[str, torch.Tensor | None] = dict.fromkeys(self.TERMS)
        if n_forget:
            c = self._control_on(hs.device)
            d = rep_distance([hs], c.view(1, 1, D).expand(1, n_forget, D), ix["forget"], impl=self.impl)
            parts["unlearn"] = d.sq[0] / (meta["forget_rows"] * meta["forget_longest"] * D)
        if use_retain:
            d = rep_distance([hs], ref.unsqueeze(0), ix["retain"], impl=self.impl)
            parts["retain"] = d.sq[0] / (meta["retain_rows"] * meta["retain_longest"] * D)
        return LossTerms.weighted(parts, {"unlearn": 1.0, "retain": cfg.rmu_alpha})

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
                "rmu_layer": self.cfg.rmu_layer, "rmu_update_layers": sorted(set(self.cfg.rmu_update_layers)),
                "load": "repbend.loss.rmu.load_rmu_weights(model, this_directory), or copy each tensor of "
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
