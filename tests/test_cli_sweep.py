"""Whatever a user passes to evaluate, diagnose, compare, study and bench gives output or one `error:` line.

Hypothesis draws each command's option values, valid and invalid (text where a number goes, zero, negative,
nan, inf, unknown choices, missing paths), and runs the command through click. The outcome must be exit 0, or
a non-zero exit whose stderr is one line starting with `error:`; never a traceback.

What would take long is replaced or capped, for speed only: evaluate scores with a stand-in for Inception
(its maths is tested in tests/test_metrics.py), bench's measurements are stubbed (the sweep is about its
options), study only lists its runs (--dry-run), and sample counts stay under 64.
"""
from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, Phase, given, settings, strategies as st

from cli import cli
from tests.conftest import train_args
from tests.test_compare import make_run
from tests.test_study import tiny_study

# Examples per sweep; the quick check (`-m "not slow"`) draws QUICK_EXAMPLES where each costs seconds.
QUICK_EXAMPLES = 10
# No shrinking: an example takes up to a second, and hypothesis's report names the failing draws anyway.
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck),
                    phases=[Phase.explicit, Phase.reuse, Phase.generate])
TEXT = st.text(max_size=8)
NUMBERS = st.one_of(st.integers(-3, 64).map(str), st.floats(allow_nan=True, allow_infinity=True).map(str), TEXT)


def _invoke(argv: list[str]):
    result = CliRunner().invoke(cli, argv)
    if result.exit_code != 0:
        assert isinstance(result.exception, SystemExit), (argv, result.exception)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), (argv, result.stderr)
    return result


def _options(draw, choices: dict) -> list[str]:
    """A random subset of the options, each with a value drawn from its strategy."""
    names = draw(st.lists(st.sampled_from(sorted(choices)), unique=True, max_size=len(choices)))
    argv = []
    for name in names:
        value = choices[name]
        argv += [name] if value is None else [name, draw(value)]
    return argv


class _StandInEvaluator:
    def score(self, images):
        assert images.dtype == torch.uint8 and len(images) >= 2
        return {"fid": 1.0, "kid_mean": 0.0, "kid_std": 0.0}


@pytest.fixture(scope="module")
def trained(image_zip, tmp_path_factory):
    run = tmp_path_factory.mktemp("sweep") / "run"
    result = CliRunner().invoke(cli, train_args(image_zip, run, "--steps", "2", "--set", "ckpt.every=2",
                                                "--norm", "mn"))
    assert result.exit_code == 0, result.output
    return run


@pytest.mark.slow  # about a minute
def test_evaluate_and_diagnose_options(trained, tmp_path, monkeypatch):
    from gan.eval.metrics import Evaluator
    monkeypatch.setattr(Evaluator, "from_config", classmethod(lambda cls, *a, **k: _StandInEvaluator()))
    paths = st.sampled_from([str(tmp_path / "out.json"), str(tmp_path / "missing" / "x"), str(tmp_path)])
    ckpt = st.sampled_from([str(trained), str(trained / "checkpoints" / "step_0000002.pt"), str(tmp_path / "none")])

    @settings(SETTINGS, max_examples=12)  # each example samples, fits mixtures and plots: seconds
    @given(st.data())
    def sweep(data):
        argv = ["evaluate", data.draw(ckpt), "--quiet"] + _options(data.draw, {
            "--num-samples": NUMBERS, "--out": paths, "--grid": paths, "--device": st.sampled_from(["cpu", "gpu"]),
            "--reference": st.sampled_from(["train", "test", str(tmp_path / "none.zip")]),
            "--g-mode": st.sampled_from(["eval", "train", "other"])})
        _invoke(argv)
        argv = ["diagnose", data.draw(ckpt), "--device", "cpu"] + _options(data.draw, {
            "--num-samples": NUMBERS, "--channels": NUMBERS, "--out": paths})
        _invoke(argv)
    sweep()


