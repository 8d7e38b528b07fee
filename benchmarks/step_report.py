"""The outputs of benchmarks/bench_step.py: results.json / results.csv / table.txt with each variant's ratios against
its method's reference re-creation, the loss check per method, the bar chart (when matplotlib is installed), and the
JSON lines of --jsonl."""
from __future__ import annotations

import csv
import json
from dataclasses import asdict
from pathlib import Path

from methods import shipped as is_shipped
from step_workload import (LENGTHS, LORA_B_STD, METHOD_OF, MFU_METHODS, MODELS, PACK_LENGTH, REFERENCE_OF, _device,
                           _dtype, adapter_layers, loss_config)

_RECORDS: dict = {}


def summarize(a, results: dict, tflops: float | None, overhead: dict | None = None, plans: dict | None = None) -> dict:
    """Per variant: the fixed keys, ratios against its method's reference, the loss check, and (with `plans`, from
    repbend.plan.bench) the planned FLOPs per useful token and peak beside the measured ones."""
    rtol = a.loss_rtol if a.loss_rtol is not None else (1e-4 if _dtype(a.dtype, _device(a.device)).itemsize == 4
                                                        else 5e-2)
    table = {}
    for v, r in results.items():
        method = r.get("method") or METHOD_OF[v]
        ref = results.get(REFERENCE_OF[method], {})
        ref_ok = ref.get("status") == "ok"
        base = ref if ref_ok else results.get(method, {})
        base_loss = base.get("loss") if base.get("status") == "ok" else None
        e = {"method": method, "status": r.get("status"), "step_s": r.get("step_s"),
             "tokens_per_s": r.get("tokens_per_s"), "peak_mem_bytes": r.get("peak_mem_bytes"), "mfu": None,
             "mfu_vs_matmul": None, "loss": r.get("loss")}
        if e["tokens_per_s"] and r.get("n_params") and method in MFU_METHODS and a.device.startswith("cuda"):
            flops = 6 * r["n_params"] * e["tokens_per_s"]
            e["mfu"] = flops / (a.peak_tflops * 1e12)
            e["mfu_vs_matmul"] = flops / (tflops * 1e12) if tflops else None
        e["speedup_vs_reference"] = _ratio(e["tokens_per_s"], ref.get("tokens_per_s") if ref_ok else None)
        e["mem_vs_reference"] = _ratio(e["peak_mem_bytes"], ref.get("peak_mem_bytes") if ref_ok else None)
        e["loss_rel_diff"] = _loss_diff(r, base) if e["loss"] is not None and base_loss is not None else None
        e["loss_ok"] = None if e["loss_rel_diff"] is None else e["loss_rel_diff"] <= rtol
        e["positions_per_useful_32"] = (overhead or {}).get(v)
        plan, ref_plan = (plans or {}).get(v) or {}, (plans or {}).get(REFERENCE_OF[method]) or {}
        e["plan_flops_per_token"] = plan.get("flops_per_token")
        e["plan_flops_vs_reference"] = _ratio(plan.get("flops_per_token"), ref_plan.get("flops_per_token"))
        e["plan_peak_bytes"] = plan.get("peak_bytes")
        e["plan_kinds"] = plan.get("kinds")
        e["plan_error"] = plan.get("error")
        e.update(model=a.model, device=a.device, dtype=str(_dtype(a.dtype, _device(a.device))).replace("torch.", ""),
                 steps=a.steps, warmup=a.warmup, loss_rtol=rtol, reference=REFERENCE_OF[method],
                 flops_per_token=6 * r["n_params"] if r.get("n_params") and method in MFU_METHODS else None)
        for k in ("error", "terms", "tokens_per_step", "positions_per_pass", "step_s_all", "step_cpu_s",
                  "peak_mem_kind", "mem_before_steps", "phases_s", "attn", "checkpointing", "n_params", "threads",
                  "batch_size", "peak_reserved_bytes", "device_other_bytes", "device_total_bytes", "model_reused"):
            e[k] = r.get(k)
        table[v] = e
    return {v: table[v] for v in sorted(table, key=lambda v: _order(v, table))}


