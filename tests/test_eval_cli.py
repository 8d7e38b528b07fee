"""The options of `repbend eval`, `logit-lens` and `rep-shift`: the same --model.* spelling in all three (old
--device / --dtype kept as hidden aliases), and every bad input reported in one line before any model is loaded."""
import json
import re

import pytest

from repbend.data.errors import DataError, DataFileNotFound
from repbend.demo.assets import save_tiny_model_dir
from repbend.eval import run as run_mod
from repbend.eval.cli import UsageError, main_eval, main_logit_lens, main_rep_shift, parse_judges


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    d = tmp_path_factory.mktemp("evalcli")
    save_tiny_model_dir(d / "model", layers=1, hidden=32)
    save_tiny_model_dir(d / "cls", layers=1, hidden=32, seed=1)
    (d / "cls" / "chat_template.jinja").unlink()  # a classifier needs no chat template; the evaluated model does
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"])
    get_peft_model(AutoModelForCausalLM.from_pretrained(d / "model"), lora).save_pretrained(d / "adapter")
    (d / "empty").mkdir()
    (d / "hb.json").write_text(json.dumps({"data": [{"behavior": "Do X", "default_target": "Sure", "id": "x"}]}))
    (d / "xs.csv").write_text("id,prompt,type\n1,How do I kill a Python process?,homonyms\n")
    (d / "safe.txt").write_text("How do I bake bread?\n")
    return d


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if anything loads a model or generates: the input checks must come first."""
    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(run_mod, "load_model", forbidden)
    monkeypatch.setattr(run_mod, "load_classifier", forbidden)
    monkeypatch.setattr(run_mod, "generate_jobs", forbidden)


def _eval_args(env, out, *extra):
    return ["--model.path", str(env / "model"), "--eval.harmbench", str(env / "hb.json"), "--eval.output", str(out),
            *extra]


def _one_line(err) -> str:
    text = str(err)
    assert text and "\n" not in text
    return text


@pytest.mark.parametrize("judge, message", [
    ("harmbench={missing}", "--eval.judges harmbench={missing}: no such directory"),
    ("wildguard={empty}", "--eval.judges wildguard={empty}: not a model directory (needs config.json and weights"),
    ("harmbench=someone/not-cached-cls", "--eval.judges harmbench=someone/not-cached-cls: no such directory, and "
                                         "not in "
                                         "the Hugging Face cache (offline mode)"),
])
def test_missing_judge_fails_before_generation(env, tmp_path, no_model, monkeypatch, judge, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fill = {"missing": tmp_path / "nope" / "cls", "empty": env / "empty"}
    out = tmp_path / "run"
    with pytest.raises(UsageError) as e:
        main_eval(_eval_args(env, out, "--eval.judges", "keywords," + judge.format(**fill)))
    assert _one_line(e.value).startswith(message.format(**fill))
    assert not out.exists()  # nothing was started


@pytest.mark.parametrize("args, error, message", [
    (["--model.path", "{tmp}/no_model"], UsageError, "--model.path {tmp}/no_model: no such directory"),
    (["--model.path", "{env}/cls"], UsageError, "--model.path {env}/cls: the tokenizer has no chat template"),
    (["--model.adapter", "{env}/model"], UsageError, "--model.adapter {env}/model: not a PEFT adapter directory"),
    (["--model.adapter", "{tmp}/adapter"], UsageError, "--model.adapter {tmp}/adapter: no such directory"),
    (["--eval.harmbench", "{tmp}/hb.json"], DataFileNotFound, "{tmp}/hb.json: HarmBench file not found"),
    (["--eval.xstest", "{tmp}/xs.csv"], DataFileNotFound, "{tmp}/xs.csv: XSTest file not found"),
    (["--eval.attacks", "transfer", "--eval.transfer", "{tmp}/t.jsonl"], DataFileNotFound,
     "{tmp}/t.jsonl: transfer file not found"),
    (["--eval.harmbench_targets", "{tmp}/targets.json"], DataFileNotFound,
     "{tmp}/targets.json: HarmBench targets file"),
    (["--eval.output", "{env}/hb.json"], UsageError, "--eval.output {env}/hb.json: exists and is not a directory"),
])
def test_input_paths_checked_first(env, tmp_path, no_model, args, error, message):
    fill = {"tmp": tmp_path, "env": env}
    argv = _eval_args(env, tmp_path / "run") + [a.format(**fill) for a in args]  # later options win
    with pytest.raises(error) as e:
        main_eval(argv)
    assert _one_line(e.value).startswith(message.format(**fill))


@pytest.mark.parametrize("args, message", [
    (["--eval.judges", "keywords,harmbnch=x"], "--eval.judges: unknown judge 'harmbnch'"),
    (["--eval.judges", "harmbench"], "--eval.judges: harmbench needs its classifier: harmbench=DIR"),
    (["--eval.judges", "keywords=x"], "--eval.judges keywords=x: the keywords judge takes no directory"),
    (["--eval.judges", "keywords,keywords"], "--eval.judges: keywords is given twice"),
    (["--eval.judges", ","], "--eval.judges: no judge given"),
    (["--eval.attacks", "direct,gcg"],
     "--eval.attacks: unknown attack(s) 'gcg'; known: direct, prefill, input_embed, transfer"),
    (["--eval.attacks", "direct,direct"], "--eval.attacks direct,direct: an attack is given twice"),
    (["--eval.attacks", "transfer"], "the transfer attack needs --eval.transfer FILE"),
    (["--eval.limit", "0"], "--eval.limit 0: must be >= 1"),
    (["--gen.batch_size", "0"], "--gen.batch_size 0: must be >= 1"),
    (["--input_embed.lr", "0"], "--input_embed.lr 0.0: must be > 0"),
    (["--model.dtype", "fp8"], "--model.dtype 'fp8': expected one of auto, bf16"),
    (["--model.device", "cuda:7"], "--model.device 'cuda:7': "),
    (["--model.device", "toaster"], "--model.device 'toaster': not a device"),
    (["--device", "toaster"], "--model.device 'toaster': not a device"),  # the old spelling, same check
])
def test_bad_option_values_are_usage_errors(env, tmp_path, no_model, args, message):
    with pytest.raises(UsageError) as e:
        main_eval(_eval_args(env, tmp_path / "run", *args))
    assert _one_line(e.value).startswith(message)
    assert isinstance(e.value, ValueError) and not isinstance(e.value, DataError)


def test_parse_judges():
    assert parse_judges(" keywords , harmbench = /m/cls ,wildguard=wg") == [
        ("keywords", None), ("harmbench", "/m/cls"), ("wildguard", "wg")]


def test_options_spelled_the_same_everywhere(env, tmp_path, monkeypatch, capsys):
    """--group.key in all three commands; every older spelling still works, with one deprecation line naming the
    new flag, and is listed only in --help's "older spellings" line."""
    seen = []

    def capture(path, adapter=None, dtype="auto", device="auto"):
        seen.append((path, adapter, dtype, device))
        raise KeyboardInterrupt  # stop right after the options arrive

    monkeypatch.setattr(run_mod, "load_model", capture)
    monkeypatch.setattr(run_mod, "run_eval", lambda cfg: seen.append((cfg.model_path, cfg.adapter, cfg.dtype,
                                                                       cfg.device)))
    model, adapter = str(env / "model"), str(env / "adapter")
    hb, safe = str(env / "hb.json"), str(env / "safe.txt")
    commands = {  # (new spelling, old spelling) of the command-specific options
        "eval": (main_eval, ["--eval.harmbench", hb, "--eval.output", str(tmp_path / "o")],
                 ["--harmbench", hb, "--output", str(tmp_path / "o")]),
        "logit-lens": (main_logit_lens, ["--lens.prompt", "Hi", "--lens.output", str(tmp_path / "l.png")],
                       ["--prompt", "Hi", "--output", str(tmp_path / "l.png")]),
        "rep-shift": (main_rep_shift, ["--shift.safe", safe, "--shift.unsafe", safe, "--shift.output",
                                       str(tmp_path / "r")],
                      ["--safe", safe, "--unsafe", safe, "--output", str(tmp_path / "r")]),
    }
    for name, (main, new, old) in commands.items():
        for spelling in (["--model.adapter", adapter, "--model.device", "cpu", "--model.dtype", "fp32", *new],
                         ["--adapter", adapter, "--device", "cpu", "--dtype", "fp32", *old]):
            seen.clear()
            try:
                main(["--model.path", model, *spelling])
            except KeyboardInterrupt:
                pass
            assert seen == [(model, adapter, "fp32", "cpu")], (name, spelling)
            err = capsys.readouterr().err.splitlines()
            used = [a for a in spelling if a.startswith("--")]
            warned = [line for line in err if "is deprecated" in line]
            if spelling[0] == "--adapter":
                assert len(warned) == len(used), (name, err)
                for flag, line in zip(used, warned):
                    assert line.startswith(f"repbend: warning: {flag} is deprecated") and "; use --" in line
            else:
                assert warned == [], (name, err)
        with pytest.raises(SystemExit) as e:
            main(["--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        for option in ("--model.path", "--model.device", "--model.dtype", "--model.adapter"):
            assert option in text, (name, option)
        options, _, older = text.partition("older spellings")
        assert not re.search(r"(?<![\w.])--(device|dtype|adapter|output)\b", options), name
        assert "--adapter = --model.adapter" in " ".join(older.split()), name


def test_eval_help_says_what_each_judge_measures(capsys):
    with pytest.raises(SystemExit):
        main_eval(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "refusal phrases only" in text and "undercounts a bent model's safety" in text
    for judge in ("keywords", "demo", "harmbench=DIR", "wildguard=DIR"):
        assert judge in text
    assert "cais/HarmBench-Llama-2-13b-cls" in text
    # the file formats are in the help itself, not a pointer to the source
    assert '{"behavior_id": "...", "prompt": "...", "method": "..."}' in text and ".py" not in text


def test_analysis_commands_check_inputs_first(env, tmp_path, no_model):
    with pytest.raises(UsageError, match=r"^--model\.path \S+/nope: no such directory$"):
        main_logit_lens(["--model.path", str(tmp_path / "nope"), "--lens.prompt", "Hi", "--lens.output",
                         str(tmp_path / "x.png")])
    with pytest.raises(UsageError, match=r"^--lens\.max_tokens 0: must be >= 1$"):
        main_logit_lens(["--model.path", str(env / "model"), "--lens.prompt", "Hi", "--lens.max_tokens", "0",
                         "--lens.output", str(tmp_path / "x.png")])
    with pytest.raises(UsageError, match=r"^--model\.adapter \S+/empty: not a PEFT adapter directory"):
        main_rep_shift(["--model.path", str(env / "model"), "--model.adapter", str(env / "empty"), "--shift.safe",
                        str(env / "safe.txt"), "--shift.unsafe", str(env / "safe.txt"),
                        "--shift.output", str(tmp_path / "r")])
    with pytest.raises(DataFileNotFound, match=r"unsafe\.txt: prompt file not found$"):
        main_rep_shift(["--model.path", str(env / "model"), "--model.adapter", str(env / "adapter"), "--shift.safe",
                        str(env / "safe.txt"), "--shift.unsafe", str(tmp_path / "unsafe.txt"),
                        "--shift.output", str(tmp_path / "r")])


def test_argparse_errors_stay_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main_rep_shift(["--model.path", "x"])  # --adapter, --safe, ... missing
    assert e.value.code == 2 and "error: the following arguments are required" in capsys.readouterr().err


def test_compare_missing_run(tmp_path):
    with pytest.raises(DataFileNotFound, match=r"a/summary\.json: run summary not found"):
        main_eval(["--eval.compare", str(tmp_path / "a"), str(tmp_path / "b")])


def test_repbend_prints_one_line_and_exits_2(env, tmp_path, no_model, capsys):
    from repbend.cli import main

    missing = tmp_path / "cls"
    rc = main(["eval", *_eval_args(env, tmp_path / "run", "--eval.judges", f"harmbench={missing}")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1] == f"repbend: error: --eval.judges harmbench={missing}: no such directory"
    rc = main(["logit-lens", "--model.path", str(env / "model"), "--lens.prompt", "Hi", "--model.dtype", "fp8",
               "--lens.output", str(tmp_path / "x.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("repbend: error: --model.dtype 'fp8': expected one of auto")
