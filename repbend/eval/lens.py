"""Logit lens: what each layer would predict next, base (adapters disabled) vs tuned.

For hidden-state index i (HF `output_hidden_states`: 0 = embeddings, n_layers = final, already normed) and token t:
    p_i,t = softmax(lm_head(final_norm(h_i,t)))   (for i = n_layers: softmax(lm_head(h_i,t)), the model's logits)
The cell shows argmax p_i,t (the predicted next token) and is coloured by its entropy -sum p log p (nats, fp32).
Rows are hidden-state indices, columns the last `max_tokens` tokens of the rendered prompt (chat template with the
generation prompt, then `response_prefix`).

The difference view (`lens_diff`, `repbend logit-lens --lens.view diff`) puts base and tuned in one map: with
b_i,t = argmax p^base_i,t (the base model's prediction at that layer and token),
    delta_i,t = p^tuned_i,t[b_i,t] - p^base_i,t[b_i,t]      (fp32, in [-1, 1])
is the change the adapter makes to the probability of the base model's prediction, and differs_i,t says whether
the tuned argmax is another token (the cell then shows the tuned token).
"""
from __future__ import annotations

import torch

from repbend.model import backbone, lm_head

from .generation import encode, render_chat


def _hidden_states(model, ids: list[int]):
    """The n_layers + 1 hidden states `(1, T_all, d)` of one forward pass over `ids`."""
    device = next(model.parameters()).device
    out = model(input_ids=torch.tensor([ids], device=device), output_hidden_states=True, use_cache=False,
                logits_to_keep=1)
    return out.hidden_states


def _layer_logprobs(model, hidden, i: int, T: int) -> torch.Tensor:
    """log p_i,t over the vocabulary for the last T tokens, `(T, V)` fp32 (module docstring)."""
    h = hidden[i][0, -T:]  # (T, d)
    logits = lm_head(model)(h if i == len(hidden) - 1 else backbone(model).norm(h)).float()  # (T, V)
    return torch.log_softmax(logits, dim=-1)


@torch.no_grad()
def logit_lens(model, tokenizer, ids: list[int], max_tokens: int = 32) -> dict:
    """{"tokens": [str] (T), "top": [[str]] (L+1, T), "entropy": Tensor (L+1, T) fp32} for the last `max_tokens`."""
    hidden = _hidden_states(model, ids)
    T = min(max_tokens, len(ids))
    tops, ents = [], []
    for i in range(len(hidden)):
        logp = _layer_logprobs(model, hidden, i, T)  # (T, V)
        ents.append(-(logp.exp() * logp).sum(-1))  # (T,)
        tops.append([_show(tokenizer, t) for t in logp.argmax(-1).tolist()])
    return {"tokens": [_show(tokenizer, t) for t in ids[-T:]], "top": tops, "entropy": torch.stack(ents).cpu()}


@torch.no_grad()
def lens_diff(model, tokenizer, prompt: str, response_prefix: str = "", max_tokens: int = 32) -> dict:
    """The difference view of a PEFT model (module docstring): {"tokens": [str] (T), "base_top", "tuned_top":
    [[str]] (L+1, T), "differs": bool Tensor (L+1, T), "delta": Tensor (L+1, T) fp32, "p_base": Tensor (L+1, T)
    fp32 (the base model's probability of its own prediction)}."""
    if not hasattr(model, "disable_adapter"):
        raise ValueError("the difference view compares base and tuned: load the model with an adapter")
    ids = encode(tokenizer, render_chat(tokenizer, [{"role": "user", "content": prompt}]) + response_prefix)
    T = min(max_tokens, len(ids))
    with model.disable_adapter():
        base = _hidden_states(model, ids)
    tuned = _hidden_states(model, ids)
    base_top, tuned_top, differs, delta, p_base = [], [], [], [], []
    for i in range(len(base)):
        lb, lt = _layer_logprobs(model, base, i, T), _layer_logprobs(model, tuned, i, T)  # (T, V) each
        b, t = lb.argmax(-1), lt.argmax(-1)  # (T,)
        pb = lb.gather(-1, b[:, None]).squeeze(-1).exp()
        delta.append(lt.gather(-1, b[:, None]).squeeze(-1).exp() - pb)
        p_base.append(pb)
        differs.append(b != t)
        base_top.append([_show(tokenizer, x) for x in b.tolist()])
        tuned_top.append([_show(tokenizer, x) for x in t.tolist()])
    return {"tokens": [_show(tokenizer, x) for x in ids[-T:]], "base_top": base_top, "tuned_top": tuned_top,
            "differs": torch.stack(differs).cpu(), "delta": torch.stack(delta).cpu(),
            "p_base": torch.stack(p_base).cpu()}


def diff_summary(diff: dict) -> str:
    """One line per hidden-state index: how many tokens' predictions changed, and the mean and smallest delta."""
    lines = ["hidden index | tokens whose top-1 changed | mean delta p(base top-1) | min delta"]
    T = diff["delta"].shape[1]
    for i, (d, row) in enumerate(zip(diff["differs"], diff["delta"])):
        lines.append(f"{i:12d} | {int(d.sum()):>13d} of {T:<10d} | {float(row.mean()):+24.3f} | "
                     f"{float(row.min()):+.3f}")
    return "\n".join(lines)


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


def plot_lens_diff(diff: dict, path, title: str = "") -> None:
    """One heatmap of `delta` (diverging colours, -1..1); a cell whose tuned top-1 differs from the base's shows
    the tuned token, the others show "=". Writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L, T = diff["delta"].shape
    fig, ax = plt.subplots(figsize=(max(6.0, 0.62 * T + 2), max(2.6, 0.34 * L + 1.8)))
    im = ax.imshow(diff["delta"].numpy(), aspect="auto", origin="lower", cmap="RdBu", vmin=-1.0, vmax=1.0)
    for i in range(L):
        for t in range(T):
            text = diff["tuned_top"][i][t] if bool(diff["differs"][i, t]) else "="
            strong = abs(float(diff["delta"][i, t])) > 0.6
            ax.text(t, i, text, ha="center", va="center", fontsize=7, color="white" if strong else "black")
    ax.set_xticks(range(T), diff["tokens"], rotation=90, fontsize=7)
    ax.set_yticks(range(L), [str(i) for i in range(L)], fontsize=7)
    ax.set_xlabel("input token (cell: the tuned model's next token where it differs from the base model's, else =)")
    ax.set_ylabel("hidden-state index (0 = embeddings)")
    ax.set_title("tuned - base: change in the probability of the base model's top-1 token")
    fig.colorbar(im, ax=ax, label="p_tuned(base top-1) - p_base(base top-1)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
