"""The RepBend loss inside a Hugging Face `transformers.Trainer`: keep the Trainer (its logging, callbacks,
checkpoints, accelerate/DDP setup), swap in the loss.

    from transformers import TrainingArguments
    from repbend.integrations.hf import RepBendTrainer, micro_batch_dataset
    from repbend.loss import LossConfig

    model = peft.get_peft_model(base, lora_config)            # or repbend.model.attach_lora(base, settings, layers)
    args = TrainingArguments(output_dir="out", per_device_train_batch_size=1, gradient_accumulation_steps=4,
                             max_steps=max_steps, learning_rate=1e-5, lr_scheduler_type="constant")
    loss = LossConfig(target_layers="20-30")
    pools = build_pools(tokenizer, wgm_file, wj_file, uc_file, spec=RepBendLoss(loss).data_spec())
    rows = micro_batch_dataset(pools, batch_size=4, args=args, loss=loss)     # rows_needed(args) rows
    RepBendTrainer(model=model, args=args, train_dataset=rows, loss=loss).train()

`examples/hf_trainer.py` runs this on the bundled tiny model and synthetic data.

Dataset rows. One dataset row is one whole micro-batch of `repbend train` (a `MicroBatch`: the method's composition
of B rows per set, drawn by `repbend.data.sampler`), not one example: per_device_train_batch_size counts
micro-batches (1 gives `repbend train`'s micro-batches; k merges k of them), and `rows_needed(args)` is how many
rows a run reads. A row is held as plain Python values so that it also fits an Arrow table
(`datasets.Dataset.from_list`):

    {"index":   int,        the sampler's micro-batch index (seeds LoRA dropout, see below); -1 = none
     "n_pairs": int,        the last n_pairs sequences of safe and of unsafe are aligned WildJailbreak pairs
     "safe":    [{"input_ids": [int, ...], "request_len": int, "origin": str}, ...],
     "unsafe":  [... the same ...],
     "retain":  [... the same, request_len 0 ...]}

Tokens [0, request_len) of a sequence are its request, the rest its response (`repbend.loss.Sequence`).
`micro_batch_dataset(pools, ...)` gives rows i = sampler(start + i) of our own deterministic sampler;
`micro_batch_to_row` / `micro_batch_from_row` convert one row. A `MicroBatch` is accepted as a row as well.

A Trainer batch. `RepBendCollator` takes the `per_device_train_batch_size` rows k of one micro-step, merges them
into one MicroBatch (every row's unpaired sequences first, then every row's pairs, so that the pairs stay last and
aligned: k rows of B act as one micro-batch of kB, each term normalised over the whole of it), lays it out with
`RepBendLoss.collate` (packed into rows of at most `pack_length` tokens, as `repbend train`; None = one row per
sequence, padded) and returns

    {"rows":              int64 [k]     the rows' indices (the Trainer counts a batch's size from its first tensor)
     "repbend_batch":     StepBatch     the model input and every term's token sets (repbend.loss.batch)
     "input_ids":         int64 [R, T]  the packed rows (for the Trainer's FLOP and token counters)
     "attention_mask":    int64 [R, T]  1 = a real token, 0 = padding
     "micro_batch_index": int | None    the first row's index}

The step. `compute_loss` runs `RepBendLoss` on the PEFT model: a reference pass (adapters off, eval mode,
no_grad) and the trained pass (adapters on, in the mode the Trainer set: train in `train()`, so LoRA dropout is
on; eval in `evaluate()`, dropout off), both under the accelerator's autocast. progress = (global_step + 1) /
max_steps, the optimizer step the micro-batch belongs to (as `repbend train`; only circuit_breakers reads it).
The Trainer divides each micro-batch's loss by gradient_accumulation_steps (the rows hold no "labels"), so a step
is the mean over its micro-batches, as `repbend train`. LoRA dropout draws its masks from generators seeded by
(args.seed, the micro-batch index) (`repbend.trainer.micro_batch_rng`); with rows from `micro_batch_dataset`,
per_device_train_batch_size 1 and the sequential order this class uses for them, rank r of W takes indices
r, r+W, ...: the micro-batches, masks and losses of `repbend train` with the same seed and batch size.

Under DDP, FSDP or DeepSpeed the Trainer hands `compute_loss` the wrapped model, whose forward does the gradient
bookkeeping (DDP's reducer, parameter gathering); the loss bypasses the model's forward (it runs the decoder stack
itself), so it is run inside the wrapper's forward: the PEFT model's `forward` is swapped for the loss for that one
call. DDP needs find_unused_parameters (the Trainer's default for a PEFT model): the adapters of layers past the
last one the loss reads get no gradient. torch.nn.DataParallel (the Trainer's choice for several GPUs in one
process) is bypassed: the loss runs on the first GPU; launch with torchrun to use them all. The KL term reads the
LM head's weight directly, so sharded heads (DeepSpeed ZeRO-3, FSDP without use_orig_params) are not supported;
single-process and DDP are tested.

What it costs against `repbend train` (benchmarks/bench_hf_trainer.py: the same model, micro-batches and loss):
nothing measurable in tokens/s or memory: the collator packs exactly as `repbend train` does (the same rows, the
same two passes), the rows are built in the DataLoader (about 1 ms a step; dataloader_num_workers moves it off the
step), and the Trainer's own per-step work is small next to a step. What it leaves to the Trainer: `repbend
train`'s skipping of non-finite steps (max_bad_steps), its checkpoint format and resume checks, and its data
report and checks before step 1 (`repbend.build.check_data`).

Logging. Each logged training record gets the unweighted terms as loss_safe, loss_unsafe, loss_cos, loss_kl,
loss_pair (the names of `RepBendLoss.terms`, means over the micro-batches since the last log, over all
processes; "loss" is the Trainer's own, the weighted total); evaluation records get eval_loss_<term> the same way.
"""
from __future__ import annotations

