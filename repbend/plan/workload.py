"""What a plan runs: the model (a known shape, an HF config file or a recipe's model directory), the method's
recipe and micro-batches, and the step of each variant, all taken from the step benchmark of the source tree
(`benchmarks/step_workload.py`, `benchmarks/step_variants.py`), so that `repbend plan` and `repbend bench` run the
same step on the same micro-batches: methods, their reference re-creations and recipes are the benchmark's tables
(METHODS, REFERENCE_OF, METHOD_OF), not names known here.
"""
from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import torch

from ..errors import ConfigError

BENCH_DIR = Path(__file__).resolve().parent.parent.parent / "benchmarks"


def bench_modules():
    """(step_workload, step_variants) of the source checkout; a ConfigError without one."""
    if not (BENCH_DIR / "step_workload.py").is_file():
        raise ConfigError(f"repbend plan runs the step benchmark's workload from {BENCH_DIR}, which is not there: it "
                          "needs a source checkout of repbend (pip install -e .)")
    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))
    return importlib.import_module("step_workload"), importlib.import_module("step_variants")


def known_models() -> dict:
    """Name -> ModelSpec: the benchmark's models plus the larger shapes only a plan can run on one machine."""
    sw, _ = bench_modules()
    models = dict(sw.MODELS)
    models.setdefault("llama3-70b", sw.ModelSpec("llama", 80, 8192, 64, 8, 28672, 128256, 500000.0, 8192, True))
    return models


def hf_config(spec):
    """The transformers config of a ModelSpec (as benchmarks/step_workload.build_model makes it)."""
    from transformers import LlamaConfig, MistralConfig

    sw, _ = bench_modules()
    llama = spec.family == "llama"
    extra = {} if llama else {"sliding_window": None}
    return (LlamaConfig if llama else MistralConfig)(
        vocab_size=spec.vocab, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
        max_position_embeddings=spec.max_positions, rope_theta=spec.rope_theta, rms_norm_eps=1e-5,
        tie_word_embeddings=False, attention_dropout=0.0, pad_token_id=sw.PAD_ID, bos_token_id=sw.FIRST_ID,
        eos_token_id=sw.EOS_ID, **extra)


def load_model_config(model: str):
    """(name, transformers config, recipe checkpointing or None) for a known name, an HF config.json or a model
    directory holding one."""
    models = known_models()
    if model in models:
        spec = models[model]
        return model, hf_config(spec), spec.checkpointing
    path = Path(model).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"--model {model}: not a known model ({', '.join(models)}), nor an HF config.json or a "
                          "model directory with one")
    from transformers import AutoConfig
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        config = AutoConfig.for_model(**data)
    except (ValueError, KeyError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not a transformers model config: {e}") from None
    return str(model), config, None


def n_layers_of(config) -> int:
    return int(config.num_hidden_layers)


def meta_model(config, dtype: torch.dtype, checkpointing: bool, lora, lora_layers: list[int] | None):
    """The causal LM of `config` on the meta device (nothing allocated, nothing initialised), sdpa attention,
    checkpointing as asked, and LoRA adapters (`lora`: repbend.model.LoraSettings) on `lora_layers` (None: none,
    the plain model)."""
    from transformers import AutoModelForCausalLM

    from ..model import attach_lora, enable_checkpointing

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
        model.eval()
        if checkpointing:
            enable_checkpointing(model)
        if lora_layers is not None:
            model = attach_lora(model, lora, lora_layers)
    return model


def micro_batches(vocab: int, batch_size: int, seed: int, count: int, method: str, scale: float = 1.0):
    sw, _ = bench_modules()
    return sw.micro_batches(vocab, batch_size, seed, count, scale, method=method)


def recipe_loss(method: str, n_layers: int, eta: float = 0.0):
    """The benchmark's recipe of `method` at `n_layers` decoder layers (benchmarks/step_workload.loss_config)."""
    sw, _ = bench_modules()
    return sw.loss_config(method, n_layers, 1.0, eta)


def lora_layers_for(method: str, n_layers: int, recipe_layers: list[int] | None = None) -> list[int] | None:
    """Decoder layers with adapters: None where the method trains full weights (the benchmark's table says which);
    else the recipe's layers when given, else the benchmark's."""
    sw, _ = bench_modules()
    layers = sw.adapter_layers(method, n_layers)
    if layers is None:
        return None
    return list(recipe_layers) if recipe_layers is not None else layers