def test_compare_options(tmp_path, quick_check):
    runs = tmp_path / "runs"
    for seed in (0, 1):
        make_run(runs, f"bn-s{seed}", {1000: 50.0 + seed, 2000: 40.0}, seed=seed)
        make_run(runs, f"mn-s{seed}", {1000: 45.0, 2000: 38.0 + seed}, norm="mn", seed=seed)
    targets = st.one_of(NUMBERS, st.floats(0.1, 100).map(str))
    also = st.lists(st.sampled_from(["2x", "1.5x", "0x", "-1x", "nanx", "250", "abc", "inf", ""]), max_size=3)

    @settings(SETTINGS, max_examples=QUICK_EXAMPLES if quick_check else SETTINGS.max_examples)
    @given(st.data())
    def sweep(data):
        argv = ["compare", data.draw(st.sampled_from([str(runs), str(runs / "bn-s0"), str(tmp_path / "none")]))]
        argv += _options(data.draw, {
            "--metric": st.sampled_from(["fid", "kid", "is"]), "--target": targets,
            "--also-at": also.map(",".join), "--baseline": st.sampled_from(["bn", "norm=mn", "nope", str(runs / "mn-s0")]),
            "--force": None, "--common-steps": None, "--out": st.just(str(tmp_path / "compare"))})
        _invoke(argv)
    sweep()


def test_study_options(tmp_path, image_zip, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tiny_study(tmp_path, image_zip)
    sets = st.sampled_from(["train.steps=5", "train.steps=-1", "model.mn.lambda_min=0.9", "train.seed=3",
                            "nokey", "model.norm=no", "train.stepz=1"])

    @SETTINGS
    @given(st.data())
    def sweep(data):
        argv = ["study", data.draw(st.sampled_from([path, "missing.yaml"])), "--dry-run"] + _options(data.draw, {
            "--jobs": NUMBERS, "--budget-minutes": NUMBERS, "--set": sets,
            "--also-at": st.sampled_from(["2x,1.5x", "250", "x", ""])})
        _invoke(argv)
    sweep()


def test_bench_options(tmp_path, monkeypatch, quick_check):
    from gan.tools import bench
    calls = []
    monkeypatch.setattr(bench, "run_benches", lambda which, device, options: calls.append(options) or [])

    @settings(SETTINGS, max_examples=QUICK_EXAMPLES if quick_check else SETTINGS.max_examples)
    @given(st.data())
    def sweep(data):
        argv = ["bench", data.draw(st.sampled_from(["train", "norm", "eval", "all", "speed"])), "--device", "cpu"]
        argv += _options(data.draw, {
            "--steps": NUMBERS, "--repeats": NUMBERS, "--ngf": NUMBERS, "--eval-images": NUMBERS,
            "--weights": st.sampled_from([str(tmp_path / "none.pth"), str(tmp_path)]),
            "--compile": st.sampled_from(["default", "reduce-overhead", "fast"]),
            "--json": st.just(str(tmp_path / "bench.json"))})
        n = len(calls)
        if _invoke(argv).exit_code == 0:  # what reached the measurements is valid
            options = calls[n]
            assert min(options.steps, options.repeats, options.ngf, options.eval_images) >= 1
    sweep()


def test_a_bad_option_value_is_one_error_line_not_clicks_usage_block():
    result = CliRunner().invoke(cli, ["evaluate", "x", "--num-samples", "abc"])
    assert result.exit_code == 2
    assert result.stderr == "error: Invalid value for '--num-samples': 'abc' is not a valid integer.\n"


def test_evaluate_num_samples_zero_is_refused_not_replaced_by_the_runs(trained, monkeypatch):
    from gan.eval.metrics import Evaluator
    monkeypatch.setattr(Evaluator, "from_config", classmethod(lambda cls, *a, **k: _StandInEvaluator()))
    result = _invoke(["evaluate", str(trained), "--num-samples", "0", "--quiet"])
    assert result.exit_code == 2 and "--num-samples must be at least 2" in result.stderr