def _loss_diff(r: dict, base: dict) -> float:
    """The largest relative difference of the total and of every term both variants computed."""
    pairs = [(r["loss"], base["loss"])]
    terms, want = r.get("terms") or {}, base.get("terms") or {}
    pairs += [(terms[k], want[k]) for k in terms if terms[k] is not None and want.get(k) is not None]
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in pairs)


def _order(v: str, table: dict) -> tuple:
    """Grouped by method (in run order), each method's variants first, its reference last."""
    methods = list(dict.fromkeys(e["method"] for e in table.values()))
    m = table[v]["method"]
    return methods.index(m), v == REFERENCE_OF[m] or v.startswith("reference"), v


def _ratio(x, y):
    return x / y if x is not None and y else None


def format_table(a, table: dict, tflops: float | None) -> str:
    first = next(iter(table.values()))
    batches = sorted({(e["method"], e["batch_size"]) for e in table.values() if e.get("batch_size")})
    lines = [f"repbend bench: {a.model} on {a.device} ({first['dtype']}), B per set "
             + ", ".join(f"{m} {b}" for m, b in batches)
             + f", {a.warmup} warm-up + {a.steps} timed steps, seed {a.seed}"
             + (f", lengths x{a.scale:g}" if a.scale != 1 else "") + (f", {a.threads} threads" if a.threads else "")
             + (f", bf16 matmul {tflops:.0f} TFLOP/s" if tflops else "")
             + (f", MFU vs {a.peak_tflops:g} TFLOP/s peak" if a.device.startswith("cuda") else "")]
    cols = [  # (header, width, value, format)
        ("variant", -18, lambda e, v: v, "s"), ("status", -8, lambda e, v: e["status"], "s"),
        ("step s", 9, lambda e, v: e["step_s"], ".3f"), ("cpu s", 9, lambda e, v: e["step_cpu_s"], ".3f"),
        ("useful tok/s", 14, lambda e, v: e["tokens_per_s"], ",.0f"),
        ("x ref", 7, lambda e, v: e["speedup_vs_reference"], ".2f"),
        ("tok/step", 9, lambda e, v: e["tokens_per_step"], ",.0f"),
        ("pos/pass", 9, lambda e, v: e["positions_per_pass"], ",.0f"),
        ("peak GiB", 10, lambda e, v: None if e["peak_mem_bytes"] is None else e["peak_mem_bytes"] / 2**30, ".2f"),
        ("x ref", 7, lambda e, v: e["mem_vs_reference"], ".2f"),
        ("plan GiB", 9, lambda e, v: None if e.get("plan_peak_bytes") is None else e["plan_peak_bytes"] / 2**30,
         ".2f"),
        ("GFLOP/tok", 10, lambda e, v: None if e.get("plan_flops_per_token") is None
         else e["plan_flops_per_token"] / 1e9, ".3g"),
        ("x ref", 7, lambda e, v: e.get("plan_flops_vs_reference"), ".2f"), ("MFU", 7, lambda e, v: e["mfu"], ".1%"),
        ("vs mm", 7, lambda e, v: e["mfu_vs_matmul"], ".1%"),
        ("loss", 14, lambda e, v: e["loss"], ".8f"), ("rel diff", 9, lambda e, v: e["loss_rel_diff"], ".1e")]

    def cell(text, width):
        return text.ljust(-width) if width < 0 else text.rjust(width)
    lines.append("".join(cell(h, w) for h, w, _, _ in cols))
    method = None
    for v, e in table.items():
        if e["method"] != method and method is not None:
            lines.append("")
        method = e["method"]
        vals = [fn(e, v) for _, _, fn, _ in cols]
        lines.append("".join(cell("-" if x is None else format(x, fmt), w) for x, (_, w, _, fmt) in zip(vals, cols)))
    if any(e.get("positions_per_useful_32") for e in table.values()):
        lines.append("positions per pass / useful tokens over 32 micro-batches: " + ", ".join(
            f"{v} {e['positions_per_useful_32']:.2f}" for v, e in table.items() if e.get("positions_per_useful_32")))
    for m in dict.fromkeys(e["method"] for e in table.values()):
        ok = [e["loss_ok"] for e in table.values() if e["method"] == m and e["loss_ok"] is not None]
        verdict = "not checked (fewer than two losses)" if len(ok) < 2 else ("OK" if all(ok) else "MISMATCH")
        lines.append(f"loss agreement {m} (the total and each term at step 0, rtol {first['loss_rtol']:g}, against "
                     f"{REFERENCE_OF[m]}): {verdict}")
    total = {}  # the same micro-batches on both sides: the reference's summed step times over the variant's
    for v, e in table.items():
        ref = table.get(e.get("reference") or "", {})
        if v != e.get("reference") and e.get("step_s_all") and ref.get("step_s_all") and e["status"] == "ok":
            total[v] = sum(ref["step_s_all"]) / sum(e["step_s_all"])
    if total:
        lines.append("x ref over the timed steps' total time (the column's is of the median per-step rate): " + ", ".join(
            f"{v} {x:.2f}" for v, x in total.items()))
    fast = {v: e["tokens_per_s"] for v, e in table.items() if v.startswith("repbend") and e["tokens_per_s"]}
    if len(fast) > 1:
        lines.append(f"fastest repbend layout: {max(fast, key=fast.get)}")
    if any(e.get("plan_peak_bytes") for e in table.values()):
        lines.append("plan GiB, GFLOP/tok: repbend plan of the same variant, settings and micro-batches on fake tensors "
                     "(allocated bytes; FLOPs of the timed micro-batches, matmuls, attention and the fused ops)")
    if any(e.get("peak_reserved_bytes") for e in table.values()):
        lines.append("peak GiB is max_memory_allocated; reserved and the device's other use (context): " + ", ".join(
            f"{v} {e['peak_reserved_bytes'] / 2**30:.2f} + {e['device_other_bytes'] / 2**30:.2f}"
            for v, e in table.items() if e.get("peak_reserved_bytes")))
    for v, e in table.items():
        if e.get("error"):
            lines.append(f"{v}: {e['error'][:300]}")
        if e.get("plan_error"):
            lines.append(f"{v}: plan failed: {e['plan_error'][:300]}")
    return "\n".join(lines)


