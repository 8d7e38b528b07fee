"""The releases the suite runs against, compared with constraints.txt.

    python .ci/versions.py freeze                      # constraints.txt's contents from this environment
    python .ci/versions.py diff constraints.txt        # one line: every release here that differs from the file
    python .ci/versions.py diff constraints.txt --failed

`make constraints` writes the file with `freeze`; `make test-latest` prints `diff` before its suite and again, with
--failed, when the suite fails, so that a break in CI names the packages and versions that moved.
"""
from __future__ import annotations

import importlib.metadata as md
import re
import subprocess
import sys
from datetime import date

HEADER = ("# The release of every package `make demo` and `make test` install (pip -c). Written by `make constraints`\n"
          "# from a .venv in which `make test` passed; bump it in a commit of its own that says what changed.\n")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def freeze() -> str:
    out = subprocess.run([sys.executable, "-m", "pip", "freeze", "--all"], capture_output=True, text=True,
                         check=True).stdout
    lines = sorted((line for line in out.splitlines()
                    if "==" in line and not line.startswith(("#", "-e")) and _norm(line.split("==")[0]) != "repbend"),
                   key=lambda line: _norm(line.split("==")[0]))
    return HEADER + f"# {date.today().isoformat()}, Python {sys.version.split()[0]}\n" + "\n".join(lines) + "\n"


def read_constraints(path: str) -> dict[str, str]:
    pins = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if "==" in line:
                name, version = line.split("==", 1)
                pins[_norm(name)] = version.strip()
    return pins


def installed() -> dict[str, tuple[str, str]]:
    return {_norm(d.metadata["Name"]): (d.metadata["Name"], d.version) for d in md.distributions()
            if d.metadata["Name"]}


def diff(path: str) -> list[str]:
    """The releases here that differ from the file's pins (first), then the packages it does not list (in one
    entry: a new dependency, or a CUDA build's runtime wheels)."""
    pins, have = read_constraints(path), installed()
    moved, new = [], []
    for key, (name, version) in sorted(have.items()):
        if key == "repbend":
            continue
        if key not in pins:
            new.append(f"{name} {version}")
        elif pins[key] != version:
            moved.append(f"{name} {version} ({path}: {pins[key]})")
    return moved + ([f"{len(new)} not in {path}: {', '.join(new)}"] if new else [])


def main(argv: list[str]) -> int:
    if argv[:1] == ["freeze"]:
        sys.stdout.write(freeze())
        return 0
    if argv[:1] == ["diff"] and len(argv) >= 2:
        moved = diff(argv[1])
        what = ", ".join(moved) if moved else "none"
        if "--failed" in argv:
            print(f"test-latest FAILED with these releases that differ from {argv[1]}: {what}")
        else:
            print(f"test-latest: releases that differ from {argv[1]}: {what}")
        return 0
    print(__doc__.strip(), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
