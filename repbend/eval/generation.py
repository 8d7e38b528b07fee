"""Batched greedy generation for evaluation: chat template, stop tokens, prefilled responses and soft prompts.

A request is a list of token ids, optionally with a soft prompt (`[n, d]` vectors) inserted at `soft_at`; a batch
with any soft prompt runs from input embeddings. Rows are left-padded (position ids count real tokens only), so
the last column of every row is its last prompt token and the KV cache grows by one column a step.

Stop tokens: the tokenizer's eos, the model's `generation_config.eos_token_id` (an int or a list) and the chat
template's end-of-turn token where distinct (the first of `END_OF_TURN_TOKENS` that the template text contains and
the vocabulary holds). A row stops at its first stop token, which is not part of the decoded text.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Iterator

import torch

END_OF_TURN_TOKENS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|end_of_turn|>")


@dataclass
class GenRequest:
    """Token ids of a rendered prompt; `soft` (`[n, d]`, any float dtype) is inserted before `ids[soft_at]`."""
    ids: list[int]
    soft: torch.Tensor | None = None
    soft_at: int = 0

    def __len__(self):
        return len(self.ids) + (0 if self.soft is None else self.soft.shape[0])


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The model's chat template applied to `messages`, as text (special tokens written out)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; evaluation needs the model's chat format")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def encode(tokenizer, text: str) -> list[int]:
    """Ids of already-rendered text: no special tokens added (the template writes its own BOS)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """Sorted ids that end a generation (see the module docstring)."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if gen_eos is not None:
        ids.update(int(i) for i in (gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]))
    template = tokenizer.chat_template if isinstance(getattr(tokenizer, "chat_template", None), str) else ""
    vocab = tokenizer.get_vocab()
    for tok in END_OF_TURN_TOKENS:
        if tok in template and tok in vocab:
            ids.add(int(vocab[tok]))
            break
    return sorted(ids)


def pad_id_of(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@functools.lru_cache(maxsize=None)
def _forward_params(cls) -> frozenset:
    return frozenset(inspect.signature(cls.forward).parameters)


def keep_kwargs(model, keep: int) -> dict:
    """Project only the last `keep` positions to the vocabulary (`logits_to_keep`; older `num_logits_to_keep`)."""
    params = _forward_params(type(_base(model)))
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if name in params:
            return {name: keep}
    return {}


def forward_kwargs(model, cache=None, keep: int | None = None) -> dict:
    """Version-portable names: transformers 5 calls the KV cache `cache` (4.x `past_key_values`)."""
    params = _forward_params(type(_base(model)))
    kw = {"use_cache": True, ("cache" if "cache" in params else "past_key_values"): cache}
    return {**kw, **(keep_kwargs(model, keep) if keep is not None else {})}


def output_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def left_pad(requests: list[GenRequest], model, pad_id: int):
    """(`input_ids` or `inputs_embeds`, attention_mask `[B, L]`, position_ids `[B, L]`) for a left-padded batch."""
    device = next(model.parameters()).device
    B, L = len(requests), max(len(r) for r in requests)
    mask = torch.zeros(B, L, dtype=torch.long, device=device)
    for i, r in enumerate(requests):
        mask[i, L - len(r):] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, L)
    if all(r.soft is None for r in requests):
        ids = torch.full((B, L), pad_id, dtype=torch.long, device=device)
        for i, r in enumerate(requests):
            ids[i, L - len(r):] = torch.tensor(r.ids, dtype=torch.long, device=device)
        return {"input_ids": ids}, mask, position_ids
    emb = model.get_input_embeddings()
    rows = []
    for r in requests:
        tok = emb(torch.tensor(r.ids, dtype=torch.long, device=device))  # (T, d)
        parts = [tok[:r.soft_at], r.soft.to(device=device, dtype=tok.dtype), tok[r.soft_at:]] if r.soft is not None \
            else [tok]
        row = torch.cat(parts)
        rows.append(torch.cat([row.new_zeros(L - row.shape[0], row.shape[1]), row]))
    return {"inputs_embeds": torch.stack(rows)}, mask, position_ids  # (B, L, d)


@torch.no_grad()
def greedy_generate(model, requests: list[GenRequest], *, max_new_tokens: int, stop_ids: list[int],
                    pad_id: int) -> list[list[int]]:
    """Greedy continuation of each request, cut before its first stop token. Returns new token ids per row."""
    inputs, mask, pos = left_pad(requests, model, pad_id)
    B = mask.shape[0]
    stop = torch.tensor(stop_ids or [-1], device=mask.device)
    out = model(**inputs, attention_mask=mask, position_ids=pos, **forward_kwargs(model, None, keep=1))
    logits, cache = out.logits[:, -1], output_cache(out)
    finished = torch.zeros(B, dtype=torch.bool, device=mask.device)
    new = []
    for step in range(max_new_tokens):
        nxt = torch.where(finished, torch.full_like(finished, pad_id, dtype=torch.long), logits.argmax(-1))  # (B,)
        new.append(nxt)
        finished |= torch.isin(nxt, stop)
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
        pos = pos[:, -1:] + 1
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos,
                    **forward_kwargs(model, cache, keep=1))
        logits, cache = out.logits[:, -1], output_cache(out)
    tokens = torch.stack(new, dim=1).tolist() if new else [[] for _ in range(B)]  # (B, T)
    stop_set = set(stop_ids)
    result = []
    for row in tokens:
        cut = next((k for k, t in enumerate(row) if t in stop_set), len(row))
        result.append(row[:cut])
    return result


def iter_generate(model, tokenizer, requests: list[GenRequest], *, max_new_tokens: int = 512, batch_size: int = 16,
                  stop_ids: list[int] | None = None) -> Iterator[tuple[list[int], list[str], list[int]]]:
    """Generate in batches of similar length (longest first, so an out-of-memory shows at once); yields
    (request indices, decoded texts, new-token counts) after each batch."""
    stop_ids = stop_token_ids(tokenizer, model) if stop_ids is None else stop_ids
    pad_id = pad_id_of(tokenizer)
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        new = greedy_generate(model, [requests[i] for i in idx], max_new_tokens=max_new_tokens,
                              stop_ids=stop_ids, pad_id=pad_id)
        texts = [tokenizer.decode(t, skip_special_tokens=True) for t in new]
        yield idx, texts, [len(t) for t in new]


def generate(model, tokenizer, requests: list[GenRequest], **kw) -> list[str]:
    """All texts of `iter_generate`, in request order."""
    texts = [""] * len(requests)
    for idx, batch, _ in iter_generate(model, tokenizer, requests, **kw):
        for i, t in zip(idx, batch):
            texts[i] = t
    return texts
