"""Layer settings that fit the model: the published values at a model's own depth, and the check that a trained
tensor can change what a weighted term reads.

Hidden-state index i is the output of decoder layer i-1 (0 = the embeddings, n_layers = the final normed output),
so decoder layer j changes the hidden states at indices j+1 .. n_layers and nothing before them.
"""
from __future__ import annotations

from ..errors import ConfigError

PUBLISHED_DEPTH = 32  # Llama-3-8B and Mistral-7B: every published layer setting is for 32 decoder layers


def scaled(index: int, n_layers: int) -> int:
    """A published layer index at the same relative depth of a model with `n_layers` decoder layers."""
    return index * n_layers // PUBLISHED_DEPTH


def scaled_span(lo: int, hi: int, n_layers: int) -> list[int]:
    """The published span lo..hi (inclusive) at the model's depth (at least one index)."""
    a, b = scaled(lo, n_layers), scaled(hi, n_layers)
    return list(range(a, max(a, b) + 1))


def influenced(reads: dict[str, tuple[float, list[int]]], trained: list[int], key: str) -> None:
    """ConfigError unless some weighted term reads a hidden-state index that one of the `trained` decoder layers
    changes. reads: term -> (weight, hidden-state indices it reads)."""
    weighted = {t: idx for t, (w, idx) in reads.items() if w}
    if not weighted or not trained:
        return
    first = min(trained)
    if any(i > first for idx in weighted.values() for i in idx):
        return
    what = "; ".join(f"{t} reads {sorted(set(idx))}" for t, idx in weighted.items())
    raise ConfigError(f"{key}: no weighted term reads a hidden state that a trained layer changes: the trained decoder "
                      f"layers are {sorted(set(trained))} (decoder layer j changes hidden-state indices j+1 and up), "
                      f"and {what}. Train earlier layers or read later indices")