def plot(table: dict, path: Path, title: str) -> bool:
    """The bar chart; False (no file) where matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(table)
    fig, axes = plt.subplots(1, 2, figsize=(max(11, 1.4 * len(names) * 2), 4.2))
    for ax, key, ratio, label, scale in ((axes[0], "tokens_per_s", "speedup_vs_reference", "useful tokens / s", 1),
                                         (axes[1], "peak_mem_bytes", "mem_vs_reference", "peak memory (GiB)", 2**30)):
        vals = [(table[v][key] or 0) / scale if table[v]["status"] == "ok" else 0 for v in names]
        shipped = [is_shipped(v) for v in names]
        bars = ax.bar(names, vals, color=["tab:green" if s else "tab:gray" for s in shipped])
        for b, v in zip(bars, names):
            r = table[v][ratio]
            text = table[v]["status"] if table[v]["status"] != "ok" else ("" if r is None else f"{r:.2f}x")
            ax.annotate(text, (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom")
        ax.set_ylim(0, max(vals + [1e-9]) * 1.15)  # room for the labels
        ax.set_ylabel(label)
        ax.tick_params(axis="x", labelrotation=30)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_outputs(a, table: dict, tflops, text: str) -> None:
    out = Path(a.output)
    fixed = ("step_s", "tokens_per_s", "peak_mem_bytes", "mfu", "loss")
    (out / "results.json").write_text(json.dumps(table, indent=2))
    cols = ["variant", "method", "status", *fixed, "plan_peak_bytes", "plan_flops_per_token", "peak_reserved_bytes",
            "mfu_vs_matmul", "step_cpu_s", "speedup_vs_reference",
            "mem_vs_reference", "loss_rel_diff", "loss_ok", "tokens_per_step", "positions_per_pass",
            "positions_per_useful_32", "model", "device", "dtype", "batch_size", "steps", "warmup", "threads",
            "peak_mem_kind", "checkpointing", "attn"]
    with open(out / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for v, e in table.items():
            w.writerow({"variant": v, **e})
    n = MODELS[a.model].layers
    run = {"argv": vars(a), "bf16_matmul_tflops": tflops, "lengths": {k: asdict(d) for k, d in LENGTHS.items()},
           "model": asdict(MODELS[a.model]), "pack_length": PACK_LENGTH, "lora_b_std": LORA_B_STD,
           "recipes": {m: {**loss_config(m, n).to_dict(), "lora_layers": adapter_layers(m, n)}
                       for m in dict.fromkeys(METHOD_OF.values())},
           "mfu_formula": "6 * n_params * tokens_per_s / peak (mfu) or / bf16_matmul_tflops (mfu_vs_matmul); "
                          "n_params = decoder layers + final norm"}
    (out / "run.json").write_text(json.dumps(run, indent=2, default=str))
    (out / "table.txt").write_text(text + "\n")
    if not plot(table, out / "step_bench.png", text.splitlines()[0]):
        print("step_bench.png not written: matplotlib is not installed")


def jsonl_record(a, variant: str, r: dict | None, tflops: float | None, table: dict | None = None) -> None:
    """One line per finished variant (stage "step") in --jsonl, written at once; `variant` "summary" with the
    table: each variant's ratios and loss check."""
    if not a.jsonl:
        return
    from gpu_records import Records

    rec = _RECORDS.setdefault(a.jsonl, Records(a.jsonl, "step"))  # one clock for the run's lines
    if table is not None:
        keep = ("method", "status", "tokens_per_s", "peak_mem_bytes", "mfu", "mfu_vs_matmul", "speedup_vs_reference",
                "mem_vs_reference", "loss", "loss_rel_diff", "loss_ok", "positions_per_useful_32", "batch_size",
                "peak_reserved_bytes", "device_other_bytes", "plan_peak_bytes", "plan_flops_per_token",
                "plan_flops_vs_reference", "plan_kinds")
        rec.write(f"{a.model}/summary", "ok", bf16_matmul_tflops=tflops, peak_tflops=a.peak_tflops,
                  variants={v: {k: e.get(k) for k in keep} for v, e in table.items()})
        return
    status = {"ok": "ok", "oom": "oom", "skipped": "skipped", "timeout": "timeout"}.get(r.get("status"), "error")
    mfu = None
    if r.get("tokens_per_s") and r.get("n_params") and r.get("method") in MFU_METHODS and a.device.startswith("cuda"):
        mfu = 6 * r["n_params"] * r["tokens_per_s"] / (a.peak_tflops * 1e12)
    rec.write(f"{a.model}/{variant}", status, method=r.get("method"), tokens_per_s=r.get("tokens_per_s"), mfu=mfu,
              step_s=r.get("step_s"), peak_gib=None if r.get("peak_mem_bytes") is None else r["peak_mem_bytes"] / 2**30,
              loss=r.get("loss"), terms=r.get("terms"), n_params=r.get("n_params"), batch_size=r.get("batch_size"),
              tokens_per_step=r.get("tokens_per_step"), positions_per_pass=r.get("positions_per_pass"),
              attn=r.get("attn"), checkpointing=r.get("checkpointing"), bf16_matmul_tflops=tflops,
              peak_reserved_gib=None if r.get("peak_reserved_bytes") is None else r["peak_reserved_bytes"] / 2**30,
              device_other_gib=None if r.get("device_other_bytes") is None else r["device_other_bytes"] / 2**30,
              model_reused=r.get("model_reused"), error=r.get("error"))
