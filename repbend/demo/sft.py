"""The demo's supervised pass: a plain causal-LM fine-tune of all parameters of the tiny model on the assistant
tokens of chats (here: "comply with everything"), so that RepBend afterwards has a compliant model to bend.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE = -100


def encode_chat(tokenizer, messages, max_len: int = 256) -> tuple[list[int], list[int]]:
    """Token ids of a chat and its labels: the ids on assistant turns (content and the template's end-of-turn
    markup, e.g. `<|eot_id|>`), IGNORE elsewhere.

    The chat is rendered segment by segment: each assistant turn's prefix is rendered with the generation
    prompt and tokenised on its own, then the turn's text (the difference of the two renderings). So the
    request tokens are exactly those that `generate_batch` feeds the model, whatever the BPE would merge
    across the boundary in one joint tokenisation."""
    ids: list[int] = []
    labels: list[int] = []
    done = ""  # the rendered text already tokenised
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prefix = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(messages[:i + 1], tokenize=False)
        if not prefix.startswith(done) or not full.startswith(prefix):
            raise ValueError(f"chat template does not render turn {i} as an extension of the earlier turns")
        request = tokenizer(prefix[len(done):], add_special_tokens=False)["input_ids"]
        answer = tokenizer(full[len(prefix):], add_special_tokens=False)["input_ids"]
        ids += request + answer
        labels += [IGNORE] * len(request) + answer
        done = full
    return ids[:max_len], labels[:max_len]


def _collate(encoded, pad_id: int):
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)  # (B, T) right-padded
    labels = torch.full((len(encoded), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, (ids, lab) in enumerate(encoded):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        labels[row, :len(lab)] = torch.tensor(lab)
        mask[row, :len(ids)] = 1
    return input_ids, mask, labels


def supervised_pass(model, tokenizer, chats, steps: int = 300, lr: float = 3e-3, batch_size: int = 16,
                    seed: int = 0, progress: bool = True, warmup: int = 20,
                    min_lr_ratio: float = 0.1, clip: float = 1.0) -> list[float]:
    """Fine-tune all parameters of `model` on the assistant tokens of `chats` (each `{"messages": [...]}` or a
    bare message list) and return the loss of every step.

    Loss: mean token cross-entropy over assistant tokens of the batch. AdamW (betas 0.9/0.95, no weight
    decay), linear warmup over `min(warmup, steps // 10)` steps then cosine decay to `min_lr_ratio * lr`,
    gradient norm clipped to `clip`. Batches: the chats in a seeded random order, reshuffled every epoch.
    Deterministic on the CPU for a given seed (and thread count). The model is left in eval mode."""
    from ..progress import progress_bar

    encoded = [encode_chat(tokenizer, c["messages"] if isinstance(c, dict) else c) for c in chats]
    if not encoded:
        raise ValueError("supervised_pass: no chats")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.95),
                            weight_decay=0.0)

    warmup = min(warmup, steps // 10)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))

    order: list[int] = []
    losses: list[float] = []
    model.train()
    bar = progress_bar(steps, "supervised pass", unit="step", enabled=progress)
    for step in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(len(encoded), generator=gen).tolist()
        batch, order = order[:batch_size], order[batch_size:]
        input_ids, mask, labels = (t.to(device) for t in _collate([encoded[i] for i in batch], pad_id))
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        logits = model(input_ids=input_ids, attention_mask=mask).logits  # (B, T, V)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        losses.append(loss.item())
        if bar is not None:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            bar.update(1)
    if bar is not None:
        bar.close()
    model.eval()
    return losses
