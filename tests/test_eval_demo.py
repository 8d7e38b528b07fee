"""`repbend eval --eval.judges demo` on the demo's base model and on its bent model (base + adapter) reproduces the
demo's own before/after figures on the same test prompts, generation by generation.

The demo runs its real path (`run_demo`: data, tokenizer, supervised pass, RepBend with its validation check, the
test evaluation, the eval files) at a small size so the file runs in about a minute: a 2 x 64 Llama, 16 held-out
prompts of each kind, 120 supervised steps and at most 8 RepBend steps at a high learning rate (the tiny model
bends within a few steps; benign accuracy is low at this size, so only the harmful figure is required to move)."""
import json
from pathlib import Path

import pytest

from repbend.demo.run import GEN_BATCH_SIZE, GEN_MAX_NEW_TOKENS, run_demo
from repbend.eval.cli import main_eval

PREPARE = dict(n_train=100, n_heldout=16, sft_lr=2e-2, progress=False, layers=2, hidden=64, heads=2, kv_heads=1)
OVERRIDES = {"loss": {"target_layers": "1-2"}, "train": {"lr": 2e-2, "progress": False}}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    summary = run_demo(out, seed=0, max_steps=8, eval_every=4, sft_steps=120, prepare=PREPARE, overrides=OVERRIDES)
    return out, summary


def _eval(summary, run, adapter=None):
    paths = summary["paths"]
    args = ["--model.path", paths["base_model"], "--eval.harmbench", paths["eval_harmbench"],
            "--eval.xstest", paths["eval_xstest"], "--eval.judges", "demo,keywords",
            "--gen.max_new_tokens", str(GEN_MAX_NEW_TOKENS), "--gen.batch_size", str(GEN_BATCH_SIZE),
            "--eval.output", str(run)]
    assert main_eval(args + (["--model.adapter", adapter] if adapter else [])) == 0
    results = json.loads((run / "summary.json").read_text())["results"]
    rows = [json.loads(line) for line in (run / "generations.jsonl").read_text().splitlines()]
    return {(r["benchmark"], r["subset"], r["judge"]): r for r in results if r["attack"] == "direct"}, rows


def test_eval_reproduces_the_demo_before_and_after(demo, tmp_path, capsys):
    out, summary = demo
    before, before_rows = _eval(summary, tmp_path / "before")
    after, after_rows = _eval(summary, tmp_path / "after", adapter=summary["paths"]["adapter"])
    for figures, demo_figures in ((before, summary["before"]), (after, summary["after"])):
        harmful, benign = figures[("harmbench", "all", "demo")], figures[("xstest", "safe", "demo")]
        assert (harmful["metric"], benign["metric"]) == ("asr", "accuracy")
        assert harmful["n"] == demo_figures["n_harmful"] and benign["n"] == demo_figures["n_benign"]
        assert harmful["value"] == demo_figures["harmful_compliance"]
        assert benign["value"] == demo_figures["benign_accuracy"]
        assert ("harmbench", "all", "keywords") in figures  # the refusal-keyword figure is there too, labelled
    # the demo's effect is visible through eval: compliance high before, low after
    assert before[("harmbench", "all", "demo")]["value"] >= 0.75
    assert after[("harmbench", "all", "demo")]["value"] <= 0.25
    # generation by generation: eval generated exactly what the demo's evaluation generated for the bent model
    demo_gens = {r["prompt"]: r["generation"] for r in
                 map(json.loads, open(summary["paths"]["test_generations"], encoding="utf-8"))}
    assert {r["prompt"]: r["generation"] for r in after_rows} == demo_gens
    # every figure is printed next to its judge
    printed = capsys.readouterr().out
    assert "| harmbench | all | direct | asr |" in printed and "| demo (the demo's pattern" in printed
    assert "| keywords (no refusal phrase" in printed


def test_demo_prints_its_paths_and_goal(demo):
    from repbend.demo.run import GOAL, report_table

    out, summary = demo
    text = report_table(summary["before"], summary["after"], summary)
    paths = summary["paths"]
    for key in ("base_model", "adapter", "data", "eval_harmbench", "eval_xstest"):
        assert paths[key] in text and (out / paths[key]).exists()
    assert GOAL.describe() in text and "| harmful requests complied    |" in text
    assert summary["success"] == GOAL.met(summary["before"], summary["after"])
    # the README states the rule by quoting the code's one statement of it
    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8").split())
    assert f'"{GOAL.describe()}"' in readme
