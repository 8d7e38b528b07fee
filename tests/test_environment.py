"""The test environment itself: which Triton mode the kernel tests run in, and (under `make test-compat`) the
releases installed.

- conftest.py turns the Triton interpreter on (TRITON_INTERPRET=1) only where no CUDA device is available, and
  must do so before any module with @triton.jit functions is imported: `triton.jit` reads the flag when it
  decorates, so a kernel module imported earlier would hold compiled-kernel objects that cannot run on the CPU.
- REPBEND_EXPECT_PINS (set by `make test-compat`) is a space-separated list of requirements such as
  "python==3.12.* torch==2.11.0 numpy==2.5.2"; every one must hold for the interpreter running the tests, so a
  stale `.venv-compat` or a pin moved by pip fails here instead of passing against other releases.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import os
import platform

import pytest
import torch

triton = pytest.importorskip("triton")

from packaging.requirements import InvalidRequirement, Requirement  # noqa: E402

_KERNEL_MODULES = ("repbend.kernels.rep_distance", "repbend.kernels.pairwise_cosine", "repbend.kernels.linear_kl",
                   "repbend.kernels.linear_logprob")


def _kernels() -> dict[str, object]:
    """Every @triton.jit object defined at module level in the kernel modules, by qualified name."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    found = {}
    for name in _KERNEL_MODULES:
        mod = importlib.import_module(name)
        for attr, obj in vars(mod).items():
            if isinstance(obj, (JITFunction, InterpretedFunction)):
                found[f"{name}.{attr}"] = obj
    return found


def test_interpreter_only_without_cuda():
    from repbend.kernels._dispatch import interpreter_on

    if torch.cuda.is_available():
        assert not interpreter_on(), ("TRITON_INTERPRET is on although CUDA is available: the kernel tests would "
                                      "check the interpreter instead of the compiled kernels (unset it)")
    else:
        assert interpreter_on(), "no CUDA device and TRITON_INTERPRET is off: Triton kernels cannot run on the CPU"


def test_kernels_were_decorated_in_the_mode_in_force():
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    from repbend.kernels._dispatch import interpreter_on

    kernels = _kernels()
    assert len(kernels) >= 4, f"expected the kernel modules' @triton.jit functions, found {sorted(kernels)}"
    want = InterpretedFunction if interpreter_on() else JITFunction
    wrong = sorted(k for k, obj in kernels.items() if not isinstance(obj, want))
    assert not wrong, (f"{wrong} are not {want.__name__}: their module was imported before TRITON_INTERPRET was "
                       f"{'set' if interpreter_on() else 'cleared'} (see tests/conftest.py)")


@pytest.mark.parametrize("cuda, given, want", [
    (False, None, "1"),     # CPU: the interpreter
    (True, None, None),     # GPU: compiled kernels, the flag left unset
    (False, "0", "0"),      # an explicit setting is kept either way
    (True, "1", "1"),
])
def test_conftest_rule(monkeypatch, cuda, given, want):
    # conftest.py run again with CUDA's answer faked (this machine may have no GPU); monkeypatch restores the flag.
    import runpy

    if given is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", given)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    runpy.run_path(os.path.join(os.path.dirname(__file__), "conftest.py"))
    assert os.environ.get("TRITON_INTERPRET") == want


def _installed(name: str) -> str:
    if name == "python":
        return platform.python_version()
    return importlib.metadata.version(name)


def expected_pins() -> list[Requirement]:
    """REPBEND_EXPECT_PINS parsed; a malformed entry is an error naming the variable and the entry."""
    pins = []
    for item in os.environ.get("REPBEND_EXPECT_PINS", "").split():
        try:
            pins.append(Requirement(item))
        except InvalidRequirement as e:
            raise ValueError(f"REPBEND_EXPECT_PINS: entry {item!r} is not a requirement: {e}") from None
    return pins


@pytest.mark.skipif(not os.environ.get("REPBEND_EXPECT_PINS", "").strip(),
                    reason="REPBEND_EXPECT_PINS unset (only `make test-compat` pins the releases)")
def test_installed_releases_match_the_pins():
    bad = []
    for req in expected_pins():
        try:
            have = _installed(req.name)
        except importlib.metadata.PackageNotFoundError:
            bad.append(f"{req}: not installed")
            continue
        # `==2.11.0` admits a local build tag (2.11.0+cu130), as pip does.
        if not req.specifier.contains(have, prereleases=True):
            bad.append(f"{req}: found {have}")
    assert not bad, "this environment is not the pinned one (rebuild it: rm -rf .venv-compat): " + "; ".join(bad)


def test_pin_parsing(monkeypatch):
    monkeypatch.setenv("REPBEND_EXPECT_PINS", " python==3.12.*  torch==2.11.0\tnumpy>=2.5 ")
    pins = expected_pins()
    assert [str(p) for p in pins] == ["python==3.12.*", "torch==2.11.0", "numpy>=2.5"]
    assert pins[1].specifier.contains("2.11.0+cu130") and not pins[1].specifier.contains("2.11.1")
    assert pins[0].specifier.contains("3.12.1") and not pins[0].specifier.contains("3.11.7")
    monkeypatch.setenv("REPBEND_EXPECT_PINS", "torch==2.11.0 numpy=2.5")
    with pytest.raises(ValueError, match="REPBEND_EXPECT_PINS: entry 'numpy=2.5'"):
        expected_pins()
