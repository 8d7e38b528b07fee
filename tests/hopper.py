"""Compile a Triton kernel for Hopper (sm_90) without a GPU and read its registers and spills.

Used by the kernel compile tests: a kernel that spills registers at the block sizes its launcher picks for
the production shapes (D = 4096) runs far slower than it should, and no CPU test would notice.

    from hopper import hopper_resources, ptxas_available
    res = hopper_resources(my_kernel, {"x_ptr": "*bf16", "n": "i32"}, {"BLOCK": 1024}, num_warps=4)
    # {"registers": 40, "spill_stores": 0, "spill_loads": 0, "stack": 0, "local": 0, "shared": 0}

    from hopper import hopper_launches
    out = hopper_launches("my_cases", "launch_all", ["repbend.kernels._rep_distance_triton"])
    # out["variants"]: every variant the launchers compiled, with its registers and spills

How: `triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))` builds PTX and a cubin with the ptxas
bundled in the triton wheel (no driver needed). Registers come from `cuobjdump -res-usage` on that cubin; the
spill byte counts from re-running that ptxas with `-v` on the PTX with the flags Triton itself uses.

`hopper_launches` goes through the real launchers instead of a hand-written signature: a child process installs a
fake Triton driver (target sm_90; loading and launching do nothing) and runs a function that calls the launchers
on meta tensors (no memory, data_ptr() 0) of the production shapes; Triton then specialises and compiles exactly
what a launch on an H100 would (an int argument equal to 1 becomes a constant, multiples of 16 are marked), and
every compiled variant is read back from the kernels' caches. The function may be a generator: each value it
yields names a phase, and the variants compiled by the end of each phase are reported (recompilation checks).

Under TRITON_INTERPRET=1 (the test suite's setting) `@triton.jit` yields interpreter objects that cannot be
compiled, so compilation runs in a child process with TRITON_INTERPRET=0 that imports the kernel again by
module and name: the kernel must be a module-level function of an importable module.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

__all__ = ["hopper_launches", "hopper_resources", "hopper_resources_many", "ptxas_available", "requires_ptxas",
           "triton_nvidia_bin"]


def triton_nvidia_bin() -> Path | None:
    """The folder holding the ptxas / cuobjdump shipped with the installed triton wheel, or None."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("triton")
    except Exception:  # pragma: no cover - triton missing
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "backends" / "nvidia" / "bin"
    return path if path.is_dir() else None


def _tool(name: str) -> str | None:
    b = triton_nvidia_bin()
    if b is not None and (b / name).exists() and os.access(b / name, os.X_OK):
        return str(b / name)
    return None


def ptxas_available() -> bool:
    """True when the triton wheel's ptxas and cuobjdump can be run here."""
    ptxas, cuobjdump = _tool("ptxas"), _tool("cuobjdump")
    if ptxas is None or cuobjdump is None:
        return False
    try:
        subprocess.run([ptxas, "--version"], check=True, capture_output=True, timeout=60)
    except Exception:
        return False
    return True


requires_ptxas = pytest.mark.skipif(not ptxas_available(), reason="triton's bundled ptxas/cuobjdump not runnable")


# The child process: compile each spec for sm_90, write PTX and cubin, print their paths as JSON.
_CHILD = r"""
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
specs = json.loads(sys.stdin.read())
out = []
for s in specs:
    fn = getattr(importlib.import_module(s["module"]), s["name"])
    sig = dict(s["signature"])
    for k in s["constexprs"]:
        sig.setdefault(k, "constexpr")
    # what a launch gives a 16-byte aligned pointer / an int that is a multiple of 16 (see BaseBackend.parse_attr)
    names = list(fn.arg_names)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in s["divisible"]}
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=s["constexprs"], attrs=attrs)
    ck = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                        options={"num_warps": s["num_warps"], "num_stages": s["num_stages"]})
    with open(s["ptx"], "w") as f:
        f.write(ck.asm["ptx"])
    with open(s["cubin"], "wb") as f:
        f.write(ck.asm["cubin"])
    ptx = ck.asm["ptx"]
    out.append({"kernel": ck.name, "shared": int(ck.metadata.shared),
                "vector_loads": ("ld.global.v" in ptx), "fp64": (".f64" in ptx)})
print("@@HOPPER@@" + json.dumps(out))
"""


