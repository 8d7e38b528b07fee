"""Checks of a run's settings against this machine that need no model (`repbend.build.check_before_load`): each
failure is one `ConfigError` line naming the setting, raised before the model loads and before a process group
starts. Nothing here touches the network."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import ConfigError

WANDB_OFFLINE_MODES = ("offline", "disabled", "dryrun")


def check_device(device: str) -> torch.device:
    """`model.device` as this process will resolve it; cuda asked for without a CUDA device (or cuda:N past the
    last device) is an error."""
    from .model import resolve_device

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise ConfigError(f"model.device {device}: no CUDA device is available here (torch {torch.__version__}, "
                              f"{build}); use --model.device cpu, or auto")
        index = torch.device(device).index
        if index is not None and index >= torch.cuda.device_count():
            raise ConfigError(f"model.device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                              f"cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    return resolve_device(device)


def check_backend(backend: str, device: torch.device) -> None:
    """nccl runs only between CUDA devices."""
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError(f"distributed.backend nccl needs CUDA devices, and this run is on the {device.type}: use "
                          "--distributed.backend gloo, or auto")
    if backend == "nccl" and not (torch.distributed.is_available() and torch.distributed.is_nccl_available()):
        raise ConfigError("distributed.backend nccl: this torch build has no NCCL; use --distributed.backend gloo")


def check_output_dir(output_dir: str) -> None:
    """`train.output_dir` must be a directory, or creatable under a writable one (the run's lock, taken next,
    then proves it can be written)."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"train.output_dir {out} is not a directory")
    existing = out
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"train.output_dir {out}: {existing} is not a directory")
    target = out if out.exists() else existing
    if not os.access(target, os.W_OK | os.X_OK):
        raise ConfigError(f"train.output_dir {out}: {target} is not writable (read-only or no permission)")


def check_wandb() -> None:
    """`train.report_to wandb` needs a key (WANDB_API_KEY, or a netrc entry for the W&B host as `wandb login`
    writes) unless WANDB_MODE is offline/disabled: without one wandb.init would wait on the network and fail late.
    A missing wandb package is left to the metric sink (one warning, log.jsonl still written)."""
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        return
    if os.environ.get("WANDB_MODE", "").strip().lower() in WANDB_OFFLINE_MODES:
        return
    if os.environ.get("WANDB_DISABLED", "").strip().lower() in ("1", "true", "yes"):
        return
    if os.environ.get("WANDB_API_KEY", "").strip():
        return
    if _netrc_has(_wandb_host()):
        return
    raise ConfigError("train.report_to wandb: no Weights & Biases API key (no WANDB_API_KEY, no netrc entry for "
                      f"{_wandb_host()}): run `wandb login`, set WANDB_API_KEY, or set WANDB_MODE=offline to log "
                      "locally")


def _wandb_host() -> str:
    from urllib.parse import urlparse

    return urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"


def _netrc_has(host: str) -> bool:
    import netrc

    files = [os.environ["NETRC"]] if os.environ.get("NETRC") else [os.path.expanduser("~/.netrc"),
                                                                     os.path.expanduser("~/_netrc")]
    for f in files:
        if not os.path.isfile(f):
            continue
        try:
            entry = netrc.netrc(f).authenticators(host)
        except (netrc.NetrcParseError, OSError):
            continue
        if entry and entry[2]:
            return True
    return False
