"""`StepMeter`: the live tensor bytes and the FLOPs of everything run under it (a TorchDispatchMode).

Memory: every tensor an op returns is looked up by its storage; a storage not seen before counts its bytes from
that moment until a weakref finalizer on the storage says it died. Views and in-place results share their
storage and add nothing. The meter keeps an event log (each birth and death numbered), so the set of storages
live at the peak is known after the fact, and each one gets the kind of the phase that allocated it
(`mark(phase)` names the allocations since the previous mark, as `benchmarks/step_variants.Phases` does for its
timers). Storages alive when the meter starts (the model's weights, adapters, frozen copies) are the `model`.
A fused op whose fake implementation cannot show its internal buffers declares them (`repbend.plan.fused`): they
count as live for the duration of the op, as "temporaries".

FLOPs: torch's own formulas (`torch.utils.flop_counter.flop_registry`: mm, addmm, bmm, the attention kernels),
formulas for the CPU flash-attention ops it lacks, and each fused op's formula (`repbend.plan.fused`), per op and
per phase. Ops of the `repbend` namespace without a formula are listed in `uncounted`. A multiply-add is 2 FLOPs.

Under FakeTensorMode nothing is computed or allocated: the meter counts what a device would hold, in bytes of
each tensor's storage (`untyped_storage().nbytes()`), without the caching allocator's rounding.
"""
from __future__ import annotations

import weakref
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from .fused import FUSED, extra_flop_formulas

MODEL = "model"


@dataclass
class _Alloc:
    nbytes: int
    born: int
    died: int | None = None
    phase: str | None = None
    op: str | None = None
    shape: tuple = ()


@dataclass
class Peak:
    """The largest live total: `bytes` at event `event`, of which `transient` were a fused op's internal buffers
    (`transient_op`)."""
    bytes: int = 0
    event: int = 0
    transient: int = 0
    transient_op: str | None = None


@dataclass
class MeterReport:
    peak_bytes: int
    peak_by_phase: dict[str, int]       # live bytes at the peak by the phase that allocated them (+ "model")
    peak_transient: tuple[str | None, int]
    flops: int
    flops_by_phase: dict[str, int]
    flops_by_op: dict[str, int]
    uncounted: list[str] = field(default_factory=list)