def _kernel_location(kernel) -> tuple[str, str]:
    fn = getattr(kernel, "fn", kernel)  # JITFunction and InterpretedFunction both keep the python function in .fn
    module, name = getattr(fn, "__module__", None), getattr(fn, "__name__", None)
    if not module or not name or module == "__main__":
        raise ValueError("hopper_resources needs a module-level @triton.jit kernel of an importable module, "
                         f"got {kernel!r}")
    return module, name


def _parse_ptxas_log(log: str, kernel: str) -> dict:
    # ptxas -v prints, per function: "Compiling entry function 'k' ...", "N bytes stack frame, N bytes spill
    # stores, N bytes spill loads", "Used N registers, ...". Take the block of our entry function.
    start = log.find(f"'{kernel}'")
    block = log[start:] if start >= 0 else log
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", block)
    r = re.search(r"Used (\d+) registers", block)
    if m is None or r is None:
        raise RuntimeError(f"could not parse ptxas -v output for {kernel}:\n{log}")
    return {"stack": int(m.group(1)), "spill_stores": int(m.group(2)), "spill_loads": int(m.group(3)),
            "ptxas_registers": int(r.group(1))}


def _parse_res_usage(text: str, kernel: str) -> dict:
    m = re.search(r"Function " + re.escape(kernel) + r":\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if m is None:
        raise RuntimeError(f"could not parse cuobjdump -res-usage output for {kernel}:\n{text}")
    return {"registers": int(m.group(1)), "local": int(m.group(4))}


def hopper_resources_many(specs: list[dict], timeout: float = 600.0) -> list[dict]:
    """Like `hopper_resources` for several kernels at once (one child process: pay the import once).

    Each spec is a dict with keys kernel, signature, constexprs, num_warps and optionally num_stages (3) and
    divisible (see `hopper_resources`).
    """
    ptxas, cuobjdump = _tool("ptxas"), _tool("cuobjdump")
    if ptxas is None or cuobjdump is None:
        raise RuntimeError("triton's bundled ptxas / cuobjdump not found (site-packages/triton/backends/nvidia/bin)")
    with tempfile.TemporaryDirectory(prefix="hopper_") as tmp:
        child_specs = []
        for i, s in enumerate(specs):
            module, name = _kernel_location(s["kernel"])
            divisible = s.get("divisible")
            if divisible is None:  # a launch with torch-allocated tensors: every pointer is 16-byte aligned
                divisible = [k for k, t in s["signature"].items() if str(t).startswith("*")]
            child_specs.append({
                "module": module, "name": name,
                "signature": dict(s["signature"]), "constexprs": dict(s.get("constexprs") or {}),
                "num_warps": int(s["num_warps"]), "num_stages": int(s.get("num_stages", 3)),
                "divisible": list(divisible),
                "ptx": os.path.join(tmp, f"k{i}.ptx"), "cubin": os.path.join(tmp, f"k{i}.cubin"),
            })
        env = dict(os.environ, TRITON_INTERPRET="0")
        # the child must import the kernel modules the way this process does (tests/ for test-local modules)
        env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p] + [env.get("PYTHONPATH", "")])
        proc = subprocess.run([sys.executable, "-c", _CHILD], input=json.dumps(child_specs), env=env,
                              capture_output=True, text=True, timeout=timeout)
        tag = "@@HOPPER@@"
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(tag)]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"compiling for sm_90 failed (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        compiled = json.loads(lines[-1][len(tag):])

        results = []
        for cs, info in zip(child_specs, compiled):
            kname = info["kernel"]
            res = subprocess.run([cuobjdump, "-res-usage", cs["cubin"]], capture_output=True, text=True,
                                 check=True, timeout=timeout)
            usage = _parse_res_usage(res.stdout, kname)
            # the flags Triton's make_cubin passes (see triton/backends/nvidia/compiler.py), plus -v
            log = subprocess.run([ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a",
                                  cs["ptx"], "-o", cs["cubin"] + ".v"], capture_output=True, text=True, timeout=timeout)
            if log.returncode != 0:
                raise RuntimeError(f"ptxas -v failed for {kname}:\n{log.stderr}")
            spills = _parse_ptxas_log(log.stdout + log.stderr, kname)
            results.append({"kernel": kname, "registers": usage["registers"], "local": usage["local"],
                            "shared": info["shared"], "vector_loads": info["vector_loads"], "fp64": info["fp64"],
                            **spills})
        return results


