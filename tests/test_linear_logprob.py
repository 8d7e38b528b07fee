"""linear_logprob (repbend/kernels/linear_logprob.py) against float64 with full logits, both impls, with and without
logit soft-capping (compiled graphs, fake tensors and the sm_90 build: test_linear_logprob_compile.py).

The op runs on kernel_refs.DEVICE (CUDA where there is one, else the CPU with the Triton interpreter) with MAX_BLOCK_V
shrunk to 256, so that V = 1031 takes five vocabulary tiles (nine with soft-capping), the last one partial; the
float64 and plain references run on the CPU. Every backward uses a random per-row grad_output (zeros and negative
values included): the op's output is a vector, and its backward must weight each row by its own entry.
"""
import importlib
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from kernel_refs import DEVICE
from repbend.kernels import LinearLogprob, linear_logprob
from repbend.kernels._dispatch import interpreter_on
from repbend.kernels.reference import linear_logprob_reference

# the module itself: `repbend.kernels.linear_logprob` as an attribute is the re-exported function
llp = importlib.import_module("repbend.kernels.linear_logprob")

IMPLS = ("torch", "triton")
N, D, V = 37, 67, 1031


@pytest.fixture(autouse=True)
def small_vocab_tiles(monkeypatch):
    monkeypatch.setattr(llp, "MAX_BLOCK_V", 256)
    assert llp.logprob_rows_launch_config(V, False)["NUM_TILES"] == 5
    assert llp.logprob_rows_launch_config(V, True)["NUM_TILES"] == 9


