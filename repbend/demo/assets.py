"""Offline building blocks for the demo and the tests: a byte-level BPE tokenizer with a chat template, and a
tiny Llama built from a config with random weights. Nothing is downloaded.

The vocabulary holds the special tokens of all three bundled chat templates (Llama-3, Mistral and ChatML
style), so one tokenizer can render any of them; `template` picks which one it carries.
"""
from __future__ import annotations

from importlib import resources
from typing import Iterable

TEMPLATES = ("llama3", "mistral", "chatml")

# special tokens: (bos, eos, pad) per template, plus the markup tokens all templates need
_ROLES = {
    "llama3": ("<|begin_of_text|>", "<|eot_id|>"),
    "mistral": ("<s>", "</s>"),
    "chatml": ("<|endoftext|>", "<|im_end|>"),
}
SPECIAL_TOKENS = [
    "<pad>", "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
    "<s>", "</s>", "<|endoftext|>", "<|im_start|>", "<|im_end|>",
]

_DEFAULT_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "How do I bake bread? Mix flour, water, salt and yeast, knead, let it rise, then bake it.",
    "Sure, here is a short answer to your question. I can't help with that request.",
    "What is the capital of France? The capital of France is Paris.",
    "Add 12 and 30. The answer is 42. Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000.",
    "user assistant system Hello! How can I help you today? Thank you, goodbye.",
]


def chat_template(name: str) -> str:
    """The Jinja source of a bundled chat template ("llama3", "mistral" or "chatml")."""
    if name not in TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}; bundled: {', '.join(TEMPLATES)}")
    return resources.files("repbend.demo").joinpath("templates", f"{name}.jinja").read_text(encoding="utf-8")


def build_tokenizer(corpus: Iterable[str] | None = None, template: str = "llama3", vocab_size: int = 800):
    """Train a byte-level BPE on `corpus` (a default sample when None) and wrap it as a
    `PreTrainedTokenizerFast` carrying the bundled chat `template`. Deterministic for a given corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bos, eos = _ROLES[template]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus) if corpus is not None else _DEFAULT_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token="<pad>", unk_token=None,
    )
    fast.chat_template = chat_template(template)
    fast.padding_side = "right"
    return fast


def tiny_llama_config(vocab_size: int, layers: int = 4, hidden: int = 128, heads: int = 4, kv_heads: int = 2,
                      intermediate: int | None = None, max_positions: int = 2048, **overrides):
    """A small `LlamaConfig` (GQA, untied head) for CPU runs and tests."""
    from transformers import LlamaConfig

    cfg = dict(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions, rms_norm_eps=1e-5, tie_word_embeddings=False,
        attention_dropout=0.0,
    )
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def build_tiny_model(tokenizer, seed: int = 0, dtype=None, **config_overrides):
    """A randomly initialised tiny Llama matching `tokenizer` (fp32, sdpa attention, eval mode)."""
    import torch
    from transformers import LlamaForCausalLM

    config = tiny_llama_config(len(tokenizer), **config_overrides)
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    if dtype is not None:
        model = model.to(dtype)
    model.config._attn_implementation = "sdpa"
    return model.eval()


def save_tiny_model_dir(path, corpus: Iterable[str] | None = None, template: str = "llama3", seed: int = 0,
                        **config_overrides) -> str:
    """Write a tiny model and its tokenizer to `path` (an HF model directory usable as --model.path)."""
    tokenizer = build_tokenizer(corpus, template=template)
    model = build_tiny_model(tokenizer, seed=seed, **config_overrides)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return str(path)
