"""Stage 2 of benchmarks/gpu_check.sh: packed rows are exact on every attention backend present, on the device.

    python benchmarks/gpu_attention.py --device cuda --jsonl OUT/results.jsonl [--time-limit S]

For each backend (sdpa, eager, flash_attention_2 when flash-attn is installed, flex_attention) and dtype, one tiny
Llama (3 layers, head_dim 32, random weights, LoRA r 4 with B != 0, dropout 0) computes the loss of one micro-batch
twice: one row per sequence, and packed into rows of at most 48 tokens (a row holding sequences of all three sets).
The loss goes through `RepBendLoss` with impl "auto" (the Triton kernels on CUDA), as the trainer runs it.
  fp32   packed equals unpacked: every term and every trained tensor's gradient within rel 1e-4 (norm-relative).
  bf16   (under autocast, as the trainer) both against the fp32 unpacked sdpa result of the same weights:
         err(packed) <= 3 * err(unpacked) + 2e-2. Sequences that attended to each other would be off by O(1).
flash_attention_2 runs in bf16 only. flex_attention has no backward on a CPU (loss only there) and compiles on
first use on a GPU, so it runs last. Circuit Breakers and RMU (when repbend.loss has them) are checked on sdpa.
One JSON line per (method, backend, dtype); cases not started within --time-limit are recorded as skipped.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import sys

import torch

from gpu_records import Deadline, Records, rel_err
from methods import BENCH, tiny_config

VOCAB = 512
FP32_RTOL = 1e-4


def tiny_model(method: str, attn: str, dtype, device, seed: int = 1):
    """(model, loss_fn, trained tensors) for `method`, every trained tensor moved off its initial value."""
    from transformers import LlamaForCausalLM

    from repbend.demo.assets import tiny_llama_config
    from repbend.loss import RepBendLoss
    from repbend.model import LoraSettings, attach_lora

    loss_fn = RepBendLoss(tiny_config(method))
    full = loss_fn.method.TRAINS == "full"
    torch.manual_seed(seed)
    base = LlamaForCausalLM(tiny_llama_config(VOCAB, layers=3, hidden=128, heads=4, kv_heads=2)).to(device, dtype)
    model = base
    if not full:
        model = attach_lora(base, LoraSettings(r=4, alpha=8, dropout=0.0), layers_to_transform=range(3))
    params = loss_fn.prepare(model)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # LoRA B = 0 (or RMU's untouched copy) would make h' == h: move every trained tensor
        for p in params:
            p.add_(torch.randn(p.shape, generator=g).to(p.device, p.dtype) * (0.02 if full else 0.05))
    set_attention(model, attn)
    return model.train(), loss_fn, params


def set_attention(model, attn: str) -> None:
    from repbend.model import unwrap
    unwrap(model).config._attn_implementation = attn


def micro_batch(seed: int = 0):
    from repbend.loss import MicroBatch, Sequence

    g = torch.Generator().manual_seed(seed)
    ids = lambda n: tuple(torch.randint(5, VOCAB, (n,), generator=g).tolist())  # noqa: E731
    n = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=g))  # noqa: E731

    def row(origin):
        r = n(4, 12)
        return Sequence(ids(r) + ids(n(3, 9)), r, origin)
    safe, unsafe = [row("wgm"), row("wgm")], [row("wgm"), row("wgm")]
    req = ids(6)
    safe.append(Sequence(req + ids(5), 6, "wj"))
    unsafe.append(Sequence(req + ids(7), 6, "wj"))
    retain = [Sequence(ids(n(8, 20)), 0, "uc") for _ in range(2)]
    return MicroBatch(safe, unsafe, retain, n_pairs=1)


def loss_and_grads(model, loss_fn, params, batch, grads: bool, autocast):
    with torch.set_grad_enabled(grads), autocast:
        terms = loss_fn(model, batch, progress=0.3)
    parts = {k: v.detach().float() for k, v in terms.parts.items() if v is not None}
    parts["total"] = terms.total.detach().float()
    gs = [g.float() for g in torch.autograd.grad(terms.total, params)] if grads else []
    return parts, gs


def check(rec, method: str, attn: str, dtype, device, truth: dict | None) -> dict:
    model, loss_fn, params = tiny_model(method, attn, dtype, device)
    micro = micro_batch()
    pad = 0
    plain, packed = loss_fn.collate(micro, pad), loss_fn.collate(micro, pad, 48)
    grads = not (attn == "flex_attention" and device.type != "cuda")
    cuda_bf16 = dtype == torch.bfloat16 and device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda_bf16 else contextlib.nullcontext()
    a, ga = loss_and_grads(model, loss_fn, params, plain, grads, autocast)
    b, gb = loss_and_grads(model, loss_fn, params, packed, grads, autocast)
    errs, problems = {}, []
    if dtype == torch.float32:
        for k, v in a.items():
            errs[k] = rel_err(b[k], v)
        for i, (x, y) in enumerate(zip(ga, gb)):
            errs[f"grad{i}"] = rel_err(y, x)
        problems = [f"{k}: packed vs unpacked rel {e:.2e} > {FP32_RTOL:g}" for k, e in errs.items()
                    if not e <= FP32_RTOL]
    else:
        want, gwant = truth["parts"], truth["grads"]
        for k, v in want.items():
            ep, eu = rel_err(b[k], v), rel_err(a[k], v)
            errs[k] = [ep, eu]
            if not ep <= 3 * eu + 2e-2:
                problems.append(f"{k}: packed err {ep:.2e} > 3 x unpacked {eu:.2e} + 2e-2")
        if grads and gwant:
            gp = torch.cat([g.reshape(-1) for g in gb])
            gu = torch.cat([g.reshape(-1) for g in ga])
            gw = torch.cat([g.reshape(-1) for g in gwant])
            ep, eu = rel_err(gp, gw), rel_err(gu, gw)
            errs["grads"] = [ep, eu]
            if not ep <= 3 * eu + 2e-2:
                problems.append(f"grads: packed err {ep:.2e} > 3 x unpacked {eu:.2e} + 2e-2")
    nonzero = all(abs(float(v)) > 0 for v in a.values())
    if not nonzero:
        problems.append(f"a term is exactly zero: {a}")
    worst = max((e if isinstance(e, float) else e[0] for e in errs.values()), default=0.0)
    return rec.write(f"{method}/{attn}/{_dn(dtype)}", "fail" if problems else "ok", method=method, attn=attn,
                     grads_checked=grads, rows=[list(plain.shape), list(packed.shape)], worst_err=worst,
                     loss=float(a["total"]), problems=problems or None, errs=errs)


def truth_of(method: str, device) -> dict:
    """fp32, sdpa, one row per sequence: the values the bf16 runs are measured against."""
    model, loss_fn, params = tiny_model(method, "sdpa", torch.float32, device)
    a, ga = loss_and_grads(model, loss_fn, params, loss_fn.collate(micro_batch(), 0), True,
                           contextlib.nullcontext())
    return {"parts": a, "grads": ga}


def _dn(dt) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16"}[dt]


def methods_available() -> list[str]:
    """Every method of the benchmark's registry, the first (RepBend) first."""
    return list(BENCH)