def make_inputs(n=N, d=D, v=V, dtype=torch.float32, seed=0, scale=3.0):
    """hidden [n, d], weight [v, d] (logits of about `scale` standard deviation), labels [n]: half the rows take
    their most likely token (as a trained LM's labels mostly are), half a random one; row 0 takes token 0 and row 1
    token v - 1 (the first and the last, partial, tile)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g)
    weight = torch.randn(v, d, generator=g) / d**0.5 * scale
    labels = torch.randint(0, v, (n,), generator=g)
    top = (hidden @ weight.t()).argmax(dim=-1)
    labels = torch.where(torch.arange(n) % 2 == 0, top, labels)
    labels[:2] = torch.tensor([0, v - 1])[: min(n, 2)]
    grad_out = torch.randn(n, generator=g)
    grad_out[::5] = 0.0
    return hidden.to(dtype), weight.to(dtype), labels, grad_out


def logprob_float64(hidden, weight, labels, softcap=None):
    return linear_logprob_reference(hidden.double(), weight.double(), labels, softcap)


def logprob_plain(hidden, weight, labels, softcap=None):
    """The plain PyTorch path: logits in the input dtype, upcast to fp32, capped, log_softmax, gather, autograd."""
    z = (hidden @ weight.t()).float()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return torch.log_softmax(z, dim=-1).gather(1, labels.unsqueeze(1)).squeeze(1)


def run(fn, hidden, weight, labels, grad_out, weight_grad=True, hidden_grad=True, **kw):
    """(logp, grad_hidden, grad_weight) of sum_n grad_out[n] * fn(...)[n], on leaf copies (on DEVICE for
    linear_logprob, else on the CPU; float64 copies for logprob_float64), returned on the CPU."""
    dev = DEVICE if fn is linear_logprob else "cpu"
    h = hidden.detach().to(dev, copy=True).requires_grad_(hidden_grad)
    w = weight.detach().to(dev, copy=True).requires_grad_(weight_grad)
    out = fn(h, w, labels.to(dev), **kw)
    if hidden_grad or weight_grad:
        (out * grad_out.to(dev, out.dtype)).sum().backward()

    def cpu(t):
        return None if t is None else t.cpu()
    return out.detach().cpu(), cpu(h.grad), cpu(w.grad)


def rel_err(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def assert_matches_float64(got, want, what="", logp_atol=2e-6):
    """fp32 against float64: log-probs to 2e-6 of their size, gradients to 2e-5 of the largest entry."""
    logp, gh, gw = got
    torch.testing.assert_close(logp.double(), want[0], rtol=2e-6, atol=logp_atol, msg=lambda m: f"logp {what}: {m}")
    for name, a, b in (("grad_hidden", gh, want[1]), ("grad_weight", gw, want[2])):
        if b is None:
            assert a is None, f"{name} {what}: a gradient for a tensor that does not require one"
            continue
        scale = b.abs().max().item()
        err = (a.double() - b).abs().max().item()
        assert err <= 2e-5 * scale + 1e-7, f"{name} {what}: max error {err:.3g} vs scale {scale:.3g}"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("softcap", [None, 4.0])
def test_fp32_matches_float64(impl, softcap):
    hidden, weight, labels, grad_out = make_inputs()
    got = run(linear_logprob, hidden, weight, labels, grad_out, impl=impl, chunk_rows=16, softcap=softcap)
    want = run(logprob_float64, hidden, weight, labels, grad_out, softcap=softcap)
    assert got[0].dtype == torch.float32 and got[0].shape == (N,)
    assert got[1].dtype == torch.float32 and got[2].dtype == torch.float32
    assert (got[0] <= 0).all()
    assert_matches_float64(got, want, f"{impl} softcap={softcap}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype,softcap", [(torch.bfloat16, None), (torch.bfloat16, 4.0), (torch.float16, None)])
def test_half_no_worse_than_plain_half(impl, dtype, softcap):
    # The rule: the error against float64 may not exceed the plain PyTorch path's in the same dtype by more than a
    # margin (25%, and 1e-3). The logits are rounded to the input dtype in both (the same matmul), so the log-probs
    # match the plain path's error closely; the gradient of the logits is rounded to the input dtype once before its
    # two matmuls, as the plain path's autograd does. The interpreter truncates fp32 -> bf16 where the GPU rounds to
    # nearest: a wider margin there (measured: grad_weight 0.0053 vs plain 0.0031 with the cap).
    truncating = impl == "triton" and interpreter_on()
    hidden, weight, labels, grad_out = make_inputs(dtype=dtype, seed=1)
    ours = run(linear_logprob, hidden, weight, labels, grad_out, impl=impl, chunk_rows=16, softcap=softcap)
    plain = run(logprob_plain, hidden, weight, labels, grad_out, softcap=softcap)
    exact = run(logprob_float64, hidden, weight, labels, grad_out, softcap=softcap)
    assert ours[0].dtype == torch.float32 and ours[1].dtype == dtype and ours[2].dtype == dtype
    for i, what in enumerate(("logp", "grad_hidden", "grad_weight")):
        e_ours, e_plain = rel_err(ours[i], exact[i]), rel_err(plain[i], exact[i])
        limit = (2.0 if truncating else 1.25) * e_plain + 1e-3
        assert e_ours <= limit, f"{what}: rel. error {e_ours:.3g} vs plain {dtype} {e_plain:.3g}"


@pytest.mark.parametrize("impl", IMPLS)
def test_single_row_and_end_labels(impl):
    """One row, with the label at 0, at V - 1 (the last, partial tile), and at the row's argmax."""
    hidden, weight, _, _ = make_inputs(n=1, seed=2)
    top = int((hidden @ weight.t()).argmax())
    for label in (0, V - 1, top):
        labels = torch.tensor([label])
        got = run(linear_logprob, hidden, weight, labels, torch.tensor([-0.7]), impl=impl)
        want = run(logprob_float64, hidden, weight, labels, torch.tensor([-0.7]))
        assert got[0].shape == (1,)
        assert_matches_float64(got, want, f"label {label}")


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_rows(impl):
    hidden, weight, labels, grad_out = make_inputs(n=0)
    logp, gh, gw = run(linear_logprob, hidden, weight, labels, grad_out, impl=impl)
    assert logp.shape == (0,) and logp.dtype == torch.float32
    assert gh.shape == (0, D)
    assert gw.shape == weight.shape and not gw.any()


