"""Runs that used to finish with exit code 0 and a wrong result now stop with one clear line, or do exactly what they
say: a reused output directory, a resume with other settings, a loss term that no data can feed, torn logs,
corrupt checkpoints, and config values of the wrong type."""
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from repbend import RepBendConfig, train
from repbend.checkpoint import latest_checkpoint, list_checkpoints
from repbend.demo.assets import save_tiny_model_dir
from repbend.demo.synthetic import corpus, write_demo_data
from repbend.errors import ConfigError, TrainingError


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety-assets")
    paths = write_demo_data(root / "data", seed=0, n_train=32, n_heldout=4)
    model_dir = save_tiny_model_dir(root / "model", corpus=corpus(), layers=2, hidden=32, heads=2, kv_heads=1)
    return model_dir, paths


def _args(assets, out, *extra):
    model_dir, paths = assets
    return ["--model.path", model_dir, "--data.wildguardmix", paths["wildguardmix"],
            "--data.wildjailbreak", paths["wildjailbreak"], "--data.ultrachat", paths["ultrachat"],
            "--train.output_dir", str(out), "--train.max_steps", "2", "--train.batch_size", "1",
            "--train.grad_accum", "1", "--train.lr", "1e-3", "--lora.r", "2", "--loss.target_layers", "1-2",
            "--train.progress", "false", "--train.save_every", "1", "--train.tensorboard", "false",
            "--data.max_response_tokens", "24", "--data.max_retain_tokens", "48", *extra]


def _cfg(assets, out, *extra):
    return RepBendConfig.load(None, _args(assets, out, *extra))


def _log(out):
    return [json.loads(x) for x in (Path(out) / "log.jsonl").read_text().splitlines()]


def _adapter(out):
    from safetensors.torch import load_file
    return load_file(str(Path(out) / "adapter" / "adapter_model.safetensors"))


# ---------------------------------------------------------------- the output directory
def test_a_fresh_run_refuses_a_directory_holding_another_run(assets, tmp_path):
    out = tmp_path / "run"
    train(_cfg(assets, out, "--train.max_steps", "3", "--train.seed", "1"))
    with pytest.raises(TrainingError, match=r"train.output_dir .* holds another run"):
        train(_cfg(assets, out))
    # overwrite removes the old checkpoints, log and adapter first: nothing of the seed-1 run survives
    train(_cfg(assets, out, "--train.overwrite", "true"))
    assert [s for s, _ in list_checkpoints(out)] == [1, 2]
    assert [r["step"] for r in _log(out)] == [1, 2]
    fresh = tmp_path / "fresh"
    train(_cfg(assets, fresh))
    for name, v in _adapter(fresh).items():
        torch.testing.assert_close(_adapter(out)[name], v)


def test_resume_with_settings_that_change_the_trajectory_stops(assets, tmp_path):
    out = tmp_path / "run"
    train(_cfg(assets, out))
    with pytest.raises(TrainingError) as e:
        train(_cfg(assets, out, "--train.resume", "true", "--train.max_steps", "3", "--train.lr", "2e-3",
                   "--lora.r", "4"))
    msg = str(e.value)
    assert "train.lr 0.001 -> 0.002" in msg and "lora.r 2 -> 4" in msg and "allow_config_change" in msg
    assert "\n" not in msg
    # raising max_steps and logging cadence is fine, and recorded
    train(_cfg(assets, out, "--train.resume", "true", "--train.max_steps", "3", "--train.save_every", "3"))
    changes = [json.loads(x) for x in (out / "config_changes.jsonl").read_text().splitlines()]
    assert {c["key"] for c in changes} == {"train.max_steps", "train.save_every", "train.resume"}
    assert all(c["step"] == 2 and not c["changes_trajectory"] for c in changes)
    # an explicit allow_config_change lets a real change through, with its values, and uses the new lr
    train(_cfg(assets, out, "--train.resume", "true", "--train.max_steps", "4", "--train.lr", "2e-3",
               "--train.allow_config_change", "true"))
    changes = [json.loads(x) for x in (out / "config_changes.jsonl").read_text().splitlines()]
    lr = [c for c in changes if c["key"] == "train.lr"]
    assert lr == [{"step": 3, "checkpoint": "step-000003", "key": "train.lr", "old": 0.001, "new": 0.002,
                   "changes_trajectory": True}]
    assert _log(out)[-1]["step"] == 4 and _log(out)[-1]["lr"] == pytest.approx(2e-3)


