"""What every objective returns (`LossTerms`) and the small checks they share."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError


@dataclass
class LossTerms:
    """`total`: the scalar to backpropagate. `parts`: each term, unweighted, as a 0-dim tensor, or None where the
    term was not computed (weight 0, or no tokens in this micro-batch)."""

    total: torch.Tensor
    parts: dict[str, torch.Tensor | None]

    def detached(self) -> dict[str, torch.Tensor]:
        """The total ("loss") and every computed term, detached, still on the device (no host sync)."""
        out = {"loss": self.total.detach()}
        out.update({k: v.detach() for k, v in self.parts.items() if v is not None})
        return out

    @classmethod
    def weighted(cls, parts: dict[str, torch.Tensor | None], weights: dict[str, float]) -> "LossTerms":
        """total = sum of weights[k] * parts[k] over the computed parts."""
        total = None
        for k, v in parts.items():
            if v is not None:
                total = weights[k] * v if total is None else total + weights[k] * v
        if total is None:
            raise ValueError("every loss term is switched off or has no tokens in this micro-batch")
        return cls(total=total, parts=parts)


def check_layers(layers: list[int], n_layers: int, key: str) -> list[int]:
    """`layers` as hidden-state indices of a model with `n_layers` decoder layers (0 .. n_layers)."""
    bad = [i for i in layers if not 0 <= i <= n_layers]
    if bad:
        raise ConfigError(f"{key}: {bad} out of range: the model has hidden-state indices 0..{n_layers} "
                          f"({n_layers} decoder layers)")
    return list(layers)


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
