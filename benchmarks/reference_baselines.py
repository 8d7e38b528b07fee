"""Cost-faithful re-creations of the reference repository's Circuit Breakers and RMU steps, for benchmarks only.
Each computes the same loss as `repbend.loss.RepBendLoss(LossConfig(method=...))` on the same micro-batch, the way
the reference code spends time and memory (what docs/method.md lists as its cost-only quirks):

Circuit Breakers (`cb_reference_loss`), on the PEFT model:
  - padding: each forget row's request left-padded to `widths.request` (max_length/2 = 1024) and its response
    right-padded to `widths.response` (1024); each retain row (safe + retain sets) left-padded to P =
    `cb_retain_pad_length` (2048) (`padding="max_length"`);
  - four full causal-LM forwards (`model(...)`, fp32 logits as transformers 4.40 upcast them): reference (adapters
    off, eval, no_grad) over retain then forget, then LoRA over retain then forget;
  - all n_layers+1 hidden states stacked for retain (`torch.stack`) and multiplied by the mask, in both passes;
    the target layers C stacked for forget, duplicates included;
  - L_retain = nanmean over [|R|, B, P] of ||h' - h|| (fp32 norm); L_cb = sum relu(sum(u' * u * mask)) / mask.sum(),
    u = h / ||h|| (fp32 norm, no eps); `gc.collect()` (and empty_cache on GPU) after each reference forward.
RMU (`RMUReference`), on the plain model:
  - the model cut to L+1 decoder layers (8 of 32) and a second, frozen copy of it (a state-dict copy); every weight
    of the trained copy requires grad (the optimizer holds only the trained tensors, and its zero_grad clears only
    theirs: the others' gradients stay allocated and accumulate);
  - padding: right, to each set's longest row; three full causal-LM forwards of the cut model (fp32 logits), a hook
    taking decoder layer L-1's output: trained over forget, trained over retain, frozen over retain (no_grad);
  - L_unlearn = mse_loss(h' * m, c * m), L_retain = mse_loss(h' * m, h * m): means over the padded [B, T, D].
Shapes: hidden states [B, T, D] in the model's dtype; losses float32 0-dim.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from reference_recipe import _forward, free_memory


# ---------------------------------------------------------------- Circuit Breakers
@dataclass(frozen=True)
class CBWidths:
    request: int = 1024
    response: int = 1024


@dataclass
class CBBatch:
    forget_ids: torch.Tensor     # [B_f, Wq + Wr] long: request right-aligned at column Wq, response after it
    forget_mask: torch.Tensor    # [B_f, Wq + Wr] long
    retain_ids: torch.Tensor     # [B_r, P] long, left-padded
    retain_mask: torch.Tensor    # [B_r, P] long
    useful_tokens: int

    @property
    def positions(self) -> int:
        return self.forget_ids.numel() + self.retain_ids.numel()

    def to(self, device) -> "CBBatch":
        return CBBatch(self.forget_ids.to(device), self.forget_mask.to(device), self.retain_ids.to(device),
                       self.retain_mask.to(device), self.useful_tokens)


def build_cb_batch(micro, cfg, pad_id: int, widths: CBWidths = CBWidths()) -> CBBatch:
    """The reference layout of a Circuit Breakers micro-batch (forget = unsafe rows; retain = safe + retain rows)."""
    forget, retain = list(micro.unsafe), list(micro.safe) + list(micro.retain)
    Wq, Wr, P = widths.request, widths.response, cfg.cb_retain_pad_length
    f_ids = torch.full((len(forget), Wq + Wr), pad_id, dtype=torch.long)
    f_mask = torch.zeros_like(f_ids)
    for b, s in enumerate(forget):
        if s.request_len > Wq or s.response_len > Wr:
            raise ValueError(f"{s.origin}: request {s.request_len} / response {s.response_len} tokens do not fit "
                             f"the reference padding {Wq}/{Wr}")
        start = Wq - s.request_len
        f_ids[b, start:start + len(s)] = torch.tensor(s.input_ids, dtype=torch.long)
        f_mask[b, start:start + len(s)] = 1
    r_ids = torch.full((len(retain), P), pad_id, dtype=torch.long)
    r_mask = torch.zeros_like(r_ids)
    for b, s in enumerate(retain):
        if len(s) > P:
            raise ValueError(f"{s.origin}: {len(s)} tokens do not fit the retain padding {P}")
        r_ids[b, P - len(s):] = torch.tensor(s.input_ids, dtype=torch.long)
        r_mask[b, P - len(s):] = 1
    useful = sum(len(s) for s in forget + retain)
    return CBBatch(f_ids, f_mask, r_ids, r_mask, useful)


def cb_reference_loss(model, cb: CBBatch, cfg, n_layers: int, progress: float, mark=None):
    """(total, {"retain": L_retain, "cb": L_cb}) as the reference computes them (module docstring). `model`: the
    PEFT model in train mode; `cb` on its device."""
    mark = mark or (lambda phase: None)
    device = cb.retain_ids.device
    R = list(range(n_layers + 1)) if cfg.retain_layers == "all" else list(cfg.retain_layers)
    C = list(cfg.target_layers)
    s = cfg.cb_progress_scale * progress
    retain_coeff, cb_coeff = cfg.cb_alpha * s, cfg.cb_alpha * (1 - s)

    def free():
        mark("terms")
        free_memory(device)
        mark("gc")

    r_mask = cb.retain_mask[None, :, :, None]                                  # [1, B_r, P, 1]
    f_mask = cb.forget_mask[None, :, :, None].expand(len(C), -1, -1, -1)       # [|C|, B_f, W, 1]
    model.eval()
    with torch.no_grad(), model.disable_adapter():
        hs, _ = _forward(model, cb.retain_ids, cb.retain_mask)
        mark("ref_forward")
        orig_retain = torch.stack([hs[i] for i in R]) * r_mask                 # [|R|, B_r, P, D]
        del hs
        free()
        hs, _ = _forward(model, cb.forget_ids, cb.forget_mask)
        mark("ref_forward")
        orig_cb = torch.stack([hs[i] for i in C])                             # [|C|, B_f, W, D]
        del hs
        free()
    model.train()

    parts = dict.fromkeys(("retain", "cb"))
    hs, _ = _forward(model, cb.retain_ids, cb.retain_mask)
    mark("lora_forward")
    lora_retain = torch.stack([hs[i] for i in R]) * r_mask
    del hs
    parts["retain"] = torch.norm(lora_retain - orig_retain, dim=-1, p=2, dtype=torch.float).nanmean()
    del lora_retain, orig_retain

    hs, _ = _forward(model, cb.forget_ids, cb.forget_mask)
    mark("lora_forward")
    lora_cb = torch.stack([hs[i] for i in C])
    del hs
    u_lora = lora_cb / torch.norm(lora_cb, dim=-1, keepdim=True, dtype=torch.float)
    u_orig = orig_cb / torch.norm(orig_cb, dim=-1, keepdim=True, dtype=torch.float)
    inner = (u_lora * u_orig) * f_mask
    parts["cb"] = torch.relu(inner.sum(dim=-1)).sum() / f_mask.sum()
    del lora_cb, orig_cb, u_lora, u_orig, inner
    free()
    total = retain_coeff * parts["retain"] + cb_coeff * parts["cb"]
    return total, parts


# ---------------------------------------------------------------- RMU
@dataclass
class RMUBatch:
    forget_ids: torch.Tensor     # [B_f, T_f] long, right-padded to the set's longest row
    forget_mask: torch.Tensor
    retain_ids: torch.Tensor     # [B_r, T_r]
    retain_mask: torch.Tensor
    useful_tokens: int

    @property
    def positions(self) -> int:
        """Positions of one trained pass over both sets (the frozen pass adds the retain ones again)."""
        return self.forget_ids.numel() + self.retain_ids.numel()

    def to(self, device) -> "RMUBatch":
        return RMUBatch(self.forget_ids.to(device), self.forget_mask.to(device), self.retain_ids.to(device),
                        self.retain_mask.to(device), self.useful_tokens)


def _right_padded(seqs, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, s in enumerate(seqs):
        ids[b, :len(s)] = torch.tensor(s.input_ids, dtype=torch.long)
        mask[b, :len(s)] = 1
    return ids, mask


def build_rmu_batch(micro, pad_id: int) -> RMUBatch:
    forget, retain = list(micro.unsafe), list(micro.safe) + list(micro.retain)
    f_ids, f_mask = _right_padded(forget, pad_id)
    r_ids, r_mask = _right_padded(retain, pad_id)
    return RMUBatch(f_ids, f_mask, r_ids, r_mask, sum(len(s) for s in forget + retain))


def reference_control_vector(hidden_size: int, steering_coeff: float, seed: int) -> torch.Tensor:
    """u ~ U[0, 1)^D from a CPU generator seeded with `seed`, bf16, scaled to norm `steering_coeff`: [1, 1, D]."""
    u = torch.rand(1, 1, hidden_size, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    return u / torch.norm(u) * steering_coeff


class RMUReference:
    """The reference's RMU setup and loss. `prepare(model)` cuts the model, copies it frozen and returns the tensors
    its optimizer updates (every weight of the cut model keeps requires_grad, as in the reference)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.frozen = None
        self.control = None

    def prepare(self, model) -> list[torch.nn.Parameter]:
        cfg = self.cfg
        stack = model.model
        keep = min(len(stack.layers), cfg.rmu_layer + 1)
        stack.layers = torch.nn.ModuleList(list(stack.layers)[:keep])  # "the model is cut to 8 layers"
        model.config.num_hidden_layers = keep
        for p in model.parameters():
            p.requires_grad_(True)
        self.frozen = copy.deepcopy(model).eval()
        for p in self.frozen.parameters():
            p.requires_grad_(False)
        self.control = reference_control_vector(model.config.hidden_size, cfg.steering_coeff, cfg.rmu_seed)
        layers = stack.layers
        return [layers[i].get_parameter(name) for i in sorted(set(cfg.rmu_update_layers)) if i < keep
                for name in cfg.rmu_trainable]

    def _activations(self, model, ids, mask, grad: bool) -> torch.Tensor:
        """Decoder layer L-1's output over the whole forward of `model` (logits included), as forward_with_cache."""
        kept = []
        layer = model.model.layers[self.cfg.rmu_layer - 1]
        handle = layer.register_forward_hook(lambda m, a, out: kept.append(out[0] if isinstance(out, tuple) else out))
        try:
            with torch.set_grad_enabled(grad):
                _forward(model, ids, mask)
        finally:
            handle.remove()
        return kept[0]

    def loss(self, model, rb: RMUBatch, mark=None):
        """(total, {"unlearn": L_unlearn, "retain": L_retain}); `model` is the prepared (cut) model, train mode."""
        mark = mark or (lambda phase: None)
        cfg = self.cfg
        f_m = rb.forget_mask[:, :, None]
        r_m = rb.retain_mask[:, :, None]
        h_f = self._activations(model, rb.forget_ids, rb.forget_mask, grad=True)
        mark("lora_forward")
        c = self.control.to(h_f.device, h_f.dtype).expand_as(h_f)
        unlearn = F.mse_loss(h_f * f_m, c * f_m).float()  # in the activations' dtype, as the reference
        h_r = self._activations(model, rb.retain_ids, rb.retain_mask, grad=True)
        mark("lora_forward")
        h_0 = self._activations(self.frozen, rb.retain_ids, rb.retain_mask, grad=False)
        mark("ref_forward")
        retain = F.mse_loss(h_r * r_m, h_0 * r_m).float()
        mark("terms")
        return unlearn + cfg.rmu_alpha * retain, {"unlearn": unlearn, "retain": retain}
