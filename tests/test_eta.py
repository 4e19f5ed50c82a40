"""The CPU's expected-time line: its arithmetic (pure functions, no timing), and that a long CPU run says it
once after its first steps, naming the quick config."""
from __future__ import annotations

import pytest
import torch

from gan.core import eta
from gan.core.config import load_config
from gan.core.schedule import Due
from gan.core.train import Trainer
from tests.conftest import ROOT


@pytest.mark.parametrize("start, steps, every, at", [
    (0, 50_000, 2500, []), (10_000, 50_000, 2500, []), (0, 1000, 300, []), (300, 1000, 300, []),
    (999, 1000, 300, []), (0, 1500, 1500, []), (0, 20, 0, []), (20, 20, 10, []), (7, 9, 4, []),
    (0, 20_000, 2000, [1000]), (1000, 20_000, 2000, [1000]), (0, 1000, 300, [300, 450, 1000, 5000]),
    (0, 1001, 300, [1001, 1, 1])])
def test_evaluations_between_counts_what_the_schedule_evaluates(start, steps, every, at):
    cfg = load_config(None, {"train.steps": steps, "eval.every": every, "eval.at": at})
    due = sum(Due.at(s, cfg).evaluate for s in range(start + 1, steps + 1))
    assert eta.evaluations_between(start, steps, every, at) == due


def test_expected_seconds_adds_training_evaluations_and_reference():
    parts = eta.expected_seconds(50_000, 0.2, 20, 10_000, 50_000, 0.05)
    assert parts == pytest.approx({"train": 10_000, "evaluations": 10_000, "reference": 2500, "total": 22_500})
    assert eta.expected_seconds(100, 0.5, 0, 10_000, 0, 0.0)["total"] == 50


def test_reference_images_follow_eval_reference():
    default = load_config(ROOT / "configs" / "default.yaml")
    assert eta.reference_images(default, 50_000) == 50_000
    quick = load_config(ROOT / "configs" / "cpu-quick.yaml")
    assert eta.reference_images(quick, 50_000) == 1000  # eval.reference_samples caps it
    assert eta.reference_images(load_config(None, {"eval.reference": "test"}), 50_000) == 10_000
    assert eta.reference_images(load_config(None, {"eval.reference": "real-images.zip"}), 9) == 0  # unknown yet


def test_hours_minutes():
    assert [eta.hours_minutes(s) for s in (40, 61, 12 * 60, 3600, 6 * 3600 + 32 * 60 + 10)] == [
        "40 s", "1 min", "12 min", "1 h 00 min", "6 h 32 min"]


def test_the_default_config_is_long_on_any_cpu_and_the_quick_one_is_not():
    """The default config passes the lower bound (the fastest step and image any CPU manages) by far; the
    quick config at a 2-core CPU's speed (about 0.1 s/step, 0.05 s/image) stays under LONG_S."""
    d = load_config(ROOT / "configs" / "default.yaml")
    evals = eta.evaluations_between(0, d.train.steps, d.eval.every)
    assert evals == 20
    low = eta.expected_seconds(d.train.steps, 0.02, evals, d.eval.num_samples, 0, eta.MIN_SEC_PER_IMAGE)
    assert low["total"] > eta.LONG_S
    q = load_config(ROOT / "configs" / "cpu-quick.yaml")
    quick = eta.expected_seconds(q.train.steps, 0.1, eta.evaluations_between(0, q.train.steps, q.eval.every),
                                 q.eval.num_samples, eta.reference_images(q, 50_000), 0.05)
    assert quick["total"] < eta.LONG_S


def test_message_is_one_line_with_every_part_and_the_quick_command():
    parts = eta.expected_seconds(50_000, 0.22, 20, 10_000, 50_000, 0.05)
    line = eta.message(parts, 0.22, 20, 10_000, 50_000, 0.05)
    assert "\n" not in line
    assert line.startswith("expected time on this CPU: about 6 h 32 min (training 3 h 03 min at 0.220 s/step; "
                           "20 evaluations of 10000 samples 2 h 47 min; the statistics of 50000 reference images "
                           "42 min, at 0.050 s per image)")
    assert line.endswith(eta.QUICK_COMMAND) and "configs/cpu-quick.yaml" in eta.QUICK_COMMAND
    cached = eta.message(eta.expected_seconds(50_000, 0.22, 0, 0, 0, 0.0), 0.22, 0, 0, 0, 0.0)
    assert "evaluations" not in cached and "reference" not in cached and "per image" not in cached


class _Evaluator:
    """Scores nothing; counts the images it is shown."""

    def __init__(self, tmp_path):
        self.images, self.reference_cache_path = 0, str(tmp_path / "not-cached.pt")

    def inception_outputs(self, images, on_device=False):
        self.images += len(images)
        return torch.zeros(len(images), 4), None

    def score_features(self, feats, logits=None):
        return {"fid": 1.0, "kid_mean": 0.0, "kid_std": 0.0}


def test_a_long_cpu_run_says_so_once_after_its_first_steps(tiny_config, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(eta, "LONG_S", 0.0)
    monkeypatch.setattr(eta, "MIN_SEC_PER_IMAGE", 0.0)
    made = []

    def make_evaluator(*args):
        made.append(_Evaluator(tmp_path))
        return made[-1]
    cfg = tiny_config(**{"eval.every": 10, "train.steps": 20})
    Trainer(cfg, progress=True, make_evaluator=make_evaluator).run()
    lines = [l for l in capsys.readouterr().err.splitlines() if "expected time on this CPU" in l]
    assert len(lines) == 1, lines
    assert "2 evaluations of 16 samples" in lines[0] and "the statistics of 48 reference images" in lines[0]
    assert lines[0].endswith("python cli.py train --config configs/cpu-quick.yaml")
    # One evaluator, made for the estimate and kept for the run's two evaluations (16 samples each).
    assert len(made) == 1 and made[0].images == 2 * 16 + 2 * 16


def test_no_line_for_a_short_run_or_a_quiet_one(tiny_config, tmp_path, monkeypatch, capsys):
    Trainer(tiny_config(), progress=True).run()  # 20 tiny steps: far under LONG_S, nothing measured
    assert "expected time" not in capsys.readouterr().err
    monkeypatch.setattr(eta, "LONG_S", 0.0)
    Trainer(tiny_config(run_dir=tmp_path / "quiet"), progress=False).run()  # --quiet
    assert "expected time" not in capsys.readouterr().err
