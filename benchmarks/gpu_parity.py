"""Stage 1 of benchmarks/gpu_check.sh: every kernel path the trainer uses, compiled Triton and eager PyTorch, each
against float64 formulas written here, forward values and input gradients, fp32 and bf16, on one device.

    python benchmarks/gpu_parity.py --device cuda --jsonl OUT/results.jsonl [--time-limit S]
    TRITON_INTERPRET=1 python benchmarks/gpu_parity.py --device cpu --small     (the dry run: tiny shapes)

Cases (the `name` of each JSON line is op/case/dtype):
  rep_distance  list of L layers [R, T, D] with a gathered reference [L, N, D] and int64 flat row indices (the
                trainer's call: L_safe over 33 indices, L_unsafe over 11), odd D, a stacked [L, R, T, D] input with a
                [R, T] bool mask, RMU's row-stride-0 control vector, and the edges: hidden == ref exactly, no
                selected row, one row. Outputs l2, cos, relu_cos, sq [L]; the gradient of each one separately
                (random per-layer upstream weights), and exact zeros on unselected rows.
  pairwise_cosine_loss  [11, 8, 4096] (the trainer's), odd shapes, N = 1 (a zero loss, zero gradient).
  linear_kl     [2048, 4096] rows against a [128256, 4096] head, frozen (the trainer's), with and without the
                logit soft-cap; fp32 at smaller V; odd shapes with a trainable head (its gradient too).
The float64 formulas read the same rounded inputs. Accepted when, for every output and gradient,
err(triton) <= floor + 2 * err(torch), err = ||x - x64|| / ||x64|| (floor: FLOOR[dtype]; linear_kl's loss at least
KL_LOSS_FLOOR) ("no worse than the eager path"; at
hidden == ref, where the cos gradients cancel to ~0, errors are measured against their natural size sqrt(L*N)/|h|).
Each case writes its line when it ends; cases not started within --time-limit are recorded as skipped.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from gpu_records import Deadline, Records, rel_err

FLOOR = {  # (values, gradients): the error no implementation is asked to beat
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (1e-4, 4e-3),
}
KL_LOSS_FLOOR = 5e-5
FIELDS = ("l2", "cos", "relu_cos", "sq")
EPS_COS = 1e-8


# ---------------------------------------------------------------- float64 formulas
def f64_rep_distance(h_rows: list[torch.Tensor], r_rows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per layer over the selected rows [N, D] (float64): the four sums of rep_distance. cos as
    F.cosine_similarity: h.r / (max(|h|, 1e-8) * max(|r|, 1e-8)), the clamp passing no gradient."""
    out = {k: [] for k in FIELDS}
    for h, r in zip(h_rows, r_rows):
        nh, nr = torch.linalg.vector_norm(h, dim=-1), torch.linalg.vector_norm(r, dim=-1)
        nh_c = nh + (nh.clamp_min(EPS_COS) - nh).detach()
        cos = (h * r).sum(-1) / (nh_c * nr.clamp_min(EPS_COS))
        out["l2"].append(torch.linalg.vector_norm(h - r, dim=-1).sum())
        out["cos"].append(cos.sum())
        out["relu_cos"].append(torch.relu(cos).sum())
        out["sq"].append((h - r).square().sum())
    return {k: torch.stack(v) for k, v in out.items()}


def f64_pairwise(x: torch.Tensor) -> torch.Tensor:
    """mean_l mean_{i != j} (1 - u_i.u_j), u = x / max(|x|, 1e-12), with the N x N matrix (float64)."""
    L, N, _ = x.shape
    u = x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-12)
    if N < 2:
        return (u * 0).sum()
    g = u @ u.transpose(1, 2)
    off = ~torch.eye(N, dtype=torch.bool, device=x.device)
    return (1 - g[:, off]).mean()


def f64_linear_kl(h, r, w, temperature, softcap):
    """T^2 * sum_n KL(softmax(c(r W^T)/T) || softmax(c(h W^T)/T)), c(z) = cap * tanh(z / cap) or z (float64).
    The reference side is a constant: a trainable head gets its gradient through h W^T only."""
    z, zr = h @ w.t(), r @ w.detach().t()
    if softcap:
        z, zr = softcap * torch.tanh(z / softcap), softcap * torch.tanh(zr / softcap)
    logp = torch.log_softmax(zr / temperature, dim=-1)
    logq = torch.log_softmax(z / temperature, dim=-1)
    return temperature**2 * (logp.exp() * (logp - logq)).sum()


