"""repbend.loss: the RepBend loss (and the Circuit Breakers and RMU baselines) as a library.

    from repbend.loss import RepBendLoss, LossConfig, Sequence, MicroBatch

See `repbend.loss.module` for the calling sequence and docs/method.md for what each term computes. This package
imports no data readers, no CLI and no evaluation code; names load lazily, so `repbend.loss.types` and
`repbend.loss.config` stay cheap to import.
"""
__all__ = ["RepBendLoss", "LossConfig", "LossTerms", "Sequence", "MicroBatch", "StepBatch"]

_WHERE = {"RepBendLoss": "module", "LossConfig": "config", "LossTerms": "terms", "Sequence": "types",
          "MicroBatch": "types", "StepBatch": "batch"}


def __getattr__(name):
    if name in _WHERE:
        import importlib
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
