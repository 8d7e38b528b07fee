"""Speed and memory of the three RepBend kernels: fused Triton vs eager PyTorch vs torch.compile (vs Liger).

    python benchmarks/bench_kernels.py [--device cpu|cuda] [--output DIR] [--quick] [--interpret] [--compile]

For each op (`rep_distance`, `pairwise_cosine_loss`, `linear_kl` from repbend.kernels) and shape, every provider is
timed in three modes: forward (inputs require grad, so a fused op's forward includes the gradient it precomputes),
backward (of one retained forward) and full (forward + backward). Time: median over --repeats after a warm-up, CUDA
events on GPU, perf_counter on CPU. Memory: peak bytes allocated above what was allocated before the call
(torch.cuda.max_memory_allocated) on GPU; on CPU the peak growth of the process's resident set (VmHWM after a reset
through /proc/self/clear_refs), which is approximate (the C allocator may reuse memory it kept).

Providers
  triton        impl="triton" (GPU; on CPU only with --interpret, at tiny shapes: the interpreter is slow)
  torch         impl="torch": the library's eager path (for linear_kl the chunked eager one, no [N, V] tensor)
  compile       torch.compile of the eager reference (on CPU only with --compile: slow to build)
  eager_full    linear_kl only: the published recipe, full [N, V] logits, log_softmax + softmax + F.kl_div
  compile_full  linear_kl only: torch.compile of eager_full
  liger         linear_kl only, GPU only: Liger's LigerFusedLinearJSD with jsd_beta=0. In Liger's JSD kernel
                beta = 0 computes sum P_teacher (log P_teacher - log P_student) = KL(teacher || student), the
                direction of L_KL (teacher = reference pass, student = LoRA pass). Liger averages over rows and has
                no T^2 factor: a timing comparison, not the same number.
rep_distance runs as the objective calls it: L per-layer hidden states [B, T, D] (a list, as a model returns them),
the reference rows gathered [L, N, D], and an int64 index tensor of the N selected positions (the rows launch). Its
shapes give BT = B*T positions and the fraction of them selected: 1.0, and the bandwidth configuration of about 1/5
(spans of 16-256 tokens, like response spans in packed rows) at L = 11, D = 4096, BT = 16384, bf16. For it the
table reports the bandwidth of each mode: bytes the op must move / time, where the forward reads the selected rows
of hidden and ref (2 x L x N x D elements) and the backward reads them again and writes the whole gradient
(L x BT x D: autograd needs every position, zeros included); on GPU also as a fraction of a device-to-device copy's
bandwidth (2 x bytes / time of dst.copy_(src), 2 GiB) measured in the same run. The goal for fwd + bwd ("full") is
>= 80% of the copy.

Writes DIR/bench_kernels.csv (one row per op, shape, provider, mode) and prints a table.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Callable

from kernel_timing import (Device, _is_oom, copy_bandwidth_gbps, device_from_args,  # this folder is on sys.path
                           run_case, write_csv)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available, else cpu")
    p.add_argument("--output", default="bench_out", help="folder for bench_kernels.csv")
    p.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    p.add_argument("--interpret", action="store_true",
                   help="CPU: also run the Triton kernels in Triton's interpreter (tiny shapes)")
    p.add_argument("--compile", action="store_true", help="CPU: also run torch.compile (always on for cuda)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per mode (default 10 cuda, 3 cpu)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default 1 on cpu: stable timings on a shared machine)")
    p.add_argument("--ops", default="rep_distance,pairwise_cosine,linear_kl", help="comma-separated subset")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------
# Shapes
# ----------------------------------------------------------------------------------------------------------------
# The goal configuration of rep_distance (see the module docstring): fwd + bwd >= 80% of a device copy's bandwidth.
BANDWIDTH_CONFIG = dict(L=11, BT=16384, frac=0.2, D=4096, dtype="bfloat16")


def sweeps(device: str, quick: bool, interpret: bool) -> dict[str, list[dict]]:
    """Shapes per op. GPU: the production sizes (D = 4096, L = 11 target / 33 all layers, V = 128256)."""
    if device == "cuda":
        n_tok = [4096, 65536] if quick else [1024, 4096, 16384, 65536]
        layers = [11] if quick else [11, 33]
        return {
            "rep_distance": [dict(BANDWIDTH_CONFIG)] + [dict(L=L, BT=n, frac=1.0, D=4096, dtype="bfloat16")
                                                  for L in layers for n in n_tok],
            # the method's N is 2B = 8 vectors per layer; 1024 is the Triton kernel's limit
            "pairwise_cosine": [dict(L=L, N=n, D=4096, dtype="bfloat16") for L in layers
                                for n in ([8, 1024] if quick else [8, 64, 256, 1024])],
            "linear_kl": [dict(N=n, D=4096, V=128256, dtype="bfloat16") for n in n_tok],
        }
    if interpret:  # the Triton interpreter runs one program at a time: tiny shapes only
        return {
            "rep_distance": [dict(L=2, BT=64, frac=0.2, D=64, dtype="float32")],
            "pairwise_cosine": [dict(L=2, N=8, D=64, dtype="float32")],
            "linear_kl": [dict(N=32, D=64, V=1024, dtype="float32")],
        }
    return {
        "rep_distance": [dict(L=11, BT=n, frac=f, D=256, dtype="float32")
                         for n in ([1024] if quick else [1024, 4096]) for f in (0.2, 1.0)],
        "pairwise_cosine": [dict(L=11, N=n, D=256, dtype="float32") for n in ([8, 256] if quick else [8, 64, 256])],
        "linear_kl": [dict(N=n, D=128, V=32000, dtype="float32") for n in ([256] if quick else [256, 1024])],
    }


# ----------------------------------------------------------------------------------------------------------------
# Cases: (op, shape, provider) -> a forward closure over fresh inputs
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Case:
    op: str
    provider: str
    shape: dict
    forward: Callable  # () -> 0-dim loss
    params: list  # tensors that receive gradients (reset between repeats)
    note: str = ""
    read_bytes: int = 0  # bytes of input rows the forward must read (bandwidth column), 0 = not reported
    bwd_bytes: int = 0  # bytes the backward must move (reads and writes), 0 = not reported


def _compiled(fn, cache: dict):
    import torch

    if fn not in cache:
        cache[fn] = torch.compile(fn)  # dynamic=None: after a first recompile, shapes become symbolic
    return cache[fn]


def make_cases(op: str, shape: dict, providers: list[str], device, compile_cache: dict) -> list[Case]:
    import torch

    dtype = getattr(torch, shape["dtype"])
    g = torch.Generator(device=device).manual_seed(0)

    def randn(*size, scale=1.0):  # made on the device: the GPU sweep's inputs are tens of GB
        x = torch.randn(*size, generator=g, device=device, dtype=dtype)
        return x.mul_(scale) if scale != 1.0 else x

    cases = []
    if op == "rep_distance":
        from repbend.kernels.reference import rep_distance_torch
        from repbend.kernels.rep_distance import rep_distance

        L, BT, D = shape["L"], shape["BT"], shape["D"]
        rows = span_rows(BT, shape["frac"], seed=0).to(device)  # built on the host, as the objective does
        N = rows.numel()
        shape["N"] = N
        ref = randn(L, N, D)
        # per-layer hidden states (one sequence of BT positions), close to ref on the selected rows
        hidden = [randn(1, BT, D, scale=0.1).requires_grad_(True) for _ in range(L)]
        with torch.no_grad():
            for h, r in zip(hidden, ref):
                h.view(BT, D)[rows] += r
        elem = hidden[0].element_size()
        read, bwd = 2 * L * N * D * elem, (2 * L * N + L * BT) * D * elem

        def loss_of(out):
            return out.l2.sum() + out.cos.sum()

        for prov in providers:
            if prov in ("triton", "torch"):
                fwd = (lambda impl: lambda: loss_of(rep_distance(hidden, ref, rows, impl=impl)))(prov)
            elif prov == "compile":
                comp = _compiled(rep_distance_torch, compile_cache)
                fwd = lambda: loss_of(comp(hidden, ref, rows))  # noqa: E731
            else:
                continue
            cases.append(Case(op, prov, shape, fwd, hidden, note=f"{N}/{BT} rows", read_bytes=read,
                              bwd_bytes=bwd))

    elif op == "pairwise_cosine":
        from repbend.kernels.pairwise_cosine import BLOCK_N_MAX, pairwise_cosine_loss
        from repbend.kernels.reference import pairwise_cosine_loss_torch

        L, N, D = shape["L"], shape["N"], shape["D"]
        x = randn(L, N, D).requires_grad_(True)
        for prov in providers:
            note = "falls back to eager (N > BLOCK_N_MAX)" if prov == "triton" and N > BLOCK_N_MAX else ""
            if prov in ("triton", "torch"):
                fwd = (lambda impl: lambda: pairwise_cosine_loss(x, impl=impl))(prov)
            elif prov == "compile":
                comp = _compiled(pairwise_cosine_loss_torch, compile_cache)
                fwd = lambda: comp(x)  # noqa: E731
            else:
                continue
            cases.append(Case(op, prov, shape, fwd, [x], note=note))

    elif op == "linear_kl":
        from repbend.kernels.linear_kl import linear_kl

        N, D, V, T = shape["N"], shape["D"], shape["V"], 2.0
        ref = randn(N, D)
        hidden = randn(N, D, scale=0.05).add_(ref).requires_grad_(True)
        weight = randn(V, D, scale=D**-0.5)  # frozen LM head, as in RepBend (LoRA does not touch it)
        for prov in providers:
            note = "weight frozen"
            if prov in ("triton", "torch"):
                fwd = (lambda impl: lambda: linear_kl(hidden, ref, weight, T, impl=impl))(prov)
            elif prov == "eager_full":
                fwd = lambda: _kl_full_logits(hidden, ref, weight, T)  # noqa: E731
            elif prov == "compile_full":
                comp = _compiled(_kl_full_logits, compile_cache)
                fwd = lambda: comp(hidden, ref, weight, T)  # noqa: E731
            elif prov == "liger":
                mod = _liger_jsd(T)
                if mod is None:
                    continue
                fwd = lambda: mod(hidden, weight, ref, weight, None)  # noqa: E731
                note = "jsd_beta=0: KL(ref||lora), mean over rows, no T^2"
            else:
                continue
            cases.append(Case(op, prov, shape, fwd, [hidden], note=note))
    return cases


def span_rows(n_positions: int, frac: float, seed: int = 0):
    """int64 [N]: ascending positions covering about `frac` of n_positions in spans of 16-256 (all if frac >= 1)."""
    import torch

    if frac >= 1.0:
        return torch.arange(n_positions)
    g = torch.Generator().manual_seed(seed)
    keep = torch.zeros(n_positions, dtype=torch.bool)
    while keep.sum() < frac * n_positions:
        start = int(torch.randint(n_positions, (1,), generator=g))
        keep[start:start + int(torch.randint(16, 257, (1,), generator=g))] = True
    return keep.nonzero().squeeze(1)


def _kl_full_logits(hidden, ref_hidden, weight, temperature: float):
    """The published recipe: full [N, V] logits in the input dtype, upcast, F.kl_div(..., "sum") * T^2."""
    import torch
    import torch.nn.functional as F

    log_q = torch.log_softmax((hidden @ weight.t()).float() / temperature, dim=-1)
    with torch.no_grad():
        p = torch.softmax((ref_hidden @ weight.t()).float() / temperature, dim=-1)
    return F.kl_div(log_q, p, reduction="sum") * temperature**2


def _liger_jsd(temperature: float):
    try:
        from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD
    except Exception:  # not installed, or its import needs a GPU stack
        return None
    return LigerFusedLinearJSD(jsd_beta=0.0, temperature=temperature)


def liger_available() -> tuple[bool, str]:
    try:
        import liger_kernel.transformers.fused_linear_jsd  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return False, f"liger-kernel not importable ({type(e).__name__})"
    return True, ""


CSV_FIELDS = ["op", "provider", "mode", "device", "dtype", "L", "N", "D", "V", "ms", "peak_mib", "read_gbps",
              "frac_copy_bw", "status", "note", "BT", "bytes", "gbps", "mode_frac_copy_bw", "kernel_ms",
              "kernel_gbps", "kernel_frac_copy_bw"]


def providers_for(op: str, device: str, interpret: bool, use_compile: bool) -> tuple[list[str], list[str]]:
    """(providers to run, notes about the ones skipped)."""
    provs, skipped = [], []
    if device == "cuda" or interpret:
        provs.append("triton")
    else:
        skipped.append("triton: needs CUDA (or --interpret)")
    provs.append("torch")
    if op == "linear_kl":
        provs.append("eager_full")
    if device == "cuda" or use_compile:
        provs.append("compile_full" if op == "linear_kl" else "compile")
    else:
        skipped.append("torch.compile: off on CPU (--compile)")
    if op == "linear_kl":
        ok, why = liger_available()
        if device == "cuda" and ok:
            provs.append("liger")
        else:
            skipped.append("liger: " + (why if not ok else "its kernels need a GPU"))
    return provs, skipped


def fmt(x: float, digits: int = 2) -> str:
    return "-" if x != x else f"{x:.{digits}f}"  # NaN -> "-"


def print_table(rows: list[dict]) -> None:
    """One line per (op, shape, provider): fwd / bwd / full ms, peak MiB of full, bandwidth."""
    keyed: dict[tuple, dict] = {}
    for r in rows:
        shape = " ".join(f"{k}={r[k]}" for k in ("L", "BT", "N", "D", "V") if r[k] != "")
        key = (r["op"], shape, r["provider"])
        keyed.setdefault(key, {"note": r["note"]})[r["mode"]] = r
    header = ["op", "shape", "provider", "fwd ms", "bwd ms", "full ms", "full MiB", "fwd GB/s", "of copy",
              "full GB/s", "of copy", "note"]
    lines = [header]
    for (op, shape, prov), modes in keyed.items():
        cells = [op, shape, prov]
        for m in ("forward", "backward", "full"):
            r = modes.get(m)
            cells.append("-" if r is None else (fmt(r["ms"]) if r["status"] == "ok" else r["status"][:12]))
        full = modes.get("full")
        cells.append(fmt(full["peak_mib"], 1) if full and full["status"] == "ok" else "-")
        fwd = modes.get("forward") or {}
        cells.append(fmt(fwd.get("read_gbps", float("nan")), 1) if fwd.get("status") == "ok" else "-")
        frac = fwd.get("frac_copy_bw", float("nan")) if fwd.get("status") == "ok" else float("nan")
        cells.append("-" if frac != frac else f"{100 * frac:.0f}%")
        ok = full is not None and full["status"] == "ok"
        cells.append(fmt(full["gbps"], 1) if ok else "-")
        frac = full["mode_frac_copy_bw"] if ok else float("nan")
        cells.append("-" if frac != frac else f"{100 * frac:.0f}%")
        cells.append(modes["note"])
        lines.append([str(c) for c in cells])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for i, line in enumerate(lines):
        print("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def print_bandwidth_goal(rows: list[dict], copy_bw: float) -> None:
    """One line per provider for rep_distance's bandwidth configuration: fwd + bwd GB/s and its share of a copy."""
    goal = BANDWIDTH_CONFIG
    for r in rows:
        if (r["op"] == "rep_distance" and r["mode"] == "full" and r["status"] == "ok" and r["L"] == goal["L"]
                and r["BT"] == goal["BT"] and r["D"] == goal["D"] and r["dtype"] == goal["dtype"]
                and r["N"] < r["BT"]):
            share = f" = {100 * r['gbps'] / copy_bw:.0f}% of the copy's {copy_bw:.0f} GB/s (goal >= 80%)" \
                if copy_bw == copy_bw else ""
            kernels = (f"; kernels alone (profiler) {r['kernel_ms']:.3f} ms, {r['kernel_gbps']:.0f} GB/s"
                       + (f" = {100 * r['kernel_gbps'] / copy_bw:.0f}%" if copy_bw == copy_bw else "")
                       if r.get("kernel_ms", float("nan")) == r.get("kernel_ms", float("nan")) else "")
            print(f"rep_distance bandwidth configuration (L={r['L']}, D={r['D']}, {r['N']} of {r['BT']} rows, "
                  f"{r['dtype']}), {r['provider']}: fwd+bwd {r['ms']:.3f} ms back to back, {r['gbps']:.0f} GB/s"
                  f"{share}{kernels}")


