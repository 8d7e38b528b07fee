"""Everything the demo needs before RepBend: the synthetic data, a tokenizer trained offline on its corpus, a
tiny Llama, and a supervised pass that teaches it to comply with everything; saved as an HF model directory.
"""
from __future__ import annotations

import time
from pathlib import Path

from repbend.demo.assets import build_tiny_model, build_tokenizer
from repbend.demo.sft import supervised_pass
from repbend.demo.synthetic import corpus, read_jsonl, write_demo_data


def prepare_demo_model(work_dir, seed: int = 0, template: str = "llama3", vocab_size: int = 800,
                       n_train: int = 400, n_heldout: int = 64, sft_steps: int = 400, sft_lr: float = 3e-3,
                       sft_batch_size: int = 16, progress: bool = True, log=print,
                       **model_overrides) -> tuple[str, dict[str, str]]:
    """Write the demo data to `work_dir/data`, train the tokenizer on `corpus()`, build the tiny Llama (4 layers
    x 128 hidden unless `model_overrides` say otherwise), run the supervised pass on `sft.jsonl`, and save model
    and tokenizer to `work_dir/base_model`. Returns `(model_dir, data_paths)` with `data_paths` as from
    `write_demo_data` (keys wildguardmix, wildjailbreak, ultrachat, heldout, sft)."""
    import torch

    work = Path(work_dir)
    t0 = time.perf_counter()
    paths = write_demo_data(work / "data", seed=seed, n_train=n_train, n_heldout=n_heldout)
    tokenizer = build_tokenizer(corpus(), template=template, vocab_size=vocab_size)
    model = build_tiny_model(tokenizer, seed=seed, **model_overrides)
    log(f"demo data in {work / 'data'}; tokenizer of {len(tokenizer)} tokens; tiny Llama of "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters ({time.perf_counter() - t0:.1f} s)")

    t1 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        losses = supervised_pass(model, tokenizer, read_jsonl(paths["sft"]), steps=sft_steps, lr=sft_lr,
                                 batch_size=sft_batch_size, seed=seed, progress=progress)
    log(f"supervised pass: {sft_steps} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f} "
        f"({time.perf_counter() - t1:.1f} s)")

    model_dir = work / "base_model"
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(model_dir))
    tokenizer.save_pretrained(str(model_dir))
    return str(model_dir), paths
