"""Running a training step on fake tensors: shapes, dtypes and strides, no storage, no device.

- `fake_model(model, mode)`: a model built on the meta device (no memory, no init) given fake CPU parameters and
  buffers in place. `Module.to()` under FakeTensorMode fails ("Cannot swap t1 because it has weakref"), so every
  parameter is replaced one by one (tied weights stay tied: the same meta tensor gets the same fake one).
- `BoundedSizes`: a dispatch mode for the few ops whose output size depends on tensor values (a boolean-mask
  selection, nonzero): fake tensors have no values, so the size is taken at its bound, the mask's element count
  (more memory and FLOPs than the real op, never less). Reading a value (`.item()`) stays an error.

Fake tensors live on the CPU (a CPU-only torch cannot run autograd on fake CUDA tensors); a GPU step is planned with
the model's GPU dtype, autocast in bf16 and the kernels' GPU path (`repbend.kernels._dispatch.planned_device`), whose
custom ops give their outputs through their fake implementations.
"""
from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode


def fake_mode() -> FakeTensorMode:
    """A FakeTensorMode that turns real tensors it meets (host-built index tensors, constants) into fake ones."""
    return FakeTensorMode(allow_non_fake_inputs=True)


def fake_model(model: torch.nn.Module, mode: FakeTensorMode, device: str = "cpu") -> torch.nn.Module:
    """Give every parameter and buffer of `model` (built on the meta device) a fake tensor of the same shape,
    strides and dtype on `device`, in place; requires_grad is kept. Returns the model."""
    made: dict[int, torch.Tensor] = {}

    def fake(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in made:
            with mode:
                made[id(t)] = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device)
        return made[id(t)]

    params: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) not in params:
                params[id(p)] = torch.nn.Parameter(fake(p), requires_grad=p.requires_grad)
            module._parameters[name] = params[id(p)]
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = fake(b)
    return model


def _bound_index(indices):
    """Boolean masks among `indices` replaced by long indices of their element count (the largest selection)."""
    out = []
    for ix in indices:
        if ix is not None and ix.dtype == torch.bool:
            n = ix.numel()
            out.extend(torch.zeros(n, dtype=torch.long, device=ix.device) for _ in range(ix.dim()))
        else:
            out.append(ix)
    return out


class BoundedSizes(TorchDispatchMode):
    """Value-dependent output sizes at their bound (module docstring)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func._overloadpacket
        aten = torch.ops.aten
        if packet is aten.nonzero:
            x = args[0]
            return torch.zeros((x.numel(), x.dim()), dtype=torch.long, device=x.device)
        if packet is aten.index and any(i is not None and i.dtype == torch.bool for i in args[1]):
            return func(args[0], _bound_index(args[1]), **kwargs)
        if packet is aten.masked_select:
            x, mask = args[0], args[1]
            n = torch.broadcast_shapes(x.shape, mask.shape).numel()
            return x.new_empty((n,))
        return func(*args, **kwargs)
