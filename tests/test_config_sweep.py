"""Whatever a user sets trains or is refused with one line: a property-based sweep over the typed config.

Hypothesis walks the schema of gan/core/config.py (every key of every section, and combinations of keys) with
values both valid and invalid for each key's type and range. For every config drawn, either it loads, the
Trainer builds the models and takes one training step on a tiny random batch (CPU, no data set, no
Inception), or a one-line UserError names a config key. Any other exception, or a message of several lines,
fails the test.

Caps, for speed only: widths, z_dim, batch, D steps, EM iterations and mixture components stay small (each
is still drawn at and below its lower bound, so its invalid values are swept too). train.compile and
model.mn.fuse=always stay off: each example would compile for about a minute (tests/test_compile.py and
tests/test_fused.py check the compiled paths against eager). train.threads stays within the machine's cores,
and run_dir in a fresh temporary folder, because the step uses them for real.

The sweep runs SWEEP_EXAMPLES examples (under a minute on 2 idle cores), QUICK_EXAMPLES in the quick check.
"""
from __future__ import annotations

import dataclasses
import tempfile
import typing
from pathlib import Path
from typing import Literal

import pytest
import torch
from hypothesis import HealthCheck, Phase, example, given, settings, strategies as st

from gan.core.config import _RULES, KEY_ROLES, Config, ConfigError, config_from_dict, load_config
from gan.core.data import ImageData
from gan.core.errors import UserError
from gan.core.train import Trainer
from models.mixture_options import invalid_option
from tests.conftest import make_images

SWEEP_EXAMPLES = 1000
QUICK_EXAMPLES = 100
# No shrinking: examples take a fraction of a second each and shrinking one can take minutes; the report
# names the failing config as drawn, and it goes into FOUND below.
PHASES = [Phase.explicit, Phase.reuse, Phase.generate]

# key -> (lowest drawn, highest drawn): the speed caps above; the lowest is below each key's valid range.
CAPS = {"model.ngf": (-1, 16), "model.ndf": (-1, 16), "model.z_dim": (-1, 32), "train.batch_size": (-1, 8),
        "train.d_steps": (-1, 3), "model.mn.em_steps": (-1, 4), "model.mn.num_components": (-1, 160),
        "train.threads": (-1, 2)}
PINNED = {"train.compile": False}  # and run_dir: a fresh folder per example
NOT_DRAWN = {"model.mn.fuse": ["always"]}
TINY_DATA = ImageData(make_images(16), torch.zeros(16, dtype=torch.int64), ["x"], "sweep-tiny")
KEYS = [k for k in KEY_ROLES if k != "run_dir" and k not in PINNED]


