"""`repbend plan` from the command line: the table and --json with the method and its reference side by side, both
flag styles, a recipe with a model directory, the verdict and advice for a GPU size, FSDP's per-GPU memory, and one
clear line for a bad setting. On the benchmark's tiny model (seconds)."""
import json
import subprocess
import sys

import pytest

from repbend.cli import main as repbend_main
from repbend.plan import cli
from repbend.plan.report import GIB


def _json(capsys, argv):
    assert cli.main(argv + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_table_and_json_put_the_method_beside_its_reference(capsys):
    assert repbend_main(["plan", "--model", "tiny", "--method", "repbend", "--batch-size", "2"]) == 0
    text = capsys.readouterr().out
    assert "repbend plan: tiny, repbend, batch 2" in text and "GFLOP/tok" in text
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.startswith(("repbend ", "reference "))}
    assert set(rows) == {"repbend", "reference"}
    out = _json(capsys, ["--model", "tiny", "--method", "repbend", "--batch-size", "2"])
    rb, ref = out["variants"]["repbend"], out["variants"]["reference"]
    assert rb["reference"] == "reference" and 0 < rb["flops_vs_reference"] < 1 and 0 < rb["memory_vs_reference"] < 1
    assert rb["flops_per_token"] > 0 and rb["positions_per_token"] < ref["positions_per_token"]
    assert rb["peak_bytes"] == pytest.approx(sum(rb["kinds"].values()))
    assert rb["tokens_per_s_per_gpu"] == pytest.approx(0.4 * 989e12 / rb["flops_per_token"])


def test_dotted_flags_mean_the_same_settings():
    short = cli.setup_from_args(cli.parser().parse_args(
        ["--model", "tiny", "--method", "circuit_breakers", "--batch-size", "3", "--strategy", "fsdp", "--gpus", "2"]))
    dotted = cli.setup_from_args(cli.parser().parse_args(
        ["--model", "tiny", "--loss.method", "circuit_breakers", "--train.batch_size=3", "--distributed.strategy", "fsdp",
         "--gpus", "2"]))
    assert cli.settings_of(short) == cli.settings_of(dotted)
    assert short.method == "circuit_breakers" and short.batch_size == 3 and short.strategy == "fsdp"


def test_recipe_with_a_model_directory(tmp_path, capsys):
    from transformers import LlamaConfig
    LlamaConfig(vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2).save_pretrained(tmp_path / "model")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model:\n  path: {tmp_path / 'model'}\n  gradient_checkpointing: true\n"
                      "lora:\n  r: 8\n  layers_to_transform: 0-2\n"
                      "loss:\n  method: circuit_breakers\n  target_layers: 1,3,2-3\n"
                      "train:\n  batch_size: 3\n  pack_length: 512\n")
    out = _json(capsys, ["--config", str(recipe)])
    s = out["settings"]
    assert (s["method"], s["batch_size"], s["checkpointing"], s["pack_length"], s["layers"]) == (
        "circuit_breakers", 3, True, 512, 4)
    assert set(out["variants"]) == {"circuit_breakers", "cb_reference"}
    out = _json(capsys, ["--config", str(recipe), "--train.batch_size", "1", "--no-reference"])
    assert out["settings"]["batch_size"] == 1 and set(out["variants"]) == {"circuit_breakers"}


def test_verdict_says_what_to_change_when_it_does_not_fit(capsys):
    base = ["--model", "tiny", "--batch-size", "4", "--no-reference", "--model.gradient_checkpointing", "true"]
    fits = _json(capsys, base + ["--gpu-mem", "80"])
    assert fits["verdict"]["fits"] is True
    peak = fits["variants"]["repbend"]["peak_bytes"] / GIB
    tight = 0.75 + peak * 0.8  # less than the peak needs, more than half of it would
    out = _json(capsys, base + ["--gpu-mem", f"{tight:.4f}"])
    vd = out["verdict"]
    assert vd["fits"] is False and vd["advice"], vd
    assert vd["advice"][-1].startswith("--train.batch_size") and vd["advice"][-1].endswith("-> fits: change this")
    # without checkpointing, switching it on is tried first
    out = _json(capsys, ["--model", "tiny", "--batch-size", "4", "--no-reference", "--gpu-mem", f"{tight:.4f}"])
    assert out["verdict"]["advice"][0].startswith("--model.gradient_checkpointing true")


def test_fsdp_shards_the_model_per_gpu(capsys):
    one = _json(capsys, ["--model", "tiny", "--method", "circuit_breakers", "--no-reference"])
    eight = _json(capsys, ["--model", "tiny", "--method", "circuit_breakers", "--no-reference", "--gpus", "8",
                           "--distributed.strategy", "fsdp"])
    p1 = one["variants"]["circuit_breakers"]["kinds"]["parameters"]
    p8 = eight["variants"]["circuit_breakers"]["kinds"]["parameters"]
    assert p8 < p1 / 2
    assert eight["variants"]["circuit_breakers"]["unsharded_peak_bytes"] >= one["variants"]["circuit_breakers"][
        "peak_bytes"]  # the whole stack runs under FSDP2


def test_method_all_plans_every_method_and_says_which_a_strategy_excludes(capsys):
    assert cli.main(["--model", "tiny", "--method", "all", "--no-reference", "--gpus", "2",
                     "--distributed.strategy", "fsdp", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    import step_workload
    from repbend.methods import method_class
    for m in step_workload.METHODS:
        if "fsdp" in method_class(m).STRATEGIES:
            assert out[m]["settings"]["strategy"] == "fsdp" and m in out[m]["variants"]
        else:
            assert "supports ddp only" in out[m]["not_planned"]


@pytest.mark.parametrize("argv,words", [
    (["--model", "no-such-model"], ["--model no-such-model", "known model"]),
    (["--model", "tiny", "--method", "rmu", "--distributed.strategy", "fsdp"], ["fsdp", "rmu supports ddp only"]),
    (["--model", "tiny", "--method", "sgd"], ["--method sgd", "repbend"]),
    (["--model", "tiny", "--gpus", "0"], ["--gpus"]),
])
def test_bad_settings_are_one_line(argv, words):
    p = subprocess.run([sys.executable, "-m", "repbend", "plan", *argv], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 2, p.stderr
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("repbend: error: "), p.stderr
    assert all(w in err[0] for w in words), err
