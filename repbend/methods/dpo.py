"""DPO (direct preference optimisation) on a PEFT model, as the RepBend paper's baseline computes it
(docs/method.md, "DPO"):

    L_dpo = mean over pairs of -log sigmoid(beta * [(logp'_c - logp'_r) - (logp_c - logp_r)])

For each row k (request [0, r_k), response [r_k, n_k)): A_k = {t < n_k : x_t != pad}, its attended tokens, and
logp_k = sum of lp(t) = log_softmax(z_{t-1})[x_t] over t in A_k with t >= r_k (a sum: no length normalisation). c =
the chosen row (the request with its refusal), r = the rejected row (the same request with its harmful answer); '
marks the trained pass (adapters on), no mark the reference pass (adapters off). At LoRA B = 0: L_dpo = ln 2.
`progress` is unused.

Hidden tokens: pad = the tokenizer's pad token, the reference's EOS (Llama-3-Instruct's <|eot_id|>, which ends the
request's user turn). The reference hides every pad-valued token from attention while keeping the positions of the
others; so does this method, on every attention backend (`repbend.loss.layout`, hide_id): a hidden token is no
query's key and no label. Under flash-attn's varlen layout a hidden token's own output does not exist: a response
token following a pad-valued one is then an error (it never happens with bare response text).

Data: WildJailbreak pairs only (chosen = refusal, rejected = harmful answer), B pairs per micro-batch: safe = the B
chosen rows, unsafe = the B rejected rows, n_pairs = B. Rows rendered as RepBend's (request with the generation
prompt + bare response).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config_fields import Group
from ..errors import TrainingError
from ..loss.batch import StepBatch, long, useful_tokens
from ..loss.layout import lay_out
from ..loss.passes import gathered_reference, trained_pass
from ..loss.terms import LossTerms
from ..loss.types import MicroBatch
from ..model import decoder_layers, lm_head, unwrap
from ..roles import DataSpec, Draw
from .base import Method


@dataclass
class DPOSettings(Group):
    NAME = "loss"

    dpo_beta: float = 0.1
    """beta of L_dpo = -log sigmoid(beta [(logp'_c - logp'_r) - (logp_c - logp_r)])."""

    def validate(self) -> None:
        self.check(self.dpo_beta > 0, "dpo_beta", "be positive")


@dataclass
class DPOBatch(StepBatch):
    n_pairs: int = 0
    reads_hidden: bool = False   # a label's logits come from a hidden token's output (impossible under varlen)


class DPO(Method):
    """DPO on a PEFT model: the reference pass is the same model with its adapters disabled."""

    NAME = "dpo"
    SUMMARY = "DPO (refusal preferred over the harmful answer of each WildJailbreak request)"
    Settings = DPOSettings
    TERMS = ("dpo",)

    def data_spec(self, empty_request_p: float = 0.5) -> DataSpec:
        return DataSpec(roles=("pair",), description="dpo pairs (requests with bare responses)")

    def draws(self, pools, batch_size: int) -> dict[str, Draw]:
        return {"pair": Draw((("pair", None),), batch_size)}

    def assemble(self, drawn) -> MicroBatch:
        pairs = [item for _, item in drawn["pair"]]
        return MicroBatch(safe=[c for c, _ in pairs], unsafe=[r for _, r in pairs], retain=[], n_pairs=len(pairs))

    def composition(self, pools, batch_size: int) -> str:
        return (f"batch_size {batch_size}: {batch_size} WildJailbreak pairs ({batch_size} chosen refusals, "
                f"{batch_size} rejected harmful answers)")

    def check_data(self, pools, describe) -> None:
        if not pools.pair:
            raise TrainingError(f"dpo reads WildJailbreak pairs and there are none: {describe('pair')}")

    def collate(self, micro: MicroBatch, pad_id: int, pack_length: int | None = None) -> DPOBatch:
        P = micro.n_pairs
        seqs = list(micro.safe[len(micro.safe) - P:]) + list(micro.unsafe[len(micro.unsafe) - P:])  # chosen, rejected
        if not seqs:
            raise ValueError("dpo: the micro-batch holds no pairs (n_pairs = 0)")
        rows = lay_out(seqs, pad_id, pack_length, hide_id=pad_id)
        T, placed = rows.row_len, rows.placements
        at, labels, row, reads_hidden = [], [], [], False
        for k, s in enumerate(seqs):
            ids = s.input_ids
            for t in range(max(s.request_len, 1), len(s)):
                if ids[t] != pad_id:
                    at.append(placed[k].flat(T, t - 1))
                    labels.append(ids[t])
                    row.append(k)
                    reads_hidden |= ids[t - 1] == pad_id
        batch = DPOBatch(rows, useful_tokens=useful_tokens(seqs), n_pairs=P, reads_hidden=reads_hidden)
        batch.index.update(at=long(at), label=long(labels), row=long(row))
        return batch

    def __call__(self, model, batch: DPOBatch, progress: float | None = None) -> LossTerms:
        from repbend.kernels import linear_logprob

        ix, P = batch.index, batch.n_pairs
        attn = getattr(unwrap(model).config, "_attn_implementation", None)
        if batch.reads_hidden and batch.rows.compacted(attn):
            raise ValueError("dpo: a response token follows a pad-valued token, whose output flash-attn's varlen "
                             "layout leaves out; use attn_implementation sdpa (or clean the pad token from the "
                             "response text)")
        n = len(decoder_layers(model))
        w = lm_head(model).weight
        cap = getattr(unwrap(model).config, "final_logit_softcapping", None)  # the model's own logits' cap

        def logp(h):  # per row: the sum of its labels' log-probabilities, [2P] (chosen then rejected)
            lp = linear_logprob(h.to(w.dtype), w, ix["label"], softcap=cap, impl=self.impl)
            return torch.zeros(2 * P, device=lp.device, dtype=torch.float32).index_add(0, ix["row"], lp.float())

        ref = gathered_reference(model, batch, {"dpo": ([n], ix["at"])})
        with torch.no_grad():
            original = logp(ref["dpo"][n])
        top = trained_pass(model, batch, [n])[n]
        trained = logp(top.reshape(-1, top.shape[-1]).index_select(0, ix["at"]))
        margin = (trained[:P] - trained[P:]) - (original[:P] - original[P:])
        parts = {"dpo": -F.logsigmoid(self.cfg.dpo_beta * margin).mean()}
        return self.total(parts, {"dpo": 1.0}, {"dpo": True})
