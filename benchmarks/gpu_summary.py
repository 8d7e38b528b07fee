"""The report of benchmarks/gpu_check.sh, from its results.jsonl alone (so it can be rebuilt from a cut run):

    python benchmarks/gpu_summary.py OUT/results.jsonl [--dry-run] [--out FILE]

Prints, per stage, what passed and what did not (each non-ok line with its reason), the step table of every model
measured, and last the goal table:
  speed    repbend's useful tokens/s >= 4 x the reference re-creation's (the llama3-8b step)
  memory   repbend's peak GPU memory < 24 GiB (same step)
  MFU      repbend's 6 * N * tokens/s / 989e12 >= 40% (N = decoder parameters; also shown against the measured
           8192^3 bf16 matmul)
  kernel   rep_distance forward + backward >= 80% of a device copy's bandwidth (L = 11, D = 4096, ~16k positions,
           bf16, 1/5 selected): bench_kernels.py's figure, else gpu_kernels.py's own
each with its measured value and PASS / FAIL / NOT RUN (why). A dry run (CPU) measures nothing that counts: its goals
are NOT RUN.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

STAGES = ("env", "parity", "attention", "kernels", "step", "dist", "flex", "kernel_tests")  # gpu_check.sh's order
GOAL_MODEL = "llama3-8b"


def load(path: Path) -> list[dict]:
    out = []
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line cut by a kill
    return out


def stage_lines(lines: list[dict]) -> list[str]:
    """A row per stage (its results by status, exit code and seconds from its stage_end line), then every result
    that is not ok, with its reason."""
    by, ends = defaultdict(list), {}
    for x in lines:
        if x["name"] == "stage_end":
            ends[x["stage"]] = x
        else:
            by[x["stage"]].append(x)
    text = ["stage           ok  fail  error  oom  skip  t/o     exit    time"]
    for st in list(STAGES) + [s for s in list(by) + list(ends) if s not in STAGES]:
        xs, end = by.get(st, []), ends.get(st)
        if not xs and end is None:
            continue
        n = {k: sum(x["status"] == k for x in xs) for k in ("ok", "fail", "error", "oom", "skipped", "timeout")}
        exit_code = "-" if end is None else str(end.get("exit"))
        secs = "-" if end is None else f"{end.get('t', 0)} s"
        text.append(f"{st:14s}{n['ok']:4d}{n['fail']:6d}{n['error']:7d}{n['oom']:5d}{n['skipped']:6d}"
                    f"{n['timeout']:5d}{exit_code:>9s}{secs:>8s}")
    for x in lines:
        if x["name"] != "stage_end" and x["status"] not in ("ok", "skipped"):
            why = x.get("problems") or x.get("error") or ""
            text.append(f"  {x['status'].upper()} {x['stage']}/{x['name']}: {str(why)[:400]}")
    for x in lines:
        if x["status"] == "skipped":
            text.append(f"  skipped {x['stage']}/{x['name']}: {x.get('error', '')}")
    return text


def step_tables(lines: list[dict]) -> list[str]:
    text = []
    for x in lines:
        if x["stage"] != "step" or not x["name"].endswith("/summary"):
            continue
        model = x["name"].split("/")[0]
        tf = x.get("bf16_matmul_tflops")
        text.append(f"step {model}" + (f" (bf16 matmul {tf:.0f} TFLOP/s)" if isinstance(tf, (int, float)) else ""))
        text.append(f"  {'variant':18s}{'status':8s}{'tok/s':>12s}{'x ref':>8s}{'GiB':>8s}{'x ref':>7s}{'MFU':>7s}"
                    f"{'vs mm':>7s}{'reserved':>10s}{'+other':>8s}{'plan GiB':>10s}{'GFLOP/tok':>11s}  loss check")
        for v, e in x["variants"].items():
            def f(key, fmt):
                val = e.get(key)
                return format(val, fmt) if isinstance(val, (int, float)) else "-"
            gib = e["peak_mem_bytes"] / 2**30 if isinstance(e.get("peak_mem_bytes"), (int, float)) else None
            check = {True: "ok", False: "MISMATCH", None: "-"}[e.get("loss_ok")]

            def g(key, scale=2**30, fmt=".2f"):
                val = e.get(key)
                return format(val / scale, fmt) if isinstance(val, (int, float)) else "-"
            text.append(f"  {v:18s}{e['status']:8s}{f('tokens_per_s', ',.0f'):>12s}"
                        f"{f('speedup_vs_reference', '.2f'):>8s}{'-' if gib is None else format(gib, '.2f'):>8s}"
                        f"{f('mem_vs_reference', '.2f'):>7s}{f('mfu', '.1%'):>7s}{f('mfu_vs_matmul', '.1%'):>7s}"
                        f"{g('peak_reserved_bytes'):>10s}{g('device_other_bytes'):>8s}{g('plan_peak_bytes'):>10s}"
                        f"{g('plan_flops_per_token', 1e9, '.3g'):>11s}  {check}")
    if not text:  # the stage was cut before its summary: the per-variant lines
        for x in lines:
            if x["stage"] == "step" and not x["name"].endswith("/summary"):
                text.append(f"step {x['name']}: {x['status']} tok/s {x.get('tokens_per_s')} GiB {x.get('peak_gib')} "
                            f"loss {x.get('loss')}")
    return text


def kernel_figure(lines: list[dict]) -> tuple[float | None, str]:
    """rep_distance fwd+bwd as a fraction of the copy, and where it comes from."""
    for x in lines:
        if (x["stage"] == "kernels" and x.get("source") == "bench_kernels" and x["status"] == "ok"
                and x.get("provider") == "triton" and x.get("mode") == "full" and x.get("L") == 11
                and x.get("D") == 4096 and x.get("BT") == 16384
                and isinstance(x.get("mode_frac_copy_bw"), (int, float))):
            return x["mode_frac_copy_bw"], f"bench_kernels.py, N={x.get('N')} of {x.get('BT')} positions"
    for x in lines:
        if x["stage"] == "kernels" and x["name"] == "rep_distance/triton" and x["status"] == "ok":
            kernel = x.get("kernel_fwd_bwd_frac_copy")
            return x["fwd_bwd_frac_copy"], (f"gpu_kernels.py, N={x.get('N')} of {x.get('positions')} positions, "
                                            f"{x.get('fwd_bwd_gbps', 0):.0f} GB/s back to back"
                                            + (f"; kernels alone {kernel:.0%}" if isinstance(kernel, float) else ""))
    return None, "no fwd+bwd figure for the Triton kernel"


def goals(lines: list[dict], dry_run: bool) -> list[tuple[str, str, str, str]]:
    """(goal, target, measured, verdict)."""
    summary = next((x for x in lines if x["stage"] == "step" and x["name"] == f"{GOAL_MODEL}/summary"), None)
    variants = summary["variants"] if summary else {}
    rb, ref = variants.get("repbend", {}), variants.get("reference", {})
    if not summary:  # a cut run: the per-variant lines
        for x in lines:
            if x["stage"] == "step" and x["name"] in (f"{GOAL_MODEL}/repbend", f"{GOAL_MODEL}/reference"):
                d = {"status": x["status"], "tokens_per_s": x.get("tokens_per_s"), "mfu": x.get("mfu"),
                     "peak_mem_bytes": None if x.get("peak_gib") is None else x["peak_gib"] * 2**30}
                (rb if x["name"].endswith("/repbend") else ref).update(d)
    out = []

    def verdict(value, ok, why_missing):
        if dry_run:
            return "NOT RUN (dry run)"
        if value is None:
            return f"NOT RUN ({why_missing})"
        return "PASS" if ok(value) else "FAIL"

    missing = "no llama3-8b repbend step" if rb.get("status") != "ok" else ""
    speed = (rb["tokens_per_s"] / ref["tokens_per_s"] if rb.get("tokens_per_s") and ref.get("tokens_per_s")
             else None)
    why = missing or f"reference {ref.get('status', 'not run')}"
    out.append(("speed vs reference", ">= 4x", "-" if speed is None else f"{speed:.2f}x ({rb['tokens_per_s']:,.0f} "
                f"vs {ref['tokens_per_s']:,.0f} tok/s)", verdict(speed, lambda v: v >= 4, why)))
    gib = rb["peak_mem_bytes"] / 2**30 if isinstance(rb.get("peak_mem_bytes"), (int, float)) else None
    card = None  # what a card must hold: the allocator's peak reservation and the rest of the device's use
    if isinstance(rb.get("peak_reserved_bytes"), (int, float)) and isinstance(rb.get("device_other_bytes"),
                                                                             (int, float)):
        card = (rb["peak_reserved_bytes"] + rb["device_other_bytes"]) / 2**30
    plan = rb["plan_peak_bytes"] / 2**30 if isinstance(rb.get("plan_peak_bytes"), (int, float)) else None
    shown = "-" if gib is None else (f"{gib:.2f} GiB allocated" + (f", {card:.2f} GiB on the card (reserved + "
                                                                   "context)" if card is not None else "")
                                     + (f"; plan {plan:.2f} GiB" if plan is not None else ""))
    value = card if card is not None else gib
    out.append(("peak memory", "< 24 GiB", shown,
                verdict(value if rb.get("status") == "ok" else None, lambda v: v < 24, missing or "no figure")))
    mfu = rb.get("mfu")
    mm = rb.get("mfu_vs_matmul")
    out.append(("MFU (989 TFLOP/s)", ">= 40%", "-" if mfu is None else f"{mfu:.1%}" + (
        f" ({mm:.1%} of the measured matmul)" if mm else ""), verdict(mfu, lambda v: v >= 0.40, missing or "no MFU")))
    frac, src = kernel_figure(lines)
    out.append(("rep_distance fwd+bwd", ">= 80% of copy", "-" if frac is None else f"{frac:.0%} ({src})",
                verdict(frac, lambda v: v >= 0.80, src)))
    return out


def report(lines: list[dict], dry_run: bool) -> str:
    env = next((x for x in lines if x["stage"] == "env"), {})
    text = ["################ gpu_check summary ################"]
    if env:
        text.append("environment: " + ", ".join(f"{k} {v}" for k, v in env.items()
                                                 if k not in ("stage", "name", "status", "t")))
    text += stage_lines(lines)
    text += [""] + step_tables(lines)
    rows = [("goal", "target", "measured", "verdict")] + goals(lines, dry_run)
    widths = [max(len(r[i]) for r in rows) + 2 for i in range(3)]
    text.append("")
    text += ["".join(c.ljust(w) for c, w in zip(r[:3], widths)) + r[3] for r in rows]
    return "\n".join(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("jsonl")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--out", default=None, help="also write the report here")
    a = p.parse_args(argv)
    text = report(load(Path(a.jsonl)), a.dry_run)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
