"""A cost-faithful re-creation of the published RepBend step (docs/method.md, "Deliberate differences": what the
reference implementation spends), for benchmarks only. It computes the same loss as `repbend.loss.RepBendLoss` on
the same micro-batch, the way the reference code spends time and memory:

- six forwards per step: reference (adapters off, eval, no_grad) then LoRA, for safe, unsafe and retain separately,
  each through the full causal LM (`model(...)`): every pass computes full-vocabulary logits, upcast to fp32 as
  transformers 4.40 did inside `LlamaForCausalLM.forward`;
- fixed padding: requests left-padded to `request` (512) so that the last request token sits at column 511,
  responses right-padded to `response` (512), retain right-padded to `retain` (1024). `Padding(None, None, None)`
  pads each set to its longest row instead (the `reference+dynpad` variant);
- all n_layers+1 hidden states stacked for the safe set (`torch.stack(output_hidden_states)`), the target layers
  stacked for the unsafe set, in both passes; the masked tensors are whole-tensor copies (`where(mask, h, 0)`);
- the KL from `model(...).logits.float()`: log-softmax and softmax copies of `[B, T, V]` and the element-wise KL;
- `gc.collect()` plus `torch.cuda.empty_cache()` (GPU) eight times a step;
- one backward over the three LoRA graphs held together.
Each stack and logit tensor is dropped as soon as its term is computed: code that keeps them as locals until the
loss returns holds more than what is measured here.

The reference's known defects (docs/method.md, "Defects of the reference implementation") are not reproduced: this
is its cost with this project's semantics.
"""
from __future__ import annotations

import gc
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from repbend.methods.repbend import pair_length, term_positions
from repbend.config import LossConfig


@dataclass(frozen=True)
class Padding:
    """Widths of the reference layout; None = the longest of that part in the set (dynamic padding)."""
    request: int | None = 512
    response: int | None = 512
    retain: int | None = 1024


FIXED = Padding()
DYNAMIC = Padding(None, None, None)


@dataclass
class PaddedSet:
    input_ids: torch.Tensor       # [N, W] long, request right-aligned at column req_width
    attention_mask: torch.Tensor  # [N, W] long
    term_mask: torch.Tensor       # [N, W] bool: the tokens of the set's distance term (the loss mode)
    req_width: int                # column req_width - 1 holds every row's last request token

    def to(self, device):
        return PaddedSet(self.input_ids.to(device), self.attention_mask.to(device), self.term_mask.to(device),
                         self.req_width)


@dataclass
class ReferenceBatch:
    safe: PaddedSet
    unsafe: PaddedSet
    retain_ids: torch.Tensor      # [B, W_retain] long, right-padded
    retain_mask: torch.Tensor     # [B, W_retain] long
    n_pairs: int
    pair_len: int
    useful_tokens: int            # real tokens of all three sets

    @property
    def positions(self) -> int:
        """Positions one pass over the three sets computes (padding included)."""
        return self.safe.input_ids.numel() + self.unsafe.input_ids.numel() + self.retain_ids.numel()

    def to(self, device) -> "ReferenceBatch":
        return ReferenceBatch(self.safe.to(device), self.unsafe.to(device), self.retain_ids.to(device),
                              self.retain_mask.to(device), self.n_pairs, self.pair_len, self.useful_tokens)


