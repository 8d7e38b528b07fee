"""The attacks: which prompt each (benchmark item, attack) pair sends, and the input-embedding attack's optimiser.

| attack        | what is sent                                                                          | needs target |
|---------------|---------------------------------------------------------------------------------------|--------------|
| direct        | the item's conversation, chat template, generation prompt                             | no           |
| prefill       | the same, then `target + ":\\n\\n"` written after the generation prompt               | yes          |
| input_embed   | the user message directly followed (inside the user turn) by a soft prompt of 20      | yes          |
|               | vectors optimised towards the target (see `optimize_soft_prompts`)                    |              |
| transfer[:m]  | each ready-made attack prompt of the transfer file for the behaviour, as the user turn | no           |

The generation recorded for `prefill` is the model's continuation only (the prefill is stored beside it), and the
judges see that continuation. Transfer rows get the id `<BehaviorID>#<k>` (k = index of the prompt among that
behaviour's prompts in the file) and apply to HarmBench items only (the file is keyed by BehaviorID).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .benchmarks import Item
from .generation import GenRequest, encode, left_pad, pad_id_of, render_chat

ATTACKS = ("direct", "prefill", "input_embed", "transfer")
NEEDS_TARGET = ("prefill", "input_embed")
PREFILL_SUFFIX = ":\n\n"
# where the soft prompt goes inside the rendered user turn; split out before tokenising
_SOFT_MARK = "\u2063REPBEND_SOFT_PROMPT\u2063"


@dataclass
class Job:
    """One generation to run: `key` = (benchmark, id, attack) names it; `row_key` adds `source`, the digest of
    everything that determines its generation (set by `repbend.eval.run`), and identifies its row in
    generations.jsonl."""
    item: Item
    attack: str
    id: str
    messages: list[dict]
    prompt: str
    prefill: str = ""
    info: dict = field(default_factory=dict)
    source: str | None = None

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.item.benchmark, self.id, self.attack)

    @property
    def row_key(self) -> tuple[str, str, str, str | None]:
        return (*self.key, self.source)


def build_jobs(items: list[Item], attacks: list[str], transfer: dict[str, list[dict]] | None = None):
    """Jobs for every item and requested attack; returns (jobs, skipped) where `skipped` counts (benchmark, attack)
    pairs left out because the item has no target string."""
    jobs, skipped = [], {}
    for item in items:
        for attack in attacks:
            if attack not in ATTACKS:
                raise ValueError(f"unknown attack {attack!r}; known: {', '.join(ATTACKS)}")
            if attack in NEEDS_TARGET and not item.target:
                if item.benchmark != "xstest":  # XSTest has no targets by design: not worth a warning
                    skipped[(item.benchmark, attack)] = skipped.get((item.benchmark, attack), 0) + 1
                continue
            if attack == "transfer":
                if item.benchmark != "harmbench":
                    continue
                for k, entry in enumerate((transfer or {}).get(item.id, [])):
                    name = f"transfer:{entry['method']}" if entry.get("method") else "transfer"
                    msgs = [{"role": "user", "content": entry["prompt"]}]
                    jobs.append(Job(item, name, f"{item.id}#{k}", msgs, entry["prompt"]))
                continue
            prefill = item.target + PREFILL_SUFFIX if attack == "prefill" else ""
            jobs.append(Job(item, attack, item.id, item.messages, item.prompt, prefill))
    return jobs, skipped


def job_request(tokenizer, job: Job) -> GenRequest:
    """Token ids for a direct/prefill/transfer job (the prefill is appended to the rendered text)."""
    return GenRequest(encode(tokenizer, render_chat(tokenizer, job.messages) + job.prefill))


def soft_slot_request(tokenizer, job: Job) -> GenRequest:
    """Ids for an input-embedding job with the soft prompt's slot (`soft_at`) right after the user's message."""
    messages = [dict(m) for m in job.messages]
    messages[-1]["content"] = messages[-1]["content"] + _SOFT_MARK
    text = render_chat(tokenizer, messages)
    if text.count(_SOFT_MARK) != 1:
        raise ValueError("the chat template altered the user message; cannot place the soft prompt")
    before, after = text.split(_SOFT_MARK)
    prefix = encode(tokenizer, before)
    return GenRequest(prefix + encode(tokenizer, after), soft=None, soft_at=len(prefix))


def init_soft_prompt(model, tokenizer, n_tokens: int) -> torch.Tensor:
    """`[n_tokens, d]` fp32 starting point: the embeddings of "x x x ..." (the usual soft-prompt initialisation)."""
    ids = encode(tokenizer, " ".join(["x"] * n_tokens))
    if len(ids) != n_tokens:
        ids = (encode(tokenizer, "x") or [pad_id_of(tokenizer)])[:1] * n_tokens
    weight = model.get_input_embeddings().weight
    return weight[torch.tensor(ids, device=weight.device)].detach().float().clone()


def optimize_soft_prompts(model, tokenizer, requests: list[GenRequest], targets: list[str], *, n_tokens: int = 20,
                          steps: int = 500, lr: float = 1e-3, stop_loss: float = 0.05):
    """Optimise one soft prompt per request (a batch, optimised jointly but independently) with Adam so that the
    frozen model continues `request` with `target`.

    loss_i = mean over the target's tokens of CE(logits, target) for row i; the batch minimises sum_i loss_i, so
    each row's gradient is its own. Rows are left-padded, so every row's target ends in the last column and only the
    last `max target length + 1` positions are projected to the vocabulary. Each row keeps its lowest-loss soft
    prompt; the loop ends after `steps` or when every row's best loss is below `stop_loss`.
    Returns (soft prompts `[n_tokens, d]` fp32, best losses, steps run)."""
    device = next(model.parameters()).device
    pad_id = pad_id_of(tokenizer)
    tgt_ids = [encode(tokenizer, t) for t in targets]
    B, T = len(requests), max(len(t) for t in tgt_ids)
    labels = torch.full((B, T), -100, dtype=torch.long, device=device)  # right-aligned target ids
    for i, t in enumerate(tgt_ids):
        labels[i, T - len(t):] = torch.tensor(t, dtype=torch.long, device=device)
    soft = init_soft_prompt(model, tokenizer, n_tokens).unsqueeze(0).repeat(B, 1, 1)  # (B, n, d) fp32
    soft.requires_grad_(True)
    opt = torch.optim.Adam([soft], lr=lr)
    best = [math.inf] * B
    best_soft = soft.detach().clone()
    was_training = model.training
    model.eval()
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:  # the model is frozen: no gradient buffers for its weights
        p.requires_grad_(False)
    run = 0
    try:
        with torch.enable_grad():
            for run in range(1, steps + 1):
                batch = [GenRequest(r.ids + t, soft=soft[i], soft_at=r.soft_at)
                         for i, (r, t) in enumerate(zip(requests, tgt_ids))]
                inputs, mask, pos = left_pad(batch, model, pad_id)
                out = model(**inputs, attention_mask=mask, position_ids=pos, use_cache=False,
                            logits_to_keep=T + 1)
                logits = out.logits[:, :-1].float()  # (B, T, V): position j predicts label j
                ce = F.cross_entropy(logits.reshape(B * T, -1), labels.reshape(-1), reduction="none").view(B, T)
                per_row = ce.sum(1) / (labels != -100).sum(1)  # (B,)
                losses = per_row.detach().tolist()
                for i, loss in enumerate(losses):
                    if loss < best[i]:
                        best[i] = loss
                        best_soft[i] = soft[i].detach()
                if all(b < stop_loss for b in best):
                    break
                opt.zero_grad(set_to_none=True)
                per_row.sum().backward()
                opt.step()
    finally:
        model.train(was_training)
        for p in trainable:
            p.requires_grad_(True)
    return [best_soft[i].clone() for i in range(B)], best, run
