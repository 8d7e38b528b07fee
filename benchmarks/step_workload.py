"""The workload of benchmarks/bench_step.py: the model shapes (random weights from a config), each method's recipe
scaled to each shape, and synthetic micro-batches whose lengths follow the public data sets.

Methods and their variants (each method is measured against its own re-creation of the reference code):
    repbend           repbend, repbend+padded | reference, reference+dynpad   (benchmarks/reference_recipe.py)
    circuit_breakers  circuit_breakers        | cb_reference                  (benchmarks/reference_baselines.py)
    rmu               rmu                     | rmu_reference                 (benchmarks/reference_baselines.py)
Recipes at n decoder layers (the published 32-layer values at the same relative depth):
    repbend           U = floor(20n/32) .. floor(30n/32); LoRA r 16 on layers 0..max(U)
    circuit_breakers  C = floor(18n/32), floor(29n/32), floor(20n/32) .. floor(30n/32) (the published list, its
                      duplicate kept); R = all indices; cb_alpha 10; P = 2048 (x --scale); LoRA on 0..max(C)
    rmu               L = max(3, floor(7n/32)); trained: mlp.down_proj.weight of decoder layers L-2 .. L (5..7 of 32)
Micro-batches: RepBend's composition (2B safe, 2B unsafe, B retain); Circuit Breakers and RMU: B forget rows and B
retain-side rows (WildGuardMix safe + WildJailbreak refusals + UltraChat), from the sampler's own composition.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

METHODS = ("repbend", "circuit_breakers", "rmu")
# run order: each method with its reference first (the figures that matter when time runs out), the layouts after
VARIANTS = ("repbend", "reference", "circuit_breakers", "cb_reference", "rmu", "rmu_reference", "repbend+padded",
            "reference+dynpad")
METHOD_OF = {"repbend": "repbend", "repbend+padded": "repbend", "reference": "repbend", "reference+dynpad": "repbend",
             "circuit_breakers": "circuit_breakers", "cb_reference": "circuit_breakers", "rmu": "rmu",
             "rmu_reference": "rmu"}
REFERENCE_OF = {"repbend": "reference", "circuit_breakers": "cb_reference", "rmu": "rmu_reference"}
BATCH_GPU = {"repbend": 4, "circuit_breakers": 4, "rmu": 16}  # the recipes' per-device micro-batch B
PAD_ID, FIRST_ID = 0, 1   # token 0 pads; data ids are drawn from [FIRST_ID, vocab)
EOS_ID = FIRST_ID + 1     # the models' EOS: Circuit Breakers' reference pads with it (its embedding is not the zero
                          # row of PAD_ID, so its left padding gives no zero hidden state, whose cos would be 0/0)
PACK_LENGTH = 1024
LORA_B_STD = 0.02


# ---------------------------------------------------------------- models
@dataclass(frozen=True)
class ModelSpec:
    family: str            # llama | mistral
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    rope_theta: float = 10000.0
    max_positions: int = 2048
    checkpointing: bool = False   # the recipe's gradient checkpointing (auto setting)


MODELS = {
    "tiny": ModelSpec("llama", 4, 64, 4, 2, 128, 1000),
    "small": ModelSpec("llama", 8, 512, 8, 4, 1408, 32000),
    "llama3-8b": ModelSpec("llama", 32, 4096, 32, 8, 14336, 128256, 500000.0, 8192, True),
    "mistral-7b": ModelSpec("mistral", 32, 4096, 32, 8, 14336, 32000, 1000000.0, 32768, True),
}


def target_layers(n_layers: int) -> list[int]:
    """The recipe's U = 20..30 of 32 at the same relative span: floor(20n/32) .. floor(30n/32) (8 layers: 5..7)."""
    return list(range(20 * n_layers // 32, 30 * n_layers // 32 + 1))


def lora_layers(n_layers: int) -> list[int]:
    """The recipe: adapters on decoder layers 0 .. the last target index (0..30 of 32; 0..7 of 8)."""
    return list(range(min(max(target_layers(n_layers)), n_layers - 1) + 1))


def cb_layers(n_layers: int) -> list[int]:
    """Circuit Breakers' C: the published "18,29,20-30" of 32 at the same relative depth (duplicates kept)."""
    n = n_layers
    return [18 * n // 32, 29 * n // 32] + list(range(20 * n // 32, 30 * n // 32 + 1))


def rmu_layer(n_layers: int) -> int:
    """RMU's hidden-state index L: 7 of 32 (at least 3, so that two layers below it train)."""
    return min(n_layers, max(3, 7 * n_layers // 32))


def rmu_update_layers(n_layers: int) -> list[int]:
    """RMU's trained decoder layers: L-2 .. L (5, 6, 7 of 32; layer L never runs, the reference's quirk)."""
    L = rmu_layer(n_layers)
    return [i for i in range(L - 2, L + 1) if 0 <= i < n_layers]


def adapter_layers(method: str, n_layers: int) -> list[int] | None:
    """Decoder layers with LoRA adapters (None: RMU trains full weights)."""
    if method == "rmu":
        return None
    top = max(cb_layers(n_layers) if method == "circuit_breakers" else target_layers(n_layers))
    return list(range(min(top, n_layers - 1) + 1))


def loss_config(method: str, n_layers: int, scale: float = 1.0, eta: float = 0.0):
    """The method's recipe (module docstring) for a model with `n_layers` decoder layers."""
    from repbend.loss import LossConfig
    if method == "repbend":
        return LossConfig(target_layers=target_layers(n_layers), eta=eta)
    if method == "circuit_breakers":
        return LossConfig(method="circuit_breakers", target_layers=cb_layers(n_layers),
                          cb_retain_pad_length=max(2, round(2048 * scale)))
    if method == "rmu":
        return LossConfig(method="rmu", rmu_layer=rmu_layer(n_layers), rmu_update_layers=rmu_update_layers(n_layers))
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def n_params_counted(model) -> int:
    """N of the MFU: the decoder layers and the final norm, neither embedding table (the input embeddings are a
    lookup, and no pass applies the LM head to every token)."""
    return sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "lm_head" not in n)


def build_model(spec: ModelSpec, device, dtype, attn: str, checkpointing: bool, lora_dropout: float, seed: int,
                method: str = "repbend"):
    """The base model from `spec` with random weights (built on `device`), plus fresh LoRA r=16 on all 7 projections
    of the method's adapter layers (none for rmu: the plain model). Returns (model, n_layers, N of the MFU)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    from repbend.model import LoraSettings, attach_lora, enable_checkpointing

    llama = spec.family == "llama"
    cfg_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if llama else (MistralConfig, MistralForCausalLM)
    extra = {"sliding_window": None} if spec.family == "mistral" else {}
    config = cfg_cls(vocab_size=spec.vocab, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
                     num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
                     max_position_embeddings=spec.max_positions, rope_theta=spec.rope_theta, rms_norm_eps=1e-5,
                     tie_word_embeddings=False, attention_dropout=0.0, pad_token_id=PAD_ID, bos_token_id=FIRST_ID,
                     eos_token_id=EOS_ID, **extra)
    torch.manual_seed(seed)
    with torch.device(device):
        model = model_cls._from_config(config, dtype=dtype, attn_implementation=attn)
    model.eval()
    n_params = n_params_counted(model)
    if checkpointing:
        enable_checkpointing(model)
    layers = adapter_layers(method, spec.layers)
    if layers is None:
        return model.to(device), spec.layers, n_params
    model = attach_lora(model, LoraSettings(r=16, alpha=16, dropout=lora_dropout), layers)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # B = 0 would make h' == h: move it so that every loss term is exercised
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * LORA_B_STD)
    return model.to(device), spec.layers, n_params


# ---------------------------------------------------------------- data
@dataclass(frozen=True)
class LengthDist:
    """Token counts: round(lognormal(log(median), sigma)) clipped to [lo, hi]."""
    median: float
    sigma: float
    lo: int
    hi: int


LENGTHS = {  # shaped after the public sets (chat template included)
    "wgm_request": LengthDist(70, 0.9, 8, 512),     # WildGuardMix requests: tens to a few hundred tokens
    "wgm_response": LengthDist(180, 0.8, 4, 512),   # WildGuardMix responses: up to ~500
    "wj_request": LengthDist(120, 0.8, 8, 512),     # WildJailbreak requests (adversarial ones are longer)
    "wj_refusal": LengthDist(60, 0.5, 4, 512),
    "wj_harmful": LengthDist(300, 0.5, 4, 512),
    "retain": LengthDist(600, 0.45, 64, 1024),      # UltraChat conversations: up to ~1000
}


def synthetic_pools(vocab: int, batch_size: int, seed: int, scale: float = 1.0):
    """Pools of 64 micro-batches' worth of rows (one length-grouping chunk), random token ids. `scale` multiplies
    every length (quick runs only)."""
    import numpy as np

    from repbend.data.examples import DataReport, DataSpec, Pools, Sequence
    from repbend.data.sampler import CHUNK_BATCHES, seeded_rng

    rng = seeded_rng(seed, "bench_step")
    n = CHUNK_BATCHES * batch_size

    def lengths(name):
        d = LENGTHS[name]
        lo, hi = max(2, round(d.lo * scale)), max(2, round(d.hi * scale))
        return np.clip(np.round(rng.lognormal(math.log(d.median * scale), d.sigma, n)), lo, hi).astype(int).tolist()

    def ids(k):
        return tuple(rng.integers(FIRST_ID, vocab, k).tolist())

    def rows(name):
        return [Sequence(ids(r + s), r, f"synthetic:{name}:{i}")
                for i, (r, s) in enumerate(zip(lengths("wgm_request"), lengths("wgm_response")))]

    safe, unsafe = rows("wgm_safe"), rows("wgm_unsafe")
    pairs = []
    for i, (r, a, b) in enumerate(zip(lengths("wj_request"), lengths("wj_refusal"), lengths("wj_harmful"))):
        req = ids(r)
        pairs.append((Sequence(req + ids(a), r, f"synthetic:wj:{i}"), Sequence(req + ids(b), r, f"synthetic:wj:{i}")))
    retain = [Sequence(ids(k), 0, f"synthetic:retain:{i}") for i, k in enumerate(lengths("retain"))]
    report = DataReport(DataSpec(), limits={}, max_examples_per_pool=None, seed=seed)
    return Pools(safe, unsafe, pairs, retain, report, DataSpec())


def micro_batches(vocab: int, batch_size: int, seed: int, count: int, scale: float = 1.0,
                  method: str = "repbend") -> list:
    """`count` micro-batches of the trainer's sampler for `method` over the synthetic pools."""
    import dataclasses

    from repbend.data.sampler import MicroBatchSampler
    from repbend.loss import LossConfig, RepBendLoss

    pools = synthetic_pools(vocab, batch_size, seed, scale)
    loss = RepBendLoss(LossConfig(method=method))
    pools = dataclasses.replace(pools, spec=loss.data_spec())  # the synthetic rows stand for any method's rendering
    sampler = MicroBatchSampler(pools, batch_size, seed, loss, group_by_length=True)
    return [sampler(i) for i in range(count)]


# ---------------------------------------------------------------- one step of each variant


def _dtype(name: str, device):
    import torch
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


def _device(name: str):
    import torch
    return torch.device(name)
