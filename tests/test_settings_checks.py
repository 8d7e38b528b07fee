"""Settings that used to pass silently or end in a traceback are one line, and checks against this machine come
before the model loads: duplicate YAML keys, a group that is no mapping, the seed range, `~` in every path, a
mistyped local model path, the periodic evaluation's settings and rows, warm-up past the end, a CUDA device or NCCL
on a CPU machine, Weights & Biases without a key."""
import dataclasses
import typing

import pytest
import torch

from repbend import RepBendConfig, train
from repbend.cli import main as cli_main
from repbend.data.errors import DataError
from repbend.errors import ConfigError, UserError
from tiny_run import cfg, make_assets


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("settings-assets"))


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the run gets as far as loading its model."""
    import repbend.trainer as trainer_mod

    def no_load(*a, **k):
        raise AssertionError("the model loaded before the check")
    monkeypatch.setattr(trainer_mod, "load_model", no_load)


# ---------------------------------------------------------------- the YAML file
def test_a_duplicate_key_or_group_in_yaml_is_an_error_naming_it_and_both_lines(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 1e-5\n  max_steps: 3\n  lr: 2e-5\n")
    with pytest.raises(ConfigError, match=r"c.yaml: duplicate key 'lr' at lines 2 and 4"):
        RepBendConfig.load(f)
    f.write_text("train:\n  lr: 1e-5\nlora:\n  r: 4\ntrain:\n  max_steps: 3\n")
    with pytest.raises(ConfigError, match=r"c.yaml: duplicate key 'train' at lines 1 and 5"):
        RepBendConfig.load(f)
    f.write_text("base: &b {lr: 1e-5, max_steps: 3}\n")  # a merge key may be overridden, as YAML intends
    import yaml
    from repbend.config import UniqueKeyLoader
    assert yaml.load("a: &a {x: 1, y: 2}\nb:\n  <<: *a\n  x: 3\n", Loader=UniqueKeyLoader)["b"] == {"x": 3, "y": 2}


def test_a_group_that_is_not_a_mapping_is_one_line_with_or_without_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train: [1, 2]\n")
    for overrides in ([], ["--train.lr", "1e-4"]):
        with pytest.raises(ConfigError, match=r"c.yaml: group 'train' must be a mapping of keys, got list"):
            RepBendConfig.load(f, overrides)


# ---------------------------------------------------------------- values
def test_the_seed_range_is_checked_with_the_settings():
    RepBendConfig.load(None, ["--train.seed", str(2 ** 32 - 1)])
    with pytest.raises(ConfigError, match=r"train.seed must be in \[0, 4294967295\] .*got 202612061240"):
        RepBendConfig.load(None, ["--train.seed", "202612061240"])


def test_warmup_past_the_last_step_is_an_error():
    RepBendConfig.load(None, ["--train.max_steps", "10", "--train.warmup_steps", "10"])
    with pytest.raises(ConfigError, match=r"train.warmup_steps must be <= train.max_steps \(10\)"):
        RepBendConfig.load(None, ["--train.max_steps", "10", "--train.warmup_steps", "11"])


def test_tilde_is_expanded_in_every_path_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    home = str(tmp_path / "home")
    paths = {"model.path": "~/m", "data.wildguardmix": "~/d/wgm.jsonl", "data.wildjailbreak": "~/d/wj.jsonl",
             "data.ultrachat": "~/d/uc.jsonl", "train.output_dir": "~/runs/x", "train.eval_heldout": "~/d/h.jsonl",
             "train.resume": "~/runs/x/checkpoints/step-000002"}
    c = RepBendConfig.load(None, [x for k, v in paths.items() for x in (f"--{k}", v)])
    for key, value in paths.items():
        group, name = key.split(".")
        assert getattr(getattr(c, group), name) == home + value[1:], key
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  output_dir: ~/runs/y\n")
    assert RepBendConfig.load(f).train.output_dir == home + "/runs/y"
    assert RepBendConfig.load(None, ["--data.ultrachat", "HuggingFaceH4/ultrachat_200k@train_sft"]).data.ultrachat \
        == "HuggingFaceH4/ultrachat_200k@train_sft"  # a hub name passes unchanged
    # every path setting of a run is typed as one (a new one cannot forget the expansion)
    from repbend.config_fields import PathStr
    typed = {f"{name}.{f.name}" for name, group in RepBendConfig.groups().items() if dataclasses.is_dataclass(group)
             for f in dataclasses.fields(group) if PathStr in _members(typing.get_type_hints(group)[f.name])}
    assert typed == set(paths)


def _members(hint):
    args = typing.get_args(hint)
    return set(args) if args else {hint}


def test_a_mistyped_local_model_path_says_no_such_directory_without_the_hub(assets, tmp_path, monkeypatch):
    import transformers

    def hub(*a, **k):
        raise AssertionError("went to the hub")
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", hub)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for path in ("models/tiny-llama", "./tiny", "tiny llama"):
        with pytest.raises(ConfigError, match=f"model.path: no such directory: {path}"):
            train(cfg(assets, tmp_path / "out", "--model.path", path))


# ---------------------------------------------------------------- the periodic evaluation
def test_eval_every_needs_a_heldout_file_and_its_rows_are_checked_at_start(assets, tmp_path, no_model_load):
    with pytest.raises(UserError, match=r"train.eval_every 1 needs the held-out prompts.*--train.eval_heldout"):
        train(cfg(assets, tmp_path / "a", "--train.eval_every", "1"))
    bad = tmp_path / "heldout.jsonl"
    bad.write_text('{"kind": "harmful", "prompt": "x"}\n{"kind": "benign", "prompt": "Add 2 and 3.", "answer": 5}\n')
    with pytest.raises(DataError, match=r"heldout.jsonl:2: field 'answer'"):
        train(cfg(assets, tmp_path / "b", "--train.eval_every", "1", "--train.eval_heldout", str(bad)))


# ---------------------------------------------------------------- this machine
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_cuda_and_nccl_on_a_cpu_machine_are_one_line_before_the_model_loads(assets, tmp_path, no_model_load):
    with pytest.raises(ConfigError, match=r"model.device cuda: no CUDA device is available here"):
        train(cfg(assets, tmp_path / "a", "--model.device", "cuda"))
    with pytest.raises(ConfigError, match=r"distributed.backend nccl needs CUDA devices, and this run is on the cpu"):
        train(cfg(assets, tmp_path / "b", "--distributed.backend", "nccl"))


def test_wandb_without_a_key_is_one_line_before_the_model_loads(assets, tmp_path, monkeypatch, no_model_load):
    pytest.importorskip("wandb")
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DISABLED", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    netrc = tmp_path / "netrc"
    netrc.write_text("machine example.com login me password secret\n")
    monkeypatch.setenv("NETRC", str(netrc))
    with pytest.raises(ConfigError, match=r"train.report_to wandb: no Weights & Biases API key .*wandb login"):
        train(cfg(assets, tmp_path / "a", "--train.report_to", "wandb"))
    from repbend.preflight import check_wandb
    for var, value in (("WANDB_MODE", "offline"), ("WANDB_MODE", "disabled"), ("WANDB_API_KEY", "k" * 40)):
        monkeypatch.setenv(var, value)
        check_wandb()
        monkeypatch.delenv(var)
    netrc.write_text("machine api.wandb.ai login user password " + "k" * 40 + "\n")  # what `wandb login` writes
    check_wandb()


def test_these_errors_are_one_line_from_the_command_line(tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 1e-5\ntrain:\n  lr: 2e-5\n")
    assert cli_main(["train", "--config", str(f)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"repbend: error: {f}: duplicate key 'train' at lines 1 and 3 (YAML would keep only the last; give "
                   "each key once)"]