import contextlib
import numbers
import sys
from collections.abc import Mapping

import torch
from transformers import Trainer, TrainingArguments

from ..errors import ConfigError
from ..loss import LossConfig, MicroBatch, RepBendLoss, Sequence
from ..loss.batch import StepBatch
from ..loss.layout import layout_kind
from ..loss.terms import LossTerms
from ..model import unwrap

__all__ = ["RepBendTrainer", "RepBendCollator", "MicroBatchDataset", "micro_batch_dataset", "rows_needed",
           "micro_batch_to_row", "micro_batch_from_row", "merge_micro_batches"]

SETS = ("safe", "unsafe", "retain")


# ---------------------------------------------------------------- dataset rows
def micro_batch_to_row(micro: MicroBatch, index: int = -1) -> dict:
    """One dataset row (module docstring) holding `micro`; `index` = its sampler index (-1 = none)."""
    return {"index": int(index), "n_pairs": int(micro.n_pairs),
            **{name: [{"input_ids": list(s.input_ids), "request_len": int(s.request_len), "origin": s.origin}
                      for s in getattr(micro, name)] for name in SETS}}


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def micro_batch_from_row(row, where: str = "row", need_request: bool = True) -> MicroBatch:
    """The MicroBatch of one dataset row; a malformed row raises ValueError naming `where`, the field and the
    sequence's origin. `need_request`: safe and unsafe sequences must have request_len >= 1 (RepBend's L_cos reads
    the last request token)."""
    if isinstance(row, MicroBatch):
        return row
    if not isinstance(row, Mapping):
        raise ValueError(f"{where}: a row is a dict with the fields safe, unsafe, retain, n_pairs (and index), "
                         f"got a {type(row).__name__}")
    missing = [k for k in (*SETS, "n_pairs") if k not in row]
    if missing:
        raise ValueError(f"{where}: missing field(s) {', '.join(missing)} (has {', '.join(map(str, row)) or 'none'})")
    sets = {}
    for name in SETS:
        items = row[name]
        if not isinstance(items, (list, tuple)):
            raise ValueError(f"{where}: field {name} must be a list of sequences, got a {type(items).__name__}")
        seqs = []
        for j, item in enumerate(items):
            field = f"{name}[{j}]"
            if not isinstance(item, Mapping) or "input_ids" not in item or "request_len" not in item:
                raise ValueError(f"{where}: field {field} must be a dict with input_ids and request_len")
            origin = str(item.get("origin") or "")
            at = f" ({origin})" if origin else ""
            raw, r = item["input_ids"], item["request_len"]
            raw = raw.tolist() if isinstance(raw, torch.Tensor) else raw
            if isinstance(raw, (str, bytes)) or not hasattr(raw, "__iter__") or not all(map(_is_int, raw)) \
                    or not _is_int(r):
                raise ValueError(f"{where}: field {field}{at}: input_ids must be a list of integers and request_len "
                                 "an integer")
            ids, r = tuple(int(t) for t in raw), int(r)
            if not ids:
                raise ValueError(f"{where}: field {field}.input_ids{at} is empty")
            if not 0 <= r <= len(ids):
                raise ValueError(f"{where}: field {field}.request_len{at} = {r} is outside [0, {len(ids)}] "
                                 f"(the sequence has {len(ids)} tokens)")
            if need_request and name != "retain" and r == 0:
                raise ValueError(f"{where}: field {field}.request_len{at} = 0: safe and unsafe sequences need a "
                                 "request (L_cos reads its last token)")
            seqs.append(Sequence(ids, r, origin))
        sets[name] = seqs
    n_pairs, most = row["n_pairs"], min(len(sets["safe"]), len(sets["unsafe"]))
    if not _is_int(n_pairs) or not 0 <= n_pairs <= most:
        raise ValueError(f"{where}: field n_pairs = {n_pairs!r} must be an integer in [0, {most}] (the shorter of "
                         "the safe and unsafe lists)")
    return MicroBatch(safe=sets["safe"], unsafe=sets["unsafe"], retain=sets["retain"], n_pairs=int(n_pairs))


