"""`repbend bench`: the end-to-end step benchmark, `benchmarks/bench_step.py` of the source checkout.

    repbend bench --model tiny|small|llama3-8b|mistral-7b [--methods repbend,circuit_breakers,rmu] --steps N
                  --output DIR

Each method's shipped step (RepBend, Circuit Breakers, RMU) against its own re-creation of the reference code's step
(its passes, padding and stacked hidden states): useful tokens/s, peak memory, MFU on a GPU, and the same loss.
Takes the same arguments as `python benchmarks/bench_step.py` (`repbend bench --help` lists them) and writes
DIR/results.json, results.csv, table.txt and step_bench.png (when matplotlib is installed). The benchmark and its
re-creations of the reference code live with the other benchmarks, not in the installed package: this entry needs
the source tree, which an editable install (`pip install -e .`, what `make install` does) provides.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_step.py"


def main(argv: list[str] | None = None) -> int:
    if not SCRIPT.is_file():
        raise FileNotFoundError(f"repbend bench runs {SCRIPT}, which is not there: it needs a source checkout "
                                "of repbend (pip install -e .)")
    if str(SCRIPT.parent) not in sys.path:  # its sibling modules (workload, report, reference recipe)
        sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("repbend_bench_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return int(module.main(argv))
