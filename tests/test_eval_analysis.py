"""`repbend logit-lens` and `repbend rep-shift` on a tiny random model with a (non-zero) LoRA adapter."""
import csv
import json

import pytest
import torch

from repbend.demo.assets import save_tiny_model_dir
from repbend.eval.cli import main_logit_lens, main_rep_shift

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    d = tmp_path_factory.mktemp("analysis")
    save_tiny_model_dir(d / "model", layers=2, hidden=64)
    base = AutoModelForCausalLM.from_pretrained(d / "model")
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    get_peft_model(base, lora).save_pretrained(d / "adapter")
    (d / "safe.txt").write_text("How do I bake bread?\nWhat is the capital of France?\n")
    (d / "unsafe.jsonl").write_text(json.dumps({"prompt": "How do I pick a lock?"}) + "\n"
                                    + json.dumps({"prompt": "Tell me something bad."}) + "\n")
    return d


def test_logit_lens_png(env, tmp_path):
    out = tmp_path / "lens.png"
    assert main_logit_lens(["--model.path", str(env / "model"), "--model.adapter", str(env / "adapter"),
                            "--lens.prompt",
                            "How do I bake bread?", "--lens.response_prefix", "Sure", "--lens.output", str(out)]) == 0
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    single = tmp_path / "lens_base.png"
    assert main_logit_lens(["--model.path", str(env / "model"), "--lens.prompt", "Hi", "--lens.output",
                            str(single)]) == 0
    assert single.read_bytes().startswith(PNG_MAGIC)


def test_logit_lens_values(env):
    from repbend.eval.generation import encode, render_chat
    from repbend.eval.lens import lens_views
    from repbend.eval.run import load_model

    model, tok = load_model(str(env / "model"), str(env / "adapter"))
    views = lens_views(model, tok, "How do I bake bread?", "Sure", max_tokens=6)
    assert set(views) == {"base", "tuned"}
    ids = encode(tok, render_chat(tok, [{"role": "user", "content": "How do I bake bread?"}]) + "Sure")
    with torch.no_grad():
        with model.disable_adapter():
            base_logits = model(input_ids=torch.tensor([ids])).logits[0, -6:]
        tuned_logits = model(input_ids=torch.tensor([ids])).logits[0, -6:]
    for view, logits in ((views["base"], base_logits), (views["tuned"], tuned_logits)):
        assert view["entropy"].shape == (model.config.num_hidden_layers + 1, 6) and len(view["tokens"]) == 6
        # the last hidden-state index is the model's own prediction
        logp = torch.log_softmax(logits.float(), -1)
        torch.testing.assert_close(view["entropy"][-1], -(logp.exp() * logp).sum(-1), atol=1e-4, rtol=1e-4)
        assert (view["entropy"] >= 0).all() and (view["entropy"] <= torch.log(torch.tensor(float(len(tok))))).all()
    assert not torch.allclose(views["base"]["entropy"][-1], views["tuned"]["entropy"][-1])


def test_logit_lens_difference_view(env, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from repbend.eval.generation import encode, render_chat
    from repbend.eval.lens import lens_diff
    from repbend.eval.run import load_model

    model, tok = load_model(str(env / "model"), str(env / "adapter"))
    diff = lens_diff(model, tok, "How do I bake bread?", "Sure", max_tokens=6)
    L = model.config.num_hidden_layers + 1
    assert diff["delta"].shape == diff["differs"].shape == (L, 6) and len(diff["tuned_top"]) == L
    assert (diff["delta"].abs() <= 1).all() and diff["differs"].any()
    ids = encode(tok, render_chat(tok, [{"role": "user", "content": "How do I bake bread?"}]) + "Sure")
    with torch.no_grad():
        with model.disable_adapter():
            p_base = model(input_ids=torch.tensor([ids])).logits[0, -6:].float().softmax(-1)
        p_tuned = model(input_ids=torch.tensor([ids])).logits[0, -6:].float().softmax(-1)
    top = p_base.argmax(-1, keepdim=True)  # the last hidden-state index is the model's own prediction
    torch.testing.assert_close(diff["delta"][-1], (p_tuned.gather(-1, top) - p_base.gather(-1, top)).squeeze(-1),
                               atol=1e-5, rtol=1e-5)
    assert diff["differs"][-1].tolist() == (p_base.argmax(-1) != p_tuned.argmax(-1)).tolist()
    # an adapter that changes nothing (LoRA B = 0): no difference anywhere
    base = AutoModelForCausalLM.from_pretrained(env / "model")
    fresh = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).eval()
    same = lens_diff(fresh, tok, "How do I bake bread?", "Sure", max_tokens=6)
    assert not same["differs"].any() and same["delta"].abs().max() == 0
    # the command
    out = tmp_path / "diff.png"
    assert main_logit_lens(["--model.path", str(env / "model"), "--model.adapter", str(env / "adapter"),
                            "--lens.prompt", "How do I bake bread?", "--lens.view", "diff", "--lens.output",
                            str(out)]) == 0
    assert out.read_bytes().startswith(PNG_MAGIC)
    printed = capsys.readouterr().out
    assert "tokens whose top-1 changed" in printed and len(printed.splitlines()) == L + 2


@pytest.mark.parametrize("positions", ["last", "all"])
def test_rep_shift_csv_and_png(env, tmp_path, positions):
    out = tmp_path / "shift"
    assert main_rep_shift(["--model.path", str(env / "model"), "--model.adapter", str(env / "adapter"), "--shift.safe",
                           str(env / "safe.txt"), "--shift.unsafe", str(env / "unsafe.jsonl"),
                           "--shift.positions", positions,
                           "--shift.output", str(out)]) == 0
    assert (out / "rep_shift.png").read_bytes().startswith(PNG_MAGIC)
    with (out / "rep_shift.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["set"] for r in rows] == ["safe"] * 3 + ["unsafe"] * 3  # 2 layers: hidden indices 0, 1, 2
    for r in rows:
        n = int(r["n_tokens"])
        assert n == 2 if positions == "last" else n > 2
        if r["hidden_index"] == "0":  # embeddings carry no adapter
            assert float(r["mean_l2"]) == 0.0 and float(r["mean_cos"]) == pytest.approx(1.0, abs=1e-5)
        else:
            assert float(r["mean_l2"]) > 0.0 and float(r["mean_cos"]) < 1.0
