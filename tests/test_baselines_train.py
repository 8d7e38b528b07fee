"""Circuit Breakers and RMU end to end: `repbend.train` and the CLI on the tiny model and the bundled synthetic data
(real file formats); the logged schedule, the saved weights (a PEFT adapter; RMU's tensors and merged model), and an
RMU resume that gives the losses of an uninterrupted run."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from repbend import RepBendConfig, train
from repbend.demo.assets import save_tiny_model_dir
from repbend.demo.synthetic import corpus, write_demo_data
from repbend.loss import RepBendLoss
from repbend.methods.rmu import load_rmu_weights


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    paths = write_demo_data(root / "data", seed=0, n_train=48, n_heldout=8)
    model_dir = save_tiny_model_dir(root / "model", corpus=corpus(), layers=3, hidden=32, heads=2, kv_heads=1)
    return model_dir, paths


METHOD_ARGS = {
    "circuit_breakers": ["--loss.method", "circuit_breakers", "--loss.target_layers", "1,3,3",
                         "--loss.cb_retain_pad_length", "160", "--lora.r", "4", "--train.lr", "1e-3"],
    "rmu": ["--loss.method", "rmu", "--loss.rmu_layer", "2", "--loss.rmu_update_layers", "0-1",
            "--loss.rmu_alpha", "10", "--loss.steering_coeff", "4", "--train.lr", "1e-3"],
}


def _args(assets, out, method, *extra):
    model_dir, paths = assets
    return ["--model.path", model_dir, "--data.wildguardmix", paths["wildguardmix"],
            "--data.wildjailbreak", paths["wildjailbreak"], "--data.ultrachat", paths["ultrachat"],
            "--train.output_dir", str(out), "--train.max_steps", "2", "--train.batch_size", "2",
            "--train.grad_accum", "1", "--train.progress", "false", "--train.tensorboard", "false",
            "--data.max_request_tokens", "64", "--data.max_response_tokens", "48", "--data.max_retain_tokens", "96",
            *METHOD_ARGS[method], *extra]


def _log(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def test_circuit_breakers_trains_with_its_schedule(assets, tmp_path):
    result = train(RepBendConfig.load(None, _args(assets, tmp_path / "cb", "circuit_breakers")))
    log = _log(result.output_dir)
    assert [r["step"] for r in log] == [1, 2]
    for r in log:
        assert all(math.isfinite(r[k]) for k in ("loss", "retain", "cb", "grad_norm")), r
        s = 0.5 * r["step"] / 2  # cb_progress_scale * optimizer step / max_steps
        assert r["loss"] == pytest.approx(10 * s * r["retain"] + 10 * (1 - s) * r["cb"], rel=1e-5)
    assert log[0]["retain"] == 0 and log[1]["retain"] > 0  # LoRA starts at h' == h
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(assets[0])
    ids = torch.randint(5, 300, (1, 12))
    with torch.no_grad():
        before = base(ids).logits
        after = PeftModel.from_pretrained(base, result.adapter_dir)(ids).logits
    assert not torch.allclose(before, after)


def test_rmu_trains_the_listed_tensors_and_writes_them_and_a_merged_model(assets, tmp_path):
    result = train(RepBendConfig.load(None, _args(assets, tmp_path / "rmu", "rmu", "--train.merge", "true")))
    log = _log(result.output_dir)
    assert [r["step"] for r in log] == [1, 2]
    for r in log:
        assert all(math.isfinite(r[k]) for k in ("loss", "unlearn", "retain", "grad_norm")), r
        assert r["loss"] == pytest.approx(r["unlearn"] + 10 * r["retain"], rel=1e-5)
    assert log[0]["retain"] == 0 and log[1]["retain"] > 0
    adapter = Path(result.adapter_dir)
    assert sorted(p.name for p in adapter.iterdir()) == ["rmu_weights.json", "rmu_weights.safetensors"]
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(assets[0])
    loaded = AutoModelForCausalLM.from_pretrained(assets[0])
    names = load_rmu_weights(loaded, adapter)
    assert names == [f"model.layers.{i}.mlp.down_proj.weight" for i in (0, 1)]
    merged = AutoModelForCausalLM.from_pretrained(Path(result.output_dir) / "merged")
    b, l, m = dict(base.named_parameters()), dict(loaded.named_parameters()), dict(merged.named_parameters())
    for n in b:
        assert torch.equal(l[n], m[n]), n
        assert torch.equal(b[n], l[n]) == (n not in names), n


def test_rmu_resume_gives_the_losses_of_an_uninterrupted_run(assets, tmp_path, monkeypatch):
    extra = ["--train.max_steps", "4", "--train.save_every", "2"]
    full = train(RepBendConfig.load(None, _args(assets, tmp_path / "full", "rmu", *extra)))
    real, calls = RepBendLoss.forward, {"n": 0}

    def dies_in_step_3(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(RepBendLoss, "forward", dies_in_step_3)
    with pytest.raises(KeyboardInterrupt):
        train(RepBendConfig.load(None, _args(assets, tmp_path / "part", "rmu", *extra)))
    monkeypatch.setattr(RepBendLoss, "forward", real)
    resumed = train(RepBendConfig.load(None, _args(assets, tmp_path / "part", "rmu", *extra,
                                                   "--train.resume", "true")))
    a, b = _log(full.output_dir), _log(resumed.output_dir)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for k in ("loss", "unlearn", "retain", "grad_norm"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-6, abs=1e-9), (k, ra["step"])


@pytest.mark.parametrize("method", ["circuit_breakers", "rmu"])
def test_cli_trains_each_baseline(assets, tmp_path, method):
    out = tmp_path / method
    proc = subprocess.run([sys.executable, "-m", "repbend", "train", *_args(assets, out, method)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "adapter:" in proc.stdout
    log = _log(out)
    assert [r["step"] for r in log] == [1, 2]
    terms = {"circuit_breakers": ("retain", "cb"), "rmu": ("unlearn", "retain")}[method]
    assert all(math.isfinite(r[k]) for r in log for k in terms)


@pytest.mark.parametrize("method", ["circuit_breakers", "rmu"])
def test_demo_runs_each_baseline(tmp_path, capsys, method):
    from repbend.demo.run import main
    # a few steps of everything: the plumbing, not the result (the README states what the full demo reaches)
    code = main(["--method", method, "--output", str(tmp_path), "--sft-steps", "2", "--max-steps", "2",
                 "--eval-every", "1"])
    out = capsys.readouterr().out
    name = {"circuit_breakers": "Circuit Breakers", "rmu": "RMU"}[method]
    summary = json.loads((tmp_path / f"summary_{method}.json").read_text())
    assert f"{name} demo: {summary['steps']} {name} steps" in out and "| harmful requests complied" in out
    assert summary["method"] == method and 1 <= summary["steps"] <= 2 and code == (0 if summary["success"] else 1)
    assert (tmp_path / method / "adapter").is_dir()
