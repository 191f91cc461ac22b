"""Dataclass configs, read from configs/*.yaml with `--set a.b=c` overrides.

Every key has a default here, so a YAML file only states what differs. Unknown
keys, wrongly typed values and values outside a key's range (RANGES, CHOICES) are
errors when the config loads: a typo must not silently train with the default, and
a meaningless value must not fail after minutes of compiling.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable

import yaml

from apl_jax.errors import UserError
from apl_jax.preflight import MAX_SEED

# The project folder: shipped files (configs/...) resolve from here, not from the current folder.
PROJECT_DIR = Path(__file__).resolve().parent.parent
DEFAULT_TEMPLATES = str(PROJECT_DIR / "configs" / "data" / "templates.yaml")
NEUTRAL_MODES = ("empty", "prompt", "attributes")  # the identity neutral prompt: official empty, a fixed text, or the description
NAN_POLICIES = ("stop", "skip")
LR_SCHEDULES = ("constant", "cosine")


@dataclasses.dataclass
class ModelConfig:
    path: str = "tiny-random"  # a diffusers folder, a single-file SD 1.x checkpoint, or a preset or shipped model's name (models.py)
    dtype: str = "float32"  # float32 | bfloat16: params and compute of the UNet and VAE (the text encoder stays float32)
    # Recompute each UNet block's activations in the backward pass instead of storing them
    # (jax.checkpoint): less memory for more compute; same loss and gradient
    remat: bool = False


@dataclasses.dataclass
class PrefixConfig:
    num_vectors: int = 10
    placeholder: str = "alz"  # must be a single CLIP token
    init_word: str | None = None  # None: uniform [0, 1) as the official code


@dataclasses.dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 8  # global: per-device batch x device count (x processes)
    learning_rate: float = 1e-3  # the official code's value (its README says 1e-5)
    # constant (official) | cosine: from learning_rate down to 0 at train.steps, so the prefix settles
    # instead of ending on a full-size Adam step
    lr_schedule: str = "constant"
    negative_guidance: float = 1.0  # eta of the objective (docs/design.md)
    caption_drift_weight: float = 0.0  # weight of the generic captions' text-encoder drift term (docs/design.md); 0: official
    grad_accum_steps: int = 1  # >1 wraps the optimizer in optax.MultiSteps
    # true: one UNet call on the doubled (neutral + private) batch; false: two calls, so the
    # backward pass covers only the private half, which measured faster on CPU and on an H200
    # (benchmarks/README.md)
    fused_unet_passes: bool = False
    # Encode each distinct training image with the VAE once, not every step (see latent_cache.py)
    cache_latents: bool = False
    seed: int = 0
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    log_every: int = 1
    # A NaN/Inf loss, gradient or update: stop (the run ends with an error naming the step; the last
    # finite checkpoint stays) | skip (that step's update is dropped and counted in metrics.jsonl)
    nan_policy: str = "stop"


@dataclasses.dataclass
class DataConfig:
    source: str = "synthetic"  # synthetic (in-memory stand-in, no files) | folders (identity_dir + caption_dir)
    identity_dir: str | None = None  # face images + manifest, or <Name>-<idx>.png files (source folders)
    caption_dir: str | None = None  # images + captions.jsonl or prompts.txt (source folders)
    identity_prob: float = 0.5  # chance that an example is an identity one, else generic
    neutral_mode: str = "empty"  # identity neutral prompt: empty (official) | prompt (neutral_prompt) | attributes (manifest descriptions)
    # The neutral prompt of neutral_mode=prompt: an anonymous person, so the prefix keeps the face and
    # drops only who it is (the empty prompt's target is the unconditional picture, often no face at all).
    neutral_prompt: str = "a photo of a person"
    # true: identity private prompts "alz PRE NAME TEMPLATE" in every mode (the official template_enabled,
    # off there), so the prefix also learns the name inside a sentence, as users will write it
    private_templates: bool = False
    resolution: int = 32
    templates: str = DEFAULT_TEMPLATES  # the project's own file, wherever train.py runs from
    cache_dir: str = "~/.cache/apl_jax/datasets"  # built array_record datasets, one folder per source fingerprint
    loader_threads: int = 8  # decode + tokenize threads of the folders loader
    synthetic_names: int = 8
    synthetic_captions: int = 16


@dataclasses.dataclass
class EvalConfig:
    # After training, train.py evaluates the new prefix where it has an evaluation for
    # model.path (APL-mini's models: the compare grid and `python -m apl_jax.mini eval`)
    after_training: bool = False
    num_images: int = 32  # per name and prompt kind, per condition


@dataclasses.dataclass
class ParallelConfig:
    # Multi-host via jax.distributed. Leave all three unset on TPU pods (JAX detects them)
    # and on a single host.
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


@dataclasses.dataclass
class Config:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    prefix: PrefixConfig = dataclasses.field(default_factory=PrefixConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _at_least(low: int) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v >= low), f">= {low}"


def _between(low, high) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: low <= v <= high), f"in [{low}, {high}]"


_POSITIVE_FINITE = ((lambda v: 0 < v < math.inf), "> 0 and finite")
_NON_NEGATIVE_FINITE = ((lambda v: 0 <= v < math.inf), ">= 0 and finite")

# The allowed values of every numeric key (tests/test_config.py checks that none is missing).
RANGES = {
    "prefix.num_vectors": _between(1, 75),  # 77 tokens minus start and end
    "train.steps": _at_least(1),
    "train.batch_size": _at_least(1),
    "train.learning_rate": _POSITIVE_FINITE,
    "train.negative_guidance": _NON_NEGATIVE_FINITE,
    "train.caption_drift_weight": _NON_NEGATIVE_FINITE,
    "train.grad_accum_steps": _at_least(1),
    "train.seed": _between(0, MAX_SEED),
    "train.checkpoint_every": _at_least(1),
    "train.keep_checkpoints": _at_least(1),
    "train.log_every": _at_least(1),
    "data.identity_prob": _between(0, 1),
    "data.resolution": _at_least(8),
    "data.loader_threads": _at_least(1),
    "data.synthetic_names": _at_least(1),
    "data.synthetic_captions": _between(1, 30),  # the synthetic data has 30 colour pairs
    "eval.num_images": _at_least(1),
    "parallel.num_processes": _at_least(1),
    "parallel.process_id": _at_least(0),
}
CHOICES = {
    "model.dtype": ("float32", "bfloat16"),
    "train.nan_policy": NAN_POLICIES,
    "train.lr_schedule": LR_SCHEDULES,
    "data.source": ("synthetic", "folders"),
    "data.neutral_mode": NEUTRAL_MODES,
}


def _coerce(value: Any, field: dataclasses.Field, where: str) -> Any:
    """Check a YAML value against the field's declared type (ints may stand for floats) and allowed range."""
    kind = field.type.replace(" | None", "")
    if value is None and "None" in field.type:
        return None
    if kind == "float" and isinstance(value, str):
        # YAML 1.1 reads 1e-3 (no dot) as a string; 1.0e-3 is a float there too.
        try:
            value = float(value)
        except ValueError:
            pass
    expected = {"int": int, "float": (int, float), "str": str, "bool": bool}[kind]
    if isinstance(value, bool) and kind != "bool" or not isinstance(value, expected):
        raise UserError(f"config key {where} must be {kind}, got {value!r}")
    value = float(value) if kind == "float" else value
    if where in RANGES and not RANGES[where][0](value):
        raise UserError(f"config key {where} must be {RANGES[where][1]}, got {value!r}")
    if where in CHOICES and value not in CHOICES[where]:
        raise UserError(f"config key {where} must be one of {', '.join(CHOICES[where])}, got {value!r}")
    return value


def _from_dict(cls, values: dict[str, Any], where: str):
    if not isinstance(values, dict):
        raise UserError(f"config section {where or 'root'} must be a mapping, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        path = f"{where}.{key}" if where else key
        if key not in fields:
            raise UserError(f"unknown config key {path}; known keys here: {', '.join(fields)}")
        field = fields[key]
        if dataclasses.is_dataclass(field.default_factory):  # a nested section
            kwargs[key] = _from_dict(field.default_factory, value, path)
        else:
            kwargs[key] = _coerce(value, field, path)
    return cls(**kwargs)


def _apply_override(tree: dict[str, Any], override: str) -> None:
    if "=" not in override:
        raise UserError(f"--set expects key=value, got {override!r}")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"--set {key}: {part} is not a config section")
    node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults <- YAML file <- --set overrides, validated key by key."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file {path} does not exist")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise UserError(f"config file {path} is not valid YAML: {err}") from None
    for override in overrides:
        _apply_override(tree, override)
    return _from_dict(Config, tree, "")


def config_from_dict(values: dict[str, Any]) -> Config:
    return _from_dict(Config, values, "")
