"""Batched greedy generation for evaluation (and the demo's checks): chat template, stop tokens, prefilled
responses and soft prompts, all through the model's own `generate`.

A request is a list of token ids, optionally with a soft prompt (`[n, d]` vectors) inserted at `soft_at`; a batch
with any soft prompt runs from input embeddings. Rows are left-padded with an attention mask (`generate` counts
position ids over real tokens only), so a row's greedy continuation does not depend on the rows batched with it
beyond floating-point rounding. Decoding is greedy with nothing else switched on (`greedy_config`), whatever
sampling settings the checkpoint's generation_config carries.

Stop tokens: the tokenizer's eos, the model's `generation_config.eos_token_id` (an int or a list) and the chat
template's end-of-turn token where distinct (the first of `END_OF_TURN_TOKENS` that the template text contains and
the vocabulary holds). A row stops at its first stop token, which is not part of the decoded text.
"""
from __future__ import annotations

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


def greedy_config(*, max_new_tokens: int, stop_ids: list[int], pad_id: int):
    """The GenerationConfig of every evaluation generation: greedy, `max_new_tokens`, stopping at any of
    `stop_ids`, and nothing else (no repetition penalty, no minimum length, no sampling)."""
    from transformers import GenerationConfig

    return GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                            eos_token_id=list(stop_ids) or None, pad_token_id=pad_id)


@torch.no_grad()
def greedy_generate(model, requests: list[GenRequest], *, max_new_tokens: int, stop_ids: list[int],
                    pad_id: int) -> list[list[int]]:
    """Greedy continuation of each request by `model.generate` (left-padded batch; a batch with a soft prompt runs
    from `inputs_embeds`), cut before its first stop token. Returns the new token ids per row.

    The model's own `generation_config` (a checkpoint's sampling temperature, top-p, repetition penalty, ...) is
    set aside for the call: every evaluation is plain greedy decoding (`greedy_config`), as the reference
    evaluation's is."""
    inputs, mask, _ = left_pad(requests, model, pad_id)  # generate derives the same position ids from the mask
    base = _base(model)
    saved = base.generation_config
    base.generation_config = greedy_config(max_new_tokens=max_new_tokens, stop_ids=stop_ids, pad_id=pad_id)
    try:
        out = model.generate(**inputs, attention_mask=mask, generation_config=base.generation_config)
    finally:
        base.generation_config = saved
    # with input_ids the output repeats the prompt; from inputs_embeds it holds the new tokens only
    new = out[:, mask.shape[1]:] if "input_ids" in inputs else out  # (B, <= max_new_tokens)
    stop_set = set(stop_ids)
    result = []
    for row in new.tolist():
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
