"""`LossConfig`: which method to train and that method's own settings (the `loss` group of a run's config).

    LossConfig(method="repbend", mode="response_all", alpha=0.5, beta=0.5, gamma=0.1, epsilon=0.3, eta=0.0,
               alpha_mode="all", target_layers="20-30", temperature=2.0)
    LossConfig(method="npo", npo_beta=0.1, npo_alpha=1.0, npo_gamma=0.1, temperature=2.0)

`method` picks a class of the method registry (`repbend.methods`); every other key is one of that method's
settings (its `Settings` dataclass: typed, documented and checked when built, `repbend.config_fields`). A key of
another method is an error naming the method it belongs to. Attributes read through: `cfg.alpha` is
`cfg.settings.alpha`. docs/method.md states what every method computes.
"""
from __future__ import annotations

import dataclasses
import difflib

from ..errors import ConfigError


class LossConfig:
    NAME = "loss"

    def __init__(self, method: str = "repbend", **settings):
        from ..methods import method_class

        if not isinstance(method, str):
            raise ConfigError(f"loss.method: expected a method name, got {method!r}")
        cls = method_class(method)
        known = [f.name for f in dataclasses.fields(cls.Settings)]
        unknown = [k for k in settings if k not in known]
        if unknown:
            raise ConfigError(_unknown_key(unknown[0], method, known))
        self.__dict__["method"] = method
        self.__dict__["settings"] = cls.Settings(**settings)

    def __getattr__(self, name):
        settings = self.__dict__.get("settings")
        if settings is not None and not name.startswith("_") and hasattr(settings, name):
            return getattr(settings, name)  # a setting, or a derived one (e.g. RepBend's request_only)
        raise AttributeError(f"loss.method {self.__dict__.get('method')!r} has no setting {name!r}")

    def __setattr__(self, name, value):
        raise AttributeError("LossConfig is read-only: build a new one (LossConfig(method=..., **settings))")

    def to_dict(self) -> dict:
        return {"method": self.method, **dataclasses.asdict(self.settings)}

    def __eq__(self, other) -> bool:
        return isinstance(other, LossConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        keys = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items())
        return f"LossConfig({keys})"

    def __deepcopy__(self, memo):
        return LossConfig(**self.to_dict())

    # the `loss` group in repbend.config: its keys depend on the method
    @staticmethod
    def known_keys(method: str) -> list[str]:
        from ..methods import method_class
        return ["method"] + [f.name for f in dataclasses.fields(method_class(method).Settings)]

    @staticmethod
    def describe() -> list[str]:
        """`repbend train --help` lines: loss.method, then each method's keys."""
        from ..config_fields import describe_group
        from ..methods import METHODS, method_class

        lines = ["loss:", f"  --loss.method {{{','.join(METHODS)}}}  (default: repbend)",
                 "      The method to train; every other loss key belongs to one method (below)."]
        for name in METHODS:
            cls = method_class(name)
            body = describe_group("loss", cls.Settings)[1:]
            lines += [f"  loss keys of method {name} ({cls.SUMMARY}):"] + ["  " + line for line in body]
        return lines


def _unknown_key(key: str, method: str, known: list[str]) -> str:
    from ..methods import METHODS, method_class

    owners = [m for m in METHODS if m != method
              and key in {f.name for f in dataclasses.fields(method_class(m).Settings)}]
    if owners:
        return (f"loss.{key} is a setting of loss.method {' and '.join(owners)}, not of {method}: remove it, or set "
                f"loss.method; the keys of {method} are {', '.join(known)}")
    close = difflib.get_close_matches(key, known + ["method"], n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"loss.{key}: unknown key of loss.method {method}{hint}; its keys are method, {', '.join(known)}"
