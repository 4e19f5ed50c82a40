"""Faults inside a run: a NaN loss or gradient (the run stops naming the step and keeps the last good
checkpoint, or skips the update), fp16 overflow that is not divergence, a crash, a broken checkpoint,
and resuming after them to exactly the state an uninterrupted run has.

Tests marked `fault` are tallied by tests/conftest.py (see tests/test_faults_signals.py).
"""
from __future__ import annotations

import re
import signal

import pytest
import torch

from gan.core import checkpoint as ckpt
from gan.core.checkpoint import read_checkpoint
from gan.core.errors import Diverged
from gan.core.train import Trainer
from tests.conftest import assert_same as _assert_same
from tests.conftest import logged_steps as _logged_steps
from tests.conftest import training_state as _training_state

fault = pytest.mark.fault


# ---------------------------------------------------------------- helpers

def _poison(trainer: Trainer, at_step: int, also=None) -> None:
    """The discriminator returns NaN during training step `at_step` (1-based), as a diverged net would."""
    forward = trainer.D.forward

    def poisoned(x):
        out = forward(x)
        if trainer.step + 1 == at_step:
            if also is not None:
                also()
            return out * float("nan")
        return out
    trainer.D.forward = poisoned


# ---------------------------------------------------------------- divergence

@fault
def test_nan_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(tiny_config):
    cfg = tiny_config(**{"ckpt.every": 5})
    t = Trainer(cfg, progress=False)
    _poison(t, at_step=8)
    with pytest.raises(Diverged) as e:
        t.run()
    good = cfg.resolved_run_dir / "checkpoints" / "step_0000005.pt"
    msg = str(e.value)
    assert e.value.exit_code == 3 and "\n" not in msg
    assert msg.startswith("training diverged: non-finite loss or gradient at step 8;")
    assert f"last good checkpoint: {good}" in msg
    assert ckpt.list_checkpoints(good.parent) == [good]  # nothing saved with poisoned weights
    state = read_checkpoint(good)
    assert all(torch.isfinite(v).all() for v in state["G"].values())
    assert _logged_steps(cfg.resolved_run_dir) == [5]


@fault
@pytest.mark.parametrize("mn", [{}, {"model.mn.posteriors": "per_channel"}, {"model.mn.fit": "fresh"}],
                         ids=["joint", "per-channel", "fresh"])
def test_nan_inside_mixture_norm_stops_the_run_like_any_divergence(tiny_config, mn):
    """NaN generator weights put NaN into MN's layers. Their random draws (k-means++ seeds, re-seeding
    candidates) must still let the step finish, so that the run stops with the divergence message."""
    cfg = tiny_config(**{"model.norm": "mn", **mn})
    t = Trainer(cfg, progress=False)
    first = next(m for m in t.G.modules() if isinstance(m, torch.nn.ConvTranspose2d))
    forward = t.G.forward

    def poisoned(z):
        if t.step + 1 == 4:
            with torch.no_grad():
                first.weight.fill_(float("nan"))
        return forward(z)
    t.G.forward = poisoned
    with pytest.raises(Diverged, match="at step 4;"):
        t.run()


@fault
def test_nan_with_a_pending_signal_does_not_save_poisoned_weights(tiny_config):
    cfg = tiny_config()
    t = Trainer(cfg, progress=False)
    _poison(t, at_step=7, also=lambda: t._stop_signal or signal.raise_signal(signal.SIGTERM))
    with pytest.raises(Diverged, match="at step 7"):
        t.run()
    assert ckpt.list_checkpoints(cfg.resolved_run_dir / "checkpoints") == []


@fault
def test_nan_skip_mode_skips_the_update_and_finishes(tiny_config, capsys):
    cfg = tiny_config(**{"train.on_nan": "skip"})
    t = Trainer(cfg, progress=False)
    _poison(t, at_step=8)
    for _ in range(7):  # what the loop does, step by step, to look at step 8 closely
        assert t.train_step() is not None
        t.step += 1
    params = {n: p.detach().clone() for m in (t.G, t.D) for n, p in m.named_parameters(prefix=type(m).__name__)}
    assert t.train_step() is None
    after = {n: p.detach() for m in (t.G, t.D) for n, p in m.named_parameters(prefix=type(m).__name__)}
    _assert_same(params, after, "params")  # neither network took the bad update
    t.step += 1
    summary = t.run()
    assert summary["step"] == 20
    warnings = [l for l in capsys.readouterr().err.splitlines() if "non-finite" in l]
    assert warnings == ["warning: non-finite loss or gradient at step 8; update skipped"]
    final = read_checkpoint(cfg.resolved_run_dir / "checkpoints" / "step_0000020.pt")
    assert all(torch.isfinite(v).all() for part in ("G", "D") for v in final[part].values())


@fault
def test_fp16_loss_scaling_overflow_is_not_divergence(tiny_config):
    # GradScaler starts at 2**16, so the first fp16 updates overflow on purpose; that is not a NaN run.
    cfg = tiny_config(**{"train.amp": "fp16", "train.steps": 10, "train.channels_last": False})
    t = Trainer(cfg, progress=False)
    assert all(s.is_enabled() for s in t.scalers.values())
    assert t.run()["step"] == 10
    for s in t.scalers.values():
        assert s.get_scale() < 2.0 ** 16  # it did overflow, and the scaler dealt with it


