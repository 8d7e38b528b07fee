"""Cost-faithful re-creations of the reference repository's NPO and DPO steps, for benchmarks only. Each computes the
same loss as `repbend.loss.RepBendLoss(LossConfig(method=...))` on the same micro-batch (docs/method.md, "NPO" and
"DPO"), the way the reference code spends time and memory (its cost-only quirks):

NPO (`npo_reference_loss`), on the PEFT model, every pass a full causal-LM forward with fp32 logits [B, T, V]:
  - padding: each set right-padded to its longest row (the collator's `padding=True`);
  - the forget rows twice: the trained pass (per-row NLL sums from CrossEntropyLoss(reduction="none") on the shifted
    labels) and the reference pass (adapters off, eval, no_grad), which also computes the LM loss it never uses;
  - the safe side three times: a trained pass for the LM loss (HF's mean over label tokens), a second trained pass
    for the KL (a second dropout draw), and a reference pass; the KL from log-softmax and softmax copies of the
    full logits at the label positions (`F.kl_div(..., "batchmean")` over the selected positions);
DPO (`dpo_reference_loss`), on the PEFT model: TRL's concatenated forward of the 2N rows (chosen then rejected, each
request + response, right-padded to the longest, attention_mask = ids != pad), once with the adapters (train mode)
and once without (no_grad), each with a full-vocabulary log-softmax in fp32, the label log-probabilities gathered
and summed over the response tokens. TRL's column cut (a defect, docs/method.md) is not reproduced: every response
token counts in both.
Shapes: logits [B, T, V] fp32; losses float32 0-dim.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE = -100


@dataclass
class LabelledSet:
    ids: torch.Tensor          # [B, T] long, right-padded
    mask: torch.Tensor         # [B, T] long: 1 = a real token
    labels: torch.Tensor       # [B, T] long: the token where it is a target (or a KL position), else IGNORE

    def to(self, device) -> "LabelledSet":
        return LabelledSet(self.ids.to(device), self.mask.to(device), self.labels.to(device))


def labelled(seqs, pad_id: int, retain_from: int | None = None) -> LabelledSet:
    """Right-padded rows with the reference's labels: a one-shot row's response [r, n); a retain chat (the rows from
    index `retain_from` on) every token that is not `pad_id`."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE)
    for b, s in enumerate(seqs):
        row = torch.tensor(s.input_ids, dtype=torch.long)
        ids[b, :len(s)], mask[b, :len(s)] = row, 1
        if retain_from is not None and b >= retain_from:
            labels[b, :len(s)] = torch.where(row != pad_id, row, IGNORE)
        else:
            labels[b, s.request_len:len(s)] = row[s.request_len:]
    return LabelledSet(ids, mask, labels)


@dataclass
class NPOBatch:
    forget: LabelledSet
    side: LabelledSet              # the safe side: safe rows, then retain chats
    useful_tokens: int

    @property
    def positions(self) -> int:
        """Positions of one pass over each set (the reference runs the safe side three times, the forget rows twice)."""
        return self.forget.ids.numel() + self.side.ids.numel()

    def to(self, device) -> "NPOBatch":
        return NPOBatch(self.forget.to(device), self.side.to(device), self.useful_tokens)


def build_npo_batch(micro, pad_id: int) -> NPOBatch:
    side = list(micro.safe) + list(micro.retain)
    return NPOBatch(labelled(micro.unsafe, pad_id), labelled(side, pad_id, retain_from=len(micro.safe)),
                    sum(len(s) for s in list(micro.unsafe) + side))


def _logits(model, s: LabelledSet) -> torch.Tensor:
    return model(input_ids=s.ids, attention_mask=s.mask, use_cache=False).logits.float()   # [B, T, V]


def _nll_rows(logits, labels) -> torch.Tensor:
    """Per-row sums of -log p(label) on the shifted labels: [B]."""
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=IGNORE, reduction="none")
    return ce.sum(-1)


