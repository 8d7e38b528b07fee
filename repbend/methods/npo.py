"""NPO (negative preference optimisation) on a PEFT model, as the RepBend paper's baseline computes it
(docs/method.md, "NPO"):

    total = npo_alpha * L_ce + L_npo + npo_gamma * L_kl

    L_npo = mean over forget rows u of -(2/beta) * log sigmoid(beta * (NLL'_u - NLL_u))
    L_ce  = sum over the safe side's label positions of -lp'(t) / their number
    L_kl  = T^2 * sum over the safe side's KL positions of KL(softmax(z_t/T) || softmax(z'_t/T)) / their number

lp(t) = log_softmax(z_{t-1})[x_t], the log-probability of token t (the logits of the position before it); z' = the
trained pass (adapters on, train mode), z = the reference pass (adapters off, eval mode, no_grad); T = temperature.
NLL_u = sum_{t in [r_u, n_u)} -lp(t): the response's negative log-likelihood, summed over its tokens (not averaged).

Rows (a row's request is [0, r), its response [r, n); pad = the tokenizer's pad token, the reference's EOS):
    forget     the unsafe rows (WildGuardMix unsafe + WildJailbreak harmful answers): label positions [r, n)
    safe side  the safe rows (WildGuardMix safe + WildJailbreak refusals): CE labels and KL positions [r, n);
               the retain chats (UltraChat, whole chat template): CE labels every t >= 1 with x_t != pad, KL
               positions every t with x_t != pad (so each end-of-turn is attended but neither a target nor a KL
               position, and the KL is read at the label positions themselves, unshifted, as the reference does)
B forget rows and B safe-side rows (safe + retain drawn from one pool, repbend/methods/forget_retain.py) per
micro-batch; rows rendered as RepBend's (request with the generation prompt + bare response), no empty
instructions. At LoRA B = 0: L_npo = 2 ln 2 / beta, L_kl = 0. A weight <= 0 skips its term (part None); `progress` is
unused.

One reference pass (the forget rows' label positions and the safe side's KL positions, gathered at the final normed
hidden state) and one trained pass over every row: the LM head goes through `repbend.kernels.linear_logprob` and
`linear_kl`, never a full-vocabulary logit tensor.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config_fields import Group
from ..loss.batch import StepBatch, long, sequences, set_ranges, useful_tokens
from ..loss.layout import lay_out
from ..loss.passes import gathered_reference, trained_pass
from ..loss.terms import LossTerms
from ..model import decoder_layers, lm_head, unwrap
from ..roles import DataSpec
from .forget_retain import ForgetRetain


@dataclass
class NPOSettings(Group):
    NAME = "loss"

    npo_beta: float = 0.1
    """beta of L_npo = -(2/beta) log sigmoid(beta (NLL' - NLL))."""
    npo_alpha: float = 1.0
    """Weight of L_ce, the language-model loss on the safe side (<= 0 skips it)."""
    npo_gamma: float = 0.1
    """Weight of L_kl, the KL divergence on the safe side (<= 0 skips it)."""
    temperature: float = 2.0
    """KL temperature T."""

    def validate(self) -> None:
        self.check(self.npo_beta > 0, "npo_beta", "be positive")
        self.check(self.temperature > 0, "temperature", "be positive")


@dataclass
class NPOBatch(StepBatch):
    n_forget: int = 0      # forget rows (the per-row sums of L_npo)


class NPO(ForgetRetain):
    """NPO on a PEFT model: the reference pass is the same model with its adapters disabled."""

    NAME = "npo"
    SUMMARY = "NPO (negative preference optimisation on the harmful answers), the paper's baseline"
    Settings = NPOSettings
    TERMS = ("npo", "ce", "kl")

    def data_spec(self, empty_request_p: float = 0.5) -> DataSpec:
        return DataSpec(description="npo rows (requests with bare responses)")

    def collate(self, micro, pad_id: int, pack_length: int | None = None) -> NPOBatch:
        seqs = sequences(micro)
        safe, unsafe, retain = set_ranges(micro)
        rows = lay_out(seqs, pad_id, pack_length)
        T, P = rows.row_len, rows.placements

        def labels(ks, ts):  # (flat index of the position before each label, label id, row number)
            out = [(P[k].flat(T, t - 1), seqs[k].input_ids[t], j) for j, k in enumerate(ks) for t in ts(k)]
            return long(a for a, _, _ in out), long(b for _, b, _ in out), long(c for _, _, c in out)

        response = lambda k: range(max(seqs[k].request_len, 1), len(seqs[k]))  # noqa: E731
        real = lambda k, start: [t for t in range(start, len(seqs[k])) if seqs[k].input_ids[t] != pad_id]  # noqa: E731
        batch = NPOBatch(rows, useful_tokens=useful_tokens(seqs), n_forget=len(unsafe))
        ix = batch.index
        ix["npo_at"], ix["npo_label"], ix["npo_row"] = labels(unsafe, response)
        side_ce = lambda k: response(k) if k in safe else real(k, 1)  # noqa: E731
        ix["ce_at"], ix["ce_label"], _ = labels([*safe, *retain], side_ce)
        ix["kl_at"] = long(sorted(P[k].flat(T, t) for k in [*safe, *retain]
                                  for t in (range(seqs[k].request_len, len(seqs[k])) if k in safe else real(k, 0))))
        return batch

    def __call__(self, model, batch: NPOBatch, progress: float | None = None) -> LossTerms:
        from repbend.kernels import linear_kl, linear_logprob

        cfg, impl, ix = self.cfg, self.impl, batch.index
        n = len(decoder_layers(model))
        use = {"npo": batch.n_forget > 0,
               "ce": cfg.npo_alpha > 0 and ix["ce_at"].numel() > 0,
               "kl": cfg.npo_gamma > 0 and ix["kl_at"].numel() > 0}
        reads = {"npo": ([n], ix["npo_at"]), "kl": ([n], ix["kl_at"])}
        ref = gathered_reference(model, batch, {t: r for t, r in reads.items() if use[t] and r[1].numel()})
        top = trained_pass(model, batch, [n])[n]
        flat = top.reshape(-1, top.shape[-1])
        w = lm_head(model).weight
        cap = getattr(unwrap(model).config, "final_logit_softcapping", None)  # the model's own logits' cap

        def logprob(h, label):  # one dtype for the fused projection: under autocast h and the head may differ
            return linear_logprob(h.to(w.dtype), w, label, softcap=cap, impl=impl)

        parts: dict[str, torch.Tensor | None] = dict.fromkeys(self.TERMS)
        if use["npo"]:
            def nll(lp):  # per forget row: the sum of -lp over its response tokens
                return torch.zeros(batch.n_forget, device=lp.device, dtype=torch.float32).index_add(
                    0, ix["npo_row"], -lp.float())
            trained = nll(logprob(flat.index_select(0, ix["npo_at"]), ix["npo_label"]))
            with torch.no_grad():
                original = nll(logprob(ref["npo"][n], ix["npo_label"])) if ix["npo_at"].numel() \
                    else torch.zeros_like(trained)
            parts["npo"] = (-(2.0 / cfg.npo_beta) * F.logsigmoid(cfg.npo_beta * (trained - original))).mean()
        if use["ce"]:
            lp = logprob(flat.index_select(0, ix["ce_at"]), ix["ce_label"])
            parts["ce"] = -lp.float().sum() / ix["ce_at"].numel()
        if use["kl"]:
            h = flat.index_select(0, ix["kl_at"])
            parts["kl"] = linear_kl(h.to(w.dtype), ref["kl"][n].to(w.dtype), w, temperature=cfg.temperature,
                                    impl=impl, softcap=cap) / ix["kl_at"].numel()
        weights = {"npo": 1.0, "ce": max(cfg.npo_alpha, 0.0), "kl": max(cfg.npo_gamma, 0.0)}
        return self.total(parts, weights, {"npo": batch.n_forget > 0, "ce": ix["ce_at"].numel() > 0,
                                           "kl": ix["kl_at"].numel() > 0})
