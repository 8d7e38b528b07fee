"""The parts of a training run, built from its config: the model (with its trained tensors), the data pools and
the micro-batch sampler, and the checks, before step 1, that the settings fit the model and the data can feed every
weighted loss term. Everything method-specific comes from the method (`RepBendLoss(cfg.loss).method`)."""
from __future__ import annotations

from .config import RepBendConfig
from .errors import TrainingError
from .model import (LoraSettings, attach_lora, check_model_path, decoder_layers, enable_checkpointing,
                    load_model_and_tokenizer)


def load_model(cfg: RepBendConfig, device):
    if cfg.model.path is None:
        raise TrainingError("model.path is not set: give --model.path DIR (an HF model directory or hub name)")
    return load_model_and_tokenizer(cfg.model.path, dtype=cfg.model.dtype, device=str(device),
                                    attn_implementation=cfg.model.attn_implementation, liger=cfg.model.liger)


def check_before_load(cfg: RepBendConfig, *, model_given: bool = False, evaluate_given: bool = False) -> None:
    """The checks of a run's settings against this machine and its files that need no model: each failure is one
    line, before minutes go into loading a model. The model path (a path-like name must be a directory), the device
    (CUDA asked for and present), the process-group backend (nccl needs CUDA), the output directory (a directory,
    writable), the periodic evaluation (a held-out file to read, every row valid) and Weights & Biases (a key or an
    offline mode; the server is never contacted here)."""
    from .preflight import check_backend, check_device, check_output_dir, check_wandb

    t = cfg.train
    if not model_given:
        if cfg.model.path is None:
            raise TrainingError("model.path is not set: give --model.path DIR (an HF model directory or hub name)")
        check_model_path(cfg.model.path)
    device = check_device(cfg.model.device)
    check_backend(cfg.distributed.backend, device)
    check_output_dir(t.output_dir)
    if t.eval_every and not t.eval_heldout and not evaluate_given:
        raise TrainingError(f"train.eval_every {t.eval_every} needs the held-out prompts to evaluate: give "
                            "--train.eval_heldout FILE (or set --train.eval_every 0)")
    if t.eval_every and t.eval_heldout and not evaluate_given:
        from .heldout import load_heldout
        load_heldout(t.eval_heldout)  # every row checked now, not at the first evaluation
    if "wandb" in t.report_to:
        check_wandb()


def adapter_layers(cfg: RepBendConfig, method, n_layers: int) -> list[int] | None:
    """Decoder layers that get LoRA adapters: lora.layers_to_transform, or the method's default (None: the method
    trains full weights, no adapters)."""
    default = method.lora_layers(n_layers)
    if default is None or cfg.lora.layers_to_transform is None:
        return default
    return list(cfg.lora.layers_to_transform)


def check_model_fits(cfg: RepBendConfig, method, n_layers: int) -> None:
    """The settings against a model of `n_layers` decoder layers, from its config alone (before weights load): layer
    indices in range, adapters where a weighted term can see them."""
    layers = adapter_layers(cfg, method, n_layers)
    if layers is not None:
        bad = [i for i in layers if not 0 <= i < n_layers]
        if bad:
            raise TrainingError(f"lora.layers_to_transform {bad} out of range: the model has {n_layers} decoder "
                                "layers")
    method.check_model(n_layers, layers)


def prepare_model(cfg: RepBendConfig, model, loss_fn) -> tuple[object, list]:
    """Attach fresh LoRA adapters (the methods that train them) and set the training switches; returns the model
    and exactly the tensors to optimise (`RepBendLoss.prepare`: the LoRA tensors, or a full-weight method's
    tensors, with everything else frozen)."""
    method = loss_fn.method
    n_layers = len(decoder_layers(model))
    check_model_fits(cfg, method, n_layers)
    if cfg.model.gradient_checkpointing:
        enable_checkpointing(model)
    layers = adapter_layers(cfg, method, n_layers)
    if layers is not None:
        lora = LoraSettings(cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules)
        try:
            model = attach_lora(model, lora, layers)
        except ValueError as e:  # e.g. a target module the model does not have
            raise TrainingError(f"lora: {e}") from None
    return model, loss_fn.prepare(model)