@pytest.mark.parametrize("impl", IMPLS)
def test_one_token_dominates(impl):
    """Each row's label (or another token) 60 logits above the rest: log p ~ 0 or ~ -60, p ~ one-hot."""
    hidden, weight, labels, grad_out = make_inputs(seed=3, scale=0.5)
    winner = torch.where(torch.arange(N) % 3 == 0, (labels + 7) % V, labels)  # every third row: another token
    hidden = hidden + 60.0 * weight[winner] / weight[winner].square().sum(-1, keepdim=True)
    got = run(linear_logprob, hidden, weight, labels, grad_out, impl=impl, chunk_rows=16)
    want = run(logprob_float64, hidden, weight, labels, grad_out)
    assert (want[0][torch.arange(N) % 3 != 0] > -1e-6).all() and (want[0][::3] < -20).all()  # the regime
    assert torch.isfinite(got[0]).all() and (got[0] <= 0).all()
    assert_matches_float64(got, want, impl, logp_atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_saturated_softcap(impl):
    """Logits of +-100 under a cap of 2: c(z) sits on both flat ends of tanh, c'(z) ~ 1e-40 to 1e-4."""
    hidden, weight, labels, grad_out = make_inputs(seed=4, scale=40.0)
    z = hidden @ weight.t()
    assert (z.abs() > 20).float().mean() > 0.5  # most logits are saturated
    got = run(linear_logprob, hidden, weight, labels, grad_out, impl=impl, chunk_rows=16, softcap=2.0)
    want = run(logprob_float64, hidden, weight, labels, grad_out, softcap=2.0)
    assert all(torch.isfinite(t).all() for t in got)
    assert_matches_float64(got, want, impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_huge_cap_is_no_cap(impl):
    hidden, weight, labels, grad_out = make_inputs(seed=5)
    uncapped = run(linear_logprob, hidden, weight, labels, grad_out, impl=impl)
    big = run(linear_logprob, hidden, weight, labels, grad_out, impl=impl, softcap=1e6)
    for a, b in zip(big, uncapped):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_frozen_weight_gets_no_grad_and_no_weight_matmul(impl):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Shapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor) and not func.is_view and func is not torch.ops.aten.detach.default:
                    self.seen.append((str(func), tuple(t.shape)))
            return out

    hidden, weight, labels, grad_out = make_inputs()
    got = run(linear_logprob, hidden, weight, labels, grad_out, weight_grad=False, impl=impl, chunk_rows=16)
    want = run(logprob_float64, hidden, weight, labels, grad_out, weight_grad=False)
    assert got[2] is None
    assert_matches_float64(got, want, impl)
    # the ops are custom ops to a dispatch mode outside them: record what their implementations compute
    h, w, y = hidden.to(DEVICE), weight.to(DEVICE), labels.to(DEVICE)
    with Shapes() as mode:
        _, lse = llp._linear_logprob_forward(h, w, y, None, impl, 16)
        gh, gw = llp._linear_logprob_backward(grad_out.to(DEVICE), h, w, y, lse, None, impl, 16, True, False)
    assert gw is None and gh.shape == (N, D) and mode.seen, "nothing recorded"
    assert any(shape == (16, V) for _, shape in mode.seen), "the chunk's logits were not seen"
    assert not any(shape == (V, D) for _, shape in mode.seen), "a [V, D] tensor was computed for a frozen head"
    assert not any(len(s) == 2 and s[0] > 16 and s[1] == V for _, s in mode.seen), "more than a chunk of logits"


@pytest.mark.parametrize("impl", IMPLS)
def test_weight_grad_only(impl):
    """hidden frozen, weight trained (a full fine-tune of the head on fixed features)."""
    hidden, weight, labels, grad_out = make_inputs(seed=6)
    got = run(linear_logprob, hidden, weight, labels, grad_out, hidden_grad=False, impl=impl, chunk_rows=16)
    want = run(logprob_float64, hidden, weight, labels, grad_out, hidden_grad=False)
    assert got[1] is None and got[2] is not None
    assert_matches_float64(got, want, impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_labels_name_the_first_bad_row(impl):
    hidden, weight, labels, _ = make_inputs()
    h, w = hidden.to(DEVICE), weight.to(DEVICE)
    for row, value in ((3, -100), (5, V), (36, -1)):
        bad = labels.clone()
        bad[row] = value
        bad[row + 1:] = V + 5  # later bad rows are not the first
        with pytest.raises(ValueError, match=rf"labels\[{row}\] = {value} is outside \[0, V = {V}\)"):
            linear_logprob(h, w, bad.to(DEVICE), impl=impl, chunk_rows=16)


@pytest.mark.parametrize("impl", IMPLS)
def test_non_contiguous_inputs(impl):
    hidden, weight, labels, grad_out = make_inputs()
    h_nc = torch.zeros(N, 2 * D).index_copy(1, torch.arange(0, 2 * D, 2), hidden)[:, ::2]  # column stride 2
    w_nc = weight.t().contiguous().t()  # [V, D] view of a [D, V] tensor
    y_nc = torch.stack([labels, labels], dim=1)[:, 0]  # stride 2
    assert not (h_nc.is_contiguous() or w_nc.is_contiguous() or y_nc.is_contiguous())
    got = run(linear_logprob, h_nc, w_nc, y_nc, grad_out, impl=impl, chunk_rows=16)
    want = run(linear_logprob, hidden, weight, labels, grad_out, impl=impl, chunk_rows=16)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("impl", IMPLS)
def test_no_grad_paths_and_repeated_backward(impl):
    hidden, weight, labels, grad_out = make_inputs()
    want = logprob_float64(hidden, weight, labels)
    h, w, y = hidden.to(DEVICE, copy=True), weight.to(DEVICE), labels.to(DEVICE)
    out = linear_logprob(h, w, y, impl=impl)  # nothing requires grad
    assert not out.requires_grad
    torch.testing.assert_close(out.cpu().double(), want, rtol=2e-6, atol=2e-6)
    with torch.no_grad():
        out = linear_logprob(h.requires_grad_(True), w, y, impl=impl)
    assert not out.requires_grad
    out = linear_logprob(h, w, y, impl=impl)
    (g1,) = torch.autograd.grad(out, h, grad_out.to(DEVICE), retain_graph=True)
    (g2,) = torch.autograd.grad(out, h, 2 * grad_out.to(DEVICE))
    torch.testing.assert_close(g2, 2 * g1, rtol=1e-6, atol=1e-7)


def test_module_auto_and_validation():
    hidden, weight, labels, grad_out = make_inputs(n=5, d=8, v=50)
    mod = LinearLogprob(softcap=30.0)
    assert "softcap=30.0" in repr(mod) and "impl='auto'" in repr(mod)
    torch.testing.assert_close(mod(hidden, weight, labels).double(), logprob_float64(hidden, weight, labels, 30.0),
                               rtol=2e-6, atol=2e-6)
    with pytest.raises(ValueError, match="shape mismatch"):
        linear_logprob(hidden, weight, labels[:4])
    with pytest.raises(ValueError, match="shape mismatch"):
        linear_logprob(hidden, weight[:, :7], labels)
    with pytest.raises(ValueError, match="dtypes differ"):
        linear_logprob(hidden, weight.double(), labels)
    with pytest.raises(ValueError, match="labels must be int64"):
        linear_logprob(hidden, weight, labels.int())
    with pytest.raises(ValueError, match=r"labels \[N\]"):
        linear_logprob(hidden, weight, labels[:, None])
    with pytest.raises(ValueError, match="impl"):
        linear_logprob(hidden, weight, labels, impl="cuda")
    with pytest.raises(ValueError, match="softcap"):
        linear_logprob(hidden, weight, labels, softcap=0.0)
    with pytest.raises(ValueError, match="V = 0"):
        linear_logprob(hidden, weight[:0], labels)


def test_sharded_dtensor_weight_is_refused():
    """A tensor-parallel (sharded) LM head: a clear error; a replicated DTensor works (its local tensor)."""
    dist = torch.distributed
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.testing._internal.distributed.fake_pg import FakeStore

    hidden, weight, labels, _ = make_inputs(n=5, d=8, v=50)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        sharded = distribute_tensor(weight, mesh, [Shard(0)])
        with pytest.raises(TypeError, match=r"linear_logprob: weight is a DTensor .*Shard\(dim=0\).*full_tensor"):
            linear_logprob(hidden, sharded, labels)
        got = linear_logprob(hidden, distribute_tensor(weight, mesh, [Replicate()]), labels, impl="torch")
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(got.double(), logprob_float64(hidden, weight, labels), rtol=2e-6, atol=2e-6)


_MEMORY_SCRIPT = textwrap.dedent(
    """
    import gc, json, sys, torch
    from repbend.kernels import linear_logprob
    from repbend.kernels.reference import linear_logprob_reference

    torch.set_num_threads(1)  # one thread: a shared CPU makes multi-threaded barriers crawl
    fn = linear_logprob_reference if sys.argv[1] == "reference" else linear_logprob
    softcap = float(sys.argv[2]) if sys.argv[2] != "none" else None

    def status_kib(field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])

    N, V, D = 4096, 32000, 128
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, D, generator=g).requires_grad_(True)
    weight = (torch.randn(V, D, generator=g) * 0.2).requires_grad_(True)
    labels = torch.randint(0, V, (N,), generator=g)
    grad_out = torch.randn(N, generator=g)
    kw = {"softcap": softcap} if fn is linear_logprob_reference else {"impl": "torch", "chunk_rows": 32,
                                                                       "softcap": softcap}
    (fn(hidden[:8], weight, labels[:8], **kw) * grad_out[:8]).sum().backward()  # warm-up: allocator, threads
    hidden.grad = weight.grad = None
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = status_kib("VmRSS")
    logp = fn(hidden, weight, labels, **kw)
    (logp * grad_out).sum().backward()
    peak = status_kib("VmHWM")
    print(json.dumps({"growth": (peak - base) * 1024, "logp": logp.sum().item(),
                      "grads": hidden.grad is not None and weight.grad is not None}))
    """
)


def _memory_growth(which: str, softcap) -> dict:
    """Peak RSS growth of one forward + backward of `which` ("op": linear_logprob; "reference": the full-logit
    reference, 1.5 GiB, for a manual check that the limit below can fail). glibc's malloc is told to map every
    block over 64 KiB on its own (M_MMAP_THRESHOLD, which also stops its dynamic raise), so that a freed buffer
    leaves the resident set at once and the peak measures live memory, not what the heap kept."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, which, str(softcap).lower()], capture_output=True,
                          text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_memory_stays_chunk_sized(softcap):
    """N = 4096, V = 32000, fp32, chunks of 32 rows: forward + backward grow RSS by at most 1/8 of one [N, V] fp32
    tensor (500 MiB). Measured: 28 MiB, 36 MiB capped (the chunk's logits, 4 MiB, up to three temporaries of its
    size, grad_weight 16 MiB); the full-logit reference: 1500 MiB, 2000 MiB capped."""
    full_logits = 4096 * 32000 * 4
    res = _memory_growth("op", softcap)
    print(f"RSS growth {res['growth'] / 2**20:.0f} MiB (limit {full_logits / 8 / 2**20:.0f} MiB)")
    assert res["grads"] and res["logp"] < 0
    assert res["growth"] <= full_logits / 8, f"peak RSS grew by {res['growth'] / 2**20:.0f} MiB"
