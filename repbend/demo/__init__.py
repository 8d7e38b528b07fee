"""The built-in tiny model and synthetic data: `repbend demo`, and the public pieces examples and tests build on.

    from repbend.demo import build_tokenizer, build_tiny_model, save_tiny_model_dir, write_demo_data, corpus

    paths = write_demo_data("data")           # WildGuardMix / WildJailbreak / UltraChat files (placeholders only)
    tokenizer = build_tokenizer(corpus())      # a byte-level BPE tokenizer with a Llama-3-style chat template
    model = build_tiny_model(tokenizer, layers=4, hidden=64, heads=4, kv_heads=2)   # random weights, LlamaForCausalLM

Nothing here downloads anything.
"""
__all__ = ["build_tokenizer", "build_tiny_model", "save_tiny_model_dir", "write_demo_data", "corpus"]


def __getattr__(name):
    if name in ("build_tokenizer", "build_tiny_model", "save_tiny_model_dir"):
        from . import assets
        return getattr(assets, name)
    if name in ("write_demo_data", "corpus"):
        from . import synthetic
        return getattr(synthetic, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
