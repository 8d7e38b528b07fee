"""The `repbend` command: train | demo | eval | logit-lens | rep-shift | bench."""
from __future__ import annotations

import ast
import dataclasses
import inspect
import logging
import os
import sys

USAGE = """usage: repbend COMMAND [options]

commands:
  train       RepBend LoRA training:  repbend train --config FILE.yaml [--group.key value ...]
  demo        the built-in tiny model and data, end to end on the CPU:  repbend demo [--output DIR] [--seed N]
  eval        attack success rate and over-refusal:  repbend eval --model.path DIR [--adapter DIR] ... --output DIR
  logit-lens  layers x tokens heatmap, base vs tuned
  rep-shift   per-layer representation shift, base vs tuned
  bench       end-to-end step benchmark against the reference recipe

`repbend COMMAND --help` lists the options of a command.
"""


def _record(fn):
    """Under torchrun, write a failing rank's traceback into the launcher's error summary."""
    try:
        from torch.distributed.elastic.multiprocessing.errors import record
    except ImportError:  # pragma: no cover
        return fn
    return record(fn)


@_record
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if cmd == "train":
        return _run(_train, rest)
    if cmd == "demo":
        from .demo.run import main as demo_main
        return _run(demo_main, rest)
    if cmd in ("eval", "logit-lens", "rep-shift"):
        from .eval import cli as eval_cli
        fn = {"eval": eval_cli.main_eval, "logit-lens": eval_cli.main_logit_lens,
              "rep-shift": eval_cli.main_rep_shift}[cmd]
        return _run(fn, rest)
    if cmd == "bench":
        from .bench import main as bench_main
        return _run(bench_main, rest)
    print(f"repbend: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
    return 2


def _run(fn, argv) -> int:
    """Errors the user can fix (config, data, training) are one clear line, not a traceback."""
    from .config import ConfigError
    from .data.errors import DataError
    from .trainer import TrainingError
    try:
        return int(fn(argv) or 0)
    except (ConfigError, DataError, TrainingError, FileNotFoundError) as e:
        print(f"repbend: error: {e}", file=sys.stderr)
        return 2


def _train(argv: list[str]) -> int:
    from .config import RepBendConfig

    if "-h" in argv or "--help" in argv:
        print(train_help())
        return 0
    config = None
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            from .config import ConfigError
            raise ConfigError("--config needs a file")
        config = argv[i + 1]
        argv = argv[:i] + argv[i + 2:]
    cfg = RepBendConfig.load(config, argv)
    from .trainer import train
    result = train(cfg)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    print(f"adapter: {result.adapter_dir}\nlog: {result.output_dir}/log.jsonl"
          + (f"\nstopped: {result.stopped}" if result.stopped else ""))
    return 0


def train_help() -> str:
    """Every config key with its default and its documentation (read from the dataclass source)."""
    from . import config as cfgmod

    lines = ["usage: repbend train [--config FILE.yaml] [--group.key value ...]", ""]
    docs = _field_docs(cfgmod)
    for group in dataclasses.fields(cfgmod.RepBendConfig):
        cls = group.default_factory().__class__
        lines.append(f"{group.name}:")
        inst = cls()
        for f in dataclasses.fields(cls):
            doc = docs.get((cls.__name__, f.name), "")
            lines.append(f"  --{group.name}.{f.name} (default {getattr(inst, f.name)!r})" + (f"\n      {doc}" if doc else ""))
        lines.append("")
    return "\n".join(lines)


def _field_docs(module) -> dict:
    """The string literal under each dataclass field (the litgpt convention) keyed by (class, field)."""
    tree = ast.parse(inspect.getsource(module))
    out = {}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        body = node.body
        for a, b in zip(body, body[1:]):
            if (isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr)
                    and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str)):
                out[(node.name, a.target.id)] = " ".join(b.value.value.split())
    return out
