"""The plan's outputs: a table of each variant (memory per GPU by kind, FLOPs and positions per useful token,
tokens/s at the stated MFU, ratios against the method's reference re-creation), the verdict for a GPU memory size,
and the same as JSON.

Fitting a card: the planned peak is what `torch.cuda.max_memory_allocated` would report. A card also holds the
CUDA context and library workspaces (CUDA_OVERHEAD_GIB) and the caching allocator's unused parts of its blocks
(ALLOCATOR_SLACK of the peak): a config "fits" when peak x (1 + ALLOCATOR_SLACK) + CUDA_OVERHEAD_GIB <= --gpu-mem.
Both are estimates until a GPU measures them (benchmarks/gpu_check.sh prints allocated and reserved beside this
prediction).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from .run import KINDS, VariantPlan

GIB = 2 ** 30
CUDA_OVERHEAD_GIB = 0.75
ALLOCATOR_SLACK = 0.05


def needed_bytes(peak: int) -> float:
    """What a card must hold for a planned allocated peak (module docstring)."""
    return peak * (1 + ALLOCATOR_SLACK) + CUDA_OVERHEAD_GIB * GIB


@dataclass
class Verdict:
    gpu_mem_gib: float
    needed_gib: float
    fits: bool
    advice: list[str] = field(default_factory=list)


@dataclass
class Report:
    settings: dict
    variants: dict[str, VariantPlan]
    reference_of: dict[str, str]         # variant -> its method's reference variant (when planned)
    mfu: float
    peak_tflops: float
    verdict: Verdict | None = None

    def tokens_per_s(self, v: VariantPlan) -> float:
        """Useful tokens/s per GPU at the stated MFU: mfu x peak FLOP/s / (FLOPs per useful token)."""
        return self.mfu * self.peak_tflops * 1e12 / v.flops_per_token

    def ratio(self, variant: str, key) -> float | None:
        ref = self.variants.get(self.reference_of.get(variant, ""))
        if ref is None:
            return None
        return key(self.variants[variant]) / key(ref)

    def to_json(self) -> dict:
        out = {"settings": self.settings, "mfu": self.mfu, "peak_tflops": self.peak_tflops,
               "verdict": asdict(self.verdict) if self.verdict else None, "variants": {}}
        for name, v in self.variants.items():
            out["variants"][name] = {
                **asdict(v), "flops_per_token": v.flops_per_token, "positions_per_token": v.positions_per_token,
                "tokens_per_s_per_gpu": self.tokens_per_s(v), "reference": self.reference_of.get(name),
                "flops_vs_reference": self.ratio(name, lambda x: x.flops_per_token),
                "memory_vs_reference": self.ratio(name, lambda x: x.peak_bytes)}
        return out

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2, default=str)

    def table(self) -> str:
        s = self.settings
        lines = [f"repbend plan: {s['model']}, {s['method']}, batch {s['batch_size']} per set, {s['gpus']} GPU(s)"
                 f" {s['strategy']}, {s['dtype']} on {s['device']}, checkpointing {'on' if s['checkpointing'] else 'off'}"
                 f", packing {s['pack_length'] or 'off'}, {s['steps']} micro-batch(es) (seed {s['seed']});"
                 f" tokens/s at {self.mfu:.0%} MFU of {self.peak_tflops:g} TFLOP/s",
                 "peak memory per GPU (GiB, allocated) by kind, FLOPs and positions per useful token:"]
        cols = [("variant", -16), ("peak", 7)] + [(k[:6] if k != "parameters" else "params", 7) for k in KINDS] + [
            ("GFLOP/tok", 10), ("pos/tok", 8), ("tok/s/GPU", 10), ("xFLOP", 6), ("xmem", 6)]

        def cell(text, width):
            return text.ljust(-width) if width < 0 else text.rjust(width)
        lines.append("".join(cell(h, w) for h, w in cols))
        for name, v in self.variants.items():
            vals = [name, f"{v.peak_bytes / GIB:.2f}"] + [f"{v.kinds[k] / GIB:.2f}" for k in KINDS] + [
                f"{v.flops_per_token / 1e9:.1f}", f"{v.positions_per_token:.2f}", f"{self.tokens_per_s(v):,.0f}"]
            for key in (lambda x: x.flops_per_token, lambda x: x.peak_bytes):
                r = self.ratio(name, key)
                vals.append("-" if r is None or self.reference_of.get(name) == name else f"{r:.2f}")
            lines.append("".join(cell(x, w) for x, (_, w) in zip(vals, cols)))
        for name, v in self.variants.items():
            if v.uncounted_ops:
                lines.append(f"{name}: no FLOP formula for {', '.join(v.uncounted_ops)} (not counted)")
        if self.verdict:
            vd = self.verdict
            lines.append(f"fits {vd.gpu_mem_gib:g} GiB: {'yes' if vd.fits else 'NO'} (needs about "
                         f"{vd.needed_gib:.1f} GiB: peak x {1 + ALLOCATOR_SLACK:g} + {CUDA_OVERHEAD_GIB:g} GiB of "
                         "CUDA context and workspaces)")
            lines += [f"  {a}" for a in vd.advice]
        return "\n".join(lines)


def combined_table(reports: list[Report]) -> str:
    """One row per planned variant of several methods (`repbend plan --method all`)."""
    first = reports[0].settings
    lines = [f"repbend plan: {first['model']}, {first['gpus']} GPU(s) {first['strategy']}, {first['dtype']} on "
             f"{first['device']}, checkpointing {'on' if first['checkpointing'] else 'off'}, packing "
             f"{first['pack_length'] or 'off'}, {first['steps']} micro-batch(es) (seed {first['seed']}); tokens/s "
             f"per GPU at {reports[0].mfu:.0%} MFU of {reports[0].peak_tflops:g} TFLOP/s",
             "| method | variant | batch | peak GiB/GPU | params | activations | reference | temporaries | GFLOP/token "
             "| positions/token | tokens/s/GPU | x FLOPs | x memory |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for rep in reports:
        for name, v in rep.variants.items():
            ratio = [rep.ratio(name, k) for k in (lambda x: x.flops_per_token, lambda x: x.peak_bytes)]
            own_ref = rep.reference_of.get(name) == name
            cells = [rep.settings["method"], name, str(rep.settings["batch_size"]), f"{v.peak_bytes / GIB:.2f}",
                     f"{v.kinds['parameters'] / GIB:.2f}", f"{v.kinds['activations'] / GIB:.2f}",
                     f"{v.kinds['reference'] / GIB:.2f}", f"{v.kinds['temporaries'] / GIB:.2f}",
                     f"{v.flops_per_token / 1e9:.1f}", f"{v.positions_per_token:.2f}", f"{rep.tokens_per_s(v):,.0f}"]
            cells += ["-" if r is None or own_ref else f"{r:.2f}" for r in ratio]
            lines.append("| " + " | ".join(cells) + " |")
    for rep in reports:
        if rep.verdict:
            vd = rep.verdict
            lines.append(f"{rep.settings['method']}: fits {vd.gpu_mem_gib:g} GiB: {'yes' if vd.fits else 'NO'} (needs "
                         f"about {vd.needed_gib:.1f} GiB)" + "".join(f"; {a}" for a in vd.advice))
    return "\n".join(lines)
