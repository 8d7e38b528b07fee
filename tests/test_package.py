"""The installed layout: `repbend.kernels` stands alone (torch and triton only), no top-level `kernels` module
exists, and `pip install .` builds a wheel that holds both packages."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def _py(code: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd)


def test_kernels_import_nothing_but_torch_and_triton(tmp_path):
    p = _py("import sys, repbend.kernels as k; k.rep_distance, k.linear_kl, k.pairwise_cosine_loss; "
            "bad = sorted({m.split('.')[0] for m in sys.modules} & {'transformers', 'peft', 'tokenizers', 'yaml'}); "
            "print(bad); assert not bad", tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr


def test_no_top_level_kernels_module(tmp_path):
    # from anywhere: the installed distribution has no top-level `kernels`
    p = _py("import importlib.util as u; assert u.find_spec('kernels') is None, u.find_spec('kernels')", tmp_path)
    assert p.returncode == 0, p.stderr
    # from the repository root the folder is visible, but loads nothing under the wrong name, and transformers
    # does not take it for Hugging Face's kernels package
    p = _py("import sys, kernels; assert 'triton' not in sys.modules; kernels.rep_distance", ROOT)
    assert p.returncode != 0 and "use `from repbend.kernels import rep_distance`" in p.stderr, p.stderr
    p = _py("from transformers.utils.import_utils import is_kernels_available as a; assert not a()", ROOT)
    assert p.returncode == 0, p.stderr


@pytest.mark.skipif(sys.platform != "linux", reason="wheel build check on Linux")
def test_wheel_holds_both_packages(tmp_path):
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    wheel, = tmp_path.glob("repbend-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "repbend/kernels/rep_distance.py" in names and "repbend/kernels/linear_kl.py" in names
    assert "repbend/trainer.py" in names and "repbend/configs/llama3_8b_instruct.yaml" in names
    assert "repbend/demo/templates/llama3.jinja" in names
    assert not any(n.startswith("kernels/") for n in names)
