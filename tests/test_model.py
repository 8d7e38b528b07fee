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
