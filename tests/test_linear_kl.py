"""linear_kl (repbend/kernels/linear_kl.py) against a plain float64 formula, both impls (soft-capping:
test_linear_kl_softcap.py).

The ops run on kernel_refs.DEVICE (CUDA where there is one, else the CPU with the Triton interpreter) with
MAX_BLOCK_V shrunk to 256, so that V = 1001 takes several vocabulary tiles, the last one partial; the float64 and
plain references run on the CPU.
"""
import importlib
import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from kernel_refs import DEVICE
from repbend.kernels.linear_kl import LinearKL, linear_kl

# the module itself: `repbend.kernels.linear_kl` as an attribute is the re-exported function
lk = importlib.import_module("repbend.kernels.linear_kl")

IMPLS = ("torch", "triton")


@pytest.fixture(autouse=True)
def small_vocab_tiles(monkeypatch):
    monkeypatch.setattr(lk, "MAX_BLOCK_V", 256)


def kl_float64(hidden, ref_hidden, weight, temperature):
    """T^2 * sum_n KL(softmax(r W^T / T) || softmax(h W^T / T)) in float64 with full logits; ref side constant."""
    w = weight.double()
    log_p = torch.log_softmax(ref_hidden.detach().double() @ w.detach().t() / temperature, dim=-1)
    log_q = torch.log_softmax(hidden.double() @ w.t() / temperature, dim=-1)
    return temperature**2 * (log_p.exp() * (log_p - log_q)).sum()


def kl_plain(hidden, ref_hidden, weight, temperature):
    """What the published code does: logits in the input dtype, upcast to fp32, F.kl_div, autograd."""
    log_q = torch.log_softmax((hidden @ weight.t()).float() / temperature, dim=-1)
    p = torch.softmax((ref_hidden.detach() @ weight.detach().t()).float() / temperature, dim=-1)
    return F.kl_div(log_q, p, reduction="sum") * temperature**2


def make_inputs(n, d, v, dtype, seed=0, spread=0.5):
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(n, d, generator=g)
    hidden = ref + spread * torch.randn(n, d, generator=g)
    weight = torch.randn(v, d, generator=g) / d**0.5 * 3
    return hidden.to(dtype), ref.to(dtype), weight.to(dtype)


def run(fn, hidden, ref, weight, temperature, weight_grad=True, grad_out=1.0, **kw):
    """(loss, grad_hidden, grad_weight, grad_ref) of grad_out * fn(...), on leaf copies (on DEVICE for linear_kl),
    returned on the CPU."""
    dev = DEVICE if fn is linear_kl else "cpu"
    h = hidden.detach().to(dev, copy=True).requires_grad_(True)
    r = ref.detach().to(dev, copy=True).requires_grad_(True)  # must receive no gradient
    w = weight.detach().to(dev, copy=True).requires_grad_(weight_grad)
    loss = fn(h, r, w, temperature, **kw)
    (loss * grad_out).backward()

    def cpu(t):
        return None if t is None else t.cpu()
    return loss.detach().cpu(), cpu(h.grad), cpu(w.grad), cpu(r.grad)


