"""The RepBend loss of one micro-batch (REFERENCE.md, "The loss"):

    L = alpha*L_safe - beta*L_unsafe + gamma*L_cos + epsilon*L_KL + eta*L_pair

    L_safe   = sum_{l in S} sum_{safe tokens} ||h'_l - h_l||_2 / (|S| * n_safe_tokens)
    L_unsafe = sum_{l in U} sum_{unsafe tokens} ||h'_l - h_l||_2 / (|U| * n_unsafe_tokens)
    L_cos    = mean_{l in U} mean_{i != j} (1 - cos(u_li, u_lj)),  u = h' at each unsafe row's last request token
    L_KL     = T^2 * sum_{retain tokens} KL(softmax(z/T) || softmax(z'/T)) / n_retain_sequences
    L_pair   = sum_{l in U} sum_{pairs, k < R'} ||h'_l(harmful)[p+k] - h_l(refusal)[p+k]||_2 / (|U| * n_pairs * R')

h' = trained pass (adapters on), h = reference pass (adapters off); z, z' = the LM head applied to the final
normed hidden states. S = all n_layers+1 indices (alpha_mode=all) or U (alpha_mode=target). A term whose
weight is 0 is not computed (logged as None).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from repbend.kernels import linear_kl, pairwise_cosine_loss, rep_distance

from .batching import StepBatch
from .config import LossConfig
from .model import lm_head
from .passes import reference_pass, trained_pass

TERMS = ("safe", "unsafe", "cos", "kl", "pair")


@dataclass
class LossTerms:
    total: torch.Tensor
    parts: dict[str, torch.Tensor | None]

    def detached(self) -> dict[str, torch.Tensor]:
        """The total ("loss") and every computed term, detached, still on the device (no host sync)."""
        out = {"loss": self.total.detach()}
        out.update({k: v.detach() for k, v in self.parts.items() if v is not None})
        return out


def layer_sets(loss: LossConfig, n_layers: int) -> tuple[list[int], list[int]]:
    """(S, U): the hidden-state indices of L_safe and of the unsafe-side terms."""
    U = list(loss.target_layers)
    bad = [i for i in U if not 0 <= i <= n_layers]
    if bad:
        raise ValueError(f"loss.target_layers {bad} out of range: the model has hidden-state indices 0..{n_layers}")
    S = list(range(n_layers + 1)) if loss.alpha_mode == "all" else U
    return S, U


def repbend_loss(model, batch: StepBatch, loss: LossConfig, n_layers: int, impl: str = "auto",
                 runner=None) -> LossTerms:
    """Reference pass, trained pass, then the five terms. `model` is the PEFT model; `runner` the module that
    runs its decoder stack (default: the stack itself; under DDP its wrapper). `batch` is on the model's device."""
    S, U = layer_sets(loss, n_layers)
    use = {
        "safe": loss.alpha != 0 and batch.safe_index.numel() > 0,
        "unsafe": loss.beta != 0 and batch.unsafe_index.numel() > 0,
        "cos": loss.gamma != 0 and batch.cos_index.numel() > 0,
        "kl": loss.epsilon != 0 and batch.n_retain_seqs > 0,
        "pair": loss.eta != 0 and batch.pair_len > 0,
    }

    # what the reference pass keeps: per index, the gathered rows of each term that reads it
    wanted: dict[int, list] = {}
    def want(indices, key, idx):  # noqa: E306
        for i in indices:
            wanted.setdefault(i, []).append((key, idx))
    if use["safe"]:
        want(S, "safe", batch.safe_index)
    if use["unsafe"]:
        want(U, "unsafe", batch.unsafe_index)
    if use["pair"]:
        want(U, "pair", batch.pair_ref_index)
    if use["kl"]:
        want([n_layers], "kl", batch.retain_index)
    ref = {}
    if wanted:
        kept = reference_pass(model, batch, {i: tuple(idx for _, idx in w) for i, w in wanted.items()}, runner)
        for i, w in wanted.items():
            for (key, _), rows in zip(w, kept[i]):
                ref.setdefault(key, {})[i] = rows

    need = set()
    if use["safe"]:
        need |= set(S)
    if use["unsafe"] or use["cos"] or use["pair"]:
        need |= set(U)
    if use["kl"]:
        need.add(n_layers)
    hs = trained_pass(model, batch, sorted(need), runner) if need else {}

    parts: dict[str, torch.Tensor | None] = dict.fromkeys(TERMS)
    if use["safe"]:
        d = rep_distance([hs[i] for i in S], torch.stack([ref["safe"][i] for i in S]), batch.safe_mask, impl=impl)
        parts["safe"] = d.l2.sum() / (len(S) * d.count.clamp(min=1))
    if use["unsafe"]:
        d = rep_distance([hs[i] for i in U], torch.stack([ref["unsafe"][i] for i in U]), batch.unsafe_mask,
                         impl=impl)
        parts["unsafe"] = d.l2.sum() / (len(U) * d.count.clamp(min=1))
    if use["cos"]:
        last = torch.stack([hs[i].reshape(-1, hs[i].shape[-1]).index_select(0, batch.cos_index) for i in U])
        parts["cos"] = pairwise_cosine_loss(last, impl=impl)
    if use["kl"]:
        w = lm_head(model).weight
        final = hs[n_layers].reshape(-1, hs[n_layers].shape[-1]).index_select(0, batch.retain_index)
        # one dtype for the fused projection: under autocast the hidden states and the head may differ
        parts["kl"] = linear_kl(final.to(w.dtype), ref["kl"][n_layers].to(w.dtype), w,
                                temperature=loss.temperature, impl=impl) / batch.n_retain_seqs
    if use["pair"]:
        d = rep_distance([hs[i] for i in U], torch.stack([ref["pair"][i] for i in U]), batch.pair_mask, impl=impl)
        parts["pair"] = d.l2.sum() / (len(U) * batch.n_pairs * batch.pair_len)

    weights = {"safe": loss.alpha, "unsafe": -loss.beta, "cos": loss.gamma, "kl": loss.epsilon, "pair": loss.eta}
    total = None
    for k, v in parts.items():
        if v is not None:
            total = weights[k] * v if total is None else total + weights[k] * v
    if total is None:
        raise ValueError("every loss term is switched off or has no tokens in this micro-batch")
    return LossTerms(total=total, parts=parts)