def _types(cls=Config, prefix: str = "") -> dict[str, object]:
    """Every dotted key's annotation, read off the dataclasses themselves."""
    out = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.update(_types(tp, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = tp
    return out


TYPES = _types()
WRONG_TYPE = st.one_of(st.text(max_size=6), st.booleans(), st.none(), st.lists(st.integers(-3, 3), max_size=2),
                       st.dictionaries(st.text(max_size=3), st.integers(), max_size=1),
                       st.floats(allow_nan=True, allow_infinity=True))


def _right_type(key: str, tp) -> st.SearchStrategy:
    """Values of the key's own type, over its whole domain (or its cap), invalid ones of that type included."""
    args = typing.get_args(tp)
    if type(None) in args:  # Optional[X]
        (inner,) = [a for a in args if a is not type(None)]
        return st.none() | _right_type(key, inner)
    if typing.get_origin(tp) is Literal:
        return st.sampled_from([a for a in args if a not in NOT_DRAWN.get(key, [])]) | st.text(max_size=8)
    if typing.get_origin(tp) is list:
        return st.lists(st.integers(-2, 1100), max_size=4)
    if tp is bool:
        return st.booleans()
    if tp is int:
        if key in CAPS:
            return st.integers(*CAPS[key])
        return st.integers(-3, 10) | st.integers()
    if tp is float:
        return st.floats(-2, 2) | st.floats(allow_nan=True, allow_infinity=True) | st.integers(-2, 5)
    if tp is str:
        return st.text(max_size=12)
    raise AssertionError(f"no strategy for {key}: {tp}")


def _valid(key: str) -> st.SearchStrategy:
    """Values that the key's own rule accepts (other keys' rules, such as MN's across keys, may still refuse)."""
    tp = TYPES[key]
    if typing.get_origin(tp) is Literal:
        return st.sampled_from([a for a in typing.get_args(tp) if a not in NOT_DRAWN.get(key, [])])
    values = _right_type(key, tp)
    if tp is float:
        values = st.floats(-2, 2) | st.floats(1e-8, 1e3) | st.integers(0, 5)
    rule = _RULES.get(key)
    if key.startswith("model.mn."):
        name = key.rsplit(".", 1)[1]
        return values.filter(lambda v: _type_ok(key, v) and invalid_option(**{name: v}) is None)
    return values.filter(lambda v: _type_ok(key, v) and (rule is None or rule[0](v)))


def _type_ok(key: str, value) -> bool:
    try:
        config_from_dict(_nested(key, value))
        return True
    except ConfigError as e:
        return key not in str(e)


def _nested(key: str, value) -> dict:
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def _any(key: str) -> st.SearchStrategy:
    """Values of the key's type over its whole domain (or cap), and of other types."""
    tp = TYPES[key]
    if key in CAPS or key in NOT_DRAWN:  # wrong types, but no uncapped int and no excluded choice
        wrong = WRONG_TYPE.filter(lambda v: (isinstance(v, bool) or not isinstance(v, int))
                                  and v not in NOT_DRAWN.get(key, []))
        return _right_type(key, tp) | wrong
    return _right_type(key, tp) | WRONG_TYPE


@st.composite
def configs(draw) -> dict:
    # The capped keys always get a value within their cap (their defaults are full size). Then up to 8 keys,
    # capped ones included, get values: each one valid for its key, or (one time in eight) any value at all,
    # so that most examples train and the rest are refused for one key or a few.
    capped = {k: draw(st.integers(max(lo, 0 if k == "train.threads" else 1), min(hi, 8)) | st.integers(1, hi))
              for k, (lo, hi) in CAPS.items()}
    keys = draw(st.lists(st.sampled_from(KEYS), min_size=1, max_size=8, unique=True))
    return {**capped, **{k: draw(_valid(k) if draw(st.integers(0, 7)) < 7 else _any(k)) for k in keys}}


class _NoEvaluator:
    """Evaluation is not part of one training step; a config that evaluates still needs an evaluator."""


def check_one_step(overrides: dict) -> str:
    """Loads and steps, or checks the refusal; returns "trained" or "refused"."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            cfg = load_config(None, {**overrides, **PINNED, "run_dir": str(Path(tmp) / "run")})
        except ConfigError as e:
            _assert_one_line_naming_a_key(str(e))
            return "refused"
        threads = torch.get_num_threads()
        trainer = None
        try:
            trainer = Trainer(cfg, overwrite=True, progress=False, wandb_mode="disabled", data=TINY_DATA,
                              make_evaluator=lambda *args: _NoEvaluator())
            scalars = trainer.train_step()
            assert scalars is None or set(scalars) == {"loss_d", "loss_g", "d_real", "d_fake"}
            return "trained"
        except UserError as e:
            _assert_one_line_naming_a_key(str(e))
            return "refused"
        finally:
            if trainer is not None:
                trainer.logger.close()
            torch.set_num_threads(threads)


def _assert_one_line_naming_a_key(message: str) -> None:
    assert "\n" not in message.strip(), message
    assert any(k in message for k in KEY_ROLES), f"names no config key: {message}"


# Failing examples the sweep found, kept as regression tests.
FOUND = [
    {"model.mn.lambda_min": 0.5},          # lambda_min * K >= 1: the layer's check, which runs after loading data
    {"model.mn.em_samples": 2},            # em_samples < K
    {"train.amp": "fp16", "train.d_steps": 2},  # one GradScaler stepped twice before update()
    {"train.seed": 2**80},                 # torch's "Overflow when unpacking long long"
    {"model.mn.lambda_min": 1.65e-80},     # 0 in float32: an infinite gain (refused)
    {"model.norm": "mn", "model.mn.eps": 1e-30},  # NaN activations, which MN's random draws must survive
]


def _with_examples(test):
    small = {k: hi for k, (lo, hi) in CAPS.items()}
    for found in FOUND:
        test = example({**small, **found})(test)
    return test


def test_any_config_trains_one_step_or_is_refused_in_one_line(quick_check):
    @settings(max_examples=QUICK_EXAMPLES if quick_check else SWEEP_EXAMPLES, deadline=None,
              suppress_health_check=[HealthCheck.too_slow], phases=PHASES)
    @given(configs())
    @_with_examples
    def sweep(overrides):
        check_one_step(overrides)
    sweep()


@pytest.mark.parametrize("overrides, outcome", [
    ({}, "trained"),
    ({"model.norm": "mn", "model.mn.num_components": 2}, "trained"),
    ({"model.mn.lambda_min": 0.5}, "refused"),
    ({"train.amp": "fp16", "train.d_steps": 3}, "trained"),
    ({"data.path": "no"}, "trained"),          # YAML 1.2: "no" is a path, not False
])
def test_the_sweeps_judge_tells_the_two_outcomes_apart(overrides, outcome):
    base = {"model.ngf": 8, "model.ndf": 8, "train.batch_size": 8, "train.device": "cpu"}
    assert check_one_step({**base, **overrides}) == outcome


@pytest.mark.parametrize("options", [
    {"num_components": 0}, {"lambda_min": 0.5}, {"lambda_min": 0.0}, {"em_samples": 2}, {"em_steps": -1},
    {"dead_steps": 0}, {"eps": 0.0}, {"momentum": 1.5}, {"var_floor": -1.0}, {"fit": "often"},
    {"num_components": 10, "lambda_min": 0.1}, {"num_components": 5000},
])
def test_the_layer_and_the_config_refuse_the_same_mn_options(options):
    from models.mixture_norm import MixtureNorm2d
    name = invalid_option(**options)[0]
    with pytest.raises(ValueError, match=f"^{name} must be "):
        MixtureNorm2d(4, **options)
    refused = rf"^config: model\.mn\.{name} = .* (is out of range; must be|is not valid; expected) "
    with pytest.raises(ConfigError, match=refused):
        load_config(None, {f"model.mn.{k}": v for k, v in options.items()})
    defaults = {k: v for k, v in options.items() if k != name}
    if invalid_option(**defaults) is None:  # the rest alone is valid, for both
        MixtureNorm2d(4, **defaults)
        load_config(None, {f"model.mn.{k}": v for k, v in defaults.items()})
