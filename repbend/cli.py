"""The `repbend` command: train | demo | eval | logit-lens | rep-shift | bench | plan | recipes."""
from __future__ import annotations

import gc
import logging
import os
import sys
import traceback

USAGE = """usage: repbend COMMAND [options]

commands:
  train       RepBend LoRA training:  repbend train --config FILE.yaml [--group.key value ...]
  demo        the built-in tiny model and data, end to end on the CPU:  repbend demo [--train.output_dir DIR]
  eval        attack success rate and over-refusal:  repbend eval --model.path DIR [--model.adapter DIR] ...
  logit-lens  layers x tokens heatmap, base vs tuned
  rep-shift   per-layer representation shift, base vs tuned
  bench       end-to-end step benchmark against the reference recipe
  plan        a step at real shapes on fake tensors: memory per GPU, FLOPs per token, whether it fits
  recipes     the shipped recipes by name (`repbend recipes cp NAME PATH` copies one to edit)

`repbend COMMAND --help` lists the options of a command. `--debug` shows the traceback of an error.
`repbend --version` prints the version.
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
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    if argv[0] in ("--version", "-V"):
        from . import __version__
        print(f"repbend {__version__}")
        return 0
    cmd, rest = argv[0], argv[1:]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if cmd == "train":
        return _run(_train, rest, debug)
    if cmd == "demo":
        from .demo.run import main as demo_main
        return _run(demo_main, rest, debug)
    if cmd in ("eval", "logit-lens", "rep-shift"):
        from .eval import cli as eval_cli
        fn = {"eval": eval_cli.main_eval, "logit-lens": eval_cli.main_logit_lens,
              "rep-shift": eval_cli.main_rep_shift}[cmd]
        return _run(fn, rest, debug)
    if cmd == "recipes":
        from .recipes import main as recipes_main
        return _run(recipes_main, rest, debug)
    if cmd == "bench":
        from .bench import main as bench_main
        return _run(bench_main, rest, debug)
    if cmd == "plan":
        from .plan.cli import main as plan_main
        return _run(plan_main, rest, debug)
    print(f"repbend: error: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
    return 2


def console_main() -> None:
    """The process entry point (the `repbend` command, `python -m repbend`): run `main`, exit with its code; a
    torchrun rank whose run ended and left its process group exits without the interpreter's teardown
    (`repbend.distributed.end_process` says why)."""
    code = main()
    dist = sys.modules.get("repbend.distributed")  # not imported (nor torch) by the commands that run no training
    if dist is None:
        sys.exit(code)
    dist.end_process(code)


def user_errors() -> tuple[type, ...]:
    """The exception classes that mean "the user can fix this": printed as one line, exit code 2."""
    from .data.errors import DataError
    from .errors import UserError
    classes = [UserError, DataError]
    try:
        from .eval.cli import UsageError
        classes.append(UsageError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(classes)


def _run(fn, argv, debug: bool = False) -> int:
    """Errors the user can fix (settings, files, rows, runs that cannot start) are one line, `repbend: error: ...`,
    and exit code 2; `--debug` shows their traceback too. Anything else is a bug and keeps its traceback."""
    try:
        return int(fn(argv) or 0)
    except user_errors() as e:
        if debug:
            traceback.print_exc()
        print(f"repbend: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


def _train(argv: list[str]) -> int:
    from .config import RepBendConfig
    from .errors import ConfigError

    if "-h" in argv or "--help" in argv:
        print(train_help())
        return 0
    config = None
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
            raise ConfigError("--config needs a YAML file")
        from .recipes import resolve
        config = resolve(argv[i + 1])
        argv = argv[:i] + argv[i + 2:]
    show = "--print_config" in argv or "--print-config" in argv
    argv = [a for a in argv if a not in ("--print_config", "--print-config")]
    cfg = RepBendConfig.load(config, argv)
    if show:
        import yaml
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    from .trainer import train
    result = train(cfg)
    # the model sits in reference cycles (PEFT, FSDP2): free it now, and under torchrun the process group it holds
    # (and the backend's threads) with it, before the interpreter's teardown (repbend.distributed)
    gc.collect()
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    print(f"adapter: {result.adapter_dir}\nlog: {result.output_dir}/log.jsonl"
          + (f"\nstopped: {result.stopped}" if result.stopped else ""))
    return 0


def train_help() -> str:
    """Every config key with its type, default and documentation (read from the dataclass source)."""
    from .config import RepBendConfig
    from .config_fields import describe_group

    from .recipes import names
    lines = ["usage: repbend train [--config FILE.yaml|RECIPE] [--group.key value ...] [--print_config] [--debug]",
             "",
             "Settings come from the YAML file (or a shipped recipe by name: " + ", ".join(names()) + "; `repbend",
             "recipes` lists them), then from --group.key value (or --group.key=value; a bare flag means true).",
             "--print_config prints the resulting settings as YAML and exits. --debug shows the traceback of an",
             "error. Without a recipe, layer settings default to the published ones at the model's own depth.",
             "Every key:", ""]
    for name, cls in RepBendConfig.groups().items():
        lines += describe_group(name, cls) + [""]
    return "\n".join(lines)