def test_resume_notices_changed_data_contents(assets, tmp_path):
    model_dir, paths = assets
    data = tmp_path / "uc.jsonl"
    shutil.copy(paths["ultrachat"], data)
    out = tmp_path / "run"
    train(_cfg(assets, out, "--data.ultrachat", str(data)))
    lines = data.read_text().splitlines()
    data.write_text("\n".join(lines[1:] + lines[:1]) + "\n")  # same file name, rows in another order
    with pytest.raises(TrainingError, match="run.data_fingerprint"):
        train(_cfg(assets, out, "--data.ultrachat", str(data), "--train.resume", "true", "--train.max_steps", "3"))


def test_a_corrupt_latest_checkpoint_is_skipped_with_a_warning(assets, tmp_path, caplog):
    out = tmp_path / "run"
    train(_cfg(assets, out, "--train.max_steps", "3", "--train.keep_checkpoints", "3"))
    state = out / "checkpoints" / "step-000003" / "state.pt"
    state.write_bytes(state.read_bytes()[:100])  # truncated by a full disk, say
    with caplog.at_level(logging.WARNING, logger="repbend"):
        assert latest_checkpoint(out).name == "step-000002"
    assert "step-000003" in caplog.text and "incomplete" in caplog.text
    train(_cfg(assets, out, "--train.max_steps", "3", "--train.resume", "true"))
    assert [r["step"] for r in _log(out)] == [1, 2, 3]
    with pytest.raises(TrainingError, match="not a complete checkpoint"):
        (out / "checkpoints" / "step-000003" / "manifest.json").unlink()
        train(_cfg(assets, out, "--train.resume", str(out / "checkpoints" / "step-000003")))


def test_a_torn_log_line_keeps_every_earlier_record(assets, tmp_path):
    out = tmp_path / "run"
    train(_cfg(assets, out, "--train.max_steps", "3", "--train.keep_checkpoints", "0"))
    shutil.rmtree(out / "checkpoints" / "step-000003")
    log = out / "log.jsonl"
    lines = log.read_text().splitlines()
    log.write_text(lines[0] + "\n" + lines[1][:-7] + "\xe9\n" + lines[1] + "\n" + lines[2][:20])
    train(_cfg(assets, out, "--train.max_steps", "3", "--train.resume", "true"))
    assert [r["step"] for r in _log(out)] == [1, 2, 3]