@fault
@pytest.mark.parametrize("d_steps", [1, 2, 3])
def test_fp16_trains_with_any_number_of_d_steps_and_resumes_exactly(tiny_config, tmp_path, d_steps):
    extra = {"train.amp": "fp16", "train.d_steps": d_steps, "train.steps": 20, "train.channels_last": False}
    full = tiny_config(**extra)
    Trainer(full, progress=False).run()
    resumed_cfg = tiny_config(**extra, run_dir=str(tmp_path / "resumed"))
    resumed = Trainer(resumed_cfg, resume=str(full.resolved_run_dir / "checkpoints" / "step_0000010.pt"),
                      progress=False)
    assert resumed.step == 10
    resumed.run()
    a = read_checkpoint(full.resolved_run_dir / "checkpoints" / "step_0000020.pt")
    b = read_checkpoint(resumed_cfg.resolved_run_dir / "checkpoints" / "step_0000020.pt")
    _assert_same(_training_state(a), _training_state(b))
    _assert_same(a["scaler"], b["scaler"], "scaler")
    assert set(a["scaler"]) == {"d", "g"} and all(s["scale"] < 2.0 ** 16 for s in a["scaler"].values())


@fault
def test_a_checkpoint_with_one_scaler_for_both_optimizers_resumes(tiny_config, tmp_path):
    extra = {"train.amp": "fp16", "train.steps": 20, "train.channels_last": False}
    cfg = tiny_config(**extra)
    Trainer(cfg, progress=False).run()
    state = read_checkpoint(cfg.resolved_run_dir / "checkpoints" / "step_0000010.pt")
    state["scaler"] = state["scaler"]["g"]
    one_scaler = tmp_path / "one-scaler.pt"
    ckpt.write_checkpoint({k: v for k, v in state.items() if k != "format_version"}, one_scaler)
    resumed = Trainer(tiny_config(**extra, run_dir=str(tmp_path / "resumed")), resume=str(one_scaler),
                      progress=False)
    assert all(s.get_scale() == state["scaler"]["scale"] for s in resumed.scalers.values())
    assert resumed.run()["step"] == 20


# ---------------------------------------------------------------- resume restores everything

@fault
def test_crash_then_resume_restores_everything(tiny_config, tmp_path, monkeypatch):
    fids = {10: 5.0, 20: 3.0, 30: 4.0}
    monkeypatch.setattr(Trainer, "evaluate", lambda self: {"fid": fids[self.step], "ema": True})
    scores = {"make_evaluator": lambda *args: pytest.fail("Trainer.evaluate is replaced here")}
    extra = {"train.steps": 30, "ckpt.keep": 2, "eval.every": 10, "train.ema_decay": 0.9}
    ref = Trainer(tiny_config(run_dir=tmp_path / "ref", **extra), progress=False, **scores)
    ref.run()

    cfg = tiny_config(**extra)
    crashing = Trainer(cfg, progress=False, **scores)
    _poison(crashing, at_step=27, also=lambda: (_ for _ in ()).throw(MemoryError("simulated crash")))
    with pytest.raises(MemoryError):
        crashing.run()
    assert 25 in _logged_steps(cfg.resolved_run_dir)  # logged past the checkpoint it will resume from

    t = Trainer(cfg, resume="auto", progress=False, **scores)
    saved = read_checkpoint(cfg.resolved_run_dir / "checkpoints" / "step_0000020.pt")
    assert t.step == 20 and t.best == {"step": 20, "fid": 3.0}
    assert [h["step"] for h in t.history] == [10, 20]
    _assert_same(t.ema.state_dict(), saved["ema"], "ema")
    _assert_same(torch.get_rng_state(), saved["rng"]["torch"], "rng")
    t.run()
    _assert_same(_training_state(t.state_dict()), _training_state(ref.state_dict()), "resumed")

    files = sorted(p.name for p in (cfg.resolved_run_dir / "checkpoints").iterdir())
    assert files == ["best.pt", "step_0000020.pt", "step_0000030.pt"]  # ckpt.keep plus best.pt
    assert read_checkpoint(cfg.resolved_run_dir / "checkpoints" / "best.pt")["step"] == 20
    steps = _logged_steps(cfg.resolved_run_dir)
    assert steps == [5, 10, 15, 20, 25, 30]


@fault
def test_resume_auto_skips_a_broken_checkpoint_without_deleting_it(tiny_config, capsys):
    cfg = tiny_config()
    Trainer(cfg, progress=False).run()
    newest = cfg.resolved_run_dir / "checkpoints" / "step_0000020.pt"
    expected = read_checkpoint(newest)
    broken = newest.read_bytes()[: newest.stat().st_size // 2]
    newest.write_bytes(broken)
    t = Trainer(cfg, resume="auto", progress=False)
    err = capsys.readouterr().err
    assert t.step == 10
    assert re.search(rf"warning: skipping {re.escape(str(newest))} is not a readable checkpoint", err), err
    assert newest.read_bytes() == broken  # reported and skipped, not deleted
    t.run()
    _assert_same(_training_state(read_checkpoint(newest)), _training_state(expected), "rerun")
