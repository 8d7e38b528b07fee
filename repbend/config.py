"""Configuration: one dataclass per group, read from YAML and overridden with dotted flags.

    repbend train --config repbend/configs/llama3_8b_instruct.yaml --train.lr 2e-5 --loss.target_layers 20-30

Every field is typed and documented where it is declared; values from YAML, from the command line and from
Python are converted to the declared type the same way and checked when the group is built
(`repbend.config_fields`). A wrong value, an unknown key or an impossible combination is a `ConfigError`
naming the key.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .config_fields import Group, Layers, PathStr, parse_layers
from .errors import ConfigError
from .loss.config import LossConfig

__all__ = ["RepBendConfig", "ModelConfig", "DataConfig", "LoraConfig", "LossConfig", "TrainConfig",
           "DistributedConfig", "ConfigError", "parse_layers"]

ATTENTION = ("auto", "sdpa", "eager", "flash_attention_2", "flex_attention")
SCHEDULES = ("constant", "linear", "cosine", "cosine_with_restarts", "polynomial", "inverse_sqrt")
SEED_MAX = 2 ** 32 - 1  # np.random.seed's limit; torch.manual_seed and np.random.SeedSequence accept more


@dataclass
class ModelConfig(Group):
    NAME = "model"

    path: PathStr | None = None
    """HF model directory or hub name (the demo alone runs without one: it builds its tiny model). A path-like value
    (starting with . / or ~, or naming an existing parent directory) that is no directory is an error; only a hub
    name goes to the hub."""
    dtype: str = field(default="auto", metadata={"choices": ("auto", "bf16", "fp16", "fp32", "bfloat16", "float16",
                                                             "float32")})
    """Weights and compute dtype: auto = bf16 on a GPU, fp32 on the CPU (bfloat16/float16/float32 are the same as
    bf16/fp16/fp32)."""
    device: str = "auto"
    """auto (this rank's CUDA device, else the CPU), cpu, cuda or cuda:N."""
    attn_implementation: str = field(default="auto", metadata={"choices": ATTENTION})
    """Attention backend: auto picks flash_attention_2 on a GPU when flash-attn is installed, else sdpa. Packed rows
    stay exact on every backend (each gets its own layout; see the README's performance section)."""
    gradient_checkpointing: bool = False
    """Recompute the decoder layers in the backward of the trained pass (less memory, ~30% more compute)."""
    liger: bool = False
    """Liger-kernel RMSNorm/RoPE/SwiGLU patches (GPU, when liger-kernel is installed)."""

    def validate(self) -> None:
        self.check(re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None, "device",
                   "be auto, cpu, cuda or cuda:N")
        self.check(self.path is None or self.path.strip() != "", "path", "not be empty")


@dataclass
class DataConfig(Group):
    NAME = "data"

    wildguardmix: PathStr | None = None
    """WildGuardMix rows: a .jsonl/.json/.parquet file or a hub name NAME[:CONFIG][@SPLIT]."""
    wildjailbreak: PathStr | None = None
    """WildJailbreak pairs (prompt, prompt_type, harmless_answer, harmful_answer): a file or a hub name."""
    ultrachat: PathStr | None = None
    """UltraChat conversations (messages) for the retain rows: a file or a hub name."""
    max_examples_per_pool: int = 10_000
    """At most this many rows per role (safe, unsafe, pair, retain): a seeded random subset when more qualify; the
    retain chats as data.subset says."""
    subset: str = field(default="first", metadata={"choices": ("first", "random")})
    """Which retain (UltraChat) chats the cap keeps: first = the first ones in file order (the reference's rows),
    random = a seeded random subset."""
    max_request_tokens: int = 512
    """A longer request keeps its BOS and its last tokens (the generation prompt survives)."""
    max_response_tokens: int = 512
    """A longer response keeps its first tokens."""
    max_retain_tokens: int = 1024
    """A longer retain conversation keeps its first tokens."""
    skip_invalid: bool = False
    """Skip (and count, by reason) malformed rows instead of stopping at the first."""
    group_by_length: bool = True
    """Put rows of similar length into the same micro-batch (less padding)."""
    empty_request_p: float = 0.5
    """For the methods that draw empty instructions (Circuit Breakers, RMU): chance that a row (all but the
    WildJailbreak harmful answers) gets an empty user turn (an UltraChat chat keeps its first reply only). Seeded;
    the other methods ignore it."""

    def validate(self) -> None:
        for name in ("max_examples_per_pool", "max_request_tokens", "max_response_tokens", "max_retain_tokens"):
            self.check(getattr(self, name) >= 1, name, "be >= 1")
        self.check(0.0 <= self.empty_request_p <= 1.0, "empty_request_p", "be in [0, 1]")


@dataclass
class LoraConfig(Group):
    NAME = "lora"

    r: int = 16
    """LoRA rank."""
    alpha: int = 16
    """LoRA alpha (the update is scaled by alpha / r)."""
    dropout: float = 0.05
    """Dropout on the LoRA input. Masks are drawn from a generator seeded by (train.seed, micro-batch index),
    so a run gives the same result on 1 or N processes and after a resume."""
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    """Linear modules (by name) that get adapters; all-linear = every linear layer but the LM head (PEFT's
    shorthand)."""
    layers_to_transform: Layers | None = None
    """Decoder layers that get adapters: "0-30", a list, or null = 0 .. the last layer the loss reads."""

    def validate(self) -> None:
        self.check(self.r >= 1, "r", "be >= 1")
        self.check(self.alpha > 0, "alpha", "be > 0")
        self.check(0.0 <= self.dropout < 1.0, "dropout", "be in [0, 1)")
        self.check(len(self.target_modules) > 0, "target_modules", "name at least one module")


@dataclass
class TrainConfig(Group):
    NAME = "train"

    output_dir: PathStr = "runs/repbend"
    """Run directory: config.yaml, log.jsonl, checkpoints/, adapter/ (docs/checkpoints.md). One run at a time:
    a run holds a lock on it until it ends."""
    overwrite: bool = False
    """A fresh run (or a branch from another directory's checkpoint) into an output_dir that holds another run's
    steps is refused; true replaces that run, removed only once the checks passed and the model and data loaded."""
    resume: bool | PathStr | None = None
    """true (or auto) = the newest complete checkpoint in output_dir, if any; a path = that checkpoint (an older
    one of output_dir branches there: the newer checkpoints are fenced; another directory's starts a new branch
    in output_dir); null/false = start fresh."""
    allow_config_change: bool = False
    """Let a resume go on with settings that change the training trajectory (recorded in config_changes.jsonl)."""
    max_steps: int = 450
    """Optimizer steps."""
    batch_size: int = 4
    """B, per process and micro-step: RepBend reads 2B safe, 2B unsafe and B retain rows (batch_size 4: 8 safe, 8
    unsafe, 4 retain); Circuit Breakers, RMU and NPO B forget and B retain-side rows; DPO B pairs. The run's log
    states the composition at the start."""
    grad_accum: int = 4
    """Micro-batches per optimizer step; their losses are averaged."""
    lr: float = 1e-5
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas (two values)."""
    schedule: str = field(default="constant", metadata={"choices": SCHEDULES})
    """Learning-rate schedule after the warm-up, transformers' own (get_scheduler): constant, linear or cosine decay
    to 0 at max_steps, cosine_with_restarts, polynomial, inverse_sqrt."""
    warmup_steps: int = 0
    """Steps of linear warm-up from 0 (at most max_steps)."""
    warmup_ratio: float = 0.0
    """Warm-up as a share of max_steps (ceil(warmup_ratio * max_steps) steps), instead of warmup_steps."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm of the trained tensors (0 = no clipping)."""
    seed: int = 42
    """Seeds the adapters' initialisation, the data order and the dropout masks: 0 .. 2**32 - 1 (numpy's global
    seed range; torch and numpy's SeedSequence take more)."""
    save_every: int = 50
    """Checkpoint every N optimizer steps (and at the end); 0 = only at the end."""
    keep_checkpoints: int = 2
    """Most recent checkpoints kept on disk (0 = all)."""
    max_bad_steps: int = 5
    """Stop after this many steps in a row with a non-finite loss or gradient (each one is skipped);
    0 stops at the first."""
    eval_every: int = 0
    """Run the periodic held-out evaluation every N steps (0 = off; needs train.eval_heldout)."""
    eval_heldout: PathStr | None = None
    """JSONL of held-out prompts for the periodic evaluation ({kind: harmful|benign, prompt, answer?})."""
    merge: bool = False
    """Also write <output_dir>/merged: the base model with the trained weights merged in."""
    progress: bool = True
    """Show progress: a bar on a terminal, one log line per tenth of the run otherwise (a log file)."""
    tensorboard: bool | None = None
    """Write TensorBoard scalars to <output_dir>/tb: null = when the tensorboard package is installed, true = always
    (a warning when it is not installed), false = never."""
    report_to: list[str] = field(default_factory=list, metadata={"choices": ("tensorboard", "wandb")})
    """Further metric sinks besides log.jsonl: wandb (Weights & Biases; resumes into the same run on
    train.resume). tensorboard here is the same as train.tensorboard true."""
    wandb_project: str = "repbend"
    """Weights & Biases project name."""
    packing: bool = True
    """Pack several sequences per row, attention kept inside each sequence (the fastest layout); false = one
    row per sequence, padded to the micro-batch's longest."""
    pack_length: int = 1024
    """Tokens per packed row (a longer sequence gets a row of its own)."""

    def validate(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum", "pack_length"):
            self.check(getattr(self, name) >= 1, name, "be >= 1")
        for name in ("warmup_steps", "save_every", "keep_checkpoints", "max_bad_steps", "eval_every", "seed"):
            self.check(getattr(self, name) >= 0, name, "be >= 0")
        self.check(self.lr > 0 and self.lr == self.lr and self.lr != float("inf"), "lr", "be a positive number")
        self.check(self.weight_decay >= 0, "weight_decay", "be >= 0")
        self.check(self.max_grad_norm >= 0, "max_grad_norm", "be >= 0")
        self.check(len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas), "betas",
                   "be two values in [0, 1)")
        self.check(self.output_dir.strip() != "", "output_dir", "not be empty")
        self.check(self.seed <= SEED_MAX, "seed", f"be in [0, {SEED_MAX}] (numpy's global seed range, 2**32 - 1)")
        self.check(self.warmup_steps <= self.max_steps, "warmup_steps",
                   f"be <= train.max_steps ({self.max_steps}): the learning rate would never reach train.lr")
        self.check(0.0 <= self.warmup_ratio <= 1.0, "warmup_ratio", "be in [0, 1]")
        self.check(not (self.warmup_ratio and self.warmup_steps), "warmup_ratio",
                   "be 0 when train.warmup_steps is set (give one of the two)")
        if self.resume is True or (isinstance(self.resume, str) and self.resume.lower() in ("auto", "latest")):
            self.resume = "auto"
        elif self.resume is False:
            self.resume = None

    @property
    def warmup(self) -> int:
        """Warm-up steps: warmup_steps, or ceil(warmup_ratio * max_steps)."""
        return self.warmup_steps or math.ceil(self.warmup_ratio * self.max_steps)

    @property
    def sinks(self) -> list[str]:
        """The metric sinks besides log.jsonl."""
        tensorboard = self.tensorboard
        if tensorboard is None:
            tensorboard = importlib.util.find_spec("tensorboard") is not None
        out = ["tensorboard"] if tensorboard else []
        return out + [s for s in self.report_to if s not in out]


@dataclass
class DistributedConfig(Group):
    NAME = "distributed"

    strategy: str = field(default="ddp", metadata={"choices": ("ddp", "fsdp")})
    """Under torchrun (WORLD_SIZE > 1): ddp (every rank holds the whole model) or fsdp (FSDP2 shards per decoder
    layer)."""
    backend: str = field(default="auto", metadata={"choices": ("auto", "nccl", "gloo")})
    """auto (nccl on CUDA, gloo on the CPU), nccl or gloo."""


@dataclass
class RepBendConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    @classmethod
    def groups(cls) -> dict[str, type]:
        return {f.name: f.default_factory().__class__ for f in dataclasses.fields(cls)}

    @classmethod
    def from_dict(cls, d: dict | None, source: str = "config") -> "RepBendConfig":
        d = dict(d or {})
        groups = cls.groups()
        for name in d:
            if name not in groups:
                raise ConfigError(f"{source}: unknown group {name!r}{_hint(name, groups)}; groups are "
                                  f"{', '.join(groups)}")
        kwargs = {}
        for name, group_cls in groups.items():
            sub = d.get(name) or {}
            if not isinstance(sub, dict):
                raise ConfigError(f"{source}: group {name!r} must be a mapping of keys, got {type(sub).__name__}")
            if group_cls is LossConfig:  # its keys are the chosen method's (LossConfig names a wrong one)
                kwargs[name] = LossConfig(**sub)
                continue
            known = [f.name for f in dataclasses.fields(group_cls)]
            for key in sub:
                if key not in known:
                    raise ConfigError(f"{source}: unknown key {name}.{key}{_hint(key, known)}; the keys of {name!r} "
                                      f"are {', '.join(known)}")
            kwargs[name] = group_cls(**sub)
        return cls(**kwargs)

    def to_dict(self) -> dict:
        return {f.name: (g.to_dict() if isinstance(g := getattr(self, f.name), LossConfig) else dataclasses.asdict(g))
                for f in dataclasses.fields(self)}

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] | None = None) -> "RepBendConfig":
        """YAML file (optional) + `--group.key value` overrides (a list of argv tokens)."""
        d: dict = {}
        if path is not None:
            p = Path(path)
            if not p.is_file():
                raise ConfigError(f"--config: no such file: {path}")
            try:
                d = yaml.load(p.read_text(encoding="utf-8"), Loader=UniqueKeyLoader) or {}
            except (yaml.YAMLError, UnicodeDecodeError) as e:
                raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
            except DuplicateKey as e:
                raise ConfigError(f"{path}: {e}") from None
            if not isinstance(d, dict):
                raise ConfigError(f"{path}: the top level must be a mapping of groups (model, data, lora, ...)")
        groups = cls.groups()
        for key, value in parse_overrides(overrides or []):
            group, _, name = key.partition(".")
            if not name or group not in groups:
                raise ConfigError(f"--{key}: overrides look like --group.key value, with group one of "
                                  f"{', '.join(groups)}")
            d.setdefault(group, {})
            if d[group] is not None and not isinstance(d[group], dict):
                raise ConfigError(f"{path}: group {group!r} must be a mapping of keys, got {type(d[group]).__name__}")
            d[group] = dict(d[group] or {})
            d[group][name] = value
        return cls.from_dict(d, source=str(path) if path is not None else "config")


class DuplicateKey(ConfigError):
    """A key given twice in one YAML mapping (raised by `UniqueKeyLoader`; `load` adds the file name)."""


class UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses a key given twice in one mapping: YAML keeps the last value silently, so a
    second `train:` block would replace the first and a repeated `lr:` would win without a word. Keys merged in
    with `<<` may be overridden, as YAML intends."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    first = seen.setdefault(key, line)
                except TypeError:  # an unhashable key: SafeLoader's own error names it
                    continue
                if first != line:
                    raise DuplicateKey(f"duplicate key {key!r} at lines {first} and {line} (YAML would keep only "
                                       "the last; give each key once)")
        return super().construct_mapping(node, deep)


def parse_overrides(argv: list[str]):
    """`--group.key value`, `--group.key=value` or a bare `--group.key` (= true) -> (key, string value)."""
    i = 0
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--") or len(tok) == 2:
            raise ConfigError(f"unexpected argument {tok!r}: settings are given as --group.key value")
        key = tok[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value = argv[i + 1]
            i += 2
        else:
            value = "true"
            i += 1
        yield key.replace("-", "_"), value


def _hint(word: str, known) -> str:
    close = difflib.get_close_matches(word, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
