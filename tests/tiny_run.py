"""Shared by the run-safety tests: the tiny model and synthetic data, and the settings of a short run on them (the
shipped defaults where they matter: LoRA dropout 0.05, packing on)."""
import json
from pathlib import Path

from repbend import RepBendConfig
from repbend.demo.assets import save_tiny_model_dir
from repbend.demo.synthetic import corpus, write_demo_data


def make_assets(root: Path, seed: int = 0):
    paths = write_demo_data(root / "data", seed=0, n_train=32, n_heldout=4)
    model_dir = save_tiny_model_dir(root / "model", corpus=corpus(), seed=seed, layers=2, hidden=32, heads=2,
                                    kv_heads=1)
    return model_dir, paths


def args(assets, out, *extra) -> list[str]:
    model_dir, paths = assets
    return ["--model.path", str(model_dir), "--data.wildguardmix", paths["wildguardmix"],
            "--data.wildjailbreak", paths["wildjailbreak"], "--data.ultrachat", paths["ultrachat"],
            "--train.output_dir", str(out), "--train.max_steps", "2", "--train.batch_size", "1",
            "--train.grad_accum", "1", "--train.lr", "1e-3", "--lora.r", "2", "--loss.target_layers", "1-2",
            "--train.progress", "false", "--train.save_every", "1", "--train.tensorboard", "false",
            "--data.max_response_tokens", "24", "--data.max_retain_tokens", "48", *extra]


def cfg(assets, out, *extra) -> RepBendConfig:
    return RepBendConfig.load(None, args(assets, out, *extra))


def logged(out) -> list[dict]:
    return [json.loads(x) for x in (Path(out) / "log.jsonl").read_text().splitlines()]


def adapter(out, sub="adapter"):
    from safetensors.torch import load_file
    return load_file(str(Path(out) / sub / "adapter_model.safetensors"))


def same_tensors(a: dict, b: dict) -> bool:
    import torch
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