def rel_err(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_fp32_matches_float64(impl, temperature):
    hidden, ref, weight = make_inputs(37, 33, 1001, torch.float32)
    loss, gh, gw, gr = run(linear_kl, hidden, ref, weight, temperature, grad_out=1.5, impl=impl, chunk_rows=16)
    loss64, gh64, gw64, _ = run(kl_float64, hidden, ref, weight, temperature, grad_out=1.5)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert gh.dtype == torch.float32 and gw.dtype == torch.float32
    assert gr is None
    torch.testing.assert_close(loss.double(), loss64, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(gh, gh64, rtol=1e-4, atol=2e-6)
    torch.testing.assert_close(gw, gw64, rtol=1e-4, atol=2e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype,temperature", [(torch.bfloat16, 1.0), (torch.bfloat16, 2.0), (torch.float16, 2.0)])
def test_half_no_worse_than_plain_half(impl, dtype, temperature):
    # Cut cross-entropy's rule: the error against float64 may not exceed the plain PyTorch path's in the same dtype
    # by more than a margin. (The interpreter truncates fp32 -> bf16 where the GPU rounds to nearest: 25% margin.)
    hidden, ref, weight = make_inputs(37, 33, 1001, dtype, seed=1)
    ours = run(linear_kl, hidden, ref, weight, temperature, impl=impl, chunk_rows=16)
    plain = run(kl_plain, hidden, ref, weight, temperature)
    exact = run(kl_float64, hidden, ref, weight, temperature)
    assert ours[0].dtype == torch.float32 and ours[1].dtype == dtype and ours[2].dtype == dtype
    assert ours[3] is None
    for i, what in enumerate(("loss", "grad_hidden", "grad_weight")):
        e_ours, e_plain = rel_err(ours[i], exact[i]), rel_err(plain[i], exact[i])
        assert e_ours <= 1.25 * e_plain + 1e-3, f"{what}: rel. error {e_ours:.3g} vs plain {dtype} {e_plain:.3g}"


@pytest.mark.parametrize("impl", IMPLS)
def test_frozen_weight_gets_no_grad_and_no_grad_matmul(impl):
    from torch.utils._python_dispatch import TorchDispatchMode

    n, d, v = 37, 33, 1001

    class Shapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and not func.is_view and func is not torch.ops.aten.detach.default:
                self.seen.append((str(func), tuple(out.shape)))
            return out

    hidden, ref, weight = make_inputs(n, d, v, torch.float32)
    h = hidden.to(DEVICE, copy=True).requires_grad_(True)
    weight = weight.to(DEVICE)
    loss = linear_kl(h, ref.to(DEVICE), weight, 2.0, impl=impl, chunk_rows=16)
    loss.backward()
    assert weight.grad is None
    # the op is one custom op to a dispatch mode outside it: record what its implementation computes
    with Shapes() as mode:
        _, _, gw = lk._linear_kl_forward(h.detach(), ref.to(DEVICE), weight, 2.0, None, impl, 16, True, False)
    assert gw is None and mode.seen, "nothing recorded"
    assert any(shape == (16, v) for _, shape in mode.seen), "the chunk's logits were not seen"
    assert not any(shape == (v, d) for _, shape in mode.seen), "a [V, D] tensor was computed for a frozen head"
    assert not any(len(s) == 2 and s[0] > 16 and s[1] == v for _, s in mode.seen), "more than a chunk of logits"
    _, gh64, _, _ = run(kl_float64, hidden, ref, weight.cpu(), 2.0, weight_grad=False)
    torch.testing.assert_close(h.grad.cpu(), gh64, rtol=1e-4, atol=2e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_rows(impl):
    hidden, ref, weight = make_inputs(0, 33, 1001, torch.float32)
    loss, gh, gw, gr = run(linear_kl, hidden, ref, weight, 2.0, impl=impl)
    assert loss.dtype == torch.float32 and loss.dim() == 0 and loss.item() == 0.0
    assert gh.shape == (0, 33)
    assert gw.shape == weight.shape and not gw.any()
    assert gr is None


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_equal_inputs_give_exact_zero(impl, dtype):
    _, ref, weight = make_inputs(37, 33, 1001, dtype)
    loss, gh, gw, _ = run(linear_kl, ref, ref, weight, 2.0, impl=impl, chunk_rows=16)
    assert loss.item() == 0.0
    assert not gh.any() and not gw.any()


@pytest.mark.parametrize("impl", IMPLS)
def test_close_distributions_keep_relative_precision(impl):
    # LoRA starts at zero, so the retain KL lives near q = p. There the plain bf16 path (two logit matmuls rounded
    # to bf16 independently) is mostly rounding noise; computing z' - z = (h - r) W^T keeps the loss and the
    # gradients to bf16 precision of the change itself.
    hidden, ref, weight = make_inputs(37, 33, 1001, torch.bfloat16, seed=2, spread=1e-2)
    ours = run(linear_kl, hidden, ref, weight, 2.0, impl=impl, chunk_rows=16)
    plain = run(kl_plain, hidden, ref, weight, 2.0)
    exact = run(kl_float64, hidden, ref, weight, 2.0)
    assert rel_err(plain[0], exact[0]) > 0.05  # the regime is a hard one
    for i, what in enumerate(("loss", "grad_hidden", "grad_weight")):
        assert rel_err(ours[i], exact[i]) < 2e-2, f"{what}: rel. error {rel_err(ours[i], exact[i]):.3g}"

    hidden, ref, weight = make_inputs(37, 33, 1001, torch.float32, seed=2, spread=1e-2)
    got = linear_kl(hidden.to(DEVICE), ref.to(DEVICE), weight.to(DEVICE), 2.0, impl=impl)
    torch.testing.assert_close(got.cpu().double(), kl_float64(hidden, ref, weight, 2.0), rtol=1e-3, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_non_contiguous_inputs(impl):
    n, d, v = 37, 33, 1001
    hidden, ref, weight = make_inputs(n, d, v, torch.float32)
    h_nc = torch.zeros(n, 2 * d).index_copy(1, torch.arange(0, 2 * d, 2), hidden)[:, ::2]  # column stride 2
    r_nc = ref.t().contiguous().t()  # column-major
    w_nc = weight.t().contiguous().t()  # [V, D] view of a [D, V] tensor
    assert not (h_nc.is_contiguous() or r_nc.is_contiguous() or w_nc.is_contiguous())
    got = run(linear_kl, h_nc, r_nc, w_nc, 2.0, impl=impl, chunk_rows=16)
    want = run(linear_kl, hidden, ref, weight, 2.0, impl=impl, chunk_rows=16)
    for a, b in zip(got[:3], want[:3]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("impl", IMPLS)
def test_no_grad_paths(impl):
    hidden, ref, weight = make_inputs(37, 33, 1001, torch.float32)
    want = kl_float64(hidden, ref, weight, 2.0)
    hidden, ref, weight = hidden.to(DEVICE, copy=True), ref.to(DEVICE), weight.to(DEVICE)
    out = linear_kl(hidden, ref, weight, 2.0, impl=impl)  # nothing requires grad
    assert not out.requires_grad
    torch.testing.assert_close(out.cpu().double(), want, rtol=2e-6, atol=1e-6)
    with torch.no_grad():
        out = linear_kl(hidden.requires_grad_(True), ref, weight, 2.0, impl=impl)
    assert not out.requires_grad
    torch.testing.assert_close(out.cpu().double(), want, rtol=2e-6, atol=1e-6)


def test_module_auto_and_validation():
    hidden, ref, weight = make_inputs(5, 8, 50, torch.float32)
    mod = LinearKL(temperature=2.0)
    assert "temperature=2.0" in repr(mod)
    want = kl_float64(hidden, ref, weight, 2.0)
    torch.testing.assert_close(mod(hidden, ref, weight).double(), want, rtol=2e-6, atol=1e-6)
    with pytest.raises(ValueError, match="shape mismatch"):
        linear_kl(hidden, ref[:4], weight)
    with pytest.raises(ValueError, match="dtypes differ"):
        linear_kl(hidden, ref.double(), weight)
    with pytest.raises(ValueError, match="temperature"):
        linear_kl(hidden, ref, weight, temperature=0.0)
    with pytest.raises(ValueError, match="impl"):
        linear_kl(hidden, ref, weight, impl="cuda")
    with pytest.raises(ValueError, match="softcap"):
        linear_kl(hidden, ref, weight, softcap=0.0)
    assert "softcap=30.0" in repr(LinearKL(softcap=30.0))


def test_sharded_dtensor_weight_is_refused():
    """A tensor-parallel (sharded) LM head: a clear error; a replicated DTensor works (its local tensor)."""
    dist = torch.distributed
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.testing._internal.distributed.fake_pg import FakeStore

    hidden, ref, weight = make_inputs(5, 8, 50, torch.float32)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        sharded = distribute_tensor(weight, mesh, [Shard(0)])
        with pytest.raises(TypeError, match=r"weight is a DTensor .*Shard\(dim=0\).*full_tensor"):
            linear_kl(hidden, ref, sharded)
        replicated = distribute_tensor(weight, mesh, [Replicate()])
        got = linear_kl(hidden, ref, replicated, impl="torch")
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(got.double(), kl_float64(hidden, ref, weight, 2.0), rtol=2e-6, atol=1e-6)


def test_default_chunk_rows_fit_budget():
    assert lk._chunk_rows(10**6, 128256, 2, lk.TRITON_CHUNK_BYTES, None) == 1024
    assert lk._chunk_rows(10**6, 32000, 4, lk.TORCH_CHUNK_BYTES, None) == 256
    assert lk._chunk_rows(7, 32000, 4, lk.TORCH_CHUNK_BYTES, None) == 7
    assert lk._chunk_rows(10**6, 10**9, 4, lk.TORCH_CHUNK_BYTES, None) == 1


_MEMORY_SCRIPT = textwrap.dedent(
    """
    import gc, json, time, torch
    from repbend.kernels.linear_kl import linear_kl

    torch.set_num_threads(1)  # one thread: a shared CPU makes multi-threaded barriers crawl

    def status_kib(field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])

    N, V, D = 8192, 32000, 256
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(N, D, generator=g)
    hidden = (ref + 0.5 * torch.randn(N, D, generator=g)).requires_grad_(True)
    weight = (torch.randn(V, D, generator=g) * 0.05).requires_grad_(True)
    linear_kl(hidden[:8], ref[:8], weight, impl="torch").backward()  # warm-up: thread pools, allocator
    hidden.grad = weight.grad = None
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = status_kib("VmRSS")
    t0 = time.perf_counter()
    loss = linear_kl(hidden, ref, weight, impl="torch")
    loss.backward()
    seconds = time.perf_counter() - t0
    peak = status_kib("VmHWM")
    print(json.dumps({"base_kib": base, "peak_kib": peak, "seconds": seconds, "loss": loss.item(),
                      "grads": hidden.grad is not None and weight.grad is not None}))
    """
)


def test_memory_stays_chunk_sized():
    """N = 8192, V = 32000, D = 256, fp32: forward + backward may grow RSS by at most half of one [N, V] fp32."""
    proc = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    growth = (res["peak_kib"] - res["base_kib"]) * 1024
    full_logits = 8192 * 32000 * 4
    print(f"RSS growth {growth / 2**20:.0f} MiB (limit {full_logits / 2 / 2**20:.0f} MiB), {res['seconds']:.1f} s")
    assert res["grads"] and res["loss"] > 0
    assert growth <= full_logits / 2, f"peak RSS grew by {growth / 2**20:.0f} MiB"
