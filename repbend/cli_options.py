"""One flag style for every `repbend` subcommand: `--group.key value` (or `--group.key=value`), as `repbend train`
spells its settings, with the older spellings kept as hidden aliases for one release.

    p = OptionParser(prog="repbend demo", description="...")
    train = p.add_group("train", "the RepBend run")
    add_option(train, "--train.max_steps", "--max-steps", type=int, default=300, help="...")
    args = p.parse_args(argv)         # args.train_max_steps, from either spelling

- `add_option(container, FLAG, *OLD, **argparse_kwargs)` adds FLAG (dest defaults to FLAG without the dashes, dots
  as underscores: `--train.max_steps` -> `train_max_steps`) and each OLD spelling as a hidden alias of the same
  dest. Using an alias works as before and prints one line to stderr:
  `repbend: warning: --max-steps is deprecated and will be removed in the next release; use --train.max_steps`.
  The parser's --help lists the aliases at the end ("older spellings").
- `required=True` is checked after parsing (either spelling satisfies it), so an alias never trips argparse's own
  required-option check; a missing option is argparse's usual one-line error, exit 2.
- Abbreviations are off (`allow_abbrev=False`): `--out` is an error, not a guess at `--eval.output`.
"""
from __future__ import annotations

import argparse
import sys
import textwrap

DEPRECATION = "repbend: warning: {old} is deprecated and will be removed in the next release; use {new}"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written (its line breaks kept); each option's default shown when it has one."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, argparse.SUPPRESS, False, "") and "%(default)" not in text \
                and action.option_strings:
            text += " (default: %(default)s)"
        return text


class OptionParser(argparse.ArgumentParser):
    """An ArgumentParser with option groups, deprecated aliases and post-parse required checks (module docstring)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.aliases: list[tuple[str, str]] = []  # (old, new), in the order added
        self.required_options: list[tuple[str, str]] = []  # (flag, dest)

    def add_group(self, name: str, description: str) -> argparse._ArgumentGroup:
        """A help section titled `--name.*` (argparse's argument group: options added to it parse as usual)."""
        group = self.add_argument_group(f"--{name}.*", description)
        group.repbend_parser = self
        return group

    def format_help(self) -> str:
        text = super().format_help()
        if self.aliases:
            pairs = ", ".join(f"{old} = {new}" for old, new in self.aliases)
            text += "\n" + textwrap.fill(f"older spellings (deprecated, removed in the next release): {pairs}",
                                         width=100) + "\n"
        return text

    def parse_known_args(self, args=None, namespace=None):
        namespace, rest = super().parse_known_args(args, namespace)
        missing = [flag for flag, dest in self.required_options if getattr(namespace, dest, None) is None]
        if missing:
            self.error(f"the following arguments are required: {', '.join(missing)}")
        return namespace, rest


def _parser_of(container) -> OptionParser:
    """The OptionParser an argument group belongs to (argparse keeps no public link; groups share its actions)."""
    parser = container if isinstance(container, OptionParser) else getattr(container, "repbend_parser", None)
    if parser is None:
        raise TypeError("add_option needs an OptionParser or a group made by OptionParser.add_group")
    return parser


def add_option(container, flag: str, *old: str, **kwargs) -> argparse.Action:
    """Add `flag` (and each `old` spelling as a deprecated alias) to an OptionParser or one of its groups; returns
    the new flag's Action. kwargs are argparse's (`type`, `default`, `help`, `nargs`, `action`, `required`, ...)."""
    parser = _parser_of(container)
    kwargs.setdefault("dest", flag.lstrip("-").replace(".", "_").replace("-", "_"))
    required = kwargs.pop("required", False)
    action = container.add_argument(flag, **kwargs)
    if required:
        parser.required_options.append((flag, action.dest))
    alias_kwargs = {k: v for k, v in kwargs.items() if k not in ("help", "default", "action", "metavar")}
    for name in old:
        alias_kwargs["action"] = _deprecated(type(action), flag)
        container.add_argument(name, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **alias_kwargs)
        parser.aliases.append((name, flag))
    return action


def _deprecated(base: type, new: str) -> type:
    """`base` (the new flag's Action class) that first prints the deprecation line naming `new`."""

    class Deprecated(base):
        def __call__(self, parser, namespace, values, option_string=None):
            print(DEPRECATION.format(old=option_string, new=new), file=sys.stderr)
            super().__call__(parser, namespace, values, option_string)

    return Deprecated

