"""The outputs of benchmarks/bench_step.py: results.json / results.csv / table.txt with ratios against the
reference recipe, and the bar chart."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from dataclasses import asdict

from step_workload import LENGTHS, LORA_B_STD, MODELS, PACK_LENGTH, _device, _dtype, lora_layers, target_layers

def summarize(a, results: dict, tflops: float | None, overhead: dict | None = None) -> dict:
    """Per variant: the fixed keys, ratios against `reference` and the loss check."""
    ref = results.get("reference", {})
    base_loss = ref.get("loss") if ref.get("status") == "ok" else results.get("repbend", {}).get("loss")
    rtol = a.loss_rtol if a.loss_rtol is not None else (1e-4 if _dtype(a.dtype, _device(a.device)).itemsize == 4
                                                        else 5e-2)
    table = {}
    for v, r in results.items():
        e = {"status": r.get("status"), "step_s": r.get("step_s"), "tokens_per_s": r.get("tokens_per_s"),
             "peak_mem_bytes": r.get("peak_mem_bytes"), "mfu": None, "loss": r.get("loss")}
        flops_c = 6 + (2 if r.get("checkpointing") else 0)
        if tflops and e["tokens_per_s"]:
            e["mfu"] = flops_c * r["n_params"] * e["tokens_per_s"] / (tflops * 1e12)
        e["speedup_vs_reference"] = _ratio(e["tokens_per_s"], ref.get("tokens_per_s"))
        e["mem_vs_reference"] = _ratio(e["peak_mem_bytes"], ref.get("peak_mem_bytes") if ref.get("status") == "ok"
                                       else None)
        e["loss_rel_diff"] = (abs(e["loss"] - base_loss) / max(abs(base_loss), 1e-12)
                              if e["loss"] is not None and base_loss is not None else None)
        e["loss_ok"] = None if e["loss_rel_diff"] is None else e["loss_rel_diff"] <= rtol
        e["positions_per_useful_32"] = (overhead or {}).get(v)
        e.update(model=a.model, device=a.device, dtype=str(_dtype(a.dtype, _device(a.device))).replace("torch.", ""),
                 batch_size=a.batch_size, steps=a.steps, warmup=a.warmup, loss_rtol=rtol,
                 flops_per_token=flops_c * r["n_params"] if r.get("n_params") else None)
        for k in ("error", "terms", "tokens_per_step", "positions_per_pass", "step_s_all", "step_cpu_s",
                  "peak_mem_kind", "mem_before_steps", "phases_s", "attn", "checkpointing", "n_params", "threads"):
            e[k] = r.get(k)
        table[v] = e
    return table


def _ratio(x, y):
    return x / y if x is not None and y else None


def format_table(a, table: dict, tflops: float | None) -> str:
    first = next(iter(table.values()))
    lines = [f"repbend bench: {a.model} on {a.device} ({first['dtype']}), batch {a.batch_size} per set "
             f"(2B safe, 2B unsafe, B retain), {a.warmup} warm-up + {a.steps} timed steps, seed {a.seed}"
             + (f", lengths x{a.scale:g}" if a.scale != 1 else "") + (f", {a.threads} threads" if a.threads else "")
             + (f", bf16 matmul {tflops:.0f} TFLOP/s" if tflops else ""),
             ]
    cols = [  # (header, width, value, format)
        ("variant", -18, lambda e, v: v, "s"), ("status", -8, lambda e, v: e["status"], "s"),
        ("step s", 9, lambda e, v: e["step_s"], ".3f"), ("cpu s", 9, lambda e, v: e["step_cpu_s"], ".3f"),
        ("useful tok/s", 14, lambda e, v: e["tokens_per_s"], ",.0f"),
        ("x ref", 7, lambda e, v: e["speedup_vs_reference"], ".2f"),
        ("tok/step", 9, lambda e, v: e["tokens_per_step"], ",.0f"),
        ("pos/pass", 9, lambda e, v: e["positions_per_pass"], ",.0f"),
        ("peak GiB", 10, lambda e, v: None if e["peak_mem_bytes"] is None else e["peak_mem_bytes"] / 2**30, ".2f"),
        ("x ref", 7, lambda e, v: e["mem_vs_reference"], ".2f"), ("MFU", 7, lambda e, v: e["mfu"], ".1%"),
        ("loss", 14, lambda e, v: e["loss"], ".8f"), ("rel diff", 9, lambda e, v: e["loss_rel_diff"], ".1e")]

    def cell(text, width):
        return text.ljust(-width) if width < 0 else text.rjust(width)
    lines.append("".join(cell(h, w) for h, w, _, _ in cols))
    for v, e in table.items():
        vals = [fn(e, v) for _, _, fn, _ in cols]
        lines.append("".join(cell("-" if x is None else format(x, fmt), w) for x, (_, w, _, fmt) in zip(vals, cols)))
    if any(e.get("positions_per_useful_32") for e in table.values()):
        lines.append("positions per pass / useful tokens over 32 micro-batches: " + ", ".join(
            f"{v} {e['positions_per_useful_32']:.2f}" for v, e in table.items() if e.get("positions_per_useful_32")))
    ok = [e["loss_ok"] for e in table.values() if e["loss_ok"] is not None]
    verdict = "not checked (fewer than two losses)" if len(ok) < 2 else ("OK" if all(ok) else "MISMATCH")
    lines.append(f"loss agreement (rtol {first['loss_rtol']:g}): {verdict}")
    fast = {v: e["tokens_per_s"] for v, e in table.items() if v.startswith("repbend") and e["tokens_per_s"]}
    if fast:
        lines.append(f"fastest repbend layout: {max(fast, key=fast.get)}")
    for v, e in table.items():
        if e.get("error"):
            lines.append(f"{v}: {e['error'][:300]}")
    return "\n".join(lines)


def plot(table: dict, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(table)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, ratio, label, scale in ((axes[0], "tokens_per_s", "speedup_vs_reference", "useful tokens / s", 1),
                                         (axes[1], "peak_mem_bytes", "mem_vs_reference", "peak memory (GiB)", 2**30)):
        vals = [(table[v][key] or 0) / scale if table[v]["status"] == "ok" else 0 for v in names]
        bars = ax.bar(names, vals, color=["tab:green" if v.startswith("repbend") else "tab:gray" for v in names])
        for b, v in zip(bars, names):
            r = table[v][ratio]
            text = table[v]["status"] if table[v]["status"] != "ok" else ("" if r is None else f"{r:.2f}x")
            ax.annotate(text, (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom")
        ax.set_ylim(0, max(vals + [1e-9]) * 1.15)  # room for the labels
        ax.set_ylabel(label)
        ax.tick_params(axis="x", labelrotation=15)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(a, table: dict, tflops, text: str) -> None:
    out = Path(a.output)
    fixed = ("step_s", "tokens_per_s", "peak_mem_bytes", "mfu", "loss")
    (out / "results.json").write_text(json.dumps(table, indent=2))
    cols = ["variant", "status", *fixed, "step_cpu_s", "speedup_vs_reference", "mem_vs_reference", "loss_rel_diff",
            "loss_ok", "tokens_per_step", "positions_per_pass", "positions_per_useful_32", "model", "device", "dtype",
            "batch_size", "steps", "warmup", "threads", "peak_mem_kind", "checkpointing", "attn"]
    with open(out / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for v, e in table.items():
            w.writerow({"variant": v, **e})
    run = {"argv": vars(a), "bf16_matmul_tflops": tflops, "lengths": {k: asdict(d) for k, d in LENGTHS.items()},
           "model": asdict(MODELS[a.model]), "target_layers": target_layers(MODELS[a.model].layers),
           "lora_layers": lora_layers(MODELS[a.model].layers), "pack_length": PACK_LENGTH, "lora_b_std": LORA_B_STD,
           "mfu_formula": "(6 + 2 if checkpointing) * n_params * tokens_per_s / bf16_matmul_tflops"}
    (out / "run.json").write_text(json.dumps(run, indent=2, default=str))
    (out / "table.txt").write_text(text + "\n")
    plot(table, out / "step_bench.png", text.splitlines()[0])