COMPILE_NEED_S = 45  # flex_attention's cold compile (fp32 or bf16, forward and backward): 20-40 s each


def plan(device) -> list[tuple[str, str, object]]:
    """(method, backend, dtype) in run order: the cheap ones first, flex_attention (compiles) last."""
    f32, bf16 = torch.float32, torch.bfloat16
    cuda = device.type == "cuda"
    flash = cuda and importlib.util.find_spec("flash_attn") is not None
    out = [("repbend", "sdpa", f32), ("repbend", "eager", f32)]
    if cuda:
        out += [("repbend", "sdpa", bf16), ("repbend", "eager", bf16)]
    if flash:
        out.append(("repbend", "flash_attention_2", bf16))
    for method in methods_available()[1:]:
        out.append((method, "sdpa", f32))
    out.append(("repbend", "flex_attention", f32))
    if cuda:
        out.append(("repbend", "flex_attention", bf16))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--jsonl", default=None)
    p.add_argument("--time-limit", type=float, default=None)
    p.add_argument("--skip", default="", help="comma-separated backends not to run (recorded as skipped)")
    p.add_argument("--only", default="", help="comma-separated backends to run, nothing else")
    a = p.parse_args(argv)
    skip = [b for b in a.skip.split(",") if b]
    only = [b for b in a.only.split(",") if b]
    device = torch.device(a.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    rec = Records(a.jsonl, "attention")
    deadline = Deadline(a.time_limit)
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is None and not only:
        rec.write("repbend/flash_attention_2/bf16", "skipped", error="flash-attn is not installed")
    truths: dict[str, dict] = {}
    bad = 0
    for method, attn, dtype in plan(device):
        name = f"{method}/{attn}/{_dn(dtype)}"
        if only and attn not in only:
            continue
        if attn in skip:
            rec.write(name, "skipped", error=f"--skip {attn}" + (
                " (it compiles for 20-40 s: benchmarks/gpu_check.sh runs it in its own stage, last, when time is "
                "left; tests/test_attention_layouts.py covers it on the CPU)" if attn == "flex_attention" else ""))
            continue
        need = COMPILE_NEED_S if attn == "flex_attention" else 0
        if deadline.over(need):
            rec.write(name, "skipped", error="stage time limit reached" + (
                f" ({deadline.left():.0f} s left, a flex_attention compile takes 20-40 s)" if need else ""))
            continue
        try:
            truth = None
            if dtype != torch.float32:
                truth = truths.setdefault(method, truth_of(method, device))
            status = check(rec, method, attn, dtype, device, truth)["status"]
        except Exception as e:  # noqa: BLE001
            status = rec.error(name, e, method=method, attn=attn)["status"]
        bad += status != "ok"
    print(f"attention: {'OK' if not bad else f'{bad} case(s) not ok'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
