"""The parts of a training run, built from its config: the model (with its trained tensors), the data pools and
the micro-batch sampler, and the check, before step 1, that the data can feed every weighted loss term."""
from __future__ import annotations

from .config import RepBendConfig
from .errors import TrainingError
from .model import LoraSettings, attach_lora, decoder_layers, enable_checkpointing, load_model_and_tokenizer


def load_model(cfg: RepBendConfig, device):
    if cfg.model.path is None:
        raise TrainingError("model.path is not set: give --model.path DIR (an HF model directory or hub name)")
    return load_model_and_tokenizer(cfg.model.path, dtype=cfg.model.dtype, device=str(device),
                                    attn_implementation=cfg.model.attn_implementation, liger=cfg.model.liger)


def adapter_layers(cfg: RepBendConfig, n_layers: int) -> list[int]:
    """Decoder layers that get LoRA adapters: lora.layers_to_transform, or 0 .. the last target layer."""
    if cfg.lora.layers_to_transform is not None:
        return list(cfg.lora.layers_to_transform)
    return list(range(min(max(cfg.loss.target_layers), n_layers - 1) + 1))


def prepare_model(cfg: RepBendConfig, model, loss_fn) -> tuple[object, list]:
    """Attach fresh LoRA adapters (repbend, circuit_breakers) and set the training switches; returns the model
    and exactly the tensors to optimise (`RepBendLoss.prepare`: the LoRA tensors, or RMU's full weights, with
    everything else frozen)."""
    n_layers = len(decoder_layers(model))
    if cfg.loss.method != "rmu" and max(cfg.loss.target_layers) > n_layers:
        raise TrainingError(f"loss.target_layers goes up to {max(cfg.loss.target_layers)} but the model has "
                            f"hidden-state indices 0..{n_layers} ({n_layers} decoder layers)")
    retain = cfg.loss.retain_layers
    if cfg.loss.method == "circuit_breakers" and retain != "all" and max(retain, default=0) > n_layers:
        raise TrainingError(f"loss.retain_layers goes up to {max(retain)} but the model has hidden-state indices "
                            f"0..{n_layers} ({n_layers} decoder layers)")
    if cfg.model.gradient_checkpointing:
        enable_checkpointing(model)
    if cfg.loss.method in ("repbend", "circuit_breakers"):
        layers = adapter_layers(cfg, n_layers)
        bad = [i for i in layers if not 0 <= i < n_layers]
        if bad:
            raise TrainingError(f"lora.layers_to_transform {bad} out of range: the model has {n_layers} decoder "
                                "layers")
        lora = LoraSettings(cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules)
        try:
            model = attach_lora(model, lora, layers)
        except ValueError as e:  # e.g. a target module the model does not have
            raise TrainingError(f"lora: {e}") from None
    return model, loss_fn.prepare(model)


def build_data(cfg: RepBendConfig, tokenizer):
    from .data.chat import Limits
    from .data.pools import build_pools

    d = cfg.data
    if not (d.wildguardmix or d.wildjailbreak):
        raise TrainingError("no safe/unsafe data: give --data.wildguardmix FILE and/or --data.wildjailbreak FILE")
    if cfg.loss.method == "repbend" and cfg.loss.epsilon and not d.ultrachat:
        raise TrainingError("loss.epsilon weights L_KL, which reads the retain rows: give --data.ultrachat FILE (or "
                            "set --loss.epsilon 0)")
    limits = Limits(d.max_request_tokens, d.max_response_tokens, d.max_retain_tokens)
    return build_pools(tokenizer, d.wildguardmix, d.wildjailbreak, d.ultrachat, request_only=cfg.loss.request_only,
                       limits=limits, max_examples_per_pool=d.max_examples_per_pool, skip_invalid=d.skip_invalid,
                       seed=cfg.train.seed, method=cfg.loss.method, empty_request_p=d.empty_request_p)


