"""The kernels as custom ops: torch.library.opcheck, torch.compile(fullgraph=True) without graph breaks or
recompiles, and the pointer table's refusal of CUDA-graph capture.

Compiled steps run on kernel_refs.DEVICE (Triton interpreted on the CPU, compiled on CUDA) with the "aot_eager"
backend (AOTAutograd traces forward and backward through the ops' fake and autograd registrations; Inductor's code
generation adds nothing to that and costs a C++ build on the CPU) and, once, with Inductor. Each compiled step is
called on three sets of fresh tensors of the same shapes (new addresses): torch._dynamo's error_on_recompile makes
any recompile fail, and the results must equal eager's.
"""
import importlib

import pytest
import torch

from kernel_refs import DEVICE
from repbend.kernels import linear_kl, pairwise_cosine_loss, rep_distance
from repbend.kernels._dispatch import pointer_table

rt = importlib.import_module("repbend.kernels._rep_distance_triton")
pc = importlib.import_module("repbend.kernels.pairwise_cosine")
lk = importlib.import_module("repbend.kernels.linear_kl")

L, B, T, D, V = 3, 2, 5, 24, 70


def make_inputs(seed):
    """An objective-like micro-batch: per-layer hidden states (a list, as a model returns them), gathered refs for
    index tensors built on the host, the last layer's retain rows for the KL, the cos rows."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(L, B, T, D, generator=g)
    ref = hidden + 0.2 * torch.randn(L, B, T, D, generator=g)
    rows = torch.tensor([0, 2, 3, 7, 9])
    retain = torch.tensor([1, 4, 5, 8])
    weight = torch.randn(V, D, generator=g) / D**0.5
    return {"hidden": hidden.to(DEVICE), "ref_rows": ref.reshape(L, B * T, D)[:, rows].to(DEVICE),
            "ref_retain": ref[-1].reshape(B * T, D)[retain].to(DEVICE), "rows": rows.to(DEVICE),
            "retain": retain.to(DEVICE), "weight": weight.to(DEVICE)}


def step(hs, ref_rows, rows, ref_retain, retain, weight, impl):
    d = rep_distance(hs, ref_rows, rows, impl=impl)
    loss = d.l2.sum() / d.count + 0.3 * d.relu_cos.sum() - 0.1 * d.cos.sum() + 0.01 * d.sq.sum()
    last = torch.stack([h.reshape(-1, D).index_select(0, rows) for h in hs])
    loss = loss + pairwise_cosine_loss(last, impl=impl)
    final = hs[-1].reshape(-1, D).index_select(0, retain)
    return loss + linear_kl(final, ref_retain, weight, 2.0, impl=impl, softcap=5.0)


def run_step(fn, x, impl):
    leaf = x["hidden"].clone().requires_grad_()
    loss = fn(list(leaf.unbind(0)), x["ref_rows"], x["rows"], x["ref_retain"], x["retain"], x["weight"], impl)
    (grad,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), grad


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_compiled_step_no_graph_break_no_recompile(impl):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in range(3):
            x = make_inputs(seed)
            got, got_grad = run_step(compiled, x, impl)
            want, want_grad = run_step(step, x, impl)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-6)
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_inductor_step_matches_eager():
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in range(2):
            x = make_inputs(seed)
            got, got_grad = run_step(compiled, x, "triton")
            want, want_grad = run_step(step, x, "triton")
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-6)


def test_new_row_count_compiles_once_more_then_stays():
    """A new number of selected rows (every step has its own) recompiles once, with N symbolic from then on."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()

    def fn(hs, ref, rows):
        d = rep_distance(hs, ref, rows, impl="triton")
        return d.l2.sum() + d.sq.sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    x = make_inputs(0)
    hs = list(x["hidden"].unbind(0))
    for n in (5, 3, 4, 2):
        rows = torch.arange(n, device=DEVICE) * 2
        ref = x["hidden"].reshape(L, B * T, D)[:, rows] * 0.5
        torch.testing.assert_close(compiled(hs, ref, rows), fn(hs, ref, rows), rtol=1e-6, atol=1e-6)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2


def test_opcheck_all_ops():
    x = make_inputs(5)
    hs = [h.clone().requires_grad_() for h in x["hidden"].unbind(0)]
    stacked = x["hidden"].clone().requires_grad_()
    ref_full = x["hidden"] * 0.7
    cases = [
        (rt.rep_distance_fwd, (hs, [x["ref_rows"]], x["rows"], True)),
        (rt.rep_distance_fwd, ([stacked], [ref_full], x["rows"], False)),
        (rt.rep_distance_fwd, (hs, list(ref_full.unbind(0)), x["rows"], False)),
        (pc.pairwise_cosine_fwd, (torch.randn(L, 6, D, device=DEVICE, requires_grad=True),)),
        (lk.linear_kl_op, (stacked[0, 0], ref_full[0, 0], x["weight"], 2.0, None, "triton", None, True, False)),
        (lk.linear_kl_op, (stacked[0, 0], ref_full[0, 0], x["weight"].clone().requires_grad_(), 1.5, 3.0, "torch",
                           3, True, True)),
    ]
    sums, buf, slot = rt.rep_distance_fwd([x["hidden"]], [ref_full], x["rows"], False)
    cases.append((rt.rep_distance_bwd, (torch.randn(4, L, device=DEVICE), buf, slot, [x["hidden"]], [ref_full],
                                        False, [0, 2])))
    xp = torch.randn(L, 6, D, device=DEVICE)
    _, s, norm = pc.pairwise_cosine_fwd(xp)
    cases.append((pc.pairwise_cosine_bwd, (torch.randn(L, device=DEVICE), xp, s, norm)))
    for op, args in cases:
        result = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), (op, result)


def test_pointer_table_refuses_cuda_graph_capture(monkeypatch):
    """A list of layers needs a host-built address table, which a CUDA graph would replay stale: a clear error."""
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="CUDA graph.*stale addresses.*stacked"):
        pointer_table([[16, 32]], torch.device("cuda"), "rep_distance")


def test_table_ops_are_tagged_cudagraph_unsafe():
    tag = getattr(torch.Tag, "cudagraph_unsafe", None)
    if tag is None:
        pytest.skip("this torch has no cudagraph_unsafe tag")
    assert tag in torch.ops.repbend.rep_distance_fwd.default.tags
    assert tag in torch.ops.repbend.rep_distance_bwd.default.tags


@pytest.mark.skipif(DEVICE.type != "cuda", reason="needs CUDA")
def test_stacked_forward_replays_in_a_cuda_graph():
    """One stacked tensor needs no table: the forward captures, and replays on new values correctly."""
    x = make_inputs(7)
    hidden, ref = x["hidden"].clone(), x["hidden"] * 0.5
    rows = x["rows"]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        rep_distance(hidden, ref, rows, impl="triton")  # warm-up: compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = rep_distance(hidden, ref, rows, impl="triton")
    hidden.copy_(make_inputs(8)["hidden"])
    graph.replay()
    want = rep_distance(hidden, ref, rows, impl="torch")
    for k in ("l2", "cos", "relu_cos", "sq"):
        torch.testing.assert_close(getattr(out, k), getattr(want, k), rtol=1e-5, atol=1e-5)