# ---------------------------------------------------------------- helpers
class Verdict:
    """Collects err(triton), err(torch) per quantity and decides against the floors."""

    def __init__(self, dtype, value_floor: float | None = None):
        self.floor_v, self.floor_g = FLOOR[dtype]
        self.floor_v = max(self.floor_v, value_floor or 0.0)
        self.errs: dict[str, tuple[float, float]] = {}
        self.notes: list[str] = []

    def add(self, what: str, triton, torch_, want, grad: bool, scale: float | None = None):
        """`scale`: the norm to measure errors against where `want` is (near) zero by cancellation."""
        self.errs[what] = (rel_err(triton, want, scale), rel_err(torch_, want, scale), grad)

    def bad(self) -> list[str]:
        out = []
        for what, (et, eo, grad) in self.errs.items():
            floor = self.floor_g if grad else self.floor_v
            if not (et <= floor + 2 * eo):  # NaN fails too
                out.append(f"{what}: triton {et:.2e} > {floor:g} + 2 x torch {eo:.2e}")
        return out + self.notes

    def fields(self) -> dict:
        worst = max(self.errs.items(), key=lambda kv: kv[1][0]) if self.errs else (None, (0.0, 0.0, False))
        return {"worst": worst[0], "err_triton": worst[1][0], "err_torch": worst[1][1],
                "errs": {k: [v[0], v[1]] for k, v in self.errs.items()}}


def randn(gen, *shape, device, dtype, scale=1.0):
    return (torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * scale).to(dtype)


def span_rows(R: int, T: int, frac: float, gen_cpu) -> torch.Tensor:
    """Ascending flat indices of contiguous spans covering about `frac` of each row (like response tokens)."""
    rows = []
    for r in range(R):
        n = max(1, round(frac * T))
        start = int(torch.randint(0, T - n + 1, (1,), generator=gen_cpu))
        rows.extend(r * T + t for t in range(start, start + n))
    return torch.tensor(rows, dtype=torch.int64)


