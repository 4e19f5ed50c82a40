"""One typed config for a run: YAML in, validated dataclasses out, YAML back to the run folder.

Every field has a default here, so a YAML file only lists what it changes. Validation turns
every mistake into one `ConfigError` line naming the key, so the CLI can print it and exit.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import yaml

from gan.core.errors import UserError
from models.mixture_options import invalid_option


class ConfigError(UserError):
    pass


# ---------------------------------------------------------------- each key's roles, on its field
#
# A field's metadata says what else the key is, besides a value with a default:
#   check       (predicate, what the value must be): a range rule, checked after the type
#   resumable   True: may change when a run is resumed (length, logging, device, paths); the maths may not
#   groups      False: never separates runs into groups in `compare` (seed, folder, settings that leave
#               the maths alone); on a section, for every key in it
#   must_match  True: `compare` refuses runs that differ in it (their numbers would not be comparable)
#   mn_only     True: means something only when model.norm is mn (`compare` ignores it for other runs);
#               on a section, for every key in it
#   study       why a study file may not set it (the study sets it itself)
# The lists the rest of the program uses (RESUMABLE_CHANGES here, compare's and study's) are derived
# from these, so a new key is one line here.

ROLE_DEFAULTS = {"check": None, "resumable": False, "groups": True, "must_match": False, "mn_only": False,
                 "study": None}


def key(default=dataclasses.MISSING, *, factory=None, **roles):
    """A dataclass field with its roles (names from ROLE_DEFAULTS, see above) in its metadata."""
    unknown = set(roles) - set(ROLE_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown config key role(s): {', '.join(sorted(unknown))}")
    if factory is not None:
        return field(default_factory=factory, metadata=roles)
    return field(default=default, metadata=roles)


def at_least(n) -> tuple:
    return (lambda v: v >= n, f">= {n}")


POSITIVE = (lambda v: v > 0, "> 0")
HALF_OPEN_UNIT = (lambda v: 0 <= v < 1, "in [0, 1)")
STEPS = (lambda v: all(s >= 1 for s in v), "a list of steps >= 1")
SEED = (lambda v: 0 <= v < 2**32, "in [0, 2**32)")  # torch's generators take 64 bits; offsets are added to it
MN_LAYERS = (lambda v: all(0 <= i <= 2 for i in v), "a list of layer indices in 0..2")


@dataclass
class MNConfig:
    """Mixture Normalization options (see docs/mixture-normalization.md); their ranges are the layer's own
    rules (models/mixture_options.py), checked with the rest of the config."""
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
    # auto: on a GPU, each MN layer runs as a torch.compile'd graph, a few kernels instead of dozens of tiny launches
    # and their Python (the first steps compile it); always / never force it on or off. Same results up to rounding.
    fuse: Literal["auto", "always", "never"] = key("auto", resumable=True, groups=False)


@dataclass
class ModelConfig:
    z_dim: int = key(100, check=POSITIVE)
    ngf: int = key(64, check=POSITIVE)
    ndf: int = key(64, check=POSITIVE)
    norm: Literal["bn", "mn", "none"] = "bn"
    # Generator hidden layers (0 = 4x4, 1 = 8x8, 2 = 16x16) that use MN when norm is "mn"; the others keep BN.
    mn_layers: list[int] = key(factory=lambda: [0, 1, 2], check=MN_LAYERS, mn_only=True)
    # Under torchrun: BN (generator and discriminator) and MN use the statistics of the global batch
    # (SyncBatchNorm, synchronized MN), so N processes compute what one process with the whole batch
    # would. false: each process normalizes with its own slice of the batch.
    sync_norm: bool = True
    mn: MNConfig = key(factory=MNConfig, mn_only=True)


@dataclass
class DataConfig:
    # cifar10: torchvision's CIFAR10 under `path`; folder: a folder or .zip of class folders of images.
    source: Literal["cifar10", "folder"] = key("cifar10", must_match=True)
    path: str = key("data", resumable=True, must_match=True)
    split: Literal["train", "test"] = key("train", must_match=True)
    download: bool = key(True, groups=False)
    hflip: bool = True
    # Resize + center-crop images that are not 32x32; off means such images are an error.
    resize: bool = True
    # Keep the decoded dataset as one uint8 tensor on the training device (CIFAR-10 is 150 MB), so that
    # a batch is an index into it; false: each batch is copied there from host memory. (On the CPU both
    # are the same memory.)
    on_device: bool = key(True, resumable=True, groups=False)


@dataclass
class TrainConfig:
    steps: int = key(50_000, check=at_least(1), resumable=True, groups=False)
    # The global batch: under torchrun each of the N processes takes batch_size / N of it.
    batch_size: int = key(64, check=at_least(1))
    lr_g: float = key(2e-4, check=POSITIVE)
    lr_d: float = key(2e-4, check=POSITIVE)
    beta1: float = key(0.5, check=HALF_OPEN_UNIT)
    beta2: float = key(0.999, check=HALF_OPEN_UNIT)
    d_steps: int = key(1, check=at_least(1))
    ema_decay: float = key(0.0, check=HALF_OPEN_UNIT)  # 0 = off; e.g. 0.999
    seed: int = key(0, check=SEED, groups=False, study="use seeds: [...] instead")
    device: Literal["auto", "cpu", "cuda"] = key("auto", resumable=True, groups=False)
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"  # auto: bf16 on CUDA, off on CPU
    channels_last: bool = True
    # torch.compile G and D. compile_mode auto: torch's default mode on every device; "reduce-overhead" adds
    # CUDA graphs on a GPU (gan/core/device.py, compile_in_place, says when auto may pick it).
    compile: bool = key(False, resumable=True, groups=False)
    compile_mode: Literal["auto", "default", "reduce-overhead", "max-autotune",
                          "max-autotune-no-cudagraphs"] = key("auto", resumable=True, groups=False)
    # Adam's fused kernel: auto = on CUDA only; always = on any device (the CPU has it too); never.
    fused_adam: Literal["auto", "always", "never"] = key("auto", resumable=True, groups=False)
    on_nan: Literal["stop", "skip"] = "stop"
    # CPU threads for torch (0 = torch's default).
    threads: int = key(0, check=at_least(0), resumable=True, groups=False)
    # Under torchrun: seconds any process waits for the others (at start-up and in every collective)
    # before the job fails instead of hanging.
    dist_timeout: int = key(1800, check=at_least(1), resumable=True, groups=False)


@dataclass
class EvalConfig:
    every: int = key(5000, check=at_least(0), resumable=True, groups=False)  # 0 = never during training
    # Steps evaluated besides every `every` steps, e.g. [1000] for an early point on the curve (needs every > 0).
    at: list[int] = key(factory=list, check=STEPS, resumable=True, groups=False)
    num_samples: int = key(10_000, check=at_least(2), must_match=True)
    # "train" / "test": that split of the training source; anything else: a folder or .zip of real images.
    reference: str = key("train", must_match=True)
    reference_samples: int = key(0, check=at_least(0), must_match=True)  # 0 = the whole reference set
    g_mode: Literal["eval", "train"] = "eval"
    seed: int = key(1234, check=SEED)  # fixed noise, so successive evaluations are comparable
    batch_size: int = key(200, check=at_least(1))


@dataclass
class MetricsConfig:
    inception_weights: Optional[str] = None
    cache_dir: Optional[str] = key(None, resumable=True, groups=False)  # default: $TORCH_HOME/mngan
    # Try torch-fidelity's weights download (with IS) once per process, with a short timeout, when they
    # are not cached; otherwise, or when it fails, the offline conversion (FID/KID, no IS).
    allow_download: bool = key(True, resumable=True, groups=False)
    kid_subset_size: int = key(1000, check=at_least(2))
    kid_subsets: int = key(100, check=at_least(1))
    # Precision and recall (k = 3), density and coverage (k = 5) of the Inception features at every evaluation,
    # against a fixed subset of the reference as large as the generated set (gan/eval/prdc.py).
    prdc: bool = key(True, groups=False)
    # Extras on other networks' features (gan/eval/extras.py): precision_vgg16 and recall_vgg16 (k = 3), and
    # fd_dinov2 (DINOv2 ViT-L/14). Each needs its weights (fetched once when allow_download; else one line says
    # it is skipped) and costs several times Inception's time per image.
    vgg16_prc: bool = key(False, groups=False)
    fd_dinov2: bool = key(False, groups=False)


@dataclass
class LogConfig:
    every: int = key(100, check=at_least(1), resumable=True)
    sample_every: int = key(1000, check=at_least(0), resumable=True)
    # auto: online when wandb has credentials (WANDB_API_KEY or a stored `wandb login`), else offline;
    # never a login prompt. The run's first line says which mode it chose and why.
    wandb: Literal["auto", "online", "offline", "disabled"] = key("auto", resumable=True)
    wandb_project: str = "mn-gan"


@dataclass
class CkptConfig:
    every: int = key(5000, check=at_least(0), resumable=True)
    keep: int = key(3, check=at_least(1), resumable=True)
    # true: every evaluation step also saves a checkpoint, which rotation never deletes (it does not count
    # toward `keep`), so that the generators can be scored again later with other metrics or more samples.
    keep_evaluated: bool = key(False, resumable=True)


@dataclass
class Config:
    run_dir: Optional[str] = key(None, resumable=True, groups=False,  # default: runs/<norm>-seed<seed>
                                 study="the study puts runs in OUT/<variant>-s<seed>")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    log: LogConfig = key(factory=LogConfig, groups=False)
    ckpt: CkptConfig = key(factory=CkptConfig, groups=False)

    @property
    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir or f"runs/{self.model.norm}-seed{self.train.seed}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _roles(cls, prefix: str = "", inherited: dict | None = None) -> dict[str, dict]:
    out = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        roles = {**(inherited or ROLE_DEFAULTS), **f.metadata}
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(_roles(hints[f.name], f"{prefix}{f.name}.", roles))
        else:
            out[prefix + f.name] = roles
    return out


# Every dotted key (the names --set and messages use), in declaration order, with all its roles.
KEY_ROLES: dict[str, dict] = _roles(Config)


def keys_where(role: str, value=True) -> tuple[str, ...]:
    """The dotted keys whose `role` is `value`, e.g. keys_where("groups", False)."""
    return tuple(k for k, roles in KEY_ROLES.items() if roles[role] == value)


RESUMABLE_CHANGES = keys_where("resumable")
_RULES: dict[str, tuple] = {k: roles["check"] for k, roles in KEY_ROLES.items() if roles["check"]}


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
        if not math.isfinite(value):
            raise ConfigError(f"config: {key} = {value!r} is not valid; expected a finite number")
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


def _check_across_keys(cfg: Config) -> Config:
    """Rules that involve more than one key, each message naming the key to change."""
    bad = invalid_option(**dataclasses.asdict(cfg.model.mn))
    if bad:
        name, must = bad
        value = getattr(cfg.model.mn, name)
        raise ConfigError(f"config: model.mn.{name} = {value!r} is out of range; must be {must}")
    if cfg.eval.at and cfg.eval.every == 0:
        raise ConfigError(f"config: eval.at = {cfg.eval.at} needs eval.every > 0 (evaluation is off)")
    return cfg


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _dotted_to_nested(key: str, value) -> dict:
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's booleans: only true/false are booleans, so that yes, no, on, off, y
    and n stay strings (YAML 1.1 reads `--set data.path=no` as False)."""


_BOOL = "tag:yaml.org,2002:bool"
_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Yaml12Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def load_yaml(text: str):
    """YAML text -> Python values, with YAML 1.2's booleans (see _Yaml12Loader); config files, --set values and
    study files are all read through it."""
    return yaml.load(text, Loader=_Yaml12Loader)


def parse_assignment(text: str) -> tuple[str, object]:
    """`train.lr_g=1e-4` -> ("train.lr_g", 1e-4); the value is read as YAML so lists and bools work."""
    if "=" not in text:
        raise ConfigError(f"config: --set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = load_yaml(raw) if raw.strip() else None
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
            data = load_yaml(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config: {path} is not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config: {path} must hold a mapping of sections")
    for key, value in (overrides or {}).items():
        data = _merge(data, _dotted_to_nested(key, value))
    return _check_across_keys(_build(Config, data))


def config_from_dict(data: dict) -> Config:
    return _check_across_keys(_build(Config, data))


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