def merge_micro_batches(micros: list[MicroBatch]) -> MicroBatch:
    """One MicroBatch of several: every one's unpaired safe/unsafe sequences, then every one's pairs (so the pairs
    are again the last n_pairs of both sets, aligned), and all retain sequences."""
    if len(micros) == 1:
        return micros[0]

    def side(name):
        head = [s for m in micros for s in getattr(m, name)[:len(getattr(m, name)) - m.n_pairs]]
        return head + [s for m in micros for s in getattr(m, name)[len(getattr(m, name)) - m.n_pairs:]]
    return MicroBatch(safe=side("safe"), unsafe=side("unsafe"), retain=[s for m in micros for s in m.retain],
                      n_pairs=sum(m.n_pairs for m in micros))


class MicroBatchDataset(torch.utils.data.Dataset):
    """Rows i = micro_batch_to_row(sampler(start + i)) for i < num_rows (a map-style dataset; rows are built on
    access, so any length costs nothing up front)."""

    def __init__(self, sampler, num_rows: int, start: int = 0):
        if num_rows < 1 or start < 0:
            raise ValueError(f"MicroBatchDataset: num_rows must be >= 1 and start >= 0, got {num_rows}, {start}")
        self.sampler, self.num_rows, self.start = sampler, num_rows, start

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, i: int) -> dict:
        if not -self.num_rows <= i < self.num_rows:
            raise IndexError(f"MicroBatchDataset: row {i} of {self.num_rows}")
        index = self.start + (i % self.num_rows)
        return micro_batch_to_row(self.sampler(index), index)


def rows_needed(args: TrainingArguments) -> int:
    """The dataset rows one run of `args` reads: a row is one micro-batch, so max_steps * gradient_accumulation_steps
    * world_size * per_device_train_batch_size (max_steps must be set: the rows are built on demand, any number)."""
    if not args.max_steps or args.max_steps < 1:
        raise ValueError("rows_needed: set TrainingArguments.max_steps (a row is one micro-batch; the dataset has as "
                         "many rows as the run reads)")
    return args.max_steps * args.gradient_accumulation_steps * args.world_size * args.per_device_train_batch_size


def micro_batch_dataset(pools, batch_size: int, num_rows: int | None = None, *, args: TrainingArguments | None = None,
                        seed: int = 42, group_by_length: bool = True, start: int = 0,
                        loss: RepBendLoss | LossConfig | None = None) -> MicroBatchDataset:
    """Rows from `repbend.data.MicroBatchSampler(pools, batch_size, seed, loss)`: row i = micro-batch start + i,
    with the composition of `loss`'s method (default: RepBend; the pools must be built with its `data_spec()`).
    `num_rows`: how many rows; None = `rows_needed(args)`, what one run of those TrainingArguments reads."""
    from ..data.sampler import MicroBatchSampler

    if num_rows is None:
        if args is None:
            raise TypeError("micro_batch_dataset: give num_rows, or args (the TrainingArguments: rows_needed(args))")
        num_rows = rows_needed(args)
    sampler = MicroBatchSampler(pools, batch_size, seed, loss, group_by_length=group_by_length)
    return MicroBatchDataset(sampler, num_rows, start)


