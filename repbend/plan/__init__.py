"""`repbend plan`: a training step at real shapes on any machine, under FakeTensorMode (no weights, no GPU).

For a model (a known shape, an HF config or a recipe's model), a method, a batch and a GPU count, each variant of the
step benchmark (the shipped step and the method's reference re-creation, `benchmarks/step_workload.py`) runs a few
micro-batches on fake tensors while `StepMeter` counts the live bytes and the FLOPs: peak memory per GPU by kind,
FLOPs per useful token (the fused ops' own included), positions per useful token, and tokens/s at a stated MFU.

    repbend plan --model llama3-8b --method repbend --batch-size 4 --gpu-mem 24
    repbend plan --model llama3-70b --gpus 8 --distributed.strategy fsdp --json

Modules: meter.py (live bytes and FLOPs), fused.py (the fused ops' FLOPs and buffers), fake.py (fake model, bounded
value-dependent sizes), workload.py (models and the benchmark's step), run.py (one planned variant), report.py (the
table, the JSON and the verdict), cli.py (the command).
"""
from .run import Setup, VariantPlan, plan_variant

__all__ = ["Setup", "VariantPlan", "plan_variant"]