def test_the_final_adapter_is_replaced_atomically(assets, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(_cfg(assets, out))
    before = _adapter(out)
    import repbend.trainer as trainer_mod
    real = trainer_mod._save_weights

    def dies_half_way(model, loss_fn, path, state=None):
        real(model, loss_fn, path, state)
        if "adapter.tmp" in str(path):
            (Path(path) / "adapter_model.safetensors").write_bytes(b"half")
            raise KeyboardInterrupt
    monkeypatch.setattr(trainer_mod, "_save_weights", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(assets, out, "--train.resume", "true", "--train.max_steps", "3"))
    after = _adapter(out)  # still the whole adapter of step 2
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


# ---------------------------------------------------------------- terms that nothing can feed
def test_a_weighted_term_without_rows_is_an_error_at_start(assets, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    # a file named that gives nothing is an error itself (naming what it held), before any term's check
    with pytest.raises(TrainingError, match=r"data.ultrachat .*empty.jsonl gave no usable retain rows \(0 read\)"):
        train(_cfg(assets, tmp_path / "a", "--data.ultrachat", str(empty)))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"messages": []}\n{"nope": 1}\n')
    with pytest.raises(TrainingError, match=r"broken.jsonl gave no usable retain rows \(2 read, 2 skipped as invalid"):
        train(_cfg(assets, tmp_path / "b", "--data.ultrachat", str(broken), "--data.skip_invalid", "true"))
    args = _args(assets, tmp_path / "c", "--loss.eta", "0.5")
    i = args.index("--data.wildjailbreak")
    with pytest.raises(TrainingError, match=r"loss.eta = 0.5 weights L_pair.*no --data.wildjailbreak"):
        train(RepBendConfig.load(None, args[:i] + args[i + 2:]))
    assert not (tmp_path / "a" / "log.jsonl").exists()  # nothing ran


def test_settings_that_switch_a_weighted_term_off_are_errors():
    with pytest.raises(ConfigError, match="loss.response_r must be >= 1 in mode response_R"):
        RepBendConfig.load(None, ["--loss.mode", "response_R", "--loss.response_r", "0"])
    with pytest.raises(ConfigError, match="loss.eta must be 0 in the request-only mode request_last"):
        RepBendConfig.load(None, ["--loss.mode", "request_last", "--loss.eta", "0.5"])
    RepBendConfig.load(None, ["--loss.mode", "response_R", "--loss.response_r", "0", "--loss.alpha", "0",
                              "--loss.beta", "0"])  # nothing is weighted: allowed


# ---------------------------------------------------------------- typed settings
def test_yaml_and_command_line_values_are_parsed_by_their_type(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text('train:\n  lr: 1e-5\n  packing: "no"\n  betas: [0.8, 0.95]\nlora:\n  r: "8"\n'
                 'loss:\n  target_layers: [3, 5]\n')
    cfg = RepBendConfig.load(f)
    assert cfg.train.lr == 1e-5 and isinstance(cfg.train.lr, float)
    assert cfg.train.packing is False and cfg.lora.r == 8 and cfg.train.betas == [0.8, 0.95]
    assert cfg.loss.target_layers == [3, 5]
    cfg = RepBendConfig.load(None, ["--train.packing", "off", "--train.max_steps", "1e3", "--loss.target_layers",
                                    "18,29,20-22", "--lora.layers_to_transform", "null"])
    assert cfg.train.packing is False and cfg.train.max_steps == 1000
    assert cfg.loss.target_layers == [18, 29, 20, 21, 22] and cfg.lora.layers_to_transform is None
    for args, message in [
        (["--lora.r", "16.5"], "lora.r: expected an integer, got '16.5'"),
        (["--train.lr", "abc"], "train.lr: expected a number, got 'abc'"),
        (["--train.packing", "maybe"], "train.packing: expected true or false"),
        (["--lora.r", "0"], "lora.r must be >= 1"),
        (["--lora.dropout", "1.5"], "lora.dropout must be in [0, 1)"),
        (["--loss.target_layers", "5-2"], "loss.target_layers: layer range '5-2' is empty"),
        (["--train.betas", "0.9"], "train.betas must be two values"),
        (["--train.lr"], "train.lr: expected a number, got 'true'"),
        (["--trian.lr", "1"], "overrides look like --group.key"),
        (["--train.lrr", "1"], "unknown key train.lrr (did you mean 'lr'?)"),
    ]:
        with pytest.raises(ConfigError) as e:
            RepBendConfig.load(None, args)
        assert message in str(e.value), (args, str(e.value))
    f.write_text("train:\n  max_steps: [1, 2]\n")
    with pytest.raises(ConfigError, match=r"train.max_steps: expected an integer, got \[1, 2\]"):
        RepBendConfig.load(f)


def test_max_bad_steps_0_lets_a_healthy_run_finish(assets, tmp_path):
    result = train(_cfg(assets, tmp_path / "run", "--train.max_bad_steps", "0"))
    assert result.steps == 2 and not any(r["skipped"] for r in _log(tmp_path / "run"))


def test_tensorboard_missing_gives_one_warning(assets, tmp_path, monkeypatch, caplog):
    import builtins
    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with caplog.at_level(logging.WARNING, logger="repbend"):
        train(_cfg(assets, tmp_path / "run", "--train.tensorboard", "true"))
    assert caplog.text.count("tensorboard package is not installed") == 1


# ---------------------------------------------------------------- the command line
def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "repbend", *args], capture_output=True, text=True, cwd=cwd)


def test_user_errors_are_one_line_with_exit_code_2(assets, tmp_path):
    model_dir, paths = assets
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("train:\n  lr: [1, 2]\n")
    no_template = tmp_path / "no_template"
    shutil.copytree(model_dir, no_template)
    cfg_file = no_template / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_file.read_text())
    tok_cfg.pop("chat_template", None)
    cfg_file.write_text(json.dumps(tok_cfg))
    for f in no_template.glob("chat_template.*"):
        f.unlink()
    cases = [
        (["train", "--train.lr", "abc"], "train.lr: expected a number"),
        (["train", "--config", str(bad_yaml)], "train.lr: expected a number, got [1, 2]"),
        (["train", "--lora.r", "-3"], "lora.r must be >= 1"),
        (["train", "--lora.dropout", "2"], "lora.dropout must be in [0, 1)"),
        (["train", *_args(assets, tmp_path / "x")[:1], str(tmp_path / "missing"), *_args(assets, tmp_path / "x")[2:]],
         "model.path: no such directory: " + str(tmp_path / "missing")),
        (["train", "--model.path", str(no_template), *_args(assets, tmp_path / "y")[2:]], "has no chat template"),
    ]
    for args, message in cases:
        p = _cli(*args)
        assert p.returncode == 2, (args, p.stderr[-2000:])
        err = [line for line in p.stderr.splitlines() if line.startswith("repbend: error:")]
        assert len(err) == 1 and message in err[0], (args, p.stderr[-2000:])
        assert "Traceback" not in p.stderr, (args, p.stderr[-2000:])
    p = _cli("train", "--train.lr", "abc", "--debug")
    assert p.returncode == 2 and "Traceback" in p.stderr and "repbend: error: train.lr" in p.stderr


