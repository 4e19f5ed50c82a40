"""One typed config for a run: YAML in, validated dataclasses out, YAML back to the run folder.

Every field has a default here, so a YAML file only lists what it changes. Validation turns
every mistake into one `ConfigError` line naming the key, so the CLI can print it and exit.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import yaml

from gan.errors import UserError


class ConfigError(UserError):
    pass


@dataclass
class MNConfig:
    """Mixture Normalization options (see ../shared/docs/mixture-normalization.md)."""
    num_components: int = 3
    eps: float = 1e-5
    momentum: float = 0.1
    affine: bool = True
    track_running_stats: bool = True
    em_steps: int = 1
    em_samples: int = 4096
    lambda_min: float = 1e-2
    var_floor: float = 1e-4
    prior_scaling: bool = True
    detach_posteriors: bool = True
    dead_steps: int = 5  # steps below lambda_min before a component is re-seeded
    # joint: one C-dimensional diagonal mixture per layer, so a sample gets the same posteriors in every
    # channel. per_channel: one 1-D mixture per channel, posteriors per (sample, channel); costs about K
    # activation-sized tensors more memory per layer. K=1 is BatchNorm either way.
    posteriors: Literal["joint", "per_channel"] = "joint"
    # warm: each step's EM starts from the previous step's mixture. fresh: each training step fits anew
    # (k-means++ seeding on em_samples samples, then em_steps EM iterations), components relabelled to
    # match the previous step's for the running (eval-mode) averages.
    fit: Literal["warm", "fresh"] = "warm"


@dataclass
class ModelConfig:
    z_dim: int = 100
    ngf: int = 64
    ndf: int = 64
    norm: Literal["bn", "mn", "none"] = "bn"
    # Generator hidden layers (0 = 4x4, 1 = 8x8, 2 = 16x16) that use MN when norm is "mn"; the others keep BN.
    mn_layers: list[int] = field(default_factory=lambda: [0, 1, 2])
    # Under torchrun: BN (generator and discriminator) and MN use the statistics of the global batch
    # (SyncBatchNorm, synchronized MN), so N processes compute what one process with the whole batch
    # would. false: each process normalizes with its own slice of the batch.
    sync_norm: bool = True
    mn: MNConfig = field(default_factory=MNConfig)


@dataclass
class DataConfig:
    # cifar10: torchvision's CIFAR10 under `path`; folder: a folder or .zip of class folders of images.
    source: Literal["cifar10", "folder"] = "cifar10"
    path: str = "data"
    split: Literal["train", "test"] = "train"
    download: bool = True
    hflip: bool = True
    # Resize + center-crop images that are not 32x32; off means such images are an error.
    resize: bool = True
    # Keep the decoded dataset as one uint8 tensor on the training device (CIFAR-10 is 150 MB), so that
    # a batch is an index into it; false: each batch is copied there from host memory. (On the CPU both
    # are the same memory.)
    on_device: bool = True


@dataclass
class TrainConfig:
    steps: int = 50_000
    # The global batch: under torchrun each of the N processes takes batch_size / N of it.
    batch_size: int = 64
    lr_g: float = 2e-4
    lr_d: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    d_steps: int = 1
    ema_decay: float = 0.0  # 0 = off; e.g. 0.999
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"  # auto: bf16 on CUDA, off on CPU
    channels_last: bool = True
    # torch.compile G and D. compile_mode auto: "reduce-overhead" (CUDA graphs) on CUDA, torch's default
    # on the CPU (gan/device.py says why).
    compile: bool = False
    compile_mode: Literal["auto", "default", "reduce-overhead", "max-autotune",
                          "max-autotune-no-cudagraphs"] = "auto"
    # Adam's fused kernel: auto = on CUDA only; always = on any device (the CPU has it too); never.
    fused_adam: Literal["auto", "always", "never"] = "auto"
    on_nan: Literal["stop", "skip"] = "stop"
    # CPU threads for torch (0 = torch's default).
    threads: int = 0
    # Under torchrun: seconds any process waits for the others (at start-up and in every collective)
    # before the job fails instead of hanging.
    dist_timeout: int = 1800


@dataclass
class EvalConfig:
    every: int = 5000  # 0 = never during training
    num_samples: int = 10_000
    # "train" / "test": that split of the training source; anything else: a folder or .zip of real images.
    reference: str = "train"
    reference_samples: int = 0  # 0 = the whole reference set
    g_mode: Literal["eval", "train"] = "eval"
    seed: int = 1234  # fixed noise, so successive evaluations are comparable
    batch_size: int = 200


@dataclass
class MetricsConfig:
    inception_weights: Optional[str] = None
    cache_dir: Optional[str] = None  # default: $TORCH_HOME/mngan
    # Try torch-fidelity's weights download (with IS) once per process, with a short timeout, when they
    # are not cached; otherwise, or when it fails, the offline conversion (FID/KID, no IS).
    allow_download: bool = True
    kid_subset_size: int = 1000
    kid_subsets: int = 100


@dataclass
class LogConfig:
    every: int = 100
    sample_every: int = 1000
    # auto: online when wandb has credentials (WANDB_API_KEY or a stored `wandb login`), else offline;
    # never a login prompt. The run's first line says which mode it chose and why.
    wandb: Literal["auto", "online", "offline", "disabled"] = "auto"
    wandb_project: str = "mn-gan"


@dataclass
class CkptConfig:
    every: int = 5000
    keep: int = 3


@dataclass
class Config:
    run_dir: Optional[str] = None  # default: runs/<norm>-seed<seed>
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    ckpt: CkptConfig = field(default_factory=CkptConfig)

    @property
    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir or f"runs/{self.model.norm}-seed{self.train.seed}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# Length, logging cadence and the device may change when a run is resumed; the maths may not.
RESUMABLE_CHANGES = ("run_dir", "train.steps", "train.device", "train.threads", "log.every", "log.sample_every",
                     "log.wandb", "ckpt.every", "ckpt.keep", "eval.every", "data.path", "data.on_device",
                     "train.compile", "train.compile_mode", "train.fused_adam", "train.dist_timeout",
                     "metrics.allow_download", "metrics.cache_dir")

# Range rules, checked after types. Each is (predicate, what the value must be).
_RULES: dict[str, tuple] = {
    "model.z_dim": (lambda v: v > 0, "> 0"),
    "model.ngf": (lambda v: v > 0, "> 0"),
    "model.ndf": (lambda v: v > 0, "> 0"),
    "model.mn_layers": (lambda v: all(0 <= i <= 2 for i in v), "a list of layer indices in 0..2"),
    "model.mn.num_components": (lambda v: v >= 1, ">= 1"),
    "model.mn.eps": (lambda v: v > 0, "> 0"),
    "model.mn.momentum": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "model.mn.em_steps": (lambda v: v >= 0, ">= 0"),
    "model.mn.em_samples": (lambda v: v >= 2, ">= 2"),
    "model.mn.lambda_min": (lambda v: 0 < v < 1, "in (0, 1)"),
    "model.mn.var_floor": (lambda v: v > 0, "> 0"),
    "model.mn.dead_steps": (lambda v: v >= 1, ">= 1"),
    "train.steps": (lambda v: v >= 1, ">= 1"),
    "train.batch_size": (lambda v: v >= 1, ">= 1"),
    "train.lr_g": (lambda v: v > 0, "> 0"),
    "train.lr_d": (lambda v: v > 0, "> 0"),
    "train.beta1": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "train.beta2": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "train.d_steps": (lambda v: v >= 1, ">= 1"),
    "train.ema_decay": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "train.threads": (lambda v: v >= 0, ">= 0"),
    "train.dist_timeout": (lambda v: v >= 1, ">= 1"),
    "eval.every": (lambda v: v >= 0, ">= 0"),
    "eval.num_samples": (lambda v: v >= 2, ">= 2"),
    "eval.reference_samples": (lambda v: v >= 0, ">= 0"),
    "eval.batch_size": (lambda v: v >= 1, ">= 1"),
    "metrics.kid_subset_size": (lambda v: v >= 2, ">= 2"),
    "metrics.kid_subsets": (lambda v: v >= 1, ">= 1"),
    "log.every": (lambda v: v >= 1, ">= 1"),
    "log.sample_every": (lambda v: v >= 0, ">= 0"),
    "ckpt.every": (lambda v: v >= 0, ">= 0"),
    "ckpt.keep": (lambda v: v >= 1, ">= 1"),
}


def _type_name(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value, tp):
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner)
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"config: {key} = {value!r} is not valid; expected {_type_name(tp)}")
    if origin is list:
        (inner,) = args
        if not isinstance(value, list):
            raise ConfigError(f"config: {key} = {value!r} is not valid; expected a list")
        return [_coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp in (str, bool) and isinstance(value, tp):
        return value
    raise ConfigError(f"config: {key} = {value!r} is not valid; expected {_type_name(tp)}")


def _build(cls, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise ConfigError(f"config: {prefix.rstrip('.') or 'top level'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        section = prefix.rstrip(".") or "top level"
        raise ConfigError(f"config: unknown key '{prefix}{unknown[0]}' (known under '{section}': "
                          f"{', '.join(sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        tp, key = hints[name], prefix + name
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, key + ".")
        else:
            kwargs[name] = _coerce(key, value, tp)
            rule = _RULES.get(key)
            if rule and not rule[0](kwargs[name]):
                raise ConfigError(f"config: {key} = {value!r} is out of range; must be {rule[1]}")
    return cls(**kwargs)


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _dotted_to_nested(key: str, value) -> dict:
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def parse_assignment(text: str) -> tuple[str, object]:
    """`train.lr_g=1e-4` -> ("train.lr_g", 1e-4); the value is read as YAML so lists and bools work."""
    if "=" not in text:
        raise ConfigError(f"config: --set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    # YAML reads 1e-4 as a string (no dot); numbers are what people mean.
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> Config:
    """Defaults <- YAML file <- overrides ({"train.steps": 10, ...}), validated."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config: no such file: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config: {path} is not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config: {path} must hold a mapping of sections")
    for key, value in (overrides or {}).items():
        data = _merge(data, _dotted_to_nested(key, value))
    return _build(Config, data)


def config_from_dict(data: dict) -> Config:
    return _build(Config, data)


def flatten(d: dict, prefix: str = "") -> dict:
    """{"train": {"steps": 1}} -> {"train.steps": 1}: the dotted keys that --set and messages use."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, prefix + k + "."))
        else:
            out[prefix + k] = v
    return out


def config_diff(a: Config, b: Config, ignore: tuple[str, ...] = ()) -> list[str]:
    """Dotted keys whose values differ, for 'this run folder holds a different run' messages."""
    fa, fb = flatten(a.to_dict()), flatten(b.to_dict())
    return [k for k in fa if fa[k] != fb.get(k) and k not in ignore]
