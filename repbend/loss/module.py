"""`RepBendLoss`: the public loss module. It holds no model: each call takes the model and a collated batch.

    from repbend.loss import RepBendLoss, LossConfig, Sequence, MicroBatch

    loss_fn = RepBendLoss(LossConfig(mode="response_all", target_layers="20-30"))
    params = loss_fn.prepare(model)                 # the tensors to optimise (LoRA; RMU: the listed full weights)
    batch = loss_fn.collate(MicroBatch(safe=[...], unsafe=[...], retain=[...], n_pairs=0), pad_id=0)
    terms = loss_fn(model, batch, progress=step / max_steps)
    terms.total.backward()                          # terms.parts: each term, unweighted (None = not computed)

`model` is a PEFT model for the methods that train LoRA adapters (adapters on = the trained pass, off = the
reference pass) and the plain HF model for rmu. Everything method-specific is the method's (`repbend.methods`,
one module per method); docs/method.md states what each one computes.
"""
from __future__ import annotations

import torch

from .batch import StepBatch
from .config import LossConfig
from .terms import LossTerms
from .types import MicroBatch


class RepBendLoss(torch.nn.Module):
    """The loss of `cfg.method` as an nn.Module without parameters.

    impl: "auto" (Triton kernels on CUDA, eager PyTorch elsewhere), "triton" or "torch".
    allow_empty_terms: a term with a non-zero weight but no tokens in a micro-batch (a set without rows) is a
        ValueError by default; True leaves such a term out of the total (its part is None).
    """

    def __init__(self, cfg: LossConfig | None = None, *, impl: str = "auto", allow_empty_terms: bool = False,
                 **settings):
        super().__init__()
        from ..methods import method_class

        if cfg is None:
            cfg = LossConfig(**settings)
        elif settings:
            raise TypeError("RepBendLoss: give a LossConfig or keyword settings, not both")
        self.cfg, self.impl = cfg, impl
        self.method = method_class(cfg.method)(cfg.settings, impl, allow_empty_terms)

    @property
    def objective(self):
        """The method object (alias of `method`)."""
        return self.method

    @property
    def terms(self) -> tuple[str, ...]:
        """The names of `LossTerms.parts` for this method."""
        return self.method.TERMS

    @property
    def control_vector(self):
        """RMU's control vector c (bf16, [D]) once `prepare` has run; None for the other methods."""
        return getattr(self.method, "control_vector", None)

    def data_spec(self, empty_request_p: float = 0.5):
        """How this method's rows are read and rendered (`repbend.data.build_pools(..., spec=...)`)."""
        return self.method.data_spec(empty_request_p)

    def prepare(self, model) -> list[torch.nn.Parameter]:
        """Set the model up for this method and return exactly the tensors that train, in layer order (call it once,
        before the optimizer is built and before any update)."""
        return self.method.prepare(model)

    def collate(self, micro: MicroBatch, pad_id: int, pack_length: int | None = None) -> StepBatch:
        """One model input with every term's token sets (the method's `collate`); `pack_length` packs several
        sequences per row (attention stays inside each sequence on every backend). `pad_id` fills the padding
        (never attended); give the tokenizer's pad token, or its EOS where it has none."""
        if not isinstance(micro, MicroBatch):
            raise ValueError(f"collate: expected a MicroBatch, got a {type(micro).__name__}")
        if isinstance(pad_id, bool) or not isinstance(pad_id, int) or pad_id < 0:
            raise ValueError(f"collate: pad_id must be a token id (an int >= 0), got {pad_id!r}: use "
                             "tokenizer.pad_token_id, or tokenizer.eos_token_id where the tokenizer has no pad token")
        if pack_length is not None and (isinstance(pack_length, bool) or not isinstance(pack_length, int)
                                        or pack_length < 1):
            raise ValueError(f"collate: pack_length must be None or an int >= 1, got {pack_length!r}")
        batch = self.method.collate(micro, pad_id, pack_length)
        batch.max_id = max(max(s.input_ids) for s in micro.safe + micro.unsafe + micro.retain)
        return batch

    def forward(self, model, batch: StepBatch, progress: float | None = None) -> LossTerms:
        """Reference pass, trained pass and the terms of one micro-batch. `progress` = optimizer step / max_steps
        (Circuit Breakers' coefficient schedule; the others ignore it)."""
        if not isinstance(batch, StepBatch):
            raise ValueError(f"forward: expected the StepBatch of RepBendLoss.collate, got a {type(batch).__name__}")
        self.method.check_model_kind(model)
        from ..model import unwrap
        vocab = unwrap(model).get_input_embeddings().num_embeddings
        if batch.max_id is not None and batch.max_id >= vocab:
            raise ValueError(f"forward: the batch holds token id {batch.max_id}, past the model's vocabulary of {vocab} "
                             "(rows tokenized with another tokenizer?)")
        device = next(model.parameters()).device
        return self.method(model, batch.to(device), progress)

    def extra_repr(self) -> str:
        return f"method={self.cfg.method!r}, impl={self.impl!r}"