def hopper_resources(kernel, signature: dict, constexprs: dict, num_warps: int, num_stages: int = 3,
                     divisible=None) -> dict:
    """Compile `kernel` for GPUTarget("cuda", 90, 32) and return its resource use.

    kernel: a module-level @triton.jit function (interpreted or not). signature: {arg name: triton type}, e.g.
    {"x_ptr": "*bf16", "n": "i32", "ptrs": "*i64"}; constexpr arguments may be left out (they are marked
    "constexpr"). constexprs: {arg name: value}; an int argument equal to 1 at launch (a unit stride) is
    specialised by Triton into a constant, so give it here. divisible: names of the arguments a launch would mark
    as multiples of 16 (16-byte aligned pointers, ints such as D = 4096 or a row stride); None means every pointer
    argument and no int.
    Returns {"registers", "spill_stores", "spill_loads"} (ints; spills in bytes) plus "stack", "local", "shared",
    "ptxas_registers", "vector_loads" (whether the PTX has a vector global load), "fp64" (whether it has any
    double-precision instruction or register) and "kernel" for diagnosis.
    """
    return hopper_resources_many([{"kernel": kernel, "signature": signature, "constexprs": constexprs,
                                   "num_warps": num_warps, "num_stages": num_stages, "divisible": divisible}])[0]


# The child process of `hopper_launches`: a fake driver, the caller's launches, then every compiled variant.
_LAUNCH_CHILD = r"""
import importlib, inspect, json, os, sys
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

spec = json.loads(sys.stdin.read())
launches = {}

class _Utils:
    def load_binary(self, name, kernel, shared, device):  # module, function, registers, spills, max threads
        return None, 0, 0, 0, 1024
    def get_device_properties(self, device):  # an H100's
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32,
                "sm_clock_rate": 1980000, "mem_clock_rate": 2619000, "mem_bus_width": 5120}

def _launcher(src, metadata):
    def launch(*args, **kwargs):
        launches[metadata.name] = launches.get(metadata.name, 0) + 1
    return launch

class FakeDriver:
    def __init__(self):
        self.utils, self.launcher_cls = _Utils(), _launcher
    def is_active(self):
        return True
    def get_current_device(self):
        return 0
    def set_current_device(self, device):
        pass
    def get_current_stream(self, device=None):
        return 0
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)
    def get_active_torch_device(self):
        return torch.device("meta")
    def map_python_to_cpp_type(self, ty):
        return ty

driver.set_active(FakeDriver())
kernels = {}
for name in spec["kernel_modules"]:
    m = importlib.import_module(name)
    for attr, obj in vars(m).items():
        if isinstance(obj, JITFunction) and obj.__module__ == m.__name__:
            kernels[f"{name}:{attr}"] = obj

def variants():
    out = {}
    for qual, k in kernels.items():
        for caches in k.device_caches.values():
            for key, ck in caches[0].items():
                out[str(key)] = (qual, ck)
    return out

phases = []
fn = getattr(importlib.import_module(spec["module"]), spec["function"])
result = fn(**spec["kwargs"])
if inspect.isgenerator(result):
    for phase in result:
        phases.append({"phase": str(phase), "variants": sorted(variants())})
phases.append({"phase": "end", "variants": sorted(variants())})

out = []
for i, (key, (qual, ck)) in enumerate(sorted(variants().items())):
    ptx, cubin = os.path.join(spec["tmp"], f"v{i}.ptx"), os.path.join(spec["tmp"], f"v{i}.cubin")
    with open(ptx, "w") as f:
        f.write(ck.asm["ptx"])
    with open(cubin, "wb") as f:
        f.write(ck.asm["cubin"])
    src = ck.src
    sig = {k: str(v) for k, v in src.signature.items()}
    names = list(src.fn.arg_names)
    consts = {(names[k[0]] if isinstance(k, tuple) and len(k) == 1 else str(k)): repr(v)
              for k, v in src.constants.items()}
    out.append({"function": qual, "kernel": ck.name, "key": key, "signature": sig, "constants": consts,
                "num_warps": ck.metadata.num_warps, "shared": int(ck.metadata.shared),
                "vector_loads": "ld.global.v" in ck.asm["ptx"], "fp64": ".f64" in ck.asm["ptx"],
                "ptx": ptx, "cubin": cubin})
print("@@HOPPER@@" + json.dumps({"variants": out, "phases": phases, "launches": launches}))
"""


