"""RepBend inside a Hugging Face `transformers.Trainer`, on the built-in tiny model and synthetic data: runs on the
CPU in seconds and downloads nothing.

    python examples/hf_trainer.py                      # 2 optimizer steps into a temporary folder
    python examples/hf_trainer.py --steps 4 --output runs/hf_example

With your own model: load it (and its tokenizer), attach LoRA adapters (peft.get_peft_model, as here), build the
pools from the public files with repbend.data.build_pools (as here, with your tokenizer and file paths: .jsonl,
.json, .parquet or a hub name), and keep every TrainingArguments setting you use; RepBendTrainer only swaps the
loss. A dataset row is one whole micro-batch (B rows per set), so per_device_train_batch_size counts micro-batches;
micro_batch_dataset(..., args=args) makes as many rows as the run reads (rows_needed). Another method: give its
LossConfig (e.g. LossConfig(method="npo")) to build_pools' spec, micro_batch_dataset and the Trainer alike.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default=None, help="folder for the data, the Trainer's files and the adapter "
                                                  "(default: a temporary folder)")
    p.add_argument("--steps", type=int, default=2, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=2, help="B: sequences per set in one micro-batch")
    p.add_argument("--grad-accum", type=int, default=2, help="micro-batches per optimizer step")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    import torch
    from transformers import TrainingArguments

    from peft import LoraConfig, get_peft_model

    from repbend.data import Limits, build_pools
    from repbend.demo import build_tiny_model, build_tokenizer, corpus, write_demo_data
    from repbend.integrations.hf import RepBendTrainer, micro_batch_dataset
    from repbend.loss import LossConfig, RepBendLoss

    out = Path(a.output or tempfile.mkdtemp(prefix="repbend_hf_"))
    # the public formats (WildGuardMix, WildJailbreak, UltraChat), with placeholder contents
    paths = write_demo_data(out / "data", seed=a.seed, n_train=48, n_heldout=8)
    tokenizer = build_tokenizer(corpus())
    model = build_tiny_model(tokenizer, seed=a.seed, layers=4, hidden=64, heads=4, kv_heads=2)
    torch.manual_seed(a.seed)  # LoRA A's initialisation draws from the global generator
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"]))
    loss = LossConfig(target_layers="2-4", eta=0.3)
    pools = build_pools(tokenizer, paths["wildguardmix"], paths["wildjailbreak"], paths["ultrachat"],
                        spec=RepBendLoss(loss).data_spec(), seed=a.seed,
                        limits=Limits(max_response_tokens=48, max_retain_tokens=96))

    args = TrainingArguments(
        output_dir=str(out / "trainer"), max_steps=a.steps, per_device_train_batch_size=1,
        gradient_accumulation_steps=a.grad_accum, learning_rate=1e-3, lr_scheduler_type="constant",
        max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=a.seed,
        disable_tqdm=True)
    rows = micro_batch_dataset(pools, batch_size=a.batch_size, args=args, seed=a.seed, loss=loss)
    trainer = RepBendTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer, loss=loss)
    trainer.train()
    trainer.save_model(str(out / "adapter"))  # PEFT's adapter files

    for record in trainer.state.log_history:
        if "loss" in record:
            print(json.dumps({k: record[k] for k in ("step", "loss", "loss_safe", "loss_unsafe", "loss_cos",
                                                     "loss_kl", "loss_pair") if k in record}))
    print(f"adapter: {out / 'adapter'}")
    return trainer


if __name__ == "__main__":
    main()
