"""The two forward passes of a RepBend step, and what each one keeps.

Hidden-state index i follows HF's `output_hidden_states` convention: 0 = the embedding output, i = the output
of decoder layer i-1, n_layers = the final normed output. Forward hooks on the embedding, the decoder layers and
the final norm capture just the indices a step needs, so no pass ever holds (or stacks) all layers:

- the reference pass (adapters disabled, eval mode, no_grad) keeps only the rows each term reads, gathered
  as soon as a layer has run (`[n_rows, D]` per index, in the model's dtype);
- the trained pass (adapters on, train mode) keeps references to the needed layers' outputs, which autograd
  holds anyway; the loss kernels read the masked rows from them in place.

Neither pass computes logits: the KL term projects the retain rows itself (`repbend.kernels.linear_kl`).
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

from ..model import backbone, unwrap
from .layout import attention_inputs


def _output_tensor(out):
    return out[0] if isinstance(out, (tuple, list)) else out


class HiddenCapture:
    """Capture hidden-state indices of one forward pass.

    `wanted` maps an index to None (keep the full output, as `[R, T, D]` in the rows' shape whatever the attention
    layout) or to a flat index tensor (keep only `out.flatten(0, 1)[idx]`; several terms' index tensors may be
    given as a tuple, giving a tuple back). `rows`: the layout of the pass (needed for full outputs, and where the
    model input leaves hidden tokens out: `Rows.compacted`, whose outputs are put back at their flat indices).
    """

    def __init__(self, model, wanted: dict[int, object], rows=None):
        self.decoder = backbone(model)
        self.rows_shape = tuple(rows.input_ids.shape) if rows is not None else None
        self.kept = None
        if rows is not None and rows.compacted(getattr(unwrap(model).config, "_attn_implementation", None)):
            self.kept = rows.kept
            self.where = torch.full((rows.input_ids.numel(),), -1, dtype=torch.long, device=rows.kept.device)
            self.where[rows.kept] = torch.arange(rows.kept.numel(), device=rows.kept.device)
        self.n_layers = len(self.decoder.layers)
        self.wanted = wanted
        self.captured: dict[int, object] = {}
        self._handles = []
        self._active = False

    def _module_for(self, index: int):
        if index == 0:
            return self.decoder.embed_tokens
        if index == self.n_layers:
            return self.decoder.norm
        if 0 < index < self.n_layers:
            return self.decoder.layers[index - 1]
        raise ValueError(f"hidden-state index {index} out of range 0..{self.n_layers}")

    def _hook(self, index: int) -> Callable:
        def hook(module, args, out):
            if not self._active:  # e.g. the recompute of gradient checkpointing in the backward
                return
            h = _output_tensor(out)
            sel = self.wanted[index]
            flat = h.reshape(-1, h.shape[-1])
            if sel is None:
                if self.kept is not None:  # back at the flat indices of the rows, zeros at the hidden tokens
                    flat = flat.new_zeros(self.where.numel(), flat.shape[-1]).index_copy(0, self.kept, flat)
                self.captured[index] = flat.view(*self.rows_shape, h.shape[-1]) if self.rows_shape else h
            else:
                pick = (lambda s: flat.index_select(0, self.where[s])) if self.kept is not None else \
                    (lambda s: flat.index_select(0, s))
                self.captured[index] = tuple(pick(s) for s in sel) if isinstance(sel, tuple) else pick(sel)
        return hook

    def __enter__(self):
        for index in sorted(self.wanted):
            self._handles.append(self._module_for(index).register_forward_hook(self._hook(index)))
        self._active = True
        return self

    def __exit__(self, *exc):
        self._active = False
        for h in self._handles:
            h.remove()
        self._handles.clear()


def run_backbone(model, batch, upto: int | None = None) -> None:
    """One forward of the decoder stack (no LM head) over the batch's rows, with the attention inputs of the model's
    backend (`repbend.loss.layout.attention_inputs`). `upto` = the highest hidden-state index anyone reads: the
    decoder layers past it are not run (not under FSDP2, whose sharded stack must run whole)."""
    m = unwrap(model)
    kwargs = attention_inputs(batch.rows, getattr(m.config, "_attn_implementation", None), m.dtype)
    stack = backbone(model)
    n_layers = len(stack.layers)
    if upto is None or upto >= n_layers or type(stack).__name__.startswith("FSDP"):
        stack(**kwargs, use_cache=False)
        return
    full = stack.layers
    stack.layers = torch.nn.ModuleList(full[:upto])  # index `upto` is the output of decoder layer upto-1
    try:
        stack(**kwargs, use_cache=False)
    finally:
        stack.layers = full


@contextlib.contextmanager
def adapters_disabled(model):
    """The original model: PEFT adapters off and eval mode (no dropout), restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with model.disable_adapter():
            yield
    finally:
        model.train(was_training)


def reference_pass(model, batch, wanted: dict[int, object]) -> dict[int, object]:
    """Adapters disabled, eval mode, no_grad: return the gathered rows named by `wanted` (index -> flat idx)."""
    with torch.no_grad(), adapters_disabled(model), HiddenCapture(model, wanted, batch.rows) as cap:
        run_backbone(model, batch, max(wanted))
    return cap.captured


def trained_pass(model, batch, indices) -> dict[int, torch.Tensor]:
    """Adapters on, in the model's current (train) mode: the full outputs `[R, T, D]` of the hidden-state
    `indices`."""
    with HiddenCapture(model, {i: None for i in indices}, batch.rows) as cap:
        run_backbone(model, batch, max(indices))
    return cap.captured


def gathered_reference(model, batch, reads: dict[str, tuple[list[int], torch.Tensor]]
                       ) -> dict[str, dict[int, torch.Tensor]]:
    """One reference pass for several terms: `reads` maps a term to (hidden-state indices, flat row indices);
    returns term -> index -> the gathered rows `[n_rows, D]`. Empty `reads`: no pass."""
    wanted: dict[int, list] = {}  # per hidden-state index, the rows of each term that reads it
    for term, (layers, idx) in reads.items():
        for i in layers:
            wanted.setdefault(i, []).append((term, idx))
    if not wanted:
        return {}
    kept = reference_pass(model, batch, {i: tuple(idx for _, idx in w) for i, w in wanted.items()})
    ref: dict[str, dict[int, torch.Tensor]] = {}
    for i, w in wanted.items():
        for (term, _), rows in zip(w, kept[i]):
            ref.setdefault(term, {})[i] = rows
    return ref