# ---------------------------------------------------------------- collator
class RepBendCollator:
    """Dataset rows -> one Trainer batch (module docstring). `loss`: the RepBendLoss (or its LossConfig) whose
    token sets to build; `pack_length` None = one row per sequence, padded to the longest."""

    def __init__(self, loss: RepBendLoss | LossConfig, pad_id: int = 0, pack_length: int | None = 1024):
        self.loss_fn = loss if isinstance(loss, RepBendLoss) else RepBendLoss(loss)
        if pack_length is not None and pack_length < 1:
            raise ValueError(f"RepBendCollator: pack_length must be >= 1 or None, got {pack_length}")
        self.pad_id, self.pack_length = int(pad_id), pack_length
        # RepBend's L_cos reads each unsafe row's last request token: its rows need a request
        self.need_request = "cos" in self.loss_fn.terms

    def __call__(self, features: list) -> dict:
        if not features:
            raise ValueError("RepBendCollator: an empty batch (no dataset rows)")
        micros, indices = [], []
        for i, row in enumerate(features):
            index = row.get("index", -1) if isinstance(row, Mapping) else -1
            micros.append(micro_batch_from_row(row, f"RepBendCollator: batch row {i} (dataset index {index})",
                                               need_request=self.need_request))
            indices.append(int(index) if index is not None else -1)
        batch = self.loss_fn.collate(merge_micro_batches(micros), self.pad_id, self.pack_length)
        real = torch.zeros(batch.shape, dtype=torch.long)
        for p in batch.rows.placements:
            real[p.row, p.start:p.start + p.length] = 1
        return {"rows": torch.tensor(indices, dtype=torch.long), "repbend_batch": batch,
                "input_ids": batch.input_ids, "attention_mask": real,
                "micro_batch_index": indices[0] if indices[0] >= 0 else None}


