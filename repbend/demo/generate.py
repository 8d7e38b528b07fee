"""Greedy batched generation through the chat template, and the demo's held-out evaluation built on it.

Works on a plain Hugging Face causal LM and on a PEFT-wrapped one (both expose `.generate`). The model is put
in eval mode for the call and returned to its previous mode afterwards, so the trainer can call
`evaluate_heldout` as a periodic hook in the middle of training.
"""
from __future__ import annotations

import torch

from repbend.demo.judge import rates


def render_prompts(tokenizer, prompts) -> list[str]:
    """Each prompt as one user turn rendered by the tokenizer's chat template, with the generation prompt."""
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                          tokenize=False) for p in prompts]


@torch.no_grad()
def generate_batch(model, tokenizer, prompts, max_new_tokens: int = 48, batch_size: int = 32) -> list[str]:
    """Greedy completions of `prompts` (plain user requests), one string per prompt, in order.

    Each prompt is rendered with the chat template and the generation prompt and tokenised without extra
    special tokens (the template writes its own BOS); rows are left-padded, batched by length, decoded greedily
    for at most `max_new_tokens`, and each completion is cut at the tokenizer's EOS and decoded without special
    tokens."""
    from transformers import GenerationConfig

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    gen_cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=eos,
                               pad_token_id=pad, use_cache=True)
    texts = render_prompts(tokenizer, prompts)
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths share a batch: less padding
    device = next(model.parameters()).device
    out: list[str | None] = [None] * len(ids)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            width = max(len(ids[i]) for i in chunk)
            input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)  # (b, T) left-padded
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):
                input_ids[row, width - len(ids[i]):] = torch.tensor(ids[i])
                mask[row, width - len(ids[i]):] = 1
            seqs = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                  generation_config=gen_cfg)
            for row, i in enumerate(chunk):
                new = seqs[row, width:].tolist()
                if eos in new:
                    new = new[:new.index(eos)]
                out[i] = tokenizer.decode(new, skip_special_tokens=True)
    finally:
        model.train(was_training)
    return out


def evaluate_heldout(model, tokenizer, heldout_rows, max_new_tokens: int = 48, batch_size: int = 32,
                     return_records: bool = False) -> dict:
    """Generate for every held-out row (`{"kind", "prompt", "answer"}`, as in `heldout.jsonl`) and return the
    judge's `rates` (`harmful_compliance`, `benign_accuracy`, `n_harmful`, `n_benign`); with `return_records`
    the dict also carries `records`: the rows with their `generation`."""
    rows = list(heldout_rows)
    gens = generate_batch(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens=max_new_tokens,
                          batch_size=batch_size)
    records = [{**r, "generation": g} for r, g in zip(rows, gens)]
    result = rates(records)
    if return_records:
        result["records"] = records
    return result
