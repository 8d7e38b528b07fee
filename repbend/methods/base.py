"""`Method`: everything that one training method owns, in one class per module of this package.

A method is the unit of extension. Its module holds:
    Settings       a typed config group (`repbend.config_fields.Group`, NAME "loss"): the method's own `loss` keys,
                   each documented for `repbend train --help`
    TERMS          the names of `LossTerms.parts`
    TRAINS         "lora" (PEFT adapters; the reference pass is the same model with them switched off) or "full"
                   (listed full weights; the method keeps frozen copies for its reference pass)
    STRATEGIES     the distributed strategies it supports ("ddp", "fsdp")
    data_spec      the roles it reads and how its rows are rendered (`repbend.roles.DataSpec`)
    draws/assemble how many rows of which roles one micro-batch takes, and the `MicroBatch` they make
    check_data     that its data can feed every weighted term (before step 1)
    check_model    that its settings fit a model of n decoder layers (from the config alone, before weights load)
    lora_layers    the decoder layers that get adapters by default
    prepare        set the model up and return exactly the tensors that train
    collate        its token sets and typed batch (`repbend.loss.batch.StepBatch` subclass)
    __call__       the reference and trained passes and its loss -> `LossTerms`
    save_weights / merged_model   how its trained weights are written and merged
`repbend.methods.REGISTRY` maps `loss.method` names to these classes; nothing outside a method's module compares
method names.
"""
from __future__ import annotations

from typing import ClassVar

import torch

from ..errors import ConfigError, TrainingError
from ..loss.batch import StepBatch
from ..loss.terms import LossTerms, trainable_parameters
from ..loss.types import MicroBatch
from ..roles import DataSpec, Draw


class Method:
    NAME: ClassVar[str] = ""
    SUMMARY: ClassVar[str] = ""
    Settings: ClassVar[type]
    TERMS: ClassVar[tuple[str, ...]] = ()
    TRAINS: ClassVar[str] = "lora"
    STRATEGIES: ClassVar[tuple[str, ...]] = ("ddp", "fsdp")

    def __init__(self, settings=None, impl: str = "auto", allow_empty_terms: bool = False):
        self.cfg = settings if settings is not None else self.Settings()
        self.impl = impl
        self.allow_empty_terms = allow_empty_terms

    def total(self, parts: dict, weights: dict[str, float], has_tokens: dict[str, bool]) -> LossTerms:
        """`LossTerms` of the computed parts; a term with a non-zero weight but no tokens in this micro-batch is a
        ValueError unless the loss was built with allow_empty_terms=True (then it is left out, as None)."""
        empty = [t for t in self.TERMS if weights.get(t, 0) != 0 and not has_tokens.get(t, True)]
        if empty and not self.allow_empty_terms:
            raise ValueError(f"{self.NAME}: the weighted term(s) {', '.join(empty)} have no tokens in this micro-batch "
                             "(a set without rows): give the micro-batch those rows, set the term's weight to 0, or "
                             "build the loss with allow_empty_terms=True to leave such terms out")
        return LossTerms.weighted(parts, weights)

    def check_model_kind(self, model) -> None:
        """A LoRA method's passes switch the adapters off and on: the model must be a PEFT model."""
        if self.TRAINS == "lora" and not hasattr(model, "disable_adapter"):
            raise ValueError(f"loss.method {self.NAME} trains LoRA adapters: give it the PEFT model (its reference pass "
                             f"switches them off), got a {type(model).__name__}")

    # ------------------------------------------------------------ data
    def data_spec(self, empty_request_p: float = 0.5) -> DataSpec:
        """How this method's rows are read and rendered (`empty_request_p`: data.empty_request_p, for the methods
        that draw empty instructions)."""
        return DataSpec()

    def draws(self, pools, batch_size: int) -> dict[str, Draw]:
        """The rows one micro-batch takes, per draw (`repbend.data.sampler`); ValueError if `pools` cannot give
        this method's composition at all."""
        raise NotImplementedError

    def assemble(self, drawn: dict[str, list[tuple[str, object]]]) -> MicroBatch:
        """The MicroBatch of the rows drawn (each with its role)."""
        raise NotImplementedError

    def composition(self, pools, batch_size: int) -> str:
        """One line: what one micro-batch holds, e.g. "batch_size 4: 8 safe, 8 unsafe, 4 retain rows"."""
        draws = self.draws(pools, batch_size)
        return f"batch_size {batch_size}: " + ", ".join(f"{d.rows} {d.describe()}" for d in draws.values()) + " rows"

    def check_data(self, pools, describe) -> None:
        """Raise TrainingError when a term with a non-zero weight has no rows to read; `describe(role)` says what the
        files gave for that role (for the message)."""

    # ------------------------------------------------------------ model
    def check_model(self, n_layers: int, lora_layers: list[int] | None = None) -> None:
        """ConfigError when the settings do not fit a model of `n_layers` decoder layers, or when no trained tensor
        (`lora_layers`: the decoder layers with adapters) can change what a weighted term reads (config only)."""

    def lora_layers(self, n_layers: int) -> list[int] | None:
        """Decoder layers that get LoRA adapters when lora.layers_to_transform is not set; None for full-weight
        methods."""
        return list(range(n_layers))

    def prepare(self, model) -> list[torch.nn.Parameter]:
        """Set the model up for this method and return exactly the tensors that train, in layer order (once, before
        the optimizer is built and before any update). LoRA methods: the adapters PEFT marks trainable."""
        if self.TRAINS == "lora" and not hasattr(model, "disable_adapter"):
            raise ConfigError(f"loss.method {self.NAME} trains LoRA adapters and needs a PEFT model (its reference pass "
                              f"switches them off), got a {type(model).__name__}: wrap it with peft.get_peft_model or "
                              "repbend.model.attach_lora first")
        return trainable_parameters(model)

    def check_strategy(self, strategy: str) -> None:
        if strategy not in self.STRATEGIES:
            raise TrainingError(f"loss.method {self.NAME} is not supported with distributed.strategy {strategy}; use "
                                f"{' or '.join(self.STRATEGIES)}")

    # ------------------------------------------------------------ the step
    def collate(self, micro: MicroBatch, pad_id: int, pack_length: int | None = None) -> StepBatch:
        raise NotImplementedError

    def __call__(self, model, batch: StepBatch, progress: float | None = None) -> LossTerms:
        raise NotImplementedError

    # ------------------------------------------------------------ output
    def save_weights(self, model, path, state: dict | None = None) -> None:
        """Write the trained weights in their loadable form: PEFT's adapter files (`state` = the full LoRA tensors
        when the model's are sharded)."""
        from ..distributed import unwrap_for_save
        unwrap_for_save(model).save_pretrained(str(path), state_dict=state)

    def merged_model(self, model):
        """The base model with the trained weights merged in."""
        from ..distributed import unwrap_for_save
        return unwrap_for_save(model).merge_and_unload()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.cfg!r})"