def main(argv=None) -> int:
    args = parse_args(argv)
    device, repeats = device_from_args(args, "bench_kernels")
    if device is None:
        print(repeats, file=sys.stderr)
        return 2
    import torch
    if device == "cpu":
        torch.set_num_threads(args.threads or 1)
    elif args.threads:
        torch.set_num_threads(args.threads)
    dev = Device(device)
    use_compile = device == "cuda" or args.compile
    torch.backends.cuda.matmul.allow_tf32 = True

    t_start = time.perf_counter()
    copy_bw = copy_bandwidth_gbps(dev) if device == "cuda" else float("nan")
    name = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"bench_kernels: {name}, torch {torch.__version__}, repeats {repeats}"
          + (f", copy bandwidth {copy_bw:.0f} GB/s" if device == "cuda" else ""))

    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    rows, skipped_notes = [], []
    compile_cache: dict = {}
    for op, shapes in sweeps(device, args.quick, args.interpret).items():
        if op not in ops:
            continue
        provs, skipped = providers_for(op, device, args.interpret, use_compile)
        skipped_notes += [f"{op}: {s}" for s in skipped]
        for shape in shapes:
            try:
                cases = make_cases(op, shape, provs, dev.device, compile_cache)
            except Exception as e:  # noqa: BLE001
                status = "OOM" if _is_oom(e) else f"error: {type(e).__name__}: {e}"
                print(f"  {op} {shape}: inputs not built ({status})")
                dev.clean()
                continue
            for case in cases:
                for r in run_case(case, dev, repeats):
                    ok = r["status"] == "ok"
                    gbps = (case.read_bytes / (r["ms"] * 1e-3) / 1e9
                            if case.read_bytes and r["mode"] == "forward" and ok else float("nan"))
                    nbytes = {"forward": case.read_bytes, "backward": case.bwd_bytes,
                              "full": case.read_bytes + case.bwd_bytes}[r["mode"]] if case.bwd_bytes else 0
                    mode_gbps = nbytes / (r["ms"] * 1e-3) / 1e9 if nbytes and ok else float("nan")
                    k_ms = r.get("kernel_ms", float("nan"))
                    kernel_gbps = nbytes / (k_ms * 1e-3) / 1e9 if nbytes and ok and k_ms == k_ms else float("nan")
                    rows.append({
                        "op": op, "provider": case.provider, "mode": r["mode"], "device": device,
                        "dtype": shape["dtype"], "L": shape.get("L", ""), "N": shape["N"], "D": shape["D"],
                        "V": shape.get("V", ""), "ms": r["ms"], "peak_mib": r["peak_mib"], "read_gbps": gbps,
                        "frac_copy_bw": gbps / copy_bw if copy_bw == copy_bw else float("nan"),
                        "status": r["status"], "note": case.note, "BT": shape.get("BT", ""),
                        "bytes": nbytes or "", "gbps": mode_gbps,
                        "mode_frac_copy_bw": mode_gbps / copy_bw if copy_bw == copy_bw else float("nan"),
                        "kernel_ms": k_ms, "kernel_gbps": kernel_gbps,
                        "kernel_frac_copy_bw": kernel_gbps / copy_bw if copy_bw == copy_bw else float("nan"),
                    })
                print(f"  {op:16s} {case.provider:12s} {shape}  full "
                      f"{fmt(rows[-1]['ms'])} ms ({rows[-1]['status']})", flush=True)
            del cases
            dev.clean()

    out_csv = write_csv(args.output, "bench_kernels.csv", CSV_FIELDS, rows)
    print()
    print_table(rows)
    print_bandwidth_goal(rows, copy_bw)
    for s in dict.fromkeys(skipped_notes):
        print(f"skipped {s}")
    if device == "cpu":
        print("CPU memory = peak RSS growth (approximate); GPU numbers need --device cuda")
    print(f"wrote {out_csv} ({len(rows)} rows) in {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
