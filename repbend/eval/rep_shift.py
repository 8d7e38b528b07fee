"""Representation shift: how far the adapter moves each layer's hidden states, on safe and unsafe prompts.

Each prompt is one user turn rendered with the chat template and the generation prompt (the "request"). For every
hidden-state index i (HF convention: 0 = embeddings, n_layers = final normed output) and selected token:
    l2  = ||h'_i - h_i||_2        cos = cos(h'_i, h_i)       (fp32)
with h' = tuned (adapters on) and h = base (adapters disabled). `positions="last"` selects the last request token
(the last token of the generation prompt, where the response starts); `positions="all"` every request token.
Reported per layer: the mean over all selected tokens of all prompts of the set. The last index is after the final
norm, so its distances are on a different scale from the layers before it.
"""
from __future__ import annotations

import csv
from pathlib import Path

import torch
import torch.nn.functional as F

from .generation import GenRequest, encode, left_pad, pad_id_of, render_chat


def _hidden(model, inputs, mask, pos):
    out = model(**inputs, attention_mask=mask, position_ids=pos, output_hidden_states=True, use_cache=False,
                logits_to_keep=1)
    return out.hidden_states  # n_layers + 1 tensors (B, L, d)


@torch.no_grad()
def representation_shift(model, tokenizer, prompts: list[str], positions: str = "last", batch_size: int = 8) -> dict:
    """{"l2": Tensor (L+1,), "cos": Tensor (L+1,), "n_tokens": int} averaged over the selected tokens."""
    if positions not in ("last", "all"):
        raise ValueError(f"positions must be 'last' or 'all', got {positions!r}")
    if not hasattr(model, "disable_adapter"):
        raise ValueError("rep-shift compares base and tuned: load the model with an adapter")
    reqs = [GenRequest(encode(tokenizer, render_chat(tokenizer, [{"role": "user", "content": p}]))) for p in prompts]
    l2_sum = cos_sum = None
    n = 0
    for start in range(0, len(reqs), batch_size):
        inputs, mask, pos = left_pad(reqs[start:start + batch_size], model, pad_id_of(tokenizer))
        with model.disable_adapter():
            base = _hidden(model, inputs, mask, pos)
        tuned = _hidden(model, inputs, mask, pos)
        select = mask.bool() if positions == "all" else torch.zeros_like(mask, dtype=torch.bool)
        if positions == "last":
            select[:, -1] = True  # left padding: the last column is every row's last request token
        h = torch.stack([x[select] for x in base]).float()  # (L+1, N, d)
        h_t = torch.stack([x[select] for x in tuned]).float()  # (L+1, N, d)
        l2 = (h_t - h).norm(dim=-1).sum(-1)  # (L+1,)
        cos = F.cosine_similarity(h_t, h, dim=-1).sum(-1)  # (L+1,)
        l2_sum = l2 if l2_sum is None else l2_sum + l2
        cos_sum = cos if cos_sum is None else cos_sum + cos
        n += h.shape[1]
    return {"l2": (l2_sum / n).cpu(), "cos": (cos_sum / n).cpu(), "n_tokens": n}


def write_csv(path, shifts: dict[str, dict]) -> None:
    """Columns: set, hidden_index, mean_l2, mean_cos, n_tokens."""
    with Path(path).open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["set", "hidden_index", "mean_l2", "mean_cos", "n_tokens"])
        for name, s in shifts.items():
            for i, (l2, cos) in enumerate(zip(s["l2"].tolist(), s["cos"].tolist())):
                w.writerow([name, i, f"{l2:.6g}", f"{cos:.6g}", s["n_tokens"]])


def plot_shift(path, shifts: dict[str, dict], title: str = "") -> None:
    """Two panels, L2 distance and cosine against hidden-state index, one line per prompt set; writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax_l2, ax_cos) = plt.subplots(1, 2, figsize=(11, 4))
    for name, s in shifts.items():
        x = list(range(len(s["l2"])))
        ax_l2.plot(x, s["l2"].tolist(), marker="o", markersize=3, label=name)
        ax_cos.plot(x, s["cos"].tolist(), marker="o", markersize=3, label=name)
    ax_l2.set_ylabel("mean ||h_tuned - h_base||")
    ax_cos.set_ylabel("mean cos(h_tuned, h_base)")
    for ax in (ax_l2, ax_cos):
        ax.set_xlabel("hidden-state index (0 = embeddings, last = after the final norm)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
