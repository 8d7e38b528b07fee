"""Does a PEFT LoRA adapter belong to this base model? Checked from the base model's config (built on the meta
device: no weights are read) and the adapter file's tensor shapes, before anything is loaded or generated.

PEFT itself loads an adapter for another model without a word when the module names happen to match (a 32-layer
adapter on a 4-layer model loads layers 0-3 and drops the rest; a 4-layer adapter on a 32-layer model leaves
layers 4-31 at B = 0) and with a size-mismatch traceback when they do not. Here each is one line naming both:
- a weight for a module the model does not have (e.g. `model.layers.7.self_attn.q_proj` on a 4-layer model);
- a LoRA weight whose shape does not fit its module: lora_A is `[r, in_features]`, lora_B `[out_features, r]`;
- a module the adapter's config targets in this model (PEFT's own matching rule) with no weights in the file.
"""
from __future__ import annotations

import json
import os
import re

from .cli import UsageError

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_PREFIX = "base_model.model."
_LORA = re.compile(r"(?P<module>.+)\.lora_(?P<part>A|B|embedding_A|embedding_B)(\.[^.]+)?\.weight$|"
                   r"(?P<module2>.+)\.lora_(?P<part2>embedding_A|embedding_B|magnitude_vector)(\.[^.]+)?$")


class AdapterMismatch(UsageError):
    """The adapter was trained for another base model (one line naming both)."""


def adapter_shapes(adapter_dir: str) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} of the adapter's weight file, read from its header (safetensors) or memory-mapped."""
    for name in ADAPTER_FILES:
        path = os.path.join(adapter_dir, name)
        if not os.path.exists(path):
            continue
        if name.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        import torch

        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return {k: tuple(v.shape) for k, v in state.items()}
    return {}


def _meta_model(model_path: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(os.path.expanduser(model_path))
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config), config


def check_adapter_fits(model_path: str, adapter_dir: str, option: str = "--model.adapter",
                       model_option: str = "--model.path") -> None:
    """AdapterMismatch (module docstring) when the adapter cannot belong to the model; silent when it fits or
    when the model's config cannot be read here (the model load then says what is wrong)."""
    import torch

    adapter_dir = os.path.expanduser(adapter_dir)
    shapes = adapter_shapes(adapter_dir)
    try:
        with open(os.path.join(adapter_dir, "adapter_config.json"), encoding="utf-8") as f:
            adapter_cfg = json.load(f)
    except (OSError, ValueError):
        adapter_cfg = {}
    try:
        model, config = _meta_model(model_path)
    except (OSError, ValueError):
        return
    trained_on = adapter_cfg.get("base_model_name_or_path") or "unknown"
    layers = getattr(config, "num_hidden_layers", None)
    hidden = getattr(config, "hidden_size", None)
    head = (f"{option} {adapter_dir} was trained for another base model ({trained_on}) than {model_option} "
            f"{model_path} ({layers} layers, hidden size {hidden})")
    modules = dict(model.named_modules())
    seen = set()
    for key, shape in sorted(shapes.items()):
        name = key.removeprefix(_PREFIX)
        m = _LORA.match(name)
        module_name = (m.group("module") or m.group("module2")) if m else name.rsplit(".", 1)[0]
        module = modules.get(module_name)
        if module is None:
            raise AdapterMismatch(f"{head}: the adapter has weights for {module_name}, which the model does not have")
        seen.add(module_name)
        part = (m.group("part") or m.group("part2")) if m else None
        if isinstance(module, torch.nn.Linear) and part in ("A", "B"):
            want = module.in_features if part == "A" else module.out_features
            got = shape[1] if part == "A" else shape[0]
            if len(shape) != 2 or got != want:
                side = "input" if part == "A" else "output"
                raise AdapterMismatch(f"{head}: its {module_name} LoRA weights have {side} size {got}, the model's "
                                      f"{module_name} has {want}")
        elif m is None:
            param = dict(model.named_parameters()).get(name)
            if param is not None and tuple(param.shape) != shape:
                raise AdapterMismatch(f"{head}: its {name} has shape {list(shape)}, the model's {list(param.shape)}")
    missing = _targeted_without_weights(adapter_dir, modules, seen)
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise AdapterMismatch(f"{head}: its config targets {missing[0]}{more} in this model, but it holds no "
                              "weights for them")


def _targeted_without_weights(adapter_dir: str, modules: dict, seen: set) -> list[str]:
    """Modules of the model that the adapter's LoRA config targets (PEFT's matching rule) but the file lacks."""
    import torch

    try:
        from peft import PeftConfig
        from peft.tuners.tuners_utils import check_target_module_exists
        cfg = PeftConfig.from_pretrained(adapter_dir)
    except (ImportError, OSError, ValueError, TypeError):
        return []
    if str(getattr(cfg, "peft_type", "")).split(".")[-1] != "LORA" or not getattr(cfg, "target_modules", None):
        return []
    return [name for name, module in modules.items()
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)) and name not in seen
            and check_target_module_exists(cfg, name)]