DATA_KEYS = {"wildguardmix": "wildguardmix", "wildjailbreak": "wildjailbreak", "ultrachat": "ultrachat"}
ROLE_SOURCE = {"safe": "wildguardmix", "unsafe": "wildguardmix", "pair": "wildjailbreak", "retain": "ultrachat"}


def build_data(cfg: RepBendConfig, tokenizer, loss_fn):
    """The method's pools from the data files of `cfg.data` (`repbend.data.build_pools`)."""
    from .data.chat import Limits
    from .data.pools import SOURCES, build_pools

    d = cfg.data
    spec = loss_fn.data_spec(d.empty_request_p)
    given = {name: getattr(d, name) for name in SOURCES}
    if not any(given.values()):
        raise TrainingError("no data: give --data.wildguardmix FILE, --data.wildjailbreak FILE and/or "
                            "--data.ultrachat FILE")
    for name, source in given.items():
        if source and not set(SOURCES[name]) & set(spec.roles):
            raise TrainingError(f"data.{name} {source}: loss.method {cfg.loss.method} reads {', '.join(spec.roles)} "
                                f"rows, and this file gives {'/'.join(SOURCES[name])} rows only: leave it out")
    limits = Limits(d.max_request_tokens, d.max_response_tokens, d.max_retain_tokens)
    return build_pools(tokenizer, d.wildguardmix, d.wildjailbreak, d.ultrachat, spec=spec, limits=limits,
                       max_examples_per_pool=d.max_examples_per_pool, skip_invalid=d.skip_invalid, seed=cfg.train.seed,
                       subset=d.subset)


def describe_role(pools, role: str) -> str:
    """What the files gave for `role`, for an error message (with the label values that left rows out)."""
    name = ROLE_SOURCE[role]
    rep = pools.report.sources.get(name)
    if rep is None:
        return f"no --data.{name} was given"
    return f"data.{name} {rep.source} gave {rep.taken.get(role, 0)} usable {role} rows ({_counts(rep)})"


def _counts(rep) -> str:
    out = f"{rep.rows_read} read"
    if rep.skipped.total:
        out += f", {rep.skipped.total} skipped as invalid"
    if rep.left:
        seen = "; ".join(f"{n} x {reason}" for reason, n in rep.left.most_common(3))
        out += f", {sum(rep.left.values())} left out by the label rules: {seen}"
    return out


def check_data(cfg: RepBendConfig, pools, loss_fn) -> None:
    """Every file the user named must give rows the method reads, and every term with a non-zero weight rows to
    read; else stop before step 1, naming the file (with what it held), or the term, the set and the file (the
    method's `check_data`)."""
    from .data.pools import SOURCES

    for name, rep in pools.report.sources.items():
        roles = [r for r in SOURCES[name] if r in pools.spec.roles]
        if not any(rep.taken.get(r, 0) for r in roles):
            raise TrainingError(f"data.{name} {rep.source} gave no usable {'/'.join(roles)} rows ({_counts(rep)}): "
                                "fix the file or leave it out")
    loss_fn.method.check_data(pools, lambda role: describe_role(pools, role))


def make_sampler(cfg: RepBendConfig, pools, loss_fn):
    from .data.sampler import MicroBatchSampler

    try:
        sampler = MicroBatchSampler(pools, cfg.train.batch_size, cfg.train.seed, loss_fn.method,
                                    group_by_length=cfg.data.group_by_length)
    except ValueError as e:  # a draw too small for one micro-batch, a missing set
        files = "; ".join(describe_role(pools, role) for role in pools.spec.roles
                          if ROLE_SOURCE[role] in pools.report.sources)
        raise TrainingError(f"the data cannot fill one micro-batch of train.batch_size {cfg.train.batch_size}: {e} "
                            f"({files})") from None
    check_batch = getattr(loss_fn.method, "check_batch", None)
    if check_batch is not None:  # settings whose micro-batches give no term a gradient at the start
        check_batch(sampler(0))
    return sampler
