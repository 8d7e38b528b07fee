"""rep_distance's backward over a list of per-layer outputs writes each layer's gradient when autograd reaches that
layer, not all L at once: the gradients of a model-like chain (each layer feeds the next, and the loss reads
several of them) match float64 autograd with the Triton path, also through a second backward (retain_graph),
torch.autograd.grad on the hidden states, a layer passed twice and a layer that nothing else uses; and the
backward holds at most two [B, T, D] gradient slots of the op at any time (it held all L of them).
"""
import torch

from kernel_refs import DEVICE, f64_rep_distance, on_device
from repbend.kernels import rep_distance
from repbend.plan.meter import StepMeter

L, B, T, D = 5, 2, 7, 24


def chain(x0, weights):
    """hidden states of a residual chain: h_{i+1} = h_i + tanh(h_i W_i), as a decoder stack's layer outputs."""
    hs = [x0]
    for w in weights:
        hs.append(hs[-1] + torch.tanh(hs[-1] @ w))
    return hs


def make(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, T, D, generator=g)
    weights = [torch.randn(D, D, generator=g) * 0.2 for _ in range(L)]
    rows = torch.tensor([0, 3, 4, 8, 9, 13], dtype=torch.int64)
    ref = torch.randn(L + 1, rows.numel(), D, generator=g)
    up = torch.randn(4, L + 1, generator=g)
    return x0, weights, rows, ref, up


def loss_of(d, up):
    return (up[0] * d.l2).sum() + (up[1] * d.cos).sum() + (up[2] * d.relu_cos).sum() + (up[3] * d.sq).sum()


def f64_grads(x0, weights, rows, ref, up, layers):
    w64 = [w.double().requires_grad_() for w in weights]
    x = x0.double().requires_grad_()
    hs = chain(x, w64)
    d = f64_rep_distance([hs[i] for i in layers], ref[layers].double(), rows)
    loss = sum((up[k, layers].double() * d[f]).sum() for k, f in enumerate(("l2", "cos", "relu_cos", "sq")))
    grads = torch.autograd.grad(loss, [x] + w64, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, [x] + w64)]


def run_triton(x0, weights, rows, ref, up, layers, twice=False):
    ws = [on_device(w).requires_grad_() for w in weights]
    x = on_device(x0).requires_grad_()
    hs = chain(x, ws)
    d = rep_distance([hs[i] for i in layers], on_device(ref[layers]), rows.to(DEVICE), impl="triton")
    loss = loss_of(d, up[:, layers].to(DEVICE))
    loss.backward(retain_graph=twice)
    if twice:
        loss.backward()
    return [torch.zeros(t.shape, dtype=torch.float64) if t.grad is None else t.grad.double().cpu() for t in [x] + ws]


def close(got, want, tol=2e-5):
    scale = max(float(w.abs().max()) for w in want)
    for g, w in zip(got, want):
        assert float((g - w).abs().max()) <= tol * scale, float((g - w).abs().max()) / scale


def test_gradients_of_a_chain_match_float64():
    x0, weights, rows, ref, up = make()
    for layers in ([0, 1, 2, 3, 4, 5], [2, 4, 5], [5], [3]):  # index 5: the top, which feeds nothing else
        close(run_triton(x0, weights, rows, ref, up, layers), f64_grads(x0, weights, rows, ref, up, layers))


def test_second_backward_with_retain_graph_adds_the_same_gradients_again():
    x0, weights, rows, ref, up = make(seed=1)
    layers = [1, 3, 5]
    want = [2 * g for g in f64_grads(x0, weights, rows, ref, up, layers)]
    close(run_triton(x0, weights, rows, ref, up, layers, twice=True), want)


def test_autograd_grad_on_hidden_states_and_a_repeated_layer():
    x0, weights, rows, ref, up = make(seed=2)
    x = on_device(x0)
    hs = chain(x.requires_grad_(), on_device(weights))
    picked = [hs[2], hs[4], hs[2]]  # hs[2] twice: both of its terms count
    r = on_device(ref[[2, 4, 3]])
    d = rep_distance(picked, r, rows.to(DEVICE), impl="triton")
    got = torch.autograd.grad(loss_of(d, up[:, :3].to(DEVICE)), [hs[2], hs[4]])
    h64 = [h.detach().double().requires_grad_() for h in (hs[2], hs[4])]
    d64 = f64_rep_distance([h64[0], h64[1], h64[0]], r.double(), rows)
    loss64 = sum((up[k, :3].double() * d64[f]).sum() for k, f in enumerate(("l2", "cos", "relu_cos", "sq")))
    # torch.autograd.grad on hs[2] also collects what flows back from hs[4] through the chain
    loss64 = loss64 + 0 * h64[0].sum()
    want = torch.autograd.grad(loss64, h64)
    g4 = want[1]
    # d hs[4] / d hs[2] via the chain: recompute the chain from hs[2] in float64
    h2 = hs[2].detach().double().requires_grad_()
    h3 = h2 + torch.tanh(h2 @ weights[2].double())
    h4 = h3 + torch.tanh(h3 @ weights[3].double())
    (back,) = torch.autograd.grad(h4, h2, g4)
    close([g.double().cpu() for g in got], [want[0] + back, g4])


def test_backward_holds_at_most_two_gradient_slots():
    x0, weights, rows, ref, up = make(seed=3)
    layers = [0, 1, 2, 3, 4, 5]
    ws = [on_device(w).requires_grad_() for w in weights]
    x = on_device(x0).requires_grad_()
    hs = chain(x, ws)
    d = rep_distance([hs[i] for i in layers], on_device(ref[layers]), rows.to(DEVICE), impl="triton")
    loss = loss_of(d, up.to(DEVICE))
    meter = StepMeter()
    with meter:
        loss.backward()
    meter.mark("backward")
    slot = B * T * D * 4
    ours = [a for a in meter.allocs if a.op == "repbend.rep_distance_bwd"]
    assert ours, "the op's backward did not run"
    most = 0
    for a in ours:  # how many of the op's gradient slots were live at each one's birth
        live = sum(b.nbytes for b in ours if b.born <= a.born and (b.died is None or b.died > a.born))
        most = max(most, live)
    assert most <= 2 * slot, f"{most / slot:.0f} slots of [B, T, D] live at once"
