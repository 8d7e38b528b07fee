"""Stage 0 of benchmarks/gpu_check.sh: what this machine has, as one JSON line (stage "env"), before anything runs.

    python benchmarks/gpu_env.py --jsonl OUT/results.jsonl

Versions (python, torch, CUDA, triton, transformers, peft, numpy), the device, which optional packages import
(flash_attn, liger_kernel, matplotlib, pyarrow, tensorboard, wandb, accelerate, pytest), and whether repbend and its
baseline objectives import. Status "error" when repbend or torch cannot be imported (nothing after this can run).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import platform
import sys

from gpu_records import Records

OPTIONAL = ("flash_attn", "liger_kernel", "matplotlib", "pyarrow", "tensorboard", "wandb", "accelerate", "pytest")


def version(name: str):
    """The installed distribution's version (read from its metadata: importing transformers alone takes seconds)."""
    try:
        from importlib.metadata import version as dist_version
        return dist_version(name)
    except Exception:  # noqa: BLE001 - not installed is a finding, not a crash
        return "not installed"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jsonl", default=None)
    a = p.parse_args(argv)
    info = {"python": platform.python_version()}
    problems = []
    try:
        import torch
        info.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info.update(device=props.name, device_gib=round(props.total_memory / 2**30, 1),
                        capability=f"{props.major}.{props.minor}", device_count=torch.cuda.device_count())
    except Exception as e:  # noqa: BLE001
        problems.append(f"torch: {type(e).__name__}: {e}")
    for name in ("triton", "transformers", "peft", "numpy"):
        info[name] = version(name)
    info["optional"] = {n: importlib.util.find_spec(n) is not None for n in OPTIONAL}
    for module in ("repbend.kernels", "repbend.loss.config"):
        try:
            importlib.import_module(module)
        except Exception as e:  # noqa: BLE001
            problems.append(f"{module}: {type(e).__name__}: {e}")
    try:
        import repbend
        info["repbend_from"] = str(repbend.__file__)
    except Exception:  # noqa: BLE001
        pass
    info["baselines"] = {m: importlib.util.find_spec(f"repbend.loss.{m}") is not None
                         for m in ("circuit_breakers", "rmu")}
    Records(a.jsonl, "env").write("environment", "error" if problems else "ok", problems=problems or None, **info)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
