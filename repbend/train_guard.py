"""A run that trained nothing is not a success: the checks of `repbend.trainer.train` that turn such a run into a
`TrainingError` (exit code 2 from the command line) instead of exit 0 with an untrained or broken adapter.

Three rules, the same for every method (they read only the step records and the trained tensors):

1. Zero gradient at the start. When the gradient norm of the trained tensors is exactly 0 at each of the first
   `ZERO_GRAD_STEPS` optimizer steps of a run (or at each of its steps, when `train.max_steps` is smaller), the run
   stops at the end of that step: no weighted loss term has a gradient at the trained tensors' starting values, so
   no later step can have one either (Adam moves nothing without a gradient). Typical causes: the loss weights of
   every term that has a gradient at the start are 0, or the terms read no layer a trained tensor influences.
   The count of such leading steps is kept in each checkpoint (`zero_grad_steps`), so a resume continues it.
2. Ending on skipped steps. When the last step of a run was skipped (a non-finite loss or gradient, fewer than
   `train.max_bad_steps` in a row, so the run went on), the run ends non-zero after writing its adapter: the
   weights are those of the last applied step, and a divergence that lasted to the end did not recover.
3. Unchanged tensors. When a run that took at least one step ends with every trained tensor bitwise equal to
   where this run started (after its resume, if any), it ends non-zero after writing its adapter: e.g. a zero
   learning rate throughout (warm-up from 0 over every step) or a skipped step everywhere.

In rules 2 and 3 the checkpoints and the adapter stay on disk for inspection.
"""
from __future__ import annotations

import torch

ZERO_GRAD_STEPS = 3
_BOOKKEEPING = {"step", "lr", "grad_norm", "skipped", "tokens", "padded_positions", "tokens_per_s", "step_s",
                "peak_mem_bytes", "eval"}


def _local(p: torch.Tensor) -> torch.Tensor:
    """This rank's values of a parameter (its shard under FSDP2), detached."""
    p = p.detach()
    return p.to_local() if hasattr(p, "to_local") else p


class TrainingGuard:
    """Watches one call of `train`: `after_step` once per optimizer step, `at_end` once after the adapter is written.
    Both return None or the one-line reason the run failed (the caller raises `TrainingError` with it).

    `params`: the trained tensors (as optimised), snapshot now on the CPU; `step`: the step the run starts from (0,
    or the checkpoint's); `zero_grad_steps`: the leading steps of zero gradient so far (from the checkpoint)."""

    def __init__(self, params, step: int, zero_grad_steps: int, max_steps: int, max_bad_steps: int, out):
        self.params = list(params)
        self.start = [_local(p).to("cpu", copy=True) for p in self.params]
        self.first_step = step
        self.zero_grad_steps = zero_grad_steps
        self.window = min(ZERO_GRAD_STEPS, max_steps)
        self.max_bad_steps = max_bad_steps
        self.out = out
        self.applied = 0
        self.last_applied_step = None

    def after_step(self, record: dict) -> str | None:
        """Account for the step `record` (a log.jsonl row); the reason to stop now, if any."""
        step, skipped = record["step"], record["skipped"]
        if not skipped:
            self.applied += 1
            self.last_applied_step = step
        if self.zero_grad_steps == step - 1 and not skipped and record["grad_norm"] == 0.0:
            self.zero_grad_steps = step
        if self.zero_grad_steps == step == self.window:
            terms = ", ".join(f"{k} {v:.4g}" for k, v in record.items()
                              if k not in _BOOKKEEPING and isinstance(v, (int, float)) and not isinstance(v, bool))
            span = "step 1" if step == 1 else f"steps 1-{step}"
            return (f"nothing can train: the gradient of the trained tensors is exactly 0 at {span} (step {step}: "
                    f"{terms}), so no weighted loss term has a gradient at their starting values and no later step "
                    "would have one. Likely causes: the weights of the terms that have a gradient at the start are "
                    "0, or the terms read no layer a trained tensor influences (docs/method.md); the checkpoints "
                    f"so far are in {self.out}")
        return None

    def at_end(self, step: int, bad_in_row: int, any_of) -> str | None:
        """The reason the run that ended at `step` failed, if it did. `any_of(flag)` combines a per-rank flag (the
        tensors of a sharded model are compared shard by shard)."""
        if step == self.first_step:
            return None  # no step ran in this call (a resume at train.max_steps)
        if bad_in_row:
            first = step - bad_in_row + 1
            weights = (f"those of step {first - 1}" if first > 1 else "the untrained starting weights")
            return (f"the run ended on {bad_in_row} skipped step{'s' if bad_in_row > 1 else ''} (steps {first}-{step} "
                    f"had a non-finite loss or gradient, fewer in a row than train.max_bad_steps = "
                    f"{self.max_bad_steps}): the saved weights are {weights}, not those of a finished run. Likely "
                    "causes: a learning rate or loss weight far too large, or a non-finite setting or input; the "
                    f"adapter and checkpoints are kept in {self.out}")
        changed = any(not torch.equal(_local(p).cpu(), s) for p, s in zip(self.params, self.start))
        if not any_of(changed):
            ran = step - self.first_step
            return (f"nothing was trained: {ran} step{'s' if ran > 1 else ''} ran ({self.applied} applied) and every "
                    "trained tensor ended exactly where it started. Likely causes: a zero learning rate (warm-up "
                    "from 0 over every step), loss weights of 0, or terms without gradient; the adapter and "
                    f"checkpoints are kept in {self.out}")
        return None
