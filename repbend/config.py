"""Configuration: one dataclass per group, loaded from YAML and overridden with dotted flags.

    repbend train --config configs/llama3_8b.yaml --train.lr 2e-5 --loss.target_layers 20-30

Every field is documented where it is declared; `__post_init__` validates what can be checked early.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

LOSS_MODES = ("request_last", "request_all", "request_response", "response_all", "response_one", "response_R")
REQUEST_ONLY_MODES = ("request_last", "request_all")


class ConfigError(ValueError):
    pass


def parse_layers(spec) -> list[int]:
    """"20-30" -> [20, ..., 30] (inclusive); "1,2,5" -> [1, 2, 5]; "2-4,7" mixes both; a list passes through."""
    if spec is None:
        return []
    if isinstance(spec, int):
        return [spec]
    if isinstance(spec, (list, tuple)):
        return [int(x) for x in spec]
    out: list[int] = []
    for part in str(spec).replace(" ", "").split(","):
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-", 1)
            if int(hi) < int(lo):
                raise ConfigError(f"layer range {part!r} is empty (end before start)")
            out.extend(range(int(lo), int(hi) + 1))
        else:
            out.append(int(part))
    return out


@dataclass
class ModelConfig:
    path: str | None = None
    """HF model directory or hub name. None (the demo only) builds the bundled tiny model."""
    dtype: str = "auto"
    """auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32."""
    device: str = "auto"
    """auto (the CUDA device of this rank, else CPU) | cpu | cuda | cuda:N."""
    attn_implementation: str = "auto"
    """auto (flash_attention_2 on GPU when installed, else sdpa) | sdpa | eager | flash_attention_2."""
    gradient_checkpointing: bool = False
    """Recompute decoder layers in the backward of the LoRA pass (the recipe turns it on)."""
    liger: bool = False
    """Liger-kernel RMSNorm/RoPE/SwiGLU patches (CUDA, when installed)."""


@dataclass
class DataConfig:
    wildguardmix: str | None = None
    """WildGuardMix rows: a .jsonl/.json/.parquet file or a hub name."""
    wildjailbreak: str | None = None
    """WildJailbreak pairs file (prompt, prompt_type, harmless_answer, harmful_answer)."""
    ultrachat: str | None = None
    """UltraChat conversations (messages) for the retain set."""
    max_examples_per_pool: int = 10_000
    """At most this many examples per pool (a seeded random subset when more qualify)."""
    max_request_tokens: int = 512
    """Longer requests keep their end (the generation prompt included)."""
    max_response_tokens: int = 512
    """Longer responses keep their beginning."""
    max_retain_tokens: int = 1024
    """Longer retain chats keep their beginning."""
    skip_invalid: bool = False
    """Skip (and count) malformed rows instead of stopping with an error."""
    group_by_length: bool = True
    """Put rows of similar length into the same micro-batch (less padding)."""


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    layers_to_transform: Any = None
    """Decoder layers that get adapters: "0-30", a list, or None = 0 .. the last target layer (the recipe)."""


@dataclass
class LossConfig:
    mode: str = "response_all"
    """Which tokens form the safe/unsafe masks: one of LOSS_MODES (REFERENCE.md)."""
    alpha: float = 0.5
    """Weight of L_safe (keep safe representations)."""
    beta: float = 0.5
    """Weight of L_unsafe (push unsafe representations away; subtracted)."""
    gamma: float = 0.1
    """Weight of L_cos (pull the unsafe last-request-token representations together)."""
    epsilon: float = 0.3
    """Weight of L_KL on the retain set."""
    eta: float = 0.0
    """Weight of L_pair (harmful answer vs refusal of the same WildJailbreak request)."""
    alpha_mode: str = "all"
    """all: L_safe over all n_layers+1 hidden-state indices; target: over the target layers only."""
    target_layers: Any = "20-30"
    """Hidden-state indices U (0 = embeddings, i = output of decoder layer i-1): "20-30", "1,2,3" or a list."""
    temperature: float = 2.0
    """KL temperature T."""
    response_r: int = 20
    """R of the response_R mode: the first R response tokens."""
    paired_repr_length: int = 20
    """Positions p .. p+R-1 of L_pair, R = min(this, the shortest response of the pairs in the batch)."""

    def __post_init__(self):
        if self.mode not in LOSS_MODES:
            raise ConfigError(f"loss.mode must be one of {', '.join(LOSS_MODES)}; got {self.mode!r}")
        if self.alpha_mode not in ("all", "target"):
            raise ConfigError(f"loss.alpha_mode must be 'all' or 'target'; got {self.alpha_mode!r}")
        self.target_layers = parse_layers(self.target_layers)
        if not self.target_layers:
            raise ConfigError("loss.target_layers is empty")
        if self.temperature <= 0:
            raise ConfigError("loss.temperature must be positive")

    @property
    def request_only(self) -> bool:
        return self.mode in REQUEST_ONLY_MODES


@dataclass
class TrainConfig:
    output_dir: str = "runs/repbend"
    """The adapter lands in <output_dir>/adapter, the step log in <output_dir>/log.jsonl."""
    max_steps: int = 450
    """Optimizer steps."""
    batch_size: int = 4
    """Rows per set (B) per device and micro-step: 2B safe, 2B unsafe, B retain."""
    grad_accum: int = 4
    """Micro-batches per optimizer step; their losses are averaged."""
    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    schedule: str = "constant"
    """constant | linear | cosine (decay to 0 at max_steps), each after `warmup_steps` of linear warm-up."""
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    """Clip the LoRA gradients' global norm (0 = off)."""
    seed: int = 42
    save_every: int = 50
    """Checkpoint every N optimizer steps (and at the end); 0 = only at the end."""
    keep_checkpoints: int = 2
    """Most recent checkpoints kept on disk."""
    resume: Any = None
    """True/"auto" = the latest checkpoint in output_dir; a path = that checkpoint; None = start fresh."""
    max_bad_steps: int = 5
    """Stop after this many steps in a row with a non-finite loss or gradient (each is skipped)."""
    eval_every: int = 0
    """Run the periodic held-out evaluation every N steps (0 = off)."""
    eval_heldout: str | None = None
    """JSONL of held-out prompts for the periodic evaluation ({kind: harmful|benign, prompt, answer?})."""
    merge: bool = False
    """Also write <output_dir>/merged: the base model with the adapter merged in."""
    progress: bool = True
    tensorboard: bool = True
    """Write TensorBoard scalars to <output_dir>/tb when tensorboard is installed."""
    packing: bool = True
    """Pack several sequences per row, attention kept inside each sequence (the fastest layout in
    benchmarks/bench_step.py); false = one row per sequence, padded to the micro-batch's longest."""
    pack_length: int = 1024
    """Tokens per packed row (a longer sequence gets a row of its own)."""

    def __post_init__(self):
        if self.schedule not in ("constant", "linear", "cosine"):
            raise ConfigError(f"train.schedule must be constant, linear or cosine; got {self.schedule!r}")
        for name in ("max_steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be at least 1")


