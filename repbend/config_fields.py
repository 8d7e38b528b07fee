"""Typed config fields: one parser for YAML values and command-line strings alike, and the `--help` text.

Every group of `repbend.config` is a dataclass deriving from `Group`. Its fields are annotated with their type
and documented by the string literal under them; `Group.__post_init__` turns each value into its declared type
(so `lr: 1e-5` in YAML, `--train.lr 1e-5` on the command line and `LossConfig(alpha="0.5")` in Python all give
the float 1e-5), checks `choices`, then calls the group's `validate()`. A value that cannot be read as its type
raises `ConfigError` naming the key:

    int      12, "12"; also "1e3" (= 1000). Not 16.5, not true.
    float    0.5, "1e-5", 3. Not "abc", not true.
    bool     true/false, and the strings true/false/yes/no/on/off/1/0 (any case). Nothing else.
    str      a string (a YAML number becomes its text). Not a list, not true/false.
    X | None also null / "null" / "none" / "" (= None).
    list[T]  a YAML list, or a comma-separated string "a,b".
    Layers   hidden-state or decoder-layer indices: "20-30", "18,29,20-30", 7, or a list of ints; kept in order,
             duplicates kept.
    PathStr  a file or directory path (or, where the field says so, a hub name): a string whose leading `~` or
             `~user` is expanded here, once, so that every later use (the log, the loaders, the run directory)
             sees the same path.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import os
import re
import textwrap
import types
import typing
from typing import Any, NewType

from .errors import ConfigError

Layers = NewType("Layers", list)
"""An ordered list of layer indices, written "20-30", "1,2,5", "2-4,7", 7 or [20, 21]."""

PathStr = NewType("PathStr", str)
"""A path setting: a string with `~` expanded (`os.path.expanduser`); a hub name passes unchanged."""

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")
_NONE = ("null", "none", "~", "")
_INT = re.compile(r"^[+-]?\d+$")


def parse_layers(spec, key: str = "layers") -> list[int]:
    """"20-30" -> [20, ..., 30] (inclusive); "1,2,5" -> [1, 2, 5]; "2-4,7" mixes both; ints and lists pass."""
    if spec is None:
        return []
    if isinstance(spec, bool):
        raise ConfigError(f"{key}: expected layer indices such as \"20-30\" or [1, 2], got {spec!r}")
    if isinstance(spec, int):
        return [spec]
    if isinstance(spec, (list, tuple)):
        out = []
        for x in spec:
            if isinstance(x, bool) or not (isinstance(x, int) or (isinstance(x, str) and _INT.match(x.strip()))):
                raise ConfigError(f"{key}: expected integer layer indices, got {x!r} in {list(spec)!r}")
            out.append(int(x))
        return out
    if not isinstance(spec, str):
        raise ConfigError(f"{key}: expected layer indices such as \"20-30\", got {type(spec).__name__}")
    out: list[int] = []
    for part in spec.replace(" ", "").split(","):
        if not part:
            continue
        m = re.match(r"^(\d+)(?:-(\d+))?$", part)
        if not m:
            raise ConfigError(f"{key}: cannot read {part!r} in {spec!r} (write e.g. \"20-30\" or \"1,2,5\")")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise ConfigError(f"{key}: layer range {part!r} is empty (end before start)")
        out.extend(range(lo, hi + 1))
    return out


def _type_name(hint) -> str:
    if hint is Layers:
        return "layers"
    if hint is PathStr:
        return "path"
    args = typing.get_args(hint)
    if _is_union(hint):
        return " | ".join("null" if a is type(None) else _type_name(a) for a in args)
    if typing.get_origin(hint) is list:
        return f"list[{_type_name(args[0])}]"
    return getattr(hint, "__name__", str(hint))


def _is_union(hint) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def coerce(value, hint, key: str):
    """`value` (from YAML, the command line or Python) as the type `hint`; ConfigError naming `key` if it is not."""
    if hint is Any:
        return value
    if _is_union(hint):
        members = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(members) < len(typing.get_args(hint))
        if optional and (value is None or (isinstance(value, str) and value.strip().lower() in _NONE)):
            return None
        if len(members) == 1:  # X | None: X's own message
            return coerce(value, members[0], key)
        for m in members:
            try:
                return coerce(value, m, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(hint)}, got {value!r}")
    if value is None:
        raise ConfigError(f"{key}: expected {_type_name(hint)}, got null")
    if hint is Layers:
        return parse_layers(value, key)
    if hint is PathStr:
        return os.path.expanduser(coerce(value, str, key))
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str) and _INT.match(value.strip()):
            return int(value.strip())
        f = _as_float(value)
        if f is not None and f.is_integer() and abs(f) < 2 ** 53:
            return int(f)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if hint is float:
        f = _as_float(value)
        if f is None:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return f
    if hint is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                import yaml
                try:
                    value = yaml.safe_load(text)
                except yaml.YAMLError:
                    raise ConfigError(f"{key}: cannot read the list {value!r}") from None
            else:
                value = [x.strip() for x in text.split(",") if x.strip()]
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list ({_type_name(hint)}), got {value!r}")
        return [coerce(x, item, f"{key}[{i}]") for i, x in enumerate(value)]
    raise TypeError(f"{key}: unsupported field type {hint!r}")  # a bug in a Group, not a user error


def _as_float(value) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


@dataclasses.dataclass
class Group:
    """Base of the config groups: typed fields (see the module docstring), then `validate()`.

    A field may carry `metadata={"choices": (...)}`; for a list field each item must be one of them."""

    NAME: typing.ClassVar[str] = ""

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            key = f"{self.NAME}.{f.name}" if self.NAME else f.name
            value = coerce(getattr(self, f.name), hints[f.name], key)
            choices = f.metadata.get("choices")
            if choices is not None and value is not None:
                for v in (value if isinstance(value, list) else [value]):
                    if v not in choices:
                        raise ConfigError(f"{key}: must be one of {', '.join(map(str, choices))}; got {v!r}")
            setattr(self, f.name, value)
        self.validate()

    def validate(self) -> None:
        """Checks across fields and ranges; raise ConfigError naming the key."""

    def check(self, condition: bool, name: str, requirement: str) -> None:
        """ConfigError `group.name must <requirement>; got <value>` unless `condition`."""
        if not condition:
            raise ConfigError(f"{self.NAME}.{name} must {requirement}; got {getattr(self, name)!r}")


def field_docs(cls) -> dict[str, str]:
    """The string literal under each field of dataclass `cls` (and its bases), by field name."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is Group:
            continue
        try:
            tree = ast.parse(inspect.getsource(klass).strip())
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for a, b in zip(body, body[1:]):
            if (isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr)
                    and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str)):
                out[a.target.id] = " ".join(b.value.value.split())
    return out


def describe_group(name: str, cls) -> list[str]:
    """Help lines for every field of a group: `--name.key TYPE (default X)` then its documentation (a group whose
    keys depend on another setting, such as `loss`, describes itself)."""
    if hasattr(cls, "describe"):
        return cls.describe()
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    inst = cls()
    lines = [f"{name}:"]
    for f in dataclasses.fields(cls):
        choices = f.metadata.get("choices")
        kind = "{" + ",".join(map(str, choices)) + "}" if choices and hints[f.name] is str else _type_name(hints[f.name])
        default = getattr(inst, f.name)
        lines.append(f"  --{name}.{f.name} {kind}  (default: {_show(default)})")
        doc = docs.get(f.name, "")
        if choices and hints[f.name] is not str:
            doc = (doc + " " if doc else "") + f"Choices: {', '.join(map(str, choices))}."
        if doc:
            lines.append(textwrap.fill(doc, width=112, initial_indent=" " * 6, subsequent_indent=" " * 6))
    return lines


def _show(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list) and value and all(isinstance(x, int) for x in value) and \
            value == list(range(value[0], value[-1] + 1)) and len(value) > 2:
        return f"{value[0]}-{value[-1]}"
    return str(value)
