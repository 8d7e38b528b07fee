"""RepBend (Representation Bending) on a PEFT model (docs/method.md, "The RepBend loss"):

    L = alpha*L_safe - beta*L_unsafe + gamma*L_cos + epsilon*L_KL + eta*L_pair

    L_safe   = sum_{l in S} sum_{safe tokens} ||h'_l - h_l||_2 / (|S| * n_safe_tokens)
    L_unsafe = sum_{l in U} sum_{unsafe tokens} ||h'_l - h_l||_2 / (|U| * n_unsafe_tokens)
    L_cos    = mean_{l in U} mean_{i != j} (1 - cos(u_li, u_lj)),  u = h' at each unsafe row's last request token
    L_KL     = T^2 * sum_{retain tokens} KL(softmax(z/T) || softmax(z'/T)) / n_retain_sequences
    L_pair   = sum_{l in U} sum_{pairs, k < R'} ||h'_l(harmful)[p+k] - h_l(refusal)[p+k]||_2 / (|U| * n_pairs * R')

h' = trained pass (adapters on), h = reference pass (adapters off); z, z' = the LM head applied to the final
normed hidden states (soft-capped like the model's own logits where its config says so). S = all n_layers+1
indices (alpha_mode=all) or U (alpha_mode=target). A term whose weight is 0 is not computed (logged as None).

Micro-batch (B = train.batch_size), by role:
    response modes, WGM + WJ:   safe   = B safe + the refusal side of B pairs
                                unsafe = B unsafe + the harmful side of the same B pairs (n_pairs = B, aligned last)
    response modes, WGM only:   safe = 2B safe, unsafe = 2B unsafe, n_pairs = 0
    response modes, WJ only:    safe = B refusals, unsafe = the same B pairs' harmful answers, n_pairs = B
    request-only modes:         safe = B unharmful requests; unsafe = B harmful requests + B WJ requests (2B
                                harmful requests without WJ); n_pairs = 0 (a WJ "pair" is one request twice, and
                                pairing a request with itself carries no signal). WildGuardMix is required.
    retain = B UltraChat chats (none without UltraChat).

Token sets, for a row whose request is [0, r) and response [r, n):

    request_last      r-1                 request_all   [0, r)   (the rows hold the request only)
    request_response  [0, n)              response_all  [r, n)
    response_one      r                   response_R    [r, min(r+R, n))

    safe, unsafe   the mode's positions of every safe / unsafe row, ascending
    cos            the last request token r-1 of every unsafe row, in row order
    pair           positions p .. p+R'-1 (p = r-1) of the harmful pair rows (the trained side), ascending,
    pair_ref       and the same positions of the aligned refusal rows (the reference side), in matching order;
                   R' = min(paired_repr_length, the shortest response among the pair rows)
    retain         every token of the retain rows, ascending
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from repbend.kernels import linear_kl, pairwise_cosine_loss, rep_distance

from ..config_fields import Group, Layers
from ..errors import TrainingError
from ..loss.batch import (StepBatch, every_token, long, require_request, sequences, set_ranges, tokens_at,
                          useful_tokens)
from ..loss.layout import lay_out
from ..loss.passes import gathered_reference, trained_pass
from ..loss.terms import LossTerms, check_layers
from ..loss.types import MicroBatch
from ..model import decoder_layers, lm_head, unwrap
from ..roles import DataSpec, Draw
from .base import Method
from .layers import influenced, scaled_span

LOSS_MODES = ("request_last", "request_all", "request_response", "response_all", "response_one", "response_R")
REQUEST_ONLY_MODES = ("request_last", "request_all")


@dataclass
class RepBendSettings(Group):
    NAME = "loss"

    mode: str = field(default="response_all", metadata={"choices": LOSS_MODES})
    """Which tokens of the safe and unsafe rows L_safe and L_unsafe read: request_last (last request token),
    request_all (all request tokens; rows hold the request only), request_response (all tokens), response_all
    (response tokens), response_one (first response token), response_R (first response_r)."""
    alpha: float = 0.5
    """Weight of L_safe (keep the safe representations where they were)."""
    beta: float = 0.5
    """Weight of L_unsafe (push the unsafe representations away; the term is subtracted)."""
    gamma: float = 0.1
    """Weight of L_cos (pull the unsafe last-request-token representations together)."""
    epsilon: float = 0.3
    """Weight of L_KL, the KL divergence on the retain (UltraChat) rows."""
    eta: float = 0.0
    """Weight of L_pair (harmful answer vs refusal of the same WildJailbreak request)."""
    alpha_mode: str = field(default="all", metadata={"choices": ("all", "target")})
    """L_safe over all n_layers+1 hidden-state indices (all) or over target_layers only (target)."""
    target_layers: Layers | None = None
    """Hidden-state indices (0 = embeddings, i = output of decoder layer i-1) of L_unsafe, L_cos and L_pair (U).
    null = the published span 20..30 of 32 at the model's depth: floor(20n/32)..floor(30n/32)."""
    temperature: float = 2.0
    """KL temperature T."""
    response_r: int = 20
    """R of the response_R mode (the first R response tokens)."""
    paired_repr_length: int = 20
    """L_pair reads positions p .. p+R-1, R = min(this, the shortest response of the batch's pairs)."""

    def validate(self) -> None:
        if self.target_layers is not None:
            self.check(len(self.target_layers) > 0, "target_layers", "name at least one layer (or be null)")
            self.check(all(i >= 0 for i in self.target_layers), "target_layers", "hold indices >= 0")
        self.check(self.temperature > 0, "temperature", "be positive")
        self.check(self.response_r >= 0, "response_r", "be >= 0")
        self.check(self.paired_repr_length >= 1, "paired_repr_length", "be >= 1")
        # settings that silently switch a weighted term off are errors (docs/method.md, "Loss modes")
        self.check(not (self.mode == "response_R" and self.response_r == 0 and (self.alpha or self.beta)),
                   "response_r", "be >= 1 in mode response_R (0 leaves L_safe and L_unsafe no tokens)")
        self.check(not (self.request_only and self.eta), "eta",
                   f"be 0 in the request-only mode {self.mode} (L_pair compares responses; there are none)")

    @property
    def request_only(self) -> bool:
        """Rows hold the request only (request_last, request_all)."""
        return self.mode in REQUEST_ONLY_MODES

    def weights(self) -> dict[str, float]:
        """Each term's coefficient in the total (L_unsafe enters with -beta)."""
        return {"safe": self.alpha, "unsafe": -self.beta, "cos": self.gamma, "kl": self.epsilon, "pair": self.eta}


