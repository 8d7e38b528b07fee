"""`LossConfig`: which objective to train and its settings (the `loss` group of a run's config).

    LossConfig(method="repbend", mode="response_all", alpha=0.5, beta=0.5, gamma=0.1, epsilon=0.3, eta=0.0,
               alpha_mode="all", target_layers="20-30", temperature=2.0)

Values are converted to their declared types and checked when the object is built (`repbend.config_fields`).
docs/method.md states every term; each method ignores the other methods' keys.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..config_fields import Group, Layers

METHODS = ("repbend", "circuit_breakers", "rmu")
LOSS_MODES = ("request_last", "request_all", "request_response", "response_all", "response_one", "response_R")
REQUEST_ONLY_MODES = ("request_last", "request_all")


@dataclass
class LossConfig(Group):
    NAME = "loss"

    method: str = field(default="repbend", metadata={"choices": METHODS})
    """The objective: repbend (Representation Bending), circuit_breakers (representation rerouting with a LoRA)
    or rmu (representation misdirection, full weights of a few layers)."""

    # ---------------------------------------------------------------- RepBend
    mode: str = field(default="response_all", metadata={"choices": LOSS_MODES})
    """RepBend: which tokens of the safe and unsafe rows L_safe and L_unsafe read: request_last (last request
    token), request_all (all request tokens; rows hold the request only), request_response (all tokens),
    response_all (response tokens), response_one (first response token), response_R (first response_r)."""
    alpha: float = 0.5
    """RepBend: weight of L_safe (keep the safe representations where they were)."""
    beta: float = 0.5
    """RepBend: weight of L_unsafe (push the unsafe representations away; the term is subtracted)."""
    gamma: float = 0.1
    """RepBend: weight of L_cos (pull the unsafe last-request-token representations together)."""
    epsilon: float = 0.3
    """RepBend: weight of L_KL, the KL divergence on the retain (UltraChat) rows."""
    eta: float = 0.0
    """RepBend: weight of L_pair (harmful answer vs refusal of the same WildJailbreak request)."""
    alpha_mode: str = field(default="all", metadata={"choices": ("all", "target")})
    """RepBend: L_safe over all n_layers+1 hidden-state indices (all) or over target_layers only (target)."""
    target_layers: Layers = "20-30"
    """Hidden-state indices (0 = embeddings, i = output of decoder layer i-1): RepBend's U, the layers of
    L_unsafe, L_cos and L_pair; Circuit Breakers' rerouting layers C (an ordered list, duplicates kept)."""
    temperature: float = 2.0
    """RepBend: KL temperature T."""
    response_r: int = 20
    """RepBend: R of the response_R mode (the first R response tokens)."""
    paired_repr_length: int = 20
    """RepBend: L_pair reads positions p .. p+R-1, R = min(this, the shortest response of the batch's pairs)."""

    # ---------------------------------------------------------------- Circuit Breakers
    retain_layers: Layers | str = "all"
    """Circuit Breakers: hidden-state indices of the retain term; all = 0 .. n_layers."""
    cb_alpha: float = 10.0
    """Circuit Breakers: overall coefficient; the retain term gets cb_alpha*s, the rerouting term cb_alpha*(1-s)."""
    cb_progress_scale: float = 0.5
    """Circuit Breakers: s = cb_progress_scale * progress (progress = optimizer step / max_steps)."""
    cb_retain_pad_length: int = 2048
    """Circuit Breakers: P in the retain term's denominator (n_retain_rows * P); a longer retain row is an error."""

    # ---------------------------------------------------------------- RMU
    rmu_layer: int = 7
    """RMU: the hidden-state index whose activations are steered (7 = output of decoder layer 6)."""
    rmu_update_layers: Layers = "5-7"
    """RMU: decoder layers whose rmu_trainable tensors are trained (full weights, no LoRA)."""
    rmu_trainable: list[str] = field(default_factory=lambda: ["mlp.down_proj.weight"])
    """RMU: parameter names, relative to a decoder layer, that train."""
    rmu_alpha: float = 1200.0
    """RMU: weight of the retain term."""
    steering_coeff: float = 6.5
    """RMU: norm of the control vector c."""
    rmu_seed: int = 42
    """RMU: seed of the generator that draws c (once per run)."""

    def validate(self) -> None:
        self.check(len(self.target_layers) > 0, "target_layers", "name at least one layer")
        self.check(all(i >= 0 for i in self.target_layers), "target_layers", "hold indices >= 0")
        self.check(self.temperature > 0, "temperature", "be positive")
        self.check(self.response_r >= 0, "response_r", "be >= 0")
        self.check(self.paired_repr_length >= 1, "paired_repr_length", "be >= 1")
        if isinstance(self.retain_layers, str):
            self.check(self.retain_layers == "all", "retain_layers", "be 'all' or layer indices")
        self.check(self.cb_retain_pad_length >= 1, "cb_retain_pad_length", "be >= 1")
        self.check(self.rmu_layer >= 1, "rmu_layer", "be >= 1 (a decoder layer's output)")
        self.check(len(self.rmu_update_layers) > 0, "rmu_update_layers", "name at least one decoder layer")
        self.check(len(self.rmu_trainable) > 0, "rmu_trainable", "name at least one parameter")
        self.check(self.steering_coeff > 0, "steering_coeff", "be positive")
        self.check(self.rmu_seed >= 0, "rmu_seed", "be >= 0")
        if self.method == "repbend":
            # settings that silently switch a weighted term off are errors (docs/method.md, "Loss modes")
            self.check(not (self.mode == "response_R" and self.response_r == 0 and (self.alpha or self.beta)),
                       "response_r", "be >= 1 in mode response_R (0 leaves L_safe and L_unsafe no tokens)")
            self.check(not (self.request_only and self.eta), "eta",
                       f"be 0 in the request-only mode {self.mode} (L_pair compares responses; there are none)")

    @property
    def request_only(self) -> bool:
        """Rows hold the request only (request_last, request_all): RepBend only."""
        return self.method == "repbend" and self.mode in REQUEST_ONLY_MODES

    def weights(self) -> dict[str, float]:
        """RepBend: each term's coefficient in the total (L_unsafe enters with -beta)."""
        return {"safe": self.alpha, "unsafe": -self.beta, "cos": self.gamma, "kl": self.epsilon, "pair": self.eta}
