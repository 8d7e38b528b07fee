"""The shipped recipes (`repbend/configs/*.yaml`), by name, from wherever repbend is installed.

    repbend recipes                      # every recipe with its first comment line
    repbend recipes cp NAME PATH         # a copy to edit
    repbend train --config NAME ...      # NAME = a file name without .yaml, e.g. llama3_8b_instruct

`--config` takes a path first: a file that exists is read as it is; otherwise a name (with or without .yaml) is
looked up among the shipped recipes.
"""
from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

from .errors import ConfigError


def _folder():
    return resources.files("repbend") / "configs"


def names() -> list[str]:
    return sorted(p.name[:-5] for p in _folder().iterdir() if p.name.endswith(".yaml"))


def summary(name: str) -> str:
    """What a recipe is: its header comment's first line, up to its first parenthesis."""
    first = (_folder() / f"{name}.yaml").read_text(encoding="utf-8").splitlines()[0]
    return first.lstrip("# ").split(" (")[0].rstrip(".")


def resolve(config: str) -> str:
    """A `--config` value as a file path: the file itself if it exists, else the shipped recipe of that name."""
    path = Path(config).expanduser()
    if path.is_file():
        return str(path)
    name = path.name[:-5] if path.name.endswith(".yaml") else path.name
    if name in names() and (path.parent == Path(".") or path.parent.parts[-2:] == ("repbend", "configs")):
        with resources.as_file(_folder() / f"{name}.yaml") as found:
            return str(found)
    raise ConfigError(f"--config: no such file or recipe: {config} (recipes: {', '.join(names())}; "
                      "`repbend recipes` lists them)")


def main(argv: list[str]) -> int:
    """`repbend recipes` and `repbend recipes cp NAME PATH`."""
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__.split("\n\n")[1].rstrip())
        return 0
    if not argv:
        width = max(map(len, names()))
        for name in names():
            print(f"{name:<{width}}  {summary(name)}")
        return 0
    if argv[0] == "cp" and len(argv) == 3:
        source = resolve(argv[1])
        target = Path(argv[2]).expanduser()
        if target.is_dir():
            target = target / Path(source).name
        if target.exists():
            raise ConfigError(f"recipes cp: {target} exists; remove it first or name another file")
        shutil.copyfile(source, target)
        print(target)
        return 0
    raise ConfigError("usage: repbend recipes [cp NAME PATH]")