@dataclass
class DistributedConfig:
    strategy: str = "ddp"
    """ddp (replicate the frozen base) | fsdp (FSDP2 fully_shard per decoder layer and the root); only used
    under torchrun (WORLD_SIZE > 1)."""
    backend: str = "auto"
    """auto (nccl on CUDA, gloo on CPU) | nccl | gloo."""

    def __post_init__(self):
        if self.strategy not in ("ddp", "fsdp"):
            raise ConfigError(f"distributed.strategy must be ddp or fsdp; got {self.strategy!r}")


@dataclass
class RepBendConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    @classmethod
    def from_dict(cls, d: dict | None) -> "RepBendConfig":
        d = dict(d or {})
        groups = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(d) - set(groups)
        if unknown:
            raise ConfigError(f"unknown config group(s) {sorted(unknown)}; groups are {sorted(groups)}")
        kwargs = {}
        for name, f in groups.items():
            sub = d.get(name) or {}
            if not isinstance(sub, dict):
                raise ConfigError(f"config group {name!r} must be a mapping, got {type(sub).__name__}")
            sub_cls = f.default_factory().__class__
            known = {x.name for x in dataclasses.fields(sub_cls)}
            bad = set(sub) - known
            if bad:
                raise ConfigError(f"unknown key(s) {sorted(bad)} in group {name!r}; known: {sorted(known)}")
            kwargs[name] = sub_cls(**sub)
        return cls(**kwargs)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] | None = None) -> "RepBendConfig":
        """YAML file (optional) + `--group.key value` overrides (a list of argv tokens)."""
        d: dict = {}
        if path is not None:
            try:
                d = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{path}: not valid YAML: {e}") from None
            if not isinstance(d, dict):
                raise ConfigError(f"{path}: the top level must be a mapping of groups")
        for key, value in _pairs(overrides or []):
            group, _, name = key.partition(".")
            if not name:
                raise ConfigError(f"override --{key} must look like --group.key (e.g. --train.lr)")
            d.setdefault(group, {})
            d[group] = dict(d[group] or {})
            d[group][name] = _coerce(cls, group, name, value)
        return cls.from_dict(d)


def _pairs(argv: list[str]):
    i = 0
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--"):
            raise ConfigError(f"unexpected argument {tok!r}: overrides are --group.key value")
        key = tok[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value = argv[i + 1]
            i += 2
        else:
            value = "true"  # a bare flag
            i += 1
        yield key.replace("-", "_"), value


def _coerce(cls, group: str, name: str, value: str):
    """Turn a command-line string into the field's type (YAML rules for lists, bools and null)."""
    groups = {f.name: f for f in dataclasses.fields(cls)}
    if group not in groups:
        raise ConfigError(f"unknown config group {group!r} in --{group}.{name}; groups are {sorted(groups)}")
    sub_cls = groups[group].default_factory().__class__
    hints = typing.get_type_hints(sub_cls)
    if name not in hints:
        known = sorted(x.name for x in dataclasses.fields(sub_cls))
        raise ConfigError(f"unknown key --{group}.{name}; known keys of {group!r}: {known}")
    t = hints[name]
    parsed = yaml.safe_load(value) if value != "" else ""
    if t is str or t == (str | None) and parsed is not None:
        return value if parsed is not None else None
    if t is float:
        return float(parsed)
    if t is int:
        return int(parsed)
    if t is bool:
        if not isinstance(parsed, bool):
            raise ConfigError(f"--{group}.{name} takes true or false, got {value!r}")
        return parsed
    if name in ("target_layers", "layers_to_transform") and isinstance(parsed, str):
        return parsed
    if typing.get_origin(t) is list and isinstance(parsed, str):
        return [x for x in parsed.split(",") if x]
    return parsed