@dataclass
class RepBendBatch(StepBatch):
    n_safe: int = 0
    n_unsafe: int = 0
    n_retain: int = 0
    n_pairs: int = 0
    pair_len: int = 0                   # R' of L_pair (0 without pairs)


def term_positions(mode: str, request_len: int, length: int, response_r: int) -> range:
    """Token positions of one safe/unsafe sequence that its set's RepBend term reads (module docstring)."""
    r, n = request_len, length
    if mode == "request_last":
        return range(r - 1, r)
    if mode == "request_all":
        return range(0, r)
    if mode == "request_response":
        return range(0, n)
    if mode == "response_all":
        return range(r, n)
    if mode == "response_one":
        return range(r, min(r + 1, n))
    if mode == "response_R":
        return range(r, min(r + response_r, n))
    raise ValueError(f"unknown loss mode {mode!r}")


def pair_length(safe_pairs, unsafe_pairs, paired_repr_length: int) -> int:
    if not safe_pairs:
        return 0
    shortest = min(s.response_len for s in list(safe_pairs) + list(unsafe_pairs))
    return max(0, min(paired_repr_length, shortest))


class RepBend(Method):
    """RepBend on a PEFT model: the reference pass is the same model with its adapters disabled."""

    NAME = "repbend"
    SUMMARY = "Representation Bending: bend the unsafe representations away, keep the safe ones and the outputs"
    Settings = RepBendSettings
    TERMS = ("safe", "unsafe", "cos", "kl", "pair")

    # ------------------------------------------------------------ data
    def data_spec(self, empty_request_p: float = 0.5) -> DataSpec:
        if self.cfg.request_only:
            return DataSpec(request_only=True, description="request-only (requests with the generation prompt)")
        return DataSpec()

    def draws(self, pools, batch_size: int) -> dict[str, Draw]:
        B = batch_size
        has_wgm, has_wj = bool(pools.safe or pools.unsafe), bool(pools.pair)
        if self.cfg.request_only:
            if not has_wgm:
                raise ValueError("request-only modes need WildGuardMix: the safe set is its unharmful requests")
            need = {"safe": Draw((("safe", None),), B), "unsafe": Draw((("unsafe", None),), B if has_wj else 2 * B)}
            if has_wj:
                need["pair"] = Draw((("pair", None),), B)
        elif has_wgm and has_wj:
            need = {name: Draw(((name, None),), B) for name in ("safe", "unsafe", "pair")}
        elif has_wgm:
            need = {"safe": Draw((("safe", None),), 2 * B), "unsafe": Draw((("unsafe", None),), 2 * B)}
        elif has_wj:
            need = {"pair": Draw((("pair", None),), B)}
        else:
            raise ValueError("no safe/unsafe data: give WildGuardMix and/or WildJailbreak")
        if pools.retain:
            need["retain"] = Draw((("retain", None),), B)
        return need

    def assemble(self, drawn) -> MicroBatch:
        rows = {name: [item for _, item in items] for name, items in drawn.items()}
        safe, unsafe, pairs = rows.get("safe", []), rows.get("unsafe", []), rows.get("pair", [])
        if self.cfg.request_only:
            return MicroBatch(safe=safe, unsafe=unsafe + [request for request, _ in pairs],
                              retain=rows.get("retain", []), n_pairs=0)
        return MicroBatch(safe=safe + [refusal for refusal, _ in pairs], unsafe=unsafe + [harm for _, harm in pairs],
                          retain=rows.get("retain", []), n_pairs=len(pairs))

    def composition(self, pools, batch_size: int) -> str:
        d = {name: draw.rows for name, draw in self.draws(pools, batch_size).items()}
        pairs = 0 if self.cfg.request_only else d.get("pair", 0)
        safe, unsafe = d.get("safe", 0) + pairs, d.get("unsafe", 0) + d.get("pair", 0)
        return (f"batch_size {batch_size}: {safe} safe, {unsafe} unsafe, {d.get('retain', 0)} retain rows"
                + (f" ({pairs} of each side WildJailbreak pairs)" if pairs else ""))

    def check_data(self, pools, describe) -> None:
        cfg = self.cfg
        if cfg.epsilon and not pools.retain:
            raise TrainingError(f"loss.epsilon = {cfg.epsilon} weights L_KL, but no retain row can feed it: "
                                f"{describe('retain')}")
        if cfg.eta and not pools.pair:
            raise TrainingError(f"loss.eta = {cfg.eta} weights L_pair, but no WildJailbreak pair can feed it: "
                                f"{describe('pair')}")
        if (cfg.alpha or cfg.beta or cfg.gamma) and not (pools.safe or pools.unsafe or pools.pair):
            raise TrainingError("L_safe, L_unsafe and L_cos read the safe and unsafe rows, and there are none: "
                                f"{describe('safe')}; {describe('pair')}")

    def check_batch(self, micro: MicroBatch) -> None:
        """At LoRA B = 0 the trained pass equals the reference pass: only L_cos (over at least two unsafe rows) and
        L_pair have a gradient there. Settings whose micro-batches give neither can never train."""
        cfg = self.cfg
        if (cfg.gamma and len(micro.unsafe) >= 2) or (cfg.eta and micro.n_pairs):
            return
        why = []
        if not cfg.gamma:
            why.append("loss.gamma = 0")
        elif len(micro.unsafe) < 2:
            why.append(f"L_cos compares at least two unsafe rows and a micro-batch has {len(micro.unsafe)}")
        if not cfg.eta:
            why.append("loss.eta = 0")
        elif not micro.n_pairs:
            why.append("no WildJailbreak pairs for L_pair")
        raise TrainingError("nothing would ever train: LoRA starts at B = 0, so the trained pass equals the reference "
                            "pass and only L_cos and L_pair have a gradient there, but " + " and ".join(why)
                            + ". Set loss.gamma (the recipe: 0.1) or loss.eta > 0 with WildJailbreak pairs, or raise "
                            "train.batch_size")

    # ------------------------------------------------------------ model
    def layer_sets(self, n_layers: int) -> tuple[list[int], list[int]]:
        """(S, U): the hidden-state indices of L_safe and of the unsafe-side terms."""
        U = self.cfg.target_layers
        U = scaled_span(20, 30, n_layers) if U is None else check_layers(U, n_layers, "loss.target_layers")
        S = list(range(n_layers + 1)) if self.cfg.alpha_mode == "all" else U
        return S, U

    def check_model(self, n_layers: int, lora_layers: list[int] | None = None) -> None:
        S, U = self.layer_sets(n_layers)
        if lora_layers is None:
            return
        cfg = self.cfg
        reads = {"L_safe": (cfg.alpha, S), "L_unsafe": (cfg.beta, U), "L_cos": (cfg.gamma, U),
                 "L_pair": (cfg.eta, U), "L_KL": (cfg.epsilon, [n_layers])}
        influenced(reads, lora_layers, "lora.layers_to_transform")

    def lora_layers(self, n_layers: int) -> list[int]:
        """0 .. the last target layer (the recipe: decoder layers 0-30 of 32 for U = 20-30)."""
        _, U = self.layer_sets(n_layers)
        return list(range(min(max(U), n_layers - 1) + 1))

    # ------------------------------------------------------------ the step
    def collate(self, micro: MicroBatch, pad_id: int, pack_length: int | None = None) -> RepBendBatch:
        cfg = self.cfg
        if cfg.gamma:
            require_request(micro, ("unsafe",), "L_cos reads each unsafe row's last request token")
        if cfg.mode == "request_last":
            require_request(micro, ("safe", "unsafe"), "mode request_last reads each row's last request token")
        if cfg.eta and micro.n_pairs:
            require_request(MicroBatch(micro.safe[len(micro.safe) - micro.n_pairs:],
                                       micro.unsafe[len(micro.unsafe) - micro.n_pairs:], [], micro.n_pairs),
                            ("safe", "unsafe"), "L_pair reads the pair rows from their last request token on")
        seqs = sequences(micro)
        safe, unsafe, retain = set_ranges(micro)
        rows = lay_out(seqs, pad_id, pack_length)
        T, P = rows.row_len, rows.placements
        batch = RepBendBatch(rows, useful_tokens=useful_tokens(seqs), n_safe=len(safe), n_unsafe=len(unsafe),
                             n_retain=len(retain))
        mode = lambda p: term_positions(cfg.mode, p.request_len, p.length, cfg.response_r)  # noqa: E731
        batch.index["safe"] = tokens_at(rows, safe, mode)
        batch.index["unsafe"] = tokens_at(rows, unsafe, mode)
        batch.index["cos"] = long(P[k].flat(T, P[k].request_len - 1) for k in unsafe)
        batch.index["retain"] = every_token(rows, retain)

        n_pairs = micro.n_pairs
        refusals = list(safe)[len(safe) - n_pairs:]
        harmful = list(unsafe)[len(unsafe) - n_pairs:]
        plen = pair_length([seqs[k] for k in refusals], [seqs[k] for k in harmful], cfg.paired_repr_length)
        pairs = sorted((P[ku].flat(T, P[ku].request_len - 1 + i), P[ks].flat(T, P[ks].request_len - 1 + i))
                       for ks, ku in zip(refusals, harmful) for i in range(plen))
        batch.index["pair"] = long(a for a, _ in pairs)
        batch.index["pair_ref"] = long(b for _, b in pairs)
        batch.n_pairs, batch.pair_len = n_pairs, plen
        return batch

    def __call__(self, model, batch: RepBendBatch, progress: float | None = None) -> LossTerms:
        cfg, impl, ix = self.cfg, self.impl, batch.index
        n_layers = len(decoder_layers(model))
        S, U = self.layer_sets(n_layers)
        weights = cfg.weights()
        has = {"safe": ix["safe"].numel() > 0, "unsafe": ix["unsafe"].numel() > 0, "cos": ix["cos"].numel() > 0,
               "kl": batch.n_retain > 0, "pair": batch.pair_len > 0}
        use = {t: weights[t] != 0 and has[t] for t in self.TERMS}
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
        return self.total(parts, weights, has)


__all__ = ["RepBend", "RepBendSettings", "RepBendBatch", "LOSS_MODES", "REQUEST_ONLY_MODES", "term_positions",
           "pair_length"]
