"""Checks of the evaluation commands' inputs, run before any model is loaded or any prompt generated, so that a
mistyped judge directory fails in a second rather than after hours of generation. Every failure is one line:
`UsageError` for an option value, `DataError` / `DataFileNotFound` for a file.

Model, adapter and judge locations (`--model.path`, `--adapter`, `--judges NAME=DIR`):
    an existing path        must be a directory holding a model: config.json, weights (*.safetensors, *.bin, ...)
                            and tokenizer files (the evaluated model: also a chat template); an adapter:
                            adapter_config.json and adapter weights
    `org/name`, not a path  a Hugging Face Hub id, loaded by `from_pretrained`; offline (HF_HUB_OFFLINE or
                            TRANSFORMERS_OFFLINE set) it must already be in the local Hub cache
    anything else           a local path that does not exist: an error
"""
from __future__ import annotations

import json
import os
import re

from .cli import UsageError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
DTYPES = ("auto", "bf16", "bfloat16", "fp16", "float16", "fp32", "float32")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def check_model_location(path: str, option: str, *, kind: str = "model", chat_template: bool = False) -> None:
    """`kind`: "model" (a causal LM with its tokenizer) or "adapter" (a PEFT adapter); `option` names the flag in
    the message (e.g. "--judges harmbench="). `chat_template`: the tokenizer must carry one."""
    where = f"{option}{'' if option.endswith('=') else ' '}{path}"
    local = os.path.expanduser(path)
    if not os.path.exists(local):
        if _HUB_ID.fullmatch(path) is None:
            raise UsageError(f"{where}: no such directory")
        if _offline():
            from huggingface_hub import try_to_load_from_cache

            marker = "adapter_config.json" if kind == "adapter" else "config.json"
            if not isinstance(try_to_load_from_cache(path, marker), str):
                raise UsageError(f"{where}: no such directory, and not in the Hugging Face cache (offline mode)")
        return
    if not os.path.isdir(local):
        raise UsageError(f"{where}: not a directory")
    names = set(os.listdir(local))
    weights = [n for n in names if n.endswith(WEIGHT_SUFFIXES)]
    if kind == "adapter":
        if "adapter_config.json" not in names or not weights:
            raise UsageError(f"{where}: not a PEFT adapter directory (needs adapter_config.json and adapter weights)")
        return
    if "config.json" not in names or not weights:
        raise UsageError(f"{where}: not a model directory (needs config.json and weights, e.g. model.safetensors)")
    if not names.intersection(TOKENIZER_FILES):
        raise UsageError(f"{where}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    if chat_template and not _has_chat_template(local, names):
        raise UsageError(f"{where}: the tokenizer has no chat template (evaluation renders prompts with it)")


def _has_chat_template(directory: str, names: set[str]) -> bool:
    if names.intersection(("chat_template.jinja", "chat_template.json")):
        return True
    try:
        with open(os.path.join(directory, "tokenizer_config.json"), encoding="utf-8") as f:
            return bool(json.load(f).get("chat_template"))
    except (OSError, ValueError, AttributeError):
        return True  # unreadable here: let the tokenizer loader say what is wrong


def check_dtype(dtype: str, option: str = "--model.dtype") -> None:
    if dtype not in DTYPES:
        raise UsageError(f"{option} {dtype!r}: expected one of {', '.join(DTYPES)}")


def check_device(device: str, option: str = "--model.device") -> None:
    """auto, cpu, cuda, cuda:N (N below the number of visible GPUs), or another device torch knows."""
    if device == "auto":
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise UsageError(f"{option} {device!r}: not a device ({str(e).splitlines()[0]})") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UsageError(f"{option} {device!r}: no CUDA device is available (use cpu or auto)")
        if dev.index is not None and dev.index >= count:
            raise UsageError(f"{option} {device!r}: only {count} CUDA device(s) are visible")


def check_positive(value, option: str) -> None:
    if value is None or value < 1:
        raise UsageError(f"{option} {value}: must be >= 1")