def hopper_launches(module: str, function: str, kernel_modules: list[str], kwargs: dict | None = None,
                    timeout: float = 900.0) -> dict:
    """Run `module.function(**kwargs)` (it calls the real launchers on meta tensors) under a fake sm_90 driver and
    return {"variants": [...], "phases": [...], "launches": {kernel name: count}}.

    variants: one dict per variant compiled in `kernel_modules`' @triton.jit kernels: function ("module:name"),
    kernel, key (Triton's cache key: the specialisation), signature ({arg: type or "constexpr"}), constants
    ({arg: value}, the specialised ones included), num_warps, shared, vector_loads, fp64, and, from ptxas and
    cuobjdump, registers, spill_stores, spill_loads, stack, local. phases: [{"phase", "variants": [keys]}] after
    each phase the function yielded and at the end. A compile error is raised with the child's output.
    """
    ptxas, cuobjdump = _tool("ptxas"), _tool("cuobjdump")
    if ptxas is None or cuobjdump is None:
        raise RuntimeError("triton's bundled ptxas / cuobjdump not found (site-packages/triton/backends/nvidia/bin)")
    with tempfile.TemporaryDirectory(prefix="hopper_") as tmp:
        spec = {"module": module, "function": function, "kernel_modules": list(kernel_modules),
                "kwargs": dict(kwargs or {}), "tmp": tmp}
        env = dict(os.environ, TRITON_INTERPRET="0")
        env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p] + [env.get("PYTHONPATH", "")])
        proc = subprocess.run([sys.executable, "-c", _LAUNCH_CHILD], input=json.dumps(spec), env=env,
                              capture_output=True, text=True, timeout=timeout)
        tag = "@@HOPPER@@"
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(tag)]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"launching for sm_90 failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n"
                               f"{proc.stderr[-6000:]}")
        result = json.loads(lines[-1][len(tag):])
        for v in result["variants"]:
            res = subprocess.run([cuobjdump, "-res-usage", v["cubin"]], capture_output=True, text=True, check=True,
                                 timeout=timeout)
            v.update(_parse_res_usage(res.stdout, v["kernel"]))
            log = subprocess.run([ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a", v["ptx"],
                                  "-o", v["cubin"] + ".v"], capture_output=True, text=True, timeout=timeout)
            if log.returncode != 0:
                raise RuntimeError(f"ptxas -v failed for {v['kernel']}:\n{log.stderr}")
            v.update(_parse_ptxas_log(log.stdout + log.stderr, v["kernel"]))
            del v["ptx"], v["cubin"]
        return result