# ---------------------------------------------------------------- trainer
class RepBendTrainer(Trainer):
    """A `transformers.Trainer` whose loss is `RepBendLoss(loss)` (module docstring).

    model: a PEFT model (repbend, circuit_breakers) or the plain HF model (rmu); `loss.prepare(model)` runs here,
        before the Trainer builds its optimizer from the tensors that require grad.
    loss: a LossConfig or a RepBendLoss (default: LossConfig()).
    data_collator: default `RepBendCollator(loss, pad_id, pack_length)`: pad_id = the processing class's pad token
        (else 0); pack_length 1024 (one row per micro-batch under flash-attention, as `repbend train`), None = no
        packing.
    args.remove_unused_columns is set to False: the rows' fields are not the model's forward arguments.
    Everything else goes to `transformers.Trainer`.
    """

    def __init__(self, model=None, args: TrainingArguments | None = None, *, loss: RepBendLoss | LossConfig |
                 None = None, data_collator=None, pad_id: int | None = None, pack_length: int | None = 1024, **kwargs):
        self.loss_fn = loss if isinstance(loss, RepBendLoss) else RepBendLoss(loss or LossConfig())
        if model is None:
            raise TypeError("RepBendTrainer: give the model (a PEFT model with LoRA adapters)")
        try:
            self.loss_fn.prepare(model)
        except ConfigError as e:  # e.g. a LoRA method given a plain model
            raise TypeError(f"RepBendTrainer: {e}") from None
        if args is None:
            args = TrainingArguments(output_dir="trainer_output")
        args.remove_unused_columns = False
        if data_collator is None:
            tok = kwargs.get("processing_class") or kwargs.get("tokenizer")
            if pad_id is None:
                pad_id = getattr(tok, "pad_token_id", None) or 0
            attn = getattr(unwrap(model).config, "_attn_implementation", None)
            if pack_length is not None and layout_kind(attn) == "varlen":
                pack_length = sys.maxsize  # flash-attn: every sequence of the micro-batch in one row, no padding
            data_collator = RepBendCollator(self.loss_fn, pad_id, pack_length)
        super().__init__(model=model, args=args, data_collator=data_collator, **kwargs)
        self._term_sums: dict[str, dict[str, tuple]] = {"train": {}, "eval": {}}

    # ------------------------------------------------------------ the loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        batch = inputs.get("repbend_batch") if isinstance(inputs, Mapping) else None
        if not isinstance(batch, StepBatch):
            keys = ", ".join(map(str, inputs)) if isinstance(inputs, Mapping) else type(inputs).__name__
            raise ValueError(f"RepBendTrainer: the batch has no 'repbend_batch' (it has {keys}): use RepBendCollator "
                             "as the data collator, and rows as in repbend.integrations.hf")
        max_steps = self.state.max_steps
        progress = min(1.0, (self.state.global_step + 1) / max_steps) if max_steps else None
        index = inputs.get("micro_batch_index")
        seeded = contextlib.nullcontext()
        if model.training and index is not None:
            from ..trainer import micro_batch_rng
            seeded = micro_batch_rng(self.args.seed, int(index), self.args.device)
        with self.accelerator.autocast(), seeded:
            terms = self._loss_in_forward(model, batch, progress)
        self._accumulate("train" if model.training else "eval", terms)
        return (terms.total, {"terms": terms.parts}) if return_outputs else terms.total

    def _loss_in_forward(self, model, batch: StepBatch, progress) -> LossTerms:
        inner = self.accelerator.unwrap_model(model)
        if inner is model or isinstance(model, torch.nn.DataParallel):  # one process: no gradients to sync
            return self.loss_fn(inner, batch, progress=progress)
        # a DDP / FSDP / DeepSpeed wrapper: run the loss as the inner model's forward, inside the wrapper's
        kept = {}

        def forward(*_args, **_kwargs):
            kept["terms"] = self.loss_fn(inner, batch, progress=progress)
            return kept["terms"].total
        own = vars(inner).get("forward")  # accelerate may have put an autocast wrapper there
        inner.forward = forward
        try:
            total = model()
        finally:
            if own is None:
                del inner.forward
            else:
                inner.forward = own
        return LossTerms(total=total, parts=kept["terms"].parts)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The loss of one evaluation batch (no logits, no labels: the loss is all there is to compare)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def _get_train_sampler(self, *args, **kwargs):
        dataset = args[0] if args else kwargs.get("train_dataset") or self.train_dataset
        if isinstance(dataset, MicroBatchDataset):  # already shuffled, deterministically: keep repbend train's order
            return torch.utils.data.SequentialSampler(dataset)
        return super()._get_train_sampler(*args, **kwargs)

    # ------------------------------------------------------------ logging
    def _accumulate(self, kind: str, terms: LossTerms) -> None:
        acc = self._term_sums[kind]
        for name in self.loss_fn.terms:
            v = terms.parts.get(name)
            if v is not None:  # kept on the device: read once per log, not per micro-batch
                total, n = acc.get(name, (0.0, 0))
                acc[name] = (total + v.detach().float(), n + 1)

    def _drain(self, kind: str) -> dict[str, float]:
        """Each term's mean since the last log, over all processes (a collective: every rank logs together)."""
        acc, self._term_sums[kind] = self._term_sums[kind], {}
        names, device = self.loss_fn.terms, self.args.device
        sums = torch.stack([torch.as_tensor(acc[n][0] if n in acc else 0.0, dtype=torch.float32).to(device)
                            for n in names])
        counts = torch.tensor([float(acc[n][1]) if n in acc else 0.0 for n in names], device=device)
        both = torch.cat([sums, counts])
        if self.args.world_size > 1:
            both = self.accelerator.reduce(both, reduction="sum")
        values = both.tolist()
        return {n: s / c for n, s, c in zip(names, values[:len(names)], values[len(names):]) if c > 0}

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs:
            logs.update({f"loss_{n}": v for n, v in self._drain("train").items()})
        elif "train_loss" in logs:  # the end-of-training summary: terms since the last log are not a summary
            self._term_sums["train"] = {}
        else:
            key = next((k for k in logs if k.endswith("_loss")), None)
            if key is not None:
                logs.update({f"{key}_{n}": v for n, v in self._drain("eval").items()})
        super().log(logs, *args, **kwargs)