def npo_reference_loss(model, nb: NPOBatch, cfg, mark=None):
    """(total, {"npo", "ce", "kl"}) as the reference computes them (module docstring); `model` the PEFT model in
    train mode, `nb` on its device."""
    mark = mark or (lambda phase: None)
    beta, T = cfg.npo_beta, cfg.temperature
    forget, side = nb.forget, nb.side
    nll = _nll_rows(_logits(model, forget), forget.labels)
    mark("lora_forward")
    model.eval()
    with torch.no_grad(), model.disable_adapter():
        ref_logits = _logits(model, forget)
        nll_ref = _nll_rows(ref_logits, forget.labels)
        _unused = F.cross_entropy(ref_logits[:, :-1].transpose(1, 2), forget.labels[:, 1:], ignore_index=IGNORE)
        del ref_logits, _unused
        side_ref = _logits(model, side)
        mark("ref_forward")
    model.train()
    parts = {"npo": (-(2.0 / beta) * F.logsigmoid(beta * (nll - nll_ref))).mean(), "ce": None, "kl": None}
    if cfg.npo_alpha > 0:
        z = _logits(model, side)
        parts["ce"] = F.cross_entropy(z[:, :-1].transpose(1, 2), side.labels[:, 1:], ignore_index=IGNORE)
        del z
        mark("lora_forward")
    if cfg.npo_gamma > 0:
        z = _logits(model, side)                                           # the second trained pass
        m = side.labels != IGNORE                                          # unshifted: the label positions
        parts["kl"] = F.kl_div(F.log_softmax(z[m] / T, -1), F.softmax(side_ref[m] / T, -1),
                               reduction="batchmean") * T * T
        del z
        mark("lora_forward")
    del side_ref
    total = parts["npo"] + sum(w * parts[k] for k, w in (("ce", cfg.npo_alpha), ("kl", cfg.npo_gamma))
                               if parts[k] is not None)
    mark("terms")
    return total, parts


@dataclass
class DPOBatch:
    rows: LabelledSet              # 2N rows: the chosen ones, then the rejected ones
    n_pairs: int
    useful_tokens: int

    @property
    def positions(self) -> int:
        return self.rows.ids.numel()

    def to(self, device) -> "DPOBatch":
        return DPOBatch(self.rows.to(device), self.n_pairs, self.useful_tokens)


def build_dpo_batch(micro, pad_id: int) -> DPOBatch:
    P = micro.n_pairs
    seqs = list(micro.safe[len(micro.safe) - P:]) + list(micro.unsafe[len(micro.unsafe) - P:])
    rows = labelled(seqs, pad_id)
    rows.mask = (rows.ids != pad_id).long() * rows.mask              # every pad-valued token hidden
    rows.labels = torch.where(rows.ids != pad_id, rows.labels, IGNORE)
    return DPOBatch(rows, P, sum(len(s) for s in seqs))


def _logp_rows(logits, labels) -> torch.Tensor:
    """Per-row sums of log p(label) on the shifted labels, from a full log-softmax: [2N]."""
    lp = torch.log_softmax(logits[:, :-1], dim=-1)                      # [2N, T-1, V] fp32
    target = labels[:, 1:]
    picked = lp.gather(-1, target.clamp(min=0)[..., None])[..., 0]
    return torch.where(target != IGNORE, picked, 0.0).sum(-1)


def dpo_reference_loss(model, db: DPOBatch, cfg, mark=None):
    """(total, {"dpo"}) as TRL's DPO computes it (module docstring)."""
    mark = mark or (lambda phase: None)
    rows, P = db.rows, db.n_pairs
    logp = _logp_rows(_logits(model, rows), rows.labels)
    mark("lora_forward")
    model.eval()
    with torch.no_grad(), model.disable_adapter():
        logp_ref = _logp_rows(_logits(model, rows), rows.labels)
        mark("ref_forward")
    model.train()
    margin = (logp[:P] - logp[P:]) - (logp_ref[:P] - logp_ref[P:])
    total = -F.logsigmoid(cfg.dpo_beta * margin).mean()
    mark("terms")
    return total, {"dpo": total}