class StepMeter(TorchDispatchMode):
    """Live bytes (by weakref finalizers on storages) and FLOPs of the ops run under this mode.

        meter = StepMeter()
        meter.adopt(model.parameters())           # what exists already: the model
        with fake_mode, meter:
            ...; meter.mark("forward"); ...; meter.mark("backward")
        report = meter.report()
    """

    def __init__(self):
        super().__init__()
        self.events = 0
        self.live = 0
        self.peak = Peak()
        self.allocs: list[_Alloc] = []
        self._uid = WeakIdKeyDictionary()
        self._pending: list[int] = []
        self._pending_flops = 0
        self.flops_by_phase: dict[str, int] = defaultdict(int)
        self.flops_by_op: dict[str, int] = defaultdict(int)
        self.uncounted: set[str] = set()
        self.grad_uids: set[int] = set()
        self.formulas = dict(flop_registry)
        self.formulas.update(extra_flop_formulas())

    # ------------------------------------------------------------ memory
    def adopt(self, tensors, phase: str = MODEL) -> None:
        """Count tensors that exist already (a model's parameters and buffers) as live, named `phase`."""
        for t in tensors:
            if isinstance(t, torch.Tensor):
                uid = self._track(t)
                if uid is not None and self.allocs[uid].phase is None:
                    self.allocs[uid].phase = phase
        self._pending = [u for u in self._pending if self.allocs[u].phase is None]

    def uid_of(self, t: torch.Tensor) -> int | None:
        """The meter's id of `t`'s storage (None when not tracked)."""
        return self._uid.get(t.untyped_storage())

    def _track(self, t: torch.Tensor, op: str | None = None) -> int | None:
        st = t.untyped_storage()
        uid = self._uid.get(st)
        if uid is not None:
            return uid
        uid = len(self.allocs)
        self.events += 1
        n = int(st.nbytes())
        self.allocs.append(_Alloc(n, self.events, op=op, shape=tuple(t.shape)))
        self._uid[st] = uid
        weakref.finalize(st, self._free, uid)
        self.live += n
        self._pending.append(uid)
        return uid

    def _free(self, uid: int) -> None:
        a = self.allocs[uid]
        self.events += 1
        a.died = self.events
        self.live -= a.nbytes

    def _check_peak(self, transient: int = 0, op: str | None = None) -> None:
        if self.live + transient > self.peak.bytes:
            self.peak = Peak(self.live + transient, self.events, transient, op if transient else None)

    def mark(self, phase: str) -> None:
        """Name the allocations (and FLOPs) since the previous mark."""
        for uid in self._pending:
            if self.allocs[uid].phase is None:
                self.allocs[uid].phase = phase
        self._pending = []
        self.flops_by_phase[phase] += self._pending_flops
        self._pending_flops = 0

    def note_gradients(self, params) -> None:
        """Remember which storages are parameters' .grad (call after the backward)."""
        for p in params:
            if p.grad is not None:
                uid = self.uid_of(p.grad)
                if uid is not None:
                    self.grad_uids.add(uid)

    def reset_peak(self) -> Peak:
        """Start a new peak from the live bytes now; returns the previous one."""
        old, self.peak = self.peak, Peak(self.live, self.events)
        return old

    # ------------------------------------------------------------ dispatch
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        formula = self.formulas.get(packet)
        name = str(packet)
        if formula is not None:
            flops = int(formula(*args, **kwargs, out_val=out))
            self._pending_flops += flops
            self.flops_by_op[name] += flops
        elif name.startswith("repbend."):
            self.uncounted.add(name)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t, name)
        cost = FUSED.get(name)
        self._check_peak(cost.transient_bytes(args, kwargs) if cost else 0, name)
        return out

    # ------------------------------------------------------------ results
    def live_at(self, event: int) -> list[_Alloc]:
        return [a for a in self.allocs if a.born <= event and (a.died is None or a.died > event)]

    def live_bytes(self, phase: str, born_after: int = 0) -> int:
        """Bytes live now that `phase` allocated after event `born_after`."""
        return sum(a.nbytes for a in self.allocs if a.died is None and a.phase == phase and a.born > born_after)

    def breakdown(self, peak: Peak) -> dict[str, int]:
        """The bytes live at `peak` by allocating phase (call after the last `mark`); parameters' gradients are
        "gradients", a fused op's internal buffers "fused op buffers"."""
        by_phase: dict[str, int] = defaultdict(int)
        for uid, a in enumerate(self.allocs):
            if a.born <= peak.event and (a.died is None or a.died > peak.event):
                by_phase["gradients" if uid in self.grad_uids else (a.phase or "unmarked")] += a.nbytes
        if peak.transient:
            by_phase["fused op buffers"] += peak.transient
        return dict(by_phase)

    def largest(self, peak: Peak, n: int = 10) -> list[tuple[int, str, str, tuple]]:
        """The `n` largest storages live at `peak`: (bytes, phase, op, shape)."""
        live = [a for a in self.allocs if a.born <= peak.event and (a.died is None or a.died > peak.event)]
        live.sort(key=lambda a: -a.nbytes)
        return [(a.nbytes, a.phase, a.op, a.shape) for a in live[:n]]

    def report(self, peak: Peak | None = None) -> MeterReport:
        """Call after the last `mark`: the peak's (default: the largest) bytes by allocating phase, and the FLOPs."""
        peak = peak or self.peak
        if self._pending_flops:
            self.flops_by_phase["unmarked"] += self._pending_flops
            self._pending_flops = 0
        return MeterReport(peak.bytes, self.breakdown(peak), (peak.transient_op, peak.transient),
                           sum(self.flops_by_op.values()), dict(self.flops_by_phase), dict(self.flops_by_op),
                           sorted(self.uncounted))
