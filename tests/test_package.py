"""The installed layout and the names the project shares with the ecosystem.

- `repbend.kernels` stands alone (torch and triton only) and `pip install .` builds a wheel holding it inside
  `repbend/`, with no top-level `kernels`.
- Nothing in the repository is importable as `kernels`, the name of Hugging Face's kernels package (which
  transformers requires and imports): from the repository root and from anywhere else, `import kernels` gives the
  installed package, and the README's commands (`python -m repbend ...`, a training step through transformers'
  Auto classes) run in both places. A top-level `kernels/` folder broke every command started from the root.
"""
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def _py(code: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd)


def _run(args: list[str], cwd, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("PYTHONPATH", None)  # as a user runs it: the working directory is what puts the root on sys.path
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def test_kernels_import_nothing_but_torch_and_triton(tmp_path):
    p = _py("import sys, repbend.kernels as k; k.rep_distance, k.linear_kl, k.pairwise_cosine_loss; "
            "bad = sorted({m.split('.')[0] for m in sys.modules} & {'transformers', 'peft', 'tokenizers', 'yaml'}); "
            "print(bad); assert not bad", tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr


def test_no_module_of_the_repository_is_importable_as_kernels(tmp_path):
    # whether or not Hugging Face's kernels is installed: `kernels` is either absent or theirs, never our folder
    code = ("import importlib.util as u, pathlib; s = u.find_spec('kernels'); "
            "o = None if s is None else (s.origin or str(list(s.submodule_search_locations or []))); print(o); "
            f"assert o is None or {str(ROOT)!r} not in o or '/site-packages/' in o, o")
    for cwd in (ROOT, tmp_path):
        p = _py(code, cwd)
        assert p.returncode == 0, (cwd, p.stdout + p.stderr)
    assert not (ROOT / "kernels").exists(), "a top-level kernels/ folder shadows Hugging Face's kernels package"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from repbend.demo.assets import save_tiny_model_dir
    from repbend.demo.synthetic import corpus, write_demo_data

    root = tmp_path_factory.mktemp("eco")
    paths = write_demo_data(root / "data", seed=0, n_train=24, n_heldout=4)
    model_dir = save_tiny_model_dir(root / "model", corpus=corpus(), layers=2, hidden=32, heads=2, kv_heads=1)
    return root, model_dir, paths


@pytest.mark.parametrize("where", ["root", "elsewhere"])
def test_readme_commands_run_from_the_root_and_elsewhere(tiny_run, where):
    """`python -m repbend`, `python examples/...`, `python -m pytest` and transformers' Auto classes, whether or not Hugging Face's kernels package is installed
    (transformers 5.25 requires it, so `make test` has it; `make test-compat`'s transformers 5.17 does not)."""
    root, model_dir, paths = tiny_run
    cwd = ROOT if where == "root" else root
    load = ("import importlib.util as u, transformers as t; from transformers.utils.import_utils import "
            "is_kernels_available; s = u.find_spec('kernels'); "
            "print('KERNELS', s and s.origin, is_kernels_available()); "
            "s and __import__('kernels').__file__; "
            f"tok = t.AutoTokenizer.from_pretrained({str(model_dir)!r}); "
            f"m = t.AutoModelForCausalLM.from_pretrained({str(model_dir)!r}); "
            "print('LOADED', type(m).__name__, len(tok('hello')['input_ids']))")
    p = _run(["-c", load], cwd)
    assert p.returncode == 0 and "LOADED" in p.stdout, p.stdout + p.stderr
    assert str(ROOT / "kernels") not in p.stdout

    p = _run(["-m", "repbend", "demo", "--help"], cwd)
    assert p.returncode == 0 and "usage" in p.stdout.lower(), p.stdout + p.stderr

    out = root / f"run_{where}"
    p = _run(["-m", "repbend", "train", "--model.path", str(model_dir), "--data.wildguardmix", paths["wildguardmix"],
              "--data.wildjailbreak", paths["wildjailbreak"], "--data.ultrachat", paths["ultrachat"],
              "--train.output_dir", str(out), "--train.max_steps", "1", "--train.batch_size", "1",
              "--train.grad_accum", "1", "--lora.r", "2", "--loss.target_layers", "1-2", "--train.progress", "false",
              "--data.max_response_tokens", "24", "--data.max_retain_tokens", "48"], cwd)
    assert p.returncode == 0, p.stdout + p.stderr
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [1] and (out / "adapter" / "adapter_config.json").is_file()

    ex_out = root / f"example_{where}"
    p = _run([str(ROOT / "examples" / "hf_trainer.py"), "--steps", "1", "--output", str(ex_out)], cwd)
    assert p.returncode == 0 and (ex_out / "adapter").is_dir(), p.stdout + p.stderr

    # `python -m pytest` puts the working directory on sys.path as `python -m repbend` does
    probe = root / f"test_probe_{where}.py"
    probe.write_text("import transformers as t\n\n\ndef test_auto_classes():\n"
                     f"    t.AutoTokenizer.from_pretrained({str(model_dir)!r})\n"
                     f"    t.AutoModelForCausalLM.from_pretrained({str(model_dir)!r})\n")
    p = _run(["-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(root), str(probe)], cwd)
    assert p.returncode == 0 and "1 passed" in p.stdout, p.stdout + p.stderr


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


def test_recipes_by_name_from_an_installed_wheel(tmp_path):
    """`pip install .`: the recipes ship inside the package and resolve by name from any directory."""
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path / "w"), str(ROOT)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    wheel, = (tmp_path / "w").glob("repbend-*.whl")
    p = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(tmp_path / "site"),
                        str(wheel)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    run = lambda *a: subprocess.run([sys.executable, "-m", "repbend", *a], capture_output=True, text=True,  # noqa: E731
                                    cwd=tmp_path, env=env, timeout=120)
    where = subprocess.run([sys.executable, "-c", "import repbend; print(repbend.__file__)"], capture_output=True,
                           text=True, cwd=tmp_path, env=env).stdout
    assert str(tmp_path / "site") in where, where  # the installed copy, not the source tree
    listing = run("recipes")
    assert listing.returncode == 0 and "llama3_8b_instruct" in listing.stdout and "llama3_8b_rmu" in listing.stdout
    for name in ("llama3_8b_instruct", "llama3_8b_instruct.yaml", "repbend/configs/llama3_8b_instruct.yaml"):
        shown = run("train", "--config", name, "--print_config")
        assert shown.returncode == 0 and "lr: 1.0e-05" in shown.stdout and "max_steps: 450" in shown.stdout, \
            shown.stdout + shown.stderr
    copied = run("recipes", "cp", "llama3_8b_rmu", str(tmp_path / "mine.yaml"))
    assert copied.returncode == 0 and "method: rmu" in (tmp_path / "mine.yaml").read_text()
    missing = run("train", "--config", "llama3_8b_nope", "--print_config")
    assert missing.returncode == 2 and "no such file or recipe: llama3_8b_nope" in missing.stderr
