"""The workload of benchmarks/bench_step.py: the model shapes (random weights from a config), each method's recipe
scaled to each shape, and synthetic micro-batches whose lengths follow the public data sets.

Methods, their variants and their reference re-creations are registered in benchmarks/methods.py (BENCH); this
module derives the tables the benchmark reads from it. Recipes at n decoder layers (the published 32-layer values
at the same relative depth):
    repbend           U = floor(20n/32) .. floor(30n/32); LoRA r 16 on layers 0..max(U)
    circuit_breakers  C = floor(18n/32), floor(29n/32), floor(20n/32) .. floor(30n/32) (the published list, its
                      duplicate kept); R = all indices; cb_alpha 10; P = 2048 (x --scale); LoRA on 0..max(C)
    rmu               L = max(3, floor(7n/32)); trained: mlp.down_proj.weight of decoder layers L-2 .. L (5..7 of 32)
    npo, dpo          the published coefficients; LoRA on every layer
Micro-batches: each method's own composition from the sampler (RepBend: 2B safe, 2B unsafe, B retain; Circuit
Breakers, RMU, NPO: B forget and B retain-side rows; DPO: B pairs).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from methods import BENCH, EOS_ID, FIRST_ID, PAD_ID, cb_layers, method_of, rmu_layer, rmu_update_layers, target_layers  # noqa: F401,E501

METHODS = tuple(BENCH)
# run order: each method with its reference first (the figures that matter when time runs out), the layouts after
VARIANTS = tuple(v for m in BENCH.values() for v in (m.variants[0], m.references[0])) + tuple(
    v for m in BENCH.values() for v in m.variants[1:] + m.references[1:])
METHOD_OF = {v: method_of(v) for v in VARIANTS}
REFERENCE_OF = {name: m.references[0] for name, m in BENCH.items()}
BATCH_GPU = {name: m.batch_gpu for name, m in BENCH.items()}
MFU_METHODS = tuple(name for name, m in BENCH.items() if m.mfu)
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


def lora_layers(n_layers: int) -> list[int]:
    """The recipe: adapters on decoder layers 0 .. the last target index (0..30 of 32; 0..7 of 8)."""
    return adapter_layers("repbend", n_layers)


def adapter_layers(method: str, n_layers: int) -> list[int] | None:
    """Decoder layers with LoRA adapters: the method's own default at its recipe (None: it trains full weights)."""
    from repbend.loss import RepBendLoss
    return RepBendLoss(loss_config(method, n_layers)).method.lora_layers(n_layers)


def loss_config(method: str, n_layers: int, scale: float = 1.0, eta: float = 0.0):
    """The method's recipe (module docstring) for a model with `n_layers` decoder layers."""
    from repbend.loss import LossConfig
    if method not in BENCH:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    return LossConfig(method=method, **BENCH[method].recipe(n_layers, scale, eta))


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
