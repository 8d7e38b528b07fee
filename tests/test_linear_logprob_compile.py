"""linear_logprob as a custom op and as a GPU kernel: torch.compile(fullgraph=True) without graph breaks or
recompiles, FakeTensorMode at Llama-3's shapes, torch.library.opcheck, and the row kernels built for Hopper (sm_90)
at the production vocabulary without register spills (see tests/hopper.py: no GPU needed).

Compiled steps run on kernel_refs.DEVICE with the "aot_eager" backend (AOTAutograd traces forward and backward
through the ops' fake and autograd registrations; Inductor's code generation adds nothing to that and costs a C++
build on the CPU), on three sets of fresh tensors of the same shapes: error_on_recompile makes any recompile fail,
and the results must equal eager's.
"""
import importlib
import inspect

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from hopper import hopper_resources_many, requires_ptxas
from kernel_refs import DEVICE
from repbend.kernels import linear_logprob
from repbend.kernels.reference import linear_logprob_reference

llp = importlib.import_module("repbend.kernels.linear_logprob")

N, D, V = 13, 24, 70


def make_inputs(seed, weight_grad=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, N, D, generator=g)
    weight = (torch.randn(V, D, generator=g) / D**0.5).requires_grad_(weight_grad)
    labels = torch.randint(0, V, (N,), generator=g)
    mask = (torch.rand(N, generator=g) > 0.3).float()
    return {k: v.to(DEVICE) if k != "weight" else v.detach().to(DEVICE).requires_grad_(weight_grad)
            for k, v in dict(hidden=hidden, weight=weight, labels=labels, mask=mask).items()}


def step(hs, weight, labels, mask, impl, softcap):
    """A DPO/NPO-like use: per-row log-probs of two passes, masked sums, a log-sigmoid of their difference."""
    lp_a = linear_logprob(hs[0] * 1.5, weight, labels, softcap=softcap, impl=impl)
    lp_b = linear_logprob(hs[1], weight, labels, softcap=softcap, impl=impl, chunk_rows=4)
    return -torch.nn.functional.logsigmoid(0.1 * ((lp_a - lp_b) * mask).sum()) + (lp_a * mask).mean()


def run_step(fn, x, impl, softcap):
    leaf = x["hidden"].clone().requires_grad_()
    loss = fn(list(leaf.unbind(0)), x["weight"], x["labels"], x["mask"], impl, softcap)
    wrt = [leaf] + ([x["weight"]] if x["weight"].requires_grad else [])
    return loss.detach(), torch.autograd.grad(loss, wrt)


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("softcap,weight_grad", [(None, False), (5.0, True)])
def test_compiled_step_no_graph_break_no_recompile(impl, softcap, weight_grad):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in range(3):
            x = make_inputs(seed, weight_grad)
            got, got_grads = run_step(compiled, x, impl, softcap)
            want, want_grads = run_step(step, x, impl, softcap)
            assert len(got_grads) == (2 if weight_grad else 1)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
            for a, b in zip(got_grads, want_grads):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_fake_tensors_at_llama3_shapes(impl):
    """Fake tensors of Llama-3 8B's head (V = 128256, D = 4096, bf16; 1 GiB as real tensors) and 8192 rows: forward
    and backward run on shapes alone. (On DEVICE: a CPU build of torch aborts on autograd of fake CUDA tensors.)"""
    with FakeTensorMode():
        hidden = torch.empty(8192, 4096, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
        weight = torch.empty(128256, 4096, dtype=torch.bfloat16, device=DEVICE)
        labels = torch.empty(8192, dtype=torch.int64, device=DEVICE)
        logp = linear_logprob(hidden, weight, labels, softcap=30.0, impl=impl)
        assert logp.shape == (8192,) and logp.dtype == torch.float32
        (logp * torch.ones_like(logp)).sum().backward()
        assert hidden.grad.shape == hidden.shape and hidden.grad.dtype == torch.bfloat16
        assert weight.grad is None
        trained = weight.detach().requires_grad_(True)
        linear_logprob(hidden.detach()[:0], trained, labels[:0], impl=impl).sum().backward()
        assert trained.grad.shape == trained.shape and trained.grad.dtype == torch.bfloat16


def test_opcheck():
    x = make_inputs(5)
    h = x["hidden"][0].clone().requires_grad_()
    w = x["weight"].detach().clone().requires_grad_()
    logp, lse = llp.linear_logprob_op(h.detach(), w.detach(), x["labels"], None, "torch", None)
    cases = [
        (llp.linear_logprob_op, (h, x["weight"].detach(), x["labels"], None, "triton", None)),
        (llp.linear_logprob_op, (h, w, x["labels"], 3.0, "torch", 4)),
        (llp.linear_logprob_backward_op, (torch.randn(N, device=DEVICE), h.detach(), w.detach(), x["labels"], lse,
                                          None, "triton", 5, True, True)),
        (llp.linear_logprob_backward_op, (torch.randn(N, device=DEVICE), h.detach(), w.detach(), x["labels"], lse,
                                          2.0, "torch", None, True, False)),
    ]
    for op, args in cases:
        result = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), (op, result)


def test_forward_is_tagged_cudagraph_unsafe():
    """Its label check reads a flag on the host, which a CUDA graph cannot replay: Inductor must leave it out."""
    tag = getattr(torch.Tag, "cudagraph_unsafe", None)
    if tag is None:
        pytest.skip("this torch has no cudagraph_unsafe tag")
    assert tag in torch.ops.repbend.linear_logprob.default.tags