def pad_set(seqs, loss: LossConfig, pad_id: int, padding: Padding) -> PaddedSet:
    """Requests left-padded to `padding.request`, responses right-padded to `padding.response`."""
    req_w = padding.request or max(s.request_len for s in seqs)
    resp_w = padding.response if padding.response is not None else max(s.response_len for s in seqs)
    ids = torch.full((len(seqs), req_w + resp_w), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    term = torch.zeros(ids.shape, dtype=torch.bool)
    for b, s in enumerate(seqs):
        if s.request_len > req_w or s.response_len > resp_w:
            raise ValueError(f"{s.origin}: request {s.request_len} / response {s.response_len} tokens do not fit "
                             f"the reference padding {req_w}/{resp_w}")
        start = req_w - s.request_len  # the sequence is contiguous from here: request, then response
        ids[b, start:start + len(s)] = torch.tensor(s.input_ids, dtype=torch.long)
        attn[b, start:start + len(s)] = 1
        cols = term_positions(loss.mode, s.request_len, len(s), loss.response_r)
        term[b, start + cols.start:start + cols.stop] = True
    return PaddedSet(ids, attn, term, req_w)


def build_reference_batch(micro, loss: LossConfig, pad_id: int, padding: Padding = FIXED) -> ReferenceBatch:
    """The reference layout of a `repbend.data.sampler.MicroBatch`: one padded tensor per set."""
    width = padding.retain or max(len(s) for s in micro.retain)
    retain_ids = torch.full((len(micro.retain), width), pad_id, dtype=torch.long)
    retain_mask = torch.zeros_like(retain_ids)
    for b, s in enumerate(micro.retain):
        retain_ids[b, :len(s)] = torch.tensor(s.input_ids, dtype=torch.long)
        retain_mask[b, :len(s)] = 1
    P = micro.n_pairs
    plen = pair_length(micro.safe[len(micro.safe) - P:], micro.unsafe[len(micro.unsafe) - P:],
                       loss.paired_repr_length) if P else 0
    useful = sum(len(s) for s in list(micro.safe) + list(micro.unsafe) + list(micro.retain))
    return ReferenceBatch(pad_set(micro.safe, loss, pad_id, padding), pad_set(micro.unsafe, loss, pad_id, padding),
                          retain_ids, retain_mask, P, plen, useful)


def free_memory(device: torch.device) -> None:
    """What the reference does between terms: a full Python GC and, on GPU, returning cached blocks."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _forward(model, ids, attn):
    """One full causal-LM forward: (all hidden states, fp32 logits [N, W, V])."""
    out = model(input_ids=ids, attention_mask=attn, output_hidden_states=True, use_cache=False)
    return out.hidden_states, out.logits.float()


def _masked_distance(h_lora, h_ref, mask):
    """sum over masked tokens and layers of ||h' - h||_2 (fp32), from whole masked tensors [L, N, W, D]."""
    m = mask[None, :, :, None]
    diff = torch.where(m, h_lora, 0) - torch.where(m, h_ref, 0)
    return torch.linalg.vector_norm(diff, ord=2, dim=-1, dtype=torch.float32).sum()


def reference_loss(model, rb: ReferenceBatch, loss: LossConfig, n_layers: int, mark=None):
    """The five terms of docs/method.md ("The RepBend loss") from six separate forwards. Returns (total, {term: value
    or None}).
    `model` is the PEFT model, in train mode; `rb` is on its device. `mark(phase)`, when given, is called at the
    end of each phase ("ref_forward", "lora_forward", "terms", "gc") for the benchmark's timers."""
    device = rb.retain_ids.device
    mark = mark or (lambda phase: None)

    def free():
        mark("terms")
        free_memory(device)
        mark("gc")

    U = list(loss.target_layers)
    S = list(range(n_layers + 1)) if loss.alpha_mode == "all" else U
    T = loss.temperature
    parts = dict.fromkeys(("safe", "unsafe", "cos", "kl", "pair"))
    safe, unsafe = rb.safe, rb.unsafe
    free()                                                                   # 1

    model.eval()
    with torch.no_grad(), model.disable_adapter():
        hs, logits = _forward(model, safe.input_ids, safe.attention_mask)
        mark("ref_forward")
        safe_ref = torch.stack(hs)                                           # [L+1, 2B, W, D]
        del hs, logits
        free()                                                               # 2
        hs, logits = _forward(model, unsafe.input_ids, unsafe.attention_mask)
        mark("ref_forward")
        unsafe_ref = torch.stack([hs[i] for i in U])                         # [|U|, 2B, W, D]
        del hs, logits
        free()                                                               # 3
        _, z_ref = _forward(model, rb.retain_ids, rb.retain_mask)            # [B, W, V] fp32
        mark("ref_forward")
        free()                                                               # 4
    model.train()

    hs, logits = _forward(model, safe.input_ids, safe.attention_mask)
    mark("lora_forward")
    safe_lora = torch.stack(hs)
    del hs, logits
    n_safe = safe.term_mask.sum()
    if loss.alpha_mode == "all":  # S is every index: the whole stacks, no gather copy
        parts["safe"] = _masked_distance(safe_lora, safe_ref, safe.term_mask)
    else:
        parts["safe"] = _masked_distance(safe_lora[S], safe_ref[S], safe.term_mask)
    parts["safe"] = parts["safe"] / (len(S) * n_safe.clamp(min=1))
    del safe_lora
    free()                                                                   # 5

    hs, logits = _forward(model, unsafe.input_ids, unsafe.attention_mask)
    mark("lora_forward")
    unsafe_lora = torch.stack([hs[i] for i in U])                            # [|U|, 2B, W, D]
    del hs, logits
    n_unsafe = unsafe.term_mask.sum()
    parts["unsafe"] = _masked_distance(unsafe_lora, unsafe_ref, unsafe.term_mask) / (len(U) * n_unsafe.clamp(min=1))
    u = F.normalize(unsafe_lora[:, :, unsafe.req_width - 1].float(), dim=-1)  # [|U|, 2B, D] last request token
    n = u.shape[1]
    off = ~torch.eye(n, dtype=torch.bool, device=device)
    parts["cos"] = (1 - (u @ u.transpose(1, 2))[:, off]).mean(dim=1).mean()
    if loss.eta and rb.pair_len:
        P, R = rb.n_pairs, rb.pair_len
        pu, ps = unsafe.req_width - 1, safe.req_width - 1  # the last request token of each set's rows
        d = unsafe_lora[:, -P:, pu:pu + R].float() - safe_ref[:, -P:, ps:ps + R][U].float()
        parts["pair"] = torch.linalg.vector_norm(d, dim=-1).mean()
    del unsafe_lora, safe_ref, unsafe_ref
    free()                                                                   # 6

    _, z = _forward(model, rb.retain_ids, rb.retain_mask)                    # [B, W, V] fp32
    mark("lora_forward")
    kl = F.kl_div(F.log_softmax(z / T, dim=-1), F.softmax(z_ref / T, dim=-1), reduction="none").sum(-1)
    parts["kl"] = torch.where(rb.retain_mask.bool(), kl, 0).sum() / rb.retain_ids.shape[0] * T * T
    del z, z_ref, kl
    free()                                                                   # 7

    weights = {"safe": loss.alpha, "unsafe": -loss.beta, "cos": loss.gamma, "kl": loss.epsilon, "pair": loss.eta}
    total = sum(weights[k] * v for k, v in parts.items() if v is not None and weights[k] != 0)
    parts = {k: (v if weights[k] != 0 else None) for k, v in parts.items()}
    return total, parts
