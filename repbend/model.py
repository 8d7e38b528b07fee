"""Model and tokenizer loading, the LoRA adapters, the attention backend and optional Liger patches.

One model object serves both passes of a RepBend step: the reference pass runs it with the adapters
disabled, the trained pass with them enabled (see `repbend.passes`).
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from typing import Sequence

import torch

from .errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def resolve_device(device: str = "auto") -> torch.device:
    """"auto" -> the CUDA device of this process (LOCAL_RANK under torchrun) when there is one, else CPU."""
    if device == "auto":
        if torch.cuda.is_available():
            import os
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    return torch.device(device)


DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """"auto" -> bf16 on GPU, fp32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    names = DTYPES
    if dtype not in names:
        raise ConfigError(f"model.dtype must be auto, {', '.join(names)}; got {dtype!r}")
    return names[dtype]


def resolve_attention(attn: str, device: torch.device, dtype: torch.dtype) -> str:
    """"auto" -> flash_attention_2 on CUDA with bf16/fp16 when flash-attn is installed, else sdpa."""
    if attn != "auto":
        return attn
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) and importlib.util.find_spec("flash_attn"):
        return "flash_attention_2"
    return "sdpa"


def check_model_path(path: str, key: str = "model.path") -> None:
    """A path that looks local must be a directory; only a hub name (`org/name`, `name`) is left to the loader, so a
    mistyped local path is one line at once instead of a minute of hub retries. Path-like: starts with `.`, `/` or
    `~`, holds a backslash or more than one `/`, ends with `/`, names an existing directory as its first component
    (`models/llama` with ./models present), exists as a file, or is no valid hub repository id."""
    local = os.path.expanduser(path)
    if os.path.isdir(local):
        return
    if os.path.exists(local):
        raise ConfigError(f"{key}: {path} is a file, not a model directory (give an HF model directory or a hub name)")
    if looks_like_path(path):
        raise ConfigError(f"{key}: no such directory: {path} (give an HF model directory, or a hub name such as "
                          "org/name)")


def looks_like_path(name: str) -> bool:
    """Whether `name` reads as a filesystem path rather than a hub repository id (see `check_model_path`)."""
    if name.startswith((".", "/", "~")) or "\\" in name or name.endswith("/") or name.count("/") > 1:
        return True
    if "/" in name and os.path.isdir(name.split("/", 1)[0]):
        return True
    try:
        from huggingface_hub.utils import validate_repo_id
        validate_repo_id(name)
    except ImportError:  # pragma: no cover (huggingface_hub comes with transformers)
        return False
    except Exception:  # HFValidationError: no hub name can look like this
        return True
    return False


@contextlib.contextmanager
def _loading(what: str, path: str, key: str):
    """Turn a loader's OSError/ValueError (missing files, unknown hub name, no network) into one line naming `key`."""
    try:
        yield
    except ConfigError:
        raise
    except (OSError, ValueError, ImportError) as err:
        text = str(err).strip()
        first = text.splitlines()[0] if text else type(err).__name__
        raise ConfigError(f"{key}: cannot load the {what} from {path}: {first}") from None


def load_tokenizer(path: str, key: str = "model.path"):
    from transformers import AutoTokenizer

    check_model_path(path, key)
    with _loading("tokenizer", path, key):
        tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # only used to fill padding; padded positions are masked everywhere
    if not getattr(tok, "chat_template", None):
        raise ConfigError(f"{key}: the tokenizer in {path} has no chat template; every row is rendered with the "
                          "model's own chat template (use an instruct/chat model, or add a chat_template to its "
                          "tokenizer_config.json)")
    return tok


def model_depth(path: str) -> int:
    """The number of decoder layers of the model at `path`, from its config alone (no weights are read)."""
    from transformers import AutoConfig

    check_model_path(path)
    with _loading("config", path, "model.path"):
        config = AutoConfig.from_pretrained(path)
    config = getattr(config, "get_text_config", lambda: config)()
    n = getattr(config, "num_hidden_layers", None)
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"model.path: the config in {path} has no num_hidden_layers")
    return n


def load_model_and_tokenizer(path: str, *, adapter: str | None = None, dtype: str | torch.dtype = "auto",
                             device: str = "auto", attn_implementation: str = "auto", liger: bool = False):
    """Load an HF causal LM (local directory, or a hub name where the network allows) and its tokenizer.

    bf16 on GPU and fp32 on CPU by default; sdpa attention, or flash-attn 2 when installed on GPU. With
    `adapter`, a PEFT adapter directory is loaded on top (not merged). Returns (model, tokenizer), model in eval mode.
    """
    from transformers import AutoModelForCausalLM

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    check_model_path(path)
    tokenizer = load_tokenizer(path)
    if liger:
        apply_liger_patches(path)
    with _loading("model", path, "model.path"):
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dt, attn_implementation=resolve_attention(attn_implementation, dev, dt)
        ).to(dev)
    local = os.path.expanduser(path)
    if os.path.isdir(local):  # an adapter then names its base from anywhere (PEFT's base_model_name_or_path)
        model.name_or_path = model.config._name_or_path = os.path.abspath(local)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return model.eval(), tokenizer