def test_train_help_lists_every_key_with_type_default_and_text():
    from repbend.cli import train_help
    from repbend.config_fields import field_docs
    text = train_help()
    from repbend.methods import METHODS, method_class
    groups = [(name, cls) for name, cls in RepBendConfig.groups().items() if name != "loss"]
    groups += [("loss", method_class(m).Settings) for m in METHODS]  # each method's own keys
    for name, cls in groups:
        docs = field_docs(cls)
        for f in __import__("dataclasses").fields(cls):
            assert f"--{name}.{f.name} " in text, f.name
            assert docs.get(f.name), f"{name}.{f.name} has no documentation"
    assert "--loss.method {repbend,circuit_breakers,rmu,npo,dpo}" in text
    assert "{request_last,request_all,request_response,response_all,response_one,response_R}" in text
    assert "--lora.r int  (default: 16)" in text and "--train.seed int  (default: 42)" in text
    p = _cli("train", "--train.lr", "3e-4", "--print_config")
    assert p.returncode == 0 and "lr: 0.0003" in p.stdout


def test_data_without_unsafe_rows_is_one_clear_error(assets, tmp_path):
    model_dir, paths = assets
    rows = [json.loads(x) for x in Path(paths["wildguardmix"]).read_text().splitlines()]
    safe_only = tmp_path / "safe_only.jsonl"
    safe_only.write_text("".join(json.dumps(r) + "\n" for r in rows if r["prompt_harm_label"] == "unharmful"))
    args = _args(assets, tmp_path / "run", "--data.wildguardmix", str(safe_only))
    i = args.index("--data.wildjailbreak")
    with pytest.raises(TrainingError) as e:
        train(RepBendConfig.load(None, args[:i] + args[i + 2:]))
    assert "cannot fill one micro-batch" in str(e.value) and "unsafe rows: 0" in str(e.value)
    assert "safe_only.jsonl" in str(e.value)


def test_resume_with_only_incomplete_checkpoints_says_so(assets, tmp_path):
    out = tmp_path / "run"
    train(_cfg(assets, out, "--train.max_steps", "1"))
    (out / "checkpoints" / "step-000001" / "manifest.json").unlink()
    with pytest.raises(TrainingError, match="holds no complete checkpoint"):
        train(_cfg(assets, out, "--train.resume", "true"))


def test_tensorboard_by_default_only_when_installed_and_progress_lines_in_a_log_file(assets, tmp_path, monkeypatch,
                                                                                    caplog):
    import importlib.util

    installed = importlib.util.find_spec("tensorboard") is not None
    assert RepBendConfig.load(None, []).train.sinks == (["tensorboard"] if installed else [])
    assert RepBendConfig.load(None, ["--train.tensorboard", "false"]).train.sinks == []
    assert RepBendConfig.load(None, ["--train.tensorboard", "true"]).train.sinks == ["tensorboard"]
    # output that is not a terminal (a log file): plain lines, no bar redraws
    with caplog.at_level(logging.INFO, logger="repbend"):
        train(_cfg(assets, tmp_path / "run", "--train.progress", "true", "--train.max_steps", "3"))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("repbend: ")]
    assert lines and lines[-1].startswith("repbend: 3/3 steps") and "loss=" in lines[-1]
    assert "\r" not in caplog.text and "tensorboard package is not installed" not in caplog.text


def test_schedules_are_transformers_own_with_a_warmup_ratio():
    from repbend.trainer import lr_factor

    cfg = RepBendConfig.load(None, ["--train.max_steps", "20", "--train.warmup_ratio", "0.15", "--train.schedule",
                                    "cosine_with_restarts"]).train
    assert cfg.warmup == 3
    f = lr_factor(cfg.schedule, cfg.warmup, cfg.max_steps)
    assert [round(f(s), 3) for s in (0, 1, 3)] == [0.0, 0.333, 1.0] and f(20) == 0.0
    with pytest.raises(ConfigError, match="train.warmup_ratio must be 0 when train.warmup_steps is set"):
        RepBendConfig.load(None, ["--train.warmup_steps", "2", "--train.warmup_ratio", "0.1"])