# ---------------------------------------------------------------- rep_distance
def rep_distance_case(rec, name, dtype, device, L, R, T, D, form="list_gathered", frac=0.2, edge=None):
    from repbend.kernels import rep_distance

    gen = torch.Generator(device=device).manual_seed(L * 1000 + D)
    gcpu = torch.Generator().manual_seed(T + R)
    if edge == "empty":
        rows = torch.zeros(0, dtype=torch.int64)
    elif edge == "single":
        rows = torch.tensor([R * T // 2 + 1], dtype=torch.int64)
    else:
        rows = span_rows(R, T, frac, gcpu)
    rows = rows.to(device)
    N = rows.numel()
    base = randn(gen, L, R * T, D, device=device, dtype=dtype)
    sign = (torch.rand(R * T, 1, generator=gen, device=device) < 0.7).to(dtype) * 2 - 1  # some cos < 0 (relu)
    if edge == "equal":
        hidden_all = base.clone()
    else:
        hidden_all = (base * sign + randn(gen, L, R * T, D, device=device, dtype=dtype, scale=0.5)).to(dtype)
    if form == "rmu_expanded":  # one control vector per layer, expanded over the rows (row stride 0)
        c = randn(gen, L, 1, D, device=device, dtype=dtype)
        ref_rows = c.expand(L, N, D)
    else:
        ref_rows = base.index_select(1, rows)  # [L, N, D]
    if form == "stacked_mask":
        hid_in = hidden_all.view(L, R, T, D)
        ref_in = base.view(L, R, T, D)
        sel = torch.zeros(R * T, dtype=torch.bool, device=device)
        sel[rows] = True
        sel = sel.view(R, T)
    else:
        hid_in = [hidden_all[i].view(R, T, D) for i in range(L)]
        ref_in = ref_rows
        sel = rows
    weights = {k: torch.rand(L, generator=gen, device=device) + 0.5 for k in FIELDS}

    results = {}
    for impl in ("triton", "torch"):
        if isinstance(hid_in, list):
            leaves = [t.detach().clone().requires_grad_(True) for t in hid_in]
            arg = leaves
        else:
            leaves = [hid_in.detach().clone().requires_grad_(True)]
            arg = leaves[0]
        out = rep_distance(arg, ref_in, sel, impl=impl)
        missing = [k for k in FIELDS if not hasattr(out, k)]
        fields = [k for k in FIELDS if k not in missing]
        vals = {k: getattr(out, k).detach().double() for k in fields}
        grads = {}
        for k in fields:
            g = torch.autograd.grad((getattr(out, k) * weights[k]).sum(), leaves, retain_graph=True, allow_unused=True)
            full = [torch.zeros_like(x) if gi is None else gi for gi, x in zip(g, leaves)]
            flat = torch.cat([t.reshape(-1, D) for t in full]) if len(full) > 1 else full[0].reshape(-1, D)
            flat = flat.view(L, R * T, D)
            grads[k] = flat
        results[impl] = (vals, grads, int(out.count), missing)
        del out, leaves, arg

    h64 = [hidden_all[i].index_select(0, rows).double().requires_grad_(True) for i in range(L)]
    r64 = [ref_rows[i].double() for i in range(L)]
    want = f64_rep_distance(h64, r64)
    v = Verdict(dtype)
    vt, gt, count_t, missing = results["triton"]
    vo, go, count_o, _ = results["torch"]
    if missing:
        v.notes.append(f"RepDistance lacks {missing}")
    if count_t != N or count_o != N:
        v.notes.append(f"count {count_t}/{count_o} != {N}")
    outside = torch.ones(R * T, dtype=torch.bool, device=device)
    outside[rows] = False
    for k in vt:
        v.add(k, vt[k], vo[k], want[k], grad=False)
        g64 = torch.autograd.grad((want[k] * weights[k].double()).sum(), h64, retain_graph=True, allow_unused=True)
        g64 = torch.stack([torch.zeros_like(h) if g is None else g for g, h in zip(g64, h64)])  # [L, N, D]
        scale = None
        if edge == "equal":  # the cos gradients cancel: measure against a cos gradient's natural size, sqrt(L*N)/|h|
            scale = (L * N) ** 0.5 / float(torch.linalg.vector_norm(hidden_all[0, 0].float()))
        v.add(f"grad_{k}", gt[k][:, rows], go[k][:, rows], g64, grad=True, scale=scale)
        for impl, g in (("triton", gt[k]), ("torch", go[k])):
            if not torch.isfinite(g).all():
                v.notes.append(f"{impl} grad_{k} has non-finite values")
            if outside.any() and g[:, outside].abs().max() != 0:
                v.notes.append(f"{impl} grad_{k} is non-zero on unselected rows")
        if edge == "equal" and k == "l2" and gt[k].abs().max() != 0:
            v.notes.append("l2 gradient at hidden == ref is not 0")
    bad = v.bad()
    return rec.write(name, "fail" if bad else "ok", shape=dict(L=L, R=R, T=T, D=D, N=N), form=form, edge=edge,
              problems=bad or None, **v.fields())


# ---------------------------------------------------------------- pairwise_cosine_loss
def pairwise_case(rec, name, dtype, device, L, N, D):
    from repbend.kernels import pairwise_cosine_loss

    gen = torch.Generator(device=device).manual_seed(N * 7 + D)
    center = randn(gen, L, 1, D, device=device, dtype=torch.float32)
    x = (center + randn(gen, L, N, D, device=device, dtype=torch.float32, scale=0.7)).to(dtype)
    res = {}
    for impl in ("triton", "torch"):
        leaf = x.detach().clone().requires_grad_(True)
        loss = pairwise_cosine_loss(leaf, impl=impl)
        (g,) = torch.autograd.grad(loss * 1.7, leaf)
        res[impl] = (loss.detach(), g)
    x64 = x.double().requires_grad_(True)
    want = f64_pairwise(x64)
    (g64,) = torch.autograd.grad(want * 1.7, x64)
    v = Verdict(dtype)
    v.add("loss", res["triton"][0], res["torch"][0], want, grad=False)
    v.add("grad", res["triton"][1], res["torch"][1], g64, grad=True)
    if N < 2 and (float(res["triton"][0]) != 0 or res["triton"][1].abs().max() != 0):
        v.notes.append("N < 2 must give a zero loss and a zero gradient")
    bad = v.bad()
    return rec.write(name, "fail" if bad else "ok", shape=dict(L=L, N=N, D=D), problems=bad or None, **v.fields())


# ---------------------------------------------------------------- linear_kl
def linear_kl_case(rec, name, dtype, device, N, D, V, softcap=None, train_head=False, temperature=2.0):
    from repbend.kernels import linear_kl

    gen = torch.Generator(device=device).manual_seed(N + V)
    ref = randn(gen, N, D, device=device, dtype=dtype)
    hidden = (ref.float() + randn(gen, N, D, device=device, dtype=torch.float32, scale=0.05)).to(dtype)
    weight = randn(gen, V, D, device=device, dtype=dtype, scale=8 * D**-0.5)  # logits of std ~8: softmax is peaked
    kw = {"softcap": softcap} if softcap else {}
    res = {}
    for impl in ("triton", "torch"):
        h = hidden.detach().clone().requires_grad_(True)
        w = weight.detach().clone().requires_grad_(train_head)
        loss = linear_kl(h, ref, w, temperature, impl=impl, **kw)
        grads = torch.autograd.grad(loss, [h, w] if train_head else [h])
        res[impl] = (loss.detach(), grads)
        del h, w, loss
    h64 = hidden.double().requires_grad_(True)
    w64 = weight.double().requires_grad_(train_head)
    want = f64_linear_kl(h64, ref.double(), w64, temperature, softcap)
    g64 = torch.autograd.grad(want, [h64, w64] if train_head else [h64])
    v = Verdict(dtype, KL_LOSS_FLOOR)  # a KL of two close distributions: its value loses digits to cancellation
    v.add("loss", res["triton"][0], res["torch"][0], want, grad=False)
    v.add("grad_hidden", res["triton"][1][0], res["torch"][1][0], g64[0], grad=True)
    if train_head:
        v.add("grad_weight", res["triton"][1][1], res["torch"][1][1], g64[1], grad=True)
    bad = v.bad()
    return rec.write(name, "fail" if bad else "ok", shape=dict(N=N, D=D, V=V), softcap=softcap, train_head=train_head,
              loss=want.item(), problems=bad or None, **v.fields())


# ---------------------------------------------------------------- the case list
def cases(small: bool):
    """(name, function, kwargs): the full shapes on a GPU, tiny ones for the Triton interpreter (--small)."""
    f32, bf16 = torch.float32, torch.bfloat16
    out = []
    if small:  # the Triton interpreter: one program at a time
        rd = [("list_safe", f32, dict(L=4, R=2, T=12, D=40)), ("list_safe", bf16, dict(L=3, R=2, T=12, D=40)),
              ("odd", f32, dict(L=2, R=3, T=7, D=33)),
              ("stacked_mask", f32, dict(L=2, R=2, T=8, D=40, form="stacked_mask")),
              ("rmu_expanded", bf16, dict(L=1, R=2, T=10, D=40, form="rmu_expanded")),
              ("equal", f32, dict(L=2, R=2, T=6, D=16, edge="equal")),
              ("empty", f32, dict(L=2, R=2, T=6, D=16, edge="empty")),
              ("single", f32, dict(L=2, R=2, T=6, D=16, edge="single"))]
        for case, dt, kw in rd:
            out.append((f"rep_distance/{case}/{_dn(dt)}", rep_distance_case, dict(dtype=dt, **kw)))
        for case, kw in (("trainer", dict(L=2, N=4, D=40)), ("single", dict(L=2, N=1, D=16))):
            out.append((f"pairwise_cosine/{case}/fp32", pairwise_case, dict(dtype=f32, **kw)))
        for case, kw in (("trainer", dict(N=6, D=32, V=200)), ("softcap", dict(N=6, D=32, V=200, softcap=5.0)),
                         ("odd_head_grad", dict(N=5, D=24, V=131, softcap=5.0, train_head=True))):
            out.append((f"linear_kl/{case}/fp32", linear_kl_case, dict(dtype=f32, **kw)))
        return out
    # run order: the trainer's calls first (the soft time limit skips from the end), then odd shapes and edges
    trainer = [
        ("rep_distance/list_safe_33/bf16", rep_distance_case, dict(dtype=bf16, L=33, R=8, T=1024, D=4096)),
        ("rep_distance/list_unsafe_11/bf16", rep_distance_case, dict(dtype=bf16, L=11, R=8, T=1024, D=4096)),
        ("rep_distance/list_unsafe_11/fp32", rep_distance_case, dict(dtype=f32, L=11, R=4, T=1024, D=4096)),
        ("pairwise_cosine/trainer/bf16", pairwise_case, dict(dtype=bf16, L=11, N=8, D=4096)),
        ("pairwise_cosine/trainer/fp32", pairwise_case, dict(dtype=f32, L=11, N=8, D=4096)),
        ("linear_kl/trainer/bf16", linear_kl_case, dict(dtype=bf16, N=2048, D=4096, V=128256)),
        ("linear_kl/softcap/bf16", linear_kl_case, dict(dtype=bf16, N=2048, D=4096, V=128256, softcap=30.0)),
        ("rep_distance/rmu_expanded/bf16", rep_distance_case,
         dict(dtype=bf16, L=1, R=16, T=512, D=4096, form="rmu_expanded")),
    ]
    rest = [("odd", bf16, dict(L=3, R=3, T=37, D=1000)), ("odd", f32, dict(L=3, R=3, T=37, D=1000)),
            ("stacked_mask", bf16, dict(L=4, R=2, T=64, D=4096, form="stacked_mask")),
            ("stacked_mask", f32, dict(L=4, R=2, T=64, D=4096, form="stacked_mask")),
            ("rmu_expanded", f32, dict(L=1, R=4, T=512, D=4096, form="rmu_expanded")),
            ("equal", bf16, dict(L=2, R=2, T=16, D=4096, edge="equal")),
            ("equal", f32, dict(L=2, R=2, T=16, D=4096, edge="equal")),
            ("empty", bf16, dict(L=2, R=2, T=16, D=4096, edge="empty")),
            ("single", bf16, dict(L=2, R=2, T=16, D=4096, edge="single")),
            ("single", f32, dict(L=2, R=2, T=16, D=4096, edge="single"))]
    out += trainer
    for case, dt, kw in rest:
        out.append((f"rep_distance/{case}/{_dn(dt)}", rep_distance_case, dict(dtype=dt, **kw)))
    for case, kw in (("odd", dict(L=3, N=5, D=1000)), ("many", dict(L=2, N=300, D=256)),
                     ("single", dict(L=2, N=1, D=4096))):
        for dt in (bf16, f32):
            out.append((f"pairwise_cosine/{case}/{_dn(dt)}", pairwise_case, dict(dtype=dt, **kw)))
    for case, dt, kw in (("smaller_v", f32, dict(N=512, D=1024, V=32000)),
                         ("smaller_v_softcap", f32, dict(N=512, D=1024, V=32000, softcap=30.0)),
                         ("odd_head_grad", f32, dict(N=37, D=200, V=1001, softcap=30.0, train_head=True)),
                         ("odd_head_grad", bf16, dict(N=37, D=200, V=1001, train_head=True))):
        out.append((f"linear_kl/{case}/{_dn(dt)}", linear_kl_case, dict(dtype=dt, **kw)))
    return out


def _dn(dt) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16"}[dt]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--jsonl", default=None, help="append one JSON line per case here")
    p.add_argument("--small", action="store_true", help="tiny shapes (the CPU dry run, Triton interpreter)")
    p.add_argument("--time-limit", type=float, default=None, help="cases not started after S seconds are skipped")
    p.add_argument("--only", default=None, help="run the cases whose name contains this text")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # the float64 comparison needs true fp32 matmuls
    rec = Records(a.jsonl, "parity")
    deadline = Deadline(a.time_limit)
    bad = 0
    for name, fn, kw in cases(a.small):
        if a.only and a.only not in name:
            continue
        if deadline.over():
            rec.write(name, "skipped", error="stage time limit reached")
            continue
        t0 = time.perf_counter()
        try:
            status = fn(rec, name, device=device, **kw)["status"]
        except Exception as e:  # noqa: BLE001 - one failing case must not hide the others
            status = rec.error(name, e)["status"]
        bad += status != "ok"
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"    ({time.perf_counter() - t0:.1f} s)", flush=True)
    print(f"parity: {'OK' if not bad else f'{bad} case(s) not ok'}")
    return 1 if bad else 0

if __name__ == "__main__":
    sys.exit(main())
