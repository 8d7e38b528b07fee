"""Stage 0 of benchmarks/gpu_check.sh: what this machine has, as one JSON line (stage "env"), before anything runs.

    python benchmarks/gpu_env.py --jsonl OUT/results.jsonl

Versions (python, torch, CUDA, triton, transformers, peft, numpy), the device, which optional packages import
(flash_attn, liger_kernel, matplotlib, pyarrow, tensorboard, wandb, accelerate, pytest), and whether repbend and its
baseline objectives import. Status "error" when repbend or torch cannot be imported (nothing after this can run).

Triton builds each kernel's launcher at run time with a C compiler against Python.h: the stage compiles a small
extension the same way (`CC`, else gcc or clang; the interpreter's include directory) and, on a GPU, launches one
rep_distance kernel against the eager code. When any of that fails, `--impl-file` gets "torch" (else "triton") and
one line says why: benchmarks/gpu_check.sh then runs every later stage with REPBEND_KERNELS=torch (the eager
kernels) instead of failing each Triton path.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile

from gpu_records import Records

OPTIONAL = ("flash_attn", "liger_kernel", "matplotlib", "pyarrow", "tensorboard", "wandb", "accelerate", "pytest")


def version(name: str):
    """The installed distribution's version (read from its metadata: importing transformers alone takes seconds)."""
    try:
        from importlib.metadata import version as dist_version
        return dist_version(name)
    except Exception:  # noqa: BLE001 - not installed is a finding, not a crash
        return "not installed"


def c_extension_problem() -> str | None:
    """Why Triton could not build a launcher here (None: it can): the compiler and Python.h, tried as Triton does."""
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        return "no C compiler (CC unset, no gcc or clang on PATH)"
    scheme = sysconfig.get_default_scheme()
    include = sysconfig.get_paths(scheme="posix_prefix" if scheme == "posix_local" else scheme)["include"]
    if not os.path.isfile(os.path.join(include, "Python.h")):
        return f"no Python.h in {include} (install the python3-dev / python3.x-dev package)"
    with tempfile.TemporaryDirectory(prefix="gpu_env_cc_") as tmp:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as fh:
            fh.write("#include <Python.h>\nstatic PyModuleDef m = {PyModuleDef_HEAD_INIT, \"probe\", 0, -1, 0};\n"
                     "PyMODINIT_FUNC PyInit_probe(void) { return PyModule_Create(&m); }\n")
        cmd = [cc, src, "-O3", "-shared", "-fPIC", "-o", os.path.join(tmp, "probe.so"), f"-I{include}"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"{cc} could not run: {e}"
        if proc.returncode != 0:
            return f"{cc} failed on a Python extension: {(proc.stderr or proc.stdout).strip()[:300]}"
    return None


def launch_problem() -> str | None:
    """Why a Triton kernel could not run on this GPU (None: one rep_distance launch matched the eager code)."""
    import torch

    from repbend.kernels import rep_distance
    try:
        g = torch.Generator(device="cuda").manual_seed(0)
        h = [torch.randn(2, 8, 64, device="cuda", generator=g) for _ in range(2)]
        ref = torch.randn(2, 5, 64, device="cuda", generator=g)
        rows = torch.tensor([0, 3, 4, 9, 15], device="cuda")
        got = rep_distance(h, ref, rows, impl="triton").l2
        want = rep_distance(h, ref, rows, impl="torch").l2
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - the reason is the result
        return f"a Triton launch failed: {type(e).__name__}: {str(e)[:300]}"
    if not torch.allclose(got, want, rtol=1e-4, atol=1e-5):
        return f"a Triton launch gave {got.tolist()}, the eager code {want.tolist()}"
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jsonl", default=None)
    p.add_argument("--impl-file", default=None, help="write the kernels to use here: triton, or torch when Triton "
                                                     "cannot build or launch its kernels")
    a = p.parse_args(argv)
    info = {"python": platform.python_version()}
    problems = []
    try:
        import torch
        info.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info.update(device=props.name, device_gib=round(props.total_memory / 2**30, 1),
                        capability=f"{props.major}.{props.minor}", device_count=torch.cuda.device_count())
    except Exception as e:  # noqa: BLE001
        problems.append(f"torch: {type(e).__name__}: {e}")
    for name in ("triton", "transformers", "peft", "numpy"):
        info[name] = version(name)
    info["optional"] = {n: importlib.util.find_spec(n) is not None for n in OPTIONAL}
    for module in ("repbend.kernels", "repbend.loss.config"):
        try:
            importlib.import_module(module)
        except Exception as e:  # noqa: BLE001
            problems.append(f"{module}: {type(e).__name__}: {e}")
    try:
        import repbend
        info["repbend_from"] = str(repbend.__file__)
    except Exception:  # noqa: BLE001
        pass
    try:
        from repbend.methods import METHODS
        info["methods"] = list(METHODS)
    except Exception as e:  # noqa: BLE001
        problems.append(f"repbend.methods: {type(e).__name__}: {e}")
    triton_problem = c_extension_problem()
    if triton_problem is None and info.get("cuda_available") and not problems:
        triton_problem = launch_problem()
    info["triton_launch"] = "ok" if triton_problem is None else triton_problem
    info["kernels"] = "triton" if triton_problem is None else "torch"
    if triton_problem is not None:
        print(f"[env] Triton cannot run its kernels here: {triton_problem}; the later stages use impl=torch "
              "(REPBEND_KERNELS=torch)", flush=True)
    if a.impl_file:
        with open(a.impl_file, "w") as fh:
            fh.write(info["kernels"] + "\n")
    Records(a.jsonl, "env").write("environment", "error" if problems else "ok", problems=problems or None, **info)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