def apply_liger_patches(path: str) -> bool:
    """Liger-kernel's RMSNorm/RoPE/SwiGLU patches for the model's family, when installed and on CUDA.

    Off by default (`model.liger`). The patched ops only change speed, not the loss: the cross-entropy and
    fused-linear patches stay off because RepBend never computes full-vocabulary logits.
    """
    if not torch.cuda.is_available() or importlib.util.find_spec("liger_kernel") is None:
        log.warning("model.liger: liger-kernel is not installed or no GPU is present; continuing without it")
        return False
    import liger_kernel.transformers as liger

    model_type = _model_type(path)
    patch = getattr(liger, f"apply_liger_kernel_to_{model_type}", None)  # its public per-family function
    if patch is None:
        log.warning("model.liger: liger-kernel has no patches for model type %r; continuing without them", model_type)
        return False
    patch(rms_norm=True, rope=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False)
    return True


def _model_type(path: str) -> str:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path).model_type


def enable_checkpointing(model) -> None:
    """Recompute each decoder layer in the backward (non-reentrant `torch.utils.checkpoint`). transformers 5.25
    renamed the switch `activation_checkpointing_enable` (the old name warns); older releases have only the old."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def unwrap(model):
    """The HF causal LM inside any DDP (`.module`) and PEFT (`get_base_model()`) wrappers."""
    m = model
    while True:
        if isinstance(m, torch.nn.parallel.DistributedDataParallel):
            m = m.module
        elif hasattr(m, "get_base_model"):
            m = m.get_base_model()
        else:
            return m


def backbone(model):
    """The decoder stack (e.g. `LlamaModel`: embeddings, layers, final norm) under the causal-LM head."""
    m = unwrap(model)
    inner = m.get_decoder() if hasattr(m, "get_decoder") else getattr(m, "model", None)
    if inner is None or not hasattr(inner, "layers"):
        raise ValueError(f"cannot find the decoder stack of {type(m).__name__}: expected `.model.layers`")
    return inner


def decoder_layers(model) -> torch.nn.ModuleList:
    return backbone(model).layers


def lm_head(model) -> torch.nn.Linear:
    head = unwrap(model).get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(unwrap(model)).__name__} has no output embeddings (lm_head)")
    return head


@dataclass
class LoraSettings:
    r: int = 16
    alpha: int = 16
    dropout: float = 0.05
    target_modules: Sequence[str] = DEFAULT_TARGET_MODULES


def attach_lora(model, settings: LoraSettings, layers_to_transform: Sequence[int]):
    """Wrap `model` with fresh PEFT LoRA adapters on `settings.target_modules` of the decoder layers
    `layers_to_transform`. The base weights are frozen; only the adapters train."""
    from peft import LoraConfig, get_peft_model

    n_layers = len(decoder_layers(model))
    bad = [i for i in layers_to_transform if not 0 <= i < n_layers]
    if bad:
        raise ValueError(f"lora.layers_to_transform {bad} out of range: the model has {n_layers} decoder layers")
    targets = list(settings.target_modules)
    if "all-linear" in targets:  # PEFT's shorthand, spelled out: it refuses layers_to_transform with a string
        if len(targets) > 1:
            raise ValueError(f"target_modules {targets}: all-linear stands alone")
        targets = sorted({name.rsplit(".", 1)[-1] for name, mod in decoder_layers(model).named_modules()
                          if isinstance(mod, torch.nn.Linear)})
    config = LoraConfig(
        r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, target_modules=targets,
        layers_to_transform=list(layers_to_transform),
        bias="none", task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    no_input_copy_under_autocast(peft_model)
    return peft_model


def _cast_input_unless_autocast(module, args):
    x = args[0] if args else None
    if isinstance(x, torch.Tensor):
        module.cast_input_dtype_enabled = not torch.is_autocast_enabled(x.device.type)


def no_input_copy_under_autocast(model) -> None:
    """PEFT casts each LoRA layer's input to the adapters' dtype: fp32 adapters on a bf16 model make an fp32 copy of
    every projection's input (and of its dropout output) in each layer's forward and recompute. Under autocast the
    LoRA matmuls run in bf16 all the same (autocast casts the copy back), so the copy buys nothing: a pre-hook turns
    PEFT's own switch (`cast_input_dtype_enabled`, where this PEFT has it) off while autocast is on, and on again
    outside it (an fp32 CPU run casts as before)."""
    for m in model.modules():
        if hasattr(m, "lora_A") and hasattr(m, "cast_input_dtype_enabled"):
            m.register_forward_pre_hook(_cast_input_unless_autocast)
