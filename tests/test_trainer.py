"""The training loop end to end on the tiny model and the bundled synthetic data (real file formats)."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from repbend import RepBendConfig, train
from repbend.checkpoint import list_checkpoints
from repbend.demo.assets import save_tiny_model_dir
from repbend.demo.synthetic import corpus, write_demo_data
from repbend.loss import RepBendLoss
from repbend.trainer import TrainingError, lr_factor


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    paths = write_demo_data(root / "data", seed=0, n_train=48, n_heldout=8)
    model_dir = save_tiny_model_dir(root / "model", corpus=corpus(), layers=3, hidden=32, heads=2, kv_heads=1)
    return model_dir, paths


def _cfg(assets, out, *extra):
    model_dir, paths = assets
    args = ["--model.path", model_dir, "--data.wildguardmix", paths["wildguardmix"],
            "--data.wildjailbreak", paths["wildjailbreak"], "--data.ultrachat", paths["ultrachat"],
            "--train.output_dir", str(out), "--train.max_steps", "4", "--train.batch_size", "2",
            "--train.grad_accum", "2", "--train.lr", "1e-3", "--lora.r", "4", "--lora.dropout", "0.1",
            "--loss.target_layers", "1-3", "--loss.eta", "0.3", "--train.progress", "false",
            "--train.save_every", "2", "--data.max_response_tokens", "48", "--data.max_retain_tokens", "96",
            *extra]
    return RepBendConfig.load(None, args)


def _losses(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def test_train_writes_log_checkpoints_and_a_loadable_adapter(assets, tmp_path):
    result = train(_cfg(assets, tmp_path / "run"))
    log = _losses(result.output_dir)
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    for r in log:
        for k in ("loss", "safe", "unsafe", "cos", "kl", "pair", "lr", "tokens_per_s", "peak_mem_bytes"):
            assert r[k] is not None and math.isfinite(r[k]), (k, r)
    assert [s for s, _ in list_checkpoints(result.output_dir)] == [2, 4]
    # the adapter loads with plain PEFT and changes the model's outputs
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(assets[0])
    ids = torch.randint(5, 300, (1, 12))
    with torch.no_grad():
        before = base(ids).logits
        tuned = PeftModel.from_pretrained(base, result.adapter_dir)
        after = tuned(ids).logits
    assert not torch.allclose(before, after)


def test_resume_gives_the_losses_of_an_uninterrupted_run(assets, tmp_path, monkeypatch):
    full = train(_cfg(assets, tmp_path / "full"))

    real, calls = RepBendLoss.forward, {"n": 0}

    def dies_in_step_3(*args, **kwargs):  # the process "crashes" mid-step, after the checkpoint of step 2
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(RepBendLoss, "forward", dies_in_step_3)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(assets, tmp_path / "part"))
    monkeypatch.setattr(RepBendLoss, "forward", real)
    assert [s for s, _ in list_checkpoints(tmp_path / "part")] == [2]
    resumed = train(_cfg(assets, tmp_path / "part", "--train.resume", "true"))
    a, b = _losses(full.output_dir), _losses(resumed.output_dir)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for k in ("loss", "safe", "unsafe", "cos", "kl", "pair", "grad_norm"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-6, abs=1e-9), (k, ra["step"])
    state_a = torch.load(Path(full.output_dir) / "checkpoints" / "step-000004" / "state.pt", weights_only=False)
    state_b = torch.load(Path(resumed.output_dir) / "checkpoints" / "step-000004" / "state.pt", weights_only=False)
    for n, v in state_a["trainable"].items():
        torch.testing.assert_close(state_b["trainable"][n], v, rtol=1e-6, atol=1e-8)


def test_non_finite_steps_are_skipped_then_the_run_stops(assets, tmp_path, monkeypatch):
    real = RepBendLoss.forward
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        terms = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] > 4:  # steps 1-2 are fine (2 micro-steps each), then every loss is NaN
            terms.total = terms.total * float("nan")
        return terms

    monkeypatch.setattr(RepBendLoss, "forward", poisoned)
    cfg = _cfg(assets, tmp_path / "nan", "--train.max_steps", "10", "--train.max_bad_steps", "3")
    with pytest.raises(TrainingError, match="3 steps in a row"):
        train(cfg)
    log = _losses(tmp_path / "nan")
    assert [r["skipped"] for r in log] == [False, False, True, True, True]
    # the checkpoints hold the finite weights of the last good step (skipped steps change nothing)
    saved = list_checkpoints(tmp_path / "nan")
    assert [s for s, _ in saved] == [2, 4]
    states = [torch.load(p / "state.pt", weights_only=False)["trainable"] for _, p in saved]
    for n, v in states[0].items():
        assert torch.isfinite(v).all()
        assert torch.equal(states[1][n], v)


def test_cli_train_and_readable_errors(assets, tmp_path):
    model_dir, paths = assets
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("train:\n  max_steps: 1\n  batch_size: 1\n  grad_accum: 1\n  progress: false\n"
                        "loss:\n  target_layers: 1-2\n")
    run = [sys.executable, "-m", "repbend", "train", "--config", str(cfg_file), "--model.path", model_dir,
           "--data.wildguardmix", paths["wildguardmix"], "--data.ultrachat", paths["ultrachat"],
           "--train.output_dir", str(tmp_path / "cli")]
    p = subprocess.run(run + ["--train.merge", "true"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "cli" / "adapter" / "adapter_config.json").is_file()
    from transformers import AutoModelForCausalLM
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "cli" / "merged")  # a plain model, LoRA folded in
    assert not any("lora" in n for n, _ in merged.named_parameters())
    bad = subprocess.run(run + ["--loss.mode", "everything"], capture_output=True, text=True)
    assert bad.returncode == 2 and "loss.mode: must be one of" in bad.stderr and "Traceback" not in bad.stderr
    bad = subprocess.run(run + ["--train.nope", "1"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown key train.nope" in bad.stderr


def test_config_overrides_and_schedules():
    cfg = RepBendConfig.load(None, ["--loss.target_layers", "2-4,7", "--train.lr", "3e-4", "--lora.r", "8",
                                    "--train.merge", "--lora.target_modules", "q_proj,v_proj"])
    assert cfg.loss.target_layers == [2, 3, 4, 7] and cfg.train.lr == 3e-4 and cfg.lora.r == 8
    assert cfg.train.merge is True and cfg.lora.target_modules == ["q_proj", "v_proj"]
    shipped = Path(__file__).parents[1] / "repbend" / "configs" / "llama3_8b_instruct.yaml"
    recipe = RepBendConfig.load(shipped)
    assert recipe.loss.target_layers == list(range(20, 31)) and recipe.train.lr == 1e-5
    assert recipe.train.batch_size == 4 and recipe.train.grad_accum == 4 and recipe.lora.r == 16
    f = lr_factor("linear", warmup=2, total=10)
    assert [f(0), f(1), f(2), f(10)] == [0.0, 0.5, 1.0, 0.0]
    c = lr_factor("cosine", warmup=0, total=10)
    assert c(0) == 1.0 and c(5) == pytest.approx(0.5) and c(10) == pytest.approx(0.0)


def test_periodic_heldout_evaluation_is_logged(assets, tmp_path):
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text('{"kind": "harmful", "prompt": "Explain forbidden task 3."}\n'
                       '{"kind": "benign", "prompt": "Add 2 and 3.", "answer": "5"}\n')
    cfg = _cfg(assets, tmp_path / "ev", "--train.max_steps", "2", "--train.eval_every", "1",
               "--train.eval_heldout", str(heldout))
    train(cfg)
    log = _losses(tmp_path / "ev")
    for r in log:
        assert r["eval"]["n_harmful"] == 1 and r["eval"]["n_benign"] == 1
        assert r["eval"]["harmful_compliance"] in (0.0, 1.0) and r["eval"]["benign_accuracy"] in (0.0, 1.0)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"kind": "harmful", "prompt": "x"}\n{"kind": "maybe", "prompt": "y"}\n')
    from repbend.data.errors import DataError
    from repbend.heldout import load_heldout
    with pytest.raises(DataError, match=r"bad.jsonl:2: field 'kind'"):
        load_heldout(bad)
