"""The RepBend loss of one micro-batch (docs/method.md, "The loss"):

    L = alpha*L_safe - beta*L_unsafe + gamma*L_cos + epsilon*L_KL + eta*L_pair

    L_safe   = sum_{l in S} sum_{safe tokens} ||h'_l - h_l||_2 / (|S| * n_safe_tokens)
    L_unsafe = sum_{l in U} sum_{unsafe tokens} ||h'_l - h_l||_2 / (|U| * n_unsafe_tokens)
    L_cos    = mean_{l in U} mean_{i != j} (1 - cos(u_li, u_lj)),  u = h' at each unsafe row's last request token
    L_KL     = T^2 * sum_{retain tokens} KL(softmax(z/T) || softmax(z'/T)) / n_retain_sequences
    L_pair   = sum_{l in U} sum_{pairs, k < R'} ||h'_l(harmful)[p+k] - h_l(refusal)[p+k]||_2 / (|U| * n_pairs * R')

h' = trained pass (adapters on), h = reference pass (adapters off); z, z' = the LM head applied to the final
normed hidden states (soft-capped like the model's own logits where its config says so). S = all n_layers+1
indices (alpha_mode=all) or U (alpha_mode=target). A term whose weight is 0 is not computed (logged as None).
"""
from __future__ import annotations

import torch

from repbend.kernels import linear_kl, pairwise_cosine_loss, rep_distance

from ..model import decoder_layers, lm_head, unwrap
from .batch import StepBatch
from .config import LossConfig
from .passes import gathered_reference, trained_pass
from .terms import LossTerms, check_layers, trainable_parameters


class RepBendObjective:
    """RepBend on a PEFT model: the reference pass is the same model with its adapters disabled."""

    TERMS = ("safe", "unsafe", "cos", "kl", "pair")

    def __init__(self, cfg: LossConfig, impl: str = "auto"):
        self.cfg, self.impl = cfg, impl

    def prepare(self, model) -> list[torch.nn.Parameter]:
        """The tensors that train: the LoRA adapters (PEFT marks them requires_grad)."""
        return trainable_parameters(model)

    def layer_sets(self, n_layers: int) -> tuple[list[int], list[int]]:
        """(S, U): the hidden-state indices of L_safe and of the unsafe-side terms."""
        U = check_layers(self.cfg.target_layers, n_layers, "loss.target_layers")
        S = list(range(n_layers + 1)) if self.cfg.alpha_mode == "all" else U
        return S, U

    def __call__(self, model, batch: StepBatch, progress: float | None = None) -> LossTerms:
        cfg, impl, ix = self.cfg, self.impl, batch.index
        n_layers = len(decoder_layers(model))
        S, U = self.layer_sets(n_layers)
        use = {
            "safe": cfg.alpha != 0 and ix["safe"].numel() > 0,
            "unsafe": cfg.beta != 0 and ix["unsafe"].numel() > 0,
            "cos": cfg.gamma != 0 and ix["cos"].numel() > 0,
            "kl": cfg.epsilon != 0 and batch.n_retain > 0,
            "pair": cfg.eta != 0 and batch.pair_len > 0,
        }
        reads = {"safe": (S, "safe"), "unsafe": (U, "unsafe"), "pair": (U, "pair_ref"), "kl": ([n_layers], "retain")}
        ref = gathered_reference(model, batch, {t: (layers, ix[key]) for t, (layers, key) in reads.items() if use[t]})

        need = set()
        if use["safe"]:
            need |= set(S)
        if use["unsafe"] or use["cos"] or use["pair"]:
            need |= set(U)
        if use["kl"]:
            need.add(n_layers)
        hs = trained_pass(model, batch, sorted(need)) if need else {}

        parts: dict[str, torch.Tensor | None] = dict.fromkeys(self.TERMS)
        for term, layers, key in (("safe", S, "safe"), ("unsafe", U, "unsafe")):
            if use[term]:
                d = rep_distance([hs[i] for i in layers], torch.stack([ref[term][i] for i in layers]), ix[key],
                                 impl=impl)
                parts[term] = d.l2.sum() / (len(layers) * ix[key].numel())
        if use["cos"]:
            last = torch.stack([hs[i].reshape(-1, hs[i].shape[-1]).index_select(0, ix["cos"]) for i in U])
            parts["cos"] = pairwise_cosine_loss(last, impl=impl)
        if use["kl"]:
            w = lm_head(model).weight
            top = hs[n_layers]
            final = top.reshape(-1, top.shape[-1]).index_select(0, ix["retain"])
            # one dtype for the fused projection: under autocast the hidden states and the head may differ
            cap = getattr(unwrap(model).config, "final_logit_softcapping", None)  # the model's own logits' cap
            parts["kl"] = linear_kl(final.to(w.dtype), ref["kl"][n_layers].to(w.dtype), w,
                                    temperature=cfg.temperature, impl=impl, softcap=cap) / batch.n_retain
        if use["pair"]:
            d = rep_distance([hs[i] for i in U], torch.stack([ref["pair"][i] for i in U]), ix["pair"], impl=impl)
            parts["pair"] = d.l2.sum() / (len(U) * batch.n_pairs * batch.pair_len)
        return LossTerms.weighted(parts, cfg.weights())

