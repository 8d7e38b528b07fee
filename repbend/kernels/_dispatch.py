"""What the three ops share: choosing the implementation, the device guard, per-layer address tables, and the loop
bound convention of the kernels.

Loop bounds: every Triton loop runs over a constexpr trip count (`for c in range(NUM_CHUNKS)`), never
`range(0, D, BLOCK)` over a runtime argument. Triton 3.6's interpreter turns a runtime bound into a Python int with
`int()` on a one-element numpy array, which numpy >= 2.4 rejects ("only 0-dimensional arrays can be converted to
Python scalars"); triton 3.7 squeezes the array first. A constexpr count is a plain int in both, and compiled
kernels only gain from it (one specialisation per model width or vocabulary).
"""
import contextlib
import os

import torch

IMPLS = ("auto", "triton", "torch")
# REPBEND_KERNELS=torch (read at import) makes "auto" choose the eager code everywhere: the GPU check sets it when
# Triton cannot build its launchers on the machine (no C compiler or no Python.h), so that every stage still runs.
ENV_IMPL = "REPBEND_KERNELS"
AUTO_TORCH_ONLY = os.environ.get(ENV_IMPL, "") == "torch"
# The device type "auto" resolves for while a step is planned on fake tensors (repbend.plan): "cuda" selects the
# Triton custom ops, whose fake implementations give each op's outputs without launching anything. A plain module
# global (torch.compile traces it; a ContextVar it cannot); planning is single-threaded.
_planned = {"device": None}


def interpreter_on() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1 before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_impl(impl: str, device: torch.device) -> str:
    """Map `impl` to "triton" or "torch" for tensors on `device`.

    auto: Triton on CUDA, eager PyTorch elsewhere (everywhere when REPBEND_KERNELS=torch). "triton" on a CPU tensor
    needs TRITON_INTERPRET=1. Inside `planned_device(kind)`, tensors count as being on `kind`.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    kind = _planned["device"] or device.type
    if impl == "auto":
        if AUTO_TORCH_ONLY:
            return "torch"
        return "triton" if kind == "cuda" else "torch"
    if impl == "triton" and kind != "cuda" and not interpreter_on():
        raise RuntimeError(
            f"impl='triton' on a {device.type} tensor needs the Triton interpreter: set TRITON_INTERPRET=1 "
            "before importing repbend.kernels, or use impl='torch'/'auto'"
        )
    return impl


@contextlib.contextmanager
def planned_device(kind: str):
    """Resolve implementations as if every tensor were on a `kind` device ("cuda" or "cpu"). For fake tensors only
    (repbend.plan runs a step under FakeTensorMode, where the custom ops' fake implementations run, never a
    kernel)."""
    before, _planned["device"] = _planned["device"], kind
    try:
        yield
    finally:
        _planned["device"] = before


def num_chunks(n: int, block: int) -> int:
    """Trip count of a loop over n elements in blocks of `block` (a constexpr of the kernels, see above)."""
    return max(1, -(-int(n) // int(block)))


def on_device(device: torch.device):
    """Launch on `device` (Triton launches on the current CUDA device, which need not be the tensors')."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def pointer_table(rows: list[list[int]], device: torch.device, op: str) -> torch.Tensor:
    """int64 [len(rows), len(rows[0])] of host integers (addresses) on `device`.

    On CUDA it is copied from pinned memory without blocking the host; the caching host allocator keeps that
    buffer until the copy has run. A CUDA graph, though, would replay the copy from a buffer freed long before:
    capture is refused.
    """
    if device.type != "cuda":
        return torch.tensor(rows, dtype=torch.int64, device=device)
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"{op}: per-layer tensors (a list of hidden states or ref) cannot be captured in a CUDA graph: the "
            "table of their addresses is copied from host memory that is freed after the call, so a replay "
            "would read stale addresses. Pass one stacked [L, ...] tensor (read through its strides, no table), "
            "or keep this op outside the captured region (torch.compile marks it cudagraph-unsafe)."
        )
    return torch.tensor(rows, dtype=torch.int64, pin_memory=True).to(device, non_blocking=True)


def cudagraph_unsafe_tags() -> tuple:
    """Tags for a custom op whose launch builds a pointer table (see `pointer_table`): Inductor then keeps the op
    out of its CUDA graphs. Empty where this torch has no such tag."""
    tag = getattr(torch.Tag, "cudagraph_unsafe", None)
    return (tag,) if tag is not None else ()


def check_not_sharded(t: torch.Tensor, what: str, op: str, softmax: str = "softmax") -> None:
    """TypeError for a DTensor sharded over its mesh (e.g. a tensor-parallel LM head): it holds only part of the
    [V, D] rows here, and the `op`'s `softmax` needs every logit. A replicated DTensor is fine."""
    if type(t).__name__ != "DTensor" or not torch.distributed.is_available():
        return
    from torch.distributed.tensor import DTensor, Replicate

    if isinstance(t, DTensor) and not all(isinstance(p, Replicate) for p in t.placements):
        raise TypeError(
            f"{op}: {what} is a DTensor with placements {tuple(t.placements)} over {t.device_mesh}: a sharded "
            f"{what} gives each rank only part of the logits, whose {softmax} needs them all, and {op} has no "
            f"distributed {softmax}. Pass the full tensor ({what}.full_tensor(), or a replicated DTensor).")
