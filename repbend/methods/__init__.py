"""The training methods, one module each, and the registry that maps `loss.method` names to them.

    from repbend.methods import method_class, METHODS
    method_class("npo")            # -> repbend.methods.npo.NPO

Each module is loaded when its method is first asked for. A new method: a module here with a `Method` subclass
(repbend/methods/base.py says what it owns), and one line below.
"""
from __future__ import annotations

import difflib
import importlib

REGISTRY = {
    "repbend": "repbend.methods.repbend:RepBend",
    "circuit_breakers": "repbend.methods.circuit_breakers:CircuitBreakers",
    "rmu": "repbend.methods.rmu:RMU",
    "npo": "repbend.methods.npo:NPO",
    "dpo": "repbend.methods.dpo:DPO",
}
METHODS = tuple(REGISTRY)


def method_class(name: str):
    """The Method class registered as `name`; ConfigError naming `loss.method` for an unknown name."""
    if name not in REGISTRY:
        from ..errors import ConfigError
        close = difflib.get_close_matches(str(name), METHODS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"loss.method: unknown method {name!r}{hint}; methods are {', '.join(METHODS)}")
    module, _, cls = REGISTRY[name].partition(":")
    return getattr(importlib.import_module(module), cls)
