"""Logit lens: what each layer would predict next, base (adapters disabled) vs tuned.

For hidden-state index i (HF `output_hidden_states`: 0 = embeddings, n_layers = final, already normed) and token t:
    p_i,t = softmax(lm_head(final_norm(h_i,t)))   (for i = n_layers: softmax(lm_head(h_i,t)), the model's logits)
The cell shows argmax p_i,t (the predicted next token) and is coloured by its entropy -sum p log p (nats, fp32).
Rows are hidden-state indices, columns the last `max_tokens` tokens of the rendered prompt (chat template with the
generation prompt, then `response_prefix`).
"""
from __future__ import annotations

import torch

from repbend.model import backbone, lm_head

from .generation import encode, keep_kwargs, render_chat


@torch.no_grad()
def logit_lens(model, tokenizer, ids: list[int], max_tokens: int = 32) -> dict:
    """{"tokens": [str] (T), "top": [[str]] (L+1, T), "entropy": Tensor (L+1, T) fp32} for the last `max_tokens`."""
    device = next(model.parameters()).device
    x = torch.tensor([ids], device=device)
    out = model(input_ids=x, output_hidden_states=True, use_cache=False, **keep_kwargs(model, 1))
    hidden = out.hidden_states  # n_layers + 1 tensors (1, T_all, d)
    norm, head = backbone(model).norm, lm_head(model)
    T = min(max_tokens, len(ids))
    tops, ents = [], []
    for i, h in enumerate(hidden):
        h = h[0, -T:]  # (T, d)
        logits = head(h if i == len(hidden) - 1 else norm(h)).float()  # (T, V)
        logp = torch.log_softmax(logits, dim=-1)
        ents.append(-(logp.exp() * logp).sum(-1))  # (T,)
        tops.append([_show(tokenizer, t) for t in logits.argmax(-1).tolist()])
    return {"tokens": [_show(tokenizer, t) for t in ids[-T:]], "top": tops, "entropy": torch.stack(ents).cpu()}


def _show(tokenizer, token_id: int, width: int = 10) -> str:
    """A token as a short printable label: newlines and tabs escaped, other control characters as \\xNN, a
    whitespace-only token as open boxes."""
    text = tokenizer.decode([token_id]).replace("\n", "\\n").replace("\t", "\\t")
    text = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)
    if not text.strip():
        text = "\u2423" * len(text) or "\u2205"
    return text if len(text) <= width else text[:width - 1] + "\u2026"


def lens_views(model, tokenizer, prompt: str, response_prefix: str = "", max_tokens: int = 32) -> dict:
    """{"base": lens, "tuned": lens} for a PEFT model (base = adapters disabled), {"model": lens} otherwise."""
    ids = encode(tokenizer, render_chat(tokenizer, [{"role": "user", "content": prompt}]) + response_prefix)
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            base = logit_lens(model, tokenizer, ids, max_tokens)
        return {"base": base, "tuned": logit_lens(model, tokenizer, ids, max_tokens)}
    return {"model": logit_lens(model, tokenizer, ids, max_tokens)}


def plot_lens(views: dict, path, title: str = "") -> None:
    """One heatmap per view, one above the other (same tokens, so the columns line up), sharing the entropy
    colour scale; writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = next(iter(views.values()))
    L, T = first["entropy"].shape
    vmax = max(float(v["entropy"].max()) for v in views.values()) or 1.0
    fig, axes = plt.subplots(len(views), 1, figsize=(max(6.0, 0.62 * T + 2), max(2.6, 0.34 * L + 1.8) * len(views)),
                             squeeze=False)
    for ax, (name, v) in zip(axes[:, 0], views.items()):
        im = ax.imshow(v["entropy"].numpy(), aspect="auto", origin="lower", cmap="viridis", vmin=0.0, vmax=vmax)
        for i in range(L):
            for t in range(T):
                shade = float(v["entropy"][i, t]) / vmax
                ax.text(t, i, v["top"][i][t], ha="center", va="center", fontsize=7,
                        color="black" if shade > 0.6 else "white")
        ax.set_xticks(range(T), v["tokens"], rotation=90, fontsize=7)
        ax.set_yticks(range(L), [str(i) for i in range(L)], fontsize=7)
        ax.set_xlabel("input token (cell: predicted next token)")
        ax.set_ylabel("hidden-state index (0 = embeddings)")
        ax.set_title(name)
        fig.colorbar(im, ax=ax, label="entropy (nats)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