@pytest.mark.skipif(DEVICE.type != "cuda", reason="needs CUDA")
def test_forward_and_backward_replay_in_a_cuda_graph():
    """Under capture the label check is a device assert (no host read): forward and backward capture, and replay on
    new values correctly."""
    x = make_inputs(7, weight_grad=False)
    hidden = x["hidden"][0].clone().requires_grad_()
    weight, labels = x["weight"].detach(), x["labels"]
    grad_out = torch.randn(N, device=DEVICE)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the graph (Triton's first launch compiles)
        for _ in range(2):
            linear_logprob(hidden, weight, labels, impl="triton").backward(grad_out)
    torch.cuda.current_stream().wait_stream(stream)
    hidden.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logp = linear_logprob(hidden, weight, labels, impl="triton")
        (grad_h,) = torch.autograd.grad(logp, hidden, grad_out)
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            hidden.copy_(torch.randn(N, D, generator=g).to(DEVICE))
            labels.copy_(torch.randint(0, V, (N,), generator=g).to(DEVICE))
        graph.replay()
        h64 = hidden.detach().cpu().double().requires_grad_()
        want = linear_logprob_reference(h64, weight.cpu(), labels.cpu())
        (want_grad,) = torch.autograd.grad(want, h64, grad_out.cpu().double())
        torch.testing.assert_close(logp.cpu().double(), want.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad_h.cpu().double(), want_grad, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# sm_90 build of the row kernels, specialised as the real launchers specialise them
# ----------------------------------------------------------------------------------------------------------------
_TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int64: "i64"}


class _Recorder:
    """Stands in for a @triton.jit kernel: records each launch's arguments instead of running it."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((args, kwargs))


def _spec(kernel, args, kwargs) -> dict:
    """A hopper_resources spec from one recorded launch: pointer and scalar types from the arguments, the divisibility
    Triton's launcher would mark (16-byte aligned pointers, ints that are multiples of 16), constexprs and warps."""
    names = list(inspect.signature(kernel.fn).parameters)
    signature, divisible, constexprs = {}, [], {k: v for k, v in kwargs.items() if k != "num_warps"}
    for name, value in zip(names, args):
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + _TRITON_TYPES[value.dtype]
            if value.data_ptr() % 16 == 0:
                divisible.append(name)
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"unexpected launch argument {name}={value!r}")
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1:  # Triton specialises an int equal to 1 into a constant
            constexprs[name] = 1
        else:
            signature[name] = "i32"
            if value % 16 == 0:
                divisible.append(name)
    return {"kernel": kernel, "signature": signature, "constexprs": constexprs, "num_warps": kwargs["num_warps"],
            "divisible": divisible}


def _launch_specs(monkeypatch, dtype, softcap) -> list[dict]:
    """Run the forward and backward drivers (impl="triton") at Llama-3's vocabulary, V = 128256, with the kernels
    replaced by recorders. D = 8 and N = 3: the kernels' specialisation does not depend on them (the matmuls run)."""
    fwd, bwd = _Recorder(llp._logprob_fwd_kernel), _Recorder(llp._logprob_bwd_kernel)
    monkeypatch.setattr(llp, "_logprob_fwd_kernel", fwd)
    monkeypatch.setattr(llp, "_logprob_bwd_kernel", bwd)
    v = 128256
    hidden = torch.randn(3, 8, dtype=dtype)
    weight = torch.randn(v, 8, dtype=dtype)
    labels = torch.tensor([0, 5, v - 1])
    _, lse = llp._linear_logprob_forward(hidden, weight, labels, softcap, "triton", None)
    llp._linear_logprob_backward(torch.ones(3), hidden, weight, labels, lse, softcap, "triton", None, True, False)
    monkeypatch.undo()
    assert len(fwd.launches) == 1 and len(bwd.launches) == 1
    return [_spec(fwd.kernel, *fwd.launches[0]), _spec(bwd.kernel, *bwd.launches[0])]


@requires_ptxas
def test_row_kernels_compile_for_sm90_without_spills(monkeypatch):
    cases, specs = [], []
    for dtype in (torch.bfloat16, torch.float32):
        for softcap in (None, 30.0):
            for spec, direction in zip(_launch_specs(monkeypatch, dtype, softcap), ("fwd", "bwd")):
                cases.append((direction, _TRITON_TYPES[dtype], softcap))
                specs.append(spec)
    assert specs[0]["constexprs"] == {"SOFTCAP": False, "BLOCK_V": 4096, "NUM_TILES": 32}
    assert specs[2]["constexprs"] == {"SOFTCAP": True, "BLOCK_V": 2048, "NUM_TILES": 63}
    assert "V" in specs[0]["divisible"] and "stride_logits" in specs[0]["divisible"]
    results = hopper_resources_many(specs)
    for case, res in zip(cases, results):
        print(f"linear_logprob {case[0]} {case[1]} softcap={case[2]}: {res['registers']} registers, spills "
              f"{res['spill_stores']}/{res['spill_loads']} B, vector loads {res['vector_loads']}, fp64 {res['fp64']}")
        assert res["spill_stores"] == 0 and res["spill_loads"] == 0, (case, res)
        assert res["registers"] <= 128, (case, res)  # at least 2 programs of 8 warps per SM
        assert not res["fp64"], (case, "fp64 in the PTX")
        assert res["vector_loads"], (case, "no vector loads")


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__, "-s"])
