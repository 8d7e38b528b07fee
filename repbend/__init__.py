"""repbend: Representation Bending (Yousefpour et al., ACL 2025) with one model and two passes a step.

    from repbend import RepBendConfig, train

Attributes load lazily so that `import repbend.kernels` stays free of transformers and peft.
"""
__version__ = "0.1.0"
__all__ = ["RepBendConfig", "train", "TrainResult"]


def __getattr__(name):
    if name == "RepBendConfig":
        from .config import RepBendConfig
        return RepBendConfig
    if name in ("train", "TrainResult"):
        from . import trainer as _train_module
        return getattr(_train_module, name)
    raise AttributeError(f"module 'repbend' has no attribute {name!r}")
