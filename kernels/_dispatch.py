"""Choosing between the Triton and the eager PyTorch implementation of an op."""
import os

import torch

IMPLS = ("auto", "triton", "torch")


def interpreter_on() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1 before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_impl(impl: str, device: torch.device) -> str:
    """Map `impl` to "triton" or "torch" for tensors on `device`.

    auto: Triton on CUDA, eager PyTorch elsewhere. "triton" on a CPU tensor needs TRITON_INTERPRET=1.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if impl == "triton" and device.type != "cuda" and not interpreter_on():
        raise RuntimeError(
            f"impl='triton' on a {device.type} tensor needs the Triton interpreter: set TRITON_INTERPRET=1 "
            "before importing repbend.kernels, or use impl='torch'/'auto'"
        )
    return impl
