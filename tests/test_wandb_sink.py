"""The Weights & Biases sink of `repbend train` (--train.report_to wandb), in wandb's offline mode: no network, no
account, every wandb folder under the test's tmp_path.

- a run writes <output_dir>/wandb_id.txt and an offline run folder named with that id, holding the logged scalars;
- --train.resume true continues the same W&B run id (a second offline folder with the same id);
- a fresh run with --train.overwrite true starts a new W&B run;
- without the wandb package the run goes on, with one warning, and log.jsonl has every number.
"""
import json
import logging
import re
import sys
from pathlib import Path

import pytest

from repbend import RepBendConfig, train
from repbend.demo.assets import save_tiny_model_dir
from repbend.demo.synthetic import corpus, write_demo_data


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    paths = write_demo_data(root / "data", seed=0, n_train=32, n_heldout=8)
    model_dir = save_tiny_model_dir(root / "model", corpus=corpus(), layers=2, hidden=32, heads=2, kv_heads=1)
    return model_dir, paths


def _cfg(assets, out, steps, *extra):
    model_dir, paths = assets
    return RepBendConfig.load(None, [
        "--model.path", model_dir, "--data.wildguardmix", paths["wildguardmix"], "--data.wildjailbreak",
        paths["wildjailbreak"], "--data.ultrachat", paths["ultrachat"], "--train.output_dir", str(out),
        "--train.max_steps", str(steps), "--train.batch_size", "1", "--train.grad_accum", "1", "--lora.r", "2",
        "--loss.target_layers", "1-2", "--train.progress", "false", "--train.tensorboard", "false",
        "--train.save_every", "1", "--train.report_to", "wandb", "--data.max_response_tokens", "24",
        "--data.max_retain_tokens", "48", *extra])


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="the wandb package is not installed (pip install '.[test]')")
    home = tmp_path / "wandb_home"
    for var, sub in (("WANDB_DIR", "dir"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config"),
                     ("WANDB_DATA_DIR", "data"), ("WANDB_ARTIFACT_DIR", "artifacts")):
        monkeypatch.setenv(var, str(home / sub))
    for var, value in (("WANDB_MODE", "offline"), ("WANDB_SILENT", "true"), ("WANDB_CONSOLE", "off"),
                       ("WANDB_DISABLE_GIT", "true"), ("WANDB_DISABLE_CODE", "true")):
        monkeypatch.setenv(var, value)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    monkeypatch.delenv("WANDB_RESUME", raising=False)
    yield wandb
    wandb.teardown()  # ends wandb's service process, which would outlive the test


def _runs(out: Path) -> dict[Path, str]:
    """Offline run folder -> its W&B run id. wandb names a folder offline-run-<start time, 1 s>-<id>, with -1, -2 ...
    appended when a run of the same id started in the same second."""
    runs = {}
    for folder in sorted((out / "wandb").glob("offline-run-*")):
        m = re.fullmatch(r"offline-run-\d{8}_\d{6}-([a-z0-9]+)(-\d+)?", folder.name)
        assert m, folder.name
        runs[folder] = m.group(1)
    return runs


def _data(folder: Path, run_id: str) -> bytes:
    """The run's record file (protobuf records; the logged keys appear in it as plain strings)."""
    return (folder / f"run-{run_id}.wandb").read_bytes()


def _steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]


def test_offline_run_and_resume_continue_the_same_wandb_run(assets, tmp_path, offline_wandb):
    out = tmp_path / "run"
    train(_cfg(assets, out, 2))
    run_id = (out / "wandb_id.txt").read_text().strip()
    assert run_id.isalnum() and len(run_id) == 8
    ((first, first_id),) = _runs(out).items()
    assert first_id == run_id
    for key in (b"tokens_per_s", b"peak_mem_bytes", b"safe", b"loss"):  # the step records' scalars
        assert key in _data(first, run_id), key

    train(_cfg(assets, out, 3, "--train.resume", "true"))
    assert (out / "wandb_id.txt").read_text().strip() == run_id
    runs = _runs(out)
    assert len(runs) == 2 and set(runs.values()) == {run_id}
    (resumed,) = set(runs) - {first}
    assert b"tokens_per_s" in _data(resumed, run_id)
    assert _steps(out) == [1, 2, 3]

    train(_cfg(assets, out, 1, "--train.overwrite", "true"))  # a fresh run: a new W&B run
    new_id = (out / "wandb_id.txt").read_text().strip()
    assert new_id != run_id and new_id in _runs(out).values()


def test_without_the_wandb_package_the_run_goes_on_with_a_warning(assets, tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="repbend"):
        train(_cfg(assets, out, 1))
    assert [r.getMessage() for r in caplog.records if "wandb" in r.getMessage()] == [
        "train.report_to has wandb but the wandb package is not installed: no W&B logging (pip install wandb); "
        "log.jsonl has every number"]
    assert _steps(out) == [1] and not (out / "wandb").exists() and not (out / "wandb_id.txt").exists()