def _source(pools, name: str, key: str) -> str:
    rep = pools.report.sources.get(name)
    if rep is None:
        return f"no --data.{key} was given"
    skipped = f", {rep.skipped.total} skipped as invalid" if rep.skipped.total else ""
    left = f", {sum(rep.left.values())} left out by the label rules" if rep.left else ""
    return f"data.{key} {rep.source} gave {sum(rep.taken.values())} usable rows ({rep.rows_read} read{skipped}{left})"


def check_data(cfg: RepBendConfig, pools) -> None:
    """Every term with a non-zero weight must have rows to read; else stop before step 1, naming the term, the set
    and the file."""
    loss = cfg.loss
    if loss.method != "repbend":
        return _check_baseline_data(cfg, pools)
    if loss.epsilon and not pools.retain:
        raise TrainingError(f"loss.epsilon = {loss.epsilon} weights L_KL, but no retain row can feed it: "
                            f"{_source(pools, 'ultrachat', 'ultrachat')}")
    if loss.eta and not pools.wj_pairs:
        raise TrainingError(f"loss.eta = {loss.eta} weights L_pair, but no WildJailbreak pair can feed it: "
                            f"{_source(pools, 'wildjailbreak', 'wildjailbreak')}")
    if (loss.alpha or loss.beta or loss.gamma) and not (pools.wgm_safe or pools.wgm_unsafe or pools.wj_pairs):
        raise TrainingError("L_safe, L_unsafe and L_cos read the safe and unsafe rows, and there are none: "
                            f"{_source(pools, 'wildguardmix', 'wildguardmix')}; "
                            f"{_source(pools, 'wildjailbreak', 'wildjailbreak')}")


def _check_baseline_data(cfg: RepBendConfig, pools) -> None:
    """Circuit Breakers and RMU: forget rows (WildGuardMix unsafe, WildJailbreak harmful answers) and retain rows
    (WildGuardMix safe, WildJailbreak refusals, UltraChat) must both exist; Circuit Breakers' retain rows must fit
    loss.cb_retain_pad_length, the length its retain term divides by."""
    loss, method = cfg.loss, cfg.loss.method
    wgm, wj = _source(pools, "wildguardmix", "wildguardmix"), _source(pools, "wildjailbreak", "wildjailbreak")
    if not (pools.wgm_unsafe or pools.wj_pairs):
        raise TrainingError(f"{method} needs forget rows (WildGuardMix unsafe rows or WildJailbreak harmful answers) "
                            f"and there are none: {wgm}; {wj}")
    if not (pools.wgm_safe or pools.wj_pairs or pools.retain):
        raise TrainingError(f"{method} needs retain rows (WildGuardMix safe rows, WildJailbreak refusals or UltraChat "
                            f"chats) and there are none: {wgm}; {wj}; {_source(pools, 'ultrachat', 'ultrachat')}")
    if method == "circuit_breakers":
        side = list(pools.wgm_safe) + [refusal for refusal, _ in pools.wj_pairs] + list(pools.retain)
        longest = max(side, key=len)
        if len(longest) > loss.cb_retain_pad_length:
            raise TrainingError(
                f"{longest.origin}: a retain row of {len(longest)} tokens is longer than loss.cb_retain_pad_length "
                f"= {loss.cb_retain_pad_length}, the length the retain term divides by: raise it, or lower "
                "data.max_retain_tokens (UltraChat) or data.max_request_tokens + data.max_response_tokens")


def make_sampler(cfg: RepBendConfig, pools):
    from .data.sampler import MicroBatchSampler

    try:
        return MicroBatchSampler(pools, cfg.train.batch_size, cfg.train.seed, request_only=cfg.loss.request_only,
                                 group_by_length=cfg.data.group_by_length, method=cfg.loss.method)
    except ValueError as e:  # a pool too small for one micro-batch, a missing set
        files = "; ".join(_source(pools, n, n) for n in ("wildguardmix", "wildjailbreak", "ultrachat")
                          if n in pools.report.sources)
        raise TrainingError(f"the data cannot fill one micro-batch of train.batch_size {cfg.train.batch_size}: {e} "
                            f"({files})") from None
