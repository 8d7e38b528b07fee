"""Model loading switches that matter on a CPU machine."""
import logging

import torch

from repbend.demo.assets import save_tiny_model_dir
from repbend.model import apply_liger_patches, load_model_and_tokenizer, resolve_attention, resolve_dtype


def test_cpu_defaults_and_liger_falls_back_with_a_warning(tmp_path, caplog):
    path = save_tiny_model_dir(tmp_path / "m", layers=1, hidden=32, heads=2, kv_heads=1)
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32 and resolve_attention("auto", cpu, torch.float32) == "sdpa"
    with caplog.at_level(logging.WARNING, logger="repbend.model"):
        assert apply_liger_patches(path) is False
        model, tok = load_model_and_tokenizer(path, liger=True)
    assert "continuing without it" in caplog.text
    assert next(model.parameters()).dtype == torch.float32 and tok.chat_template


def test_dtype_names_all_linear_and_an_adapter_that_names_its_base_absolutely(tmp_path, monkeypatch):
    import json
    import os
    import subprocess
    import sys

    from repbend import RepBendConfig, train
    from repbend.demo import corpus, write_demo_data

    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    assert RepBendConfig.load(None, ["--model.dtype", "float16"]).model.dtype == "float16"
    model_dir = save_tiny_model_dir(tmp_path / "m", corpus=corpus(), layers=2, hidden=32, heads=2, kv_heads=1)
    paths = write_demo_data(tmp_path / "d", seed=0, n_train=16, n_heldout=4)
    monkeypatch.chdir(tmp_path)  # the user typed a relative model path
    cfg = RepBendConfig.load(None, [
        "--model.path", "m", "--data.wildguardmix", paths["wildguardmix"], "--data.ultrachat", paths["ultrachat"],
        "--train.output_dir", "run", "--train.max_steps", "1", "--train.batch_size", "1", "--train.grad_accum", "1",
        "--lora.r", "2", "--lora.target_modules", "all-linear", "--train.progress", "false",
        "--data.max_response_tokens", "16", "--data.max_retain_tokens", "32"])
    result = train(cfg)
    adapter = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(tmp_path / "m")
    assert sorted(adapter["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                        "up_proj", "down_proj"])
    # from another directory, with the hub off, PEFT finds the base by the recorded path
    code = ("from peft import AutoPeftModelForCausalLM; import sys; "
            f"m = AutoPeftModelForCausalLM.from_pretrained({str(tmp_path / result.adapter_dir)!r}); "
            "print(type(m).__name__)")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", env=env, timeout=120)
    assert p.returncode == 0 and "Peft" in p.stdout, p.stderr[-2000:]
