"""Faults around a run: the disk fills up while a checkpoint or a sample grid is written, wandb cannot
start or stops logging mid-run. The previous checkpoint and the local logs always survive.

Tests marked `fault` are tallied by tests/conftest.py (see tests/test_faults_signals.py).
"""
from __future__ import annotations

import errno
import io
import os
import sys

import pytest
import torch
from click.testing import CliRunner

from cli import cli
from gan.core import checkpoint as ckpt
from gan.core.checkpoint import read_checkpoint
from gan.core.train import Trainer
from tests.conftest import tiny_overrides
from tests.conftest import fake_wandb as _fake_wandb
from tests.conftest import logged_steps as _logged_steps
from tests.conftest import output_lines as _lines
from tests.conftest import set_args as _set_args
from tests.conftest import train_args as _train_args

fault = pytest.mark.fault


# ---------------------------------------------------------------- disk full, wandb failures

@fault
def test_disk_full_while_saving_keeps_the_previous_checkpoint(image_zip, tmp_path, tiny_config, monkeypatch):
    run = tmp_path / "run"
    real_save = torch.save

    def disk_fills_up(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("step") == 20:
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)
    monkeypatch.setattr(ckpt.torch, "save", disk_fills_up)
    result = CliRunner().invoke(cli, ["train", "--wandb", "disabled", "--quiet",
                                      *_set_args(tiny_overrides(image_zip, run))])
    ckpts = run / "checkpoints"
    assert result.exit_code == 1, result.output
    assert _lines(result.output) == [
        f"error: could not write checkpoint {ckpts / 'step_0000020.pt'}: No space left on device; "
        f"the previous checkpoint {ckpts / 'step_0000010.pt'} is untouched"]
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_0000010.pt"]  # no half file, no temp
    assert read_checkpoint(ckpts / "step_0000010.pt")["step"] == 10
    monkeypatch.undo()
    t = Trainer(tiny_config(run_dir=run), resume="auto", progress=False)
    assert t.step == 10 and t.run()["step"] == 20


@fault
def test_disk_full_while_writing_samples_is_one_line_and_checkpoints_stay(image_zip, tmp_path, monkeypatch):
    import gan.core.tracking
    run = tmp_path / "run"
    real = gan.core.tracking.save_image

    def disk_fills_up(tensor, path, *args, **kwargs):
        if "step_0000020" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(tensor, path, *args, **kwargs)
    monkeypatch.setattr(gan.core.tracking, "save_image", disk_fills_up)
    result = CliRunner().invoke(cli, _train_args(image_zip, run))
    assert result.exit_code == 1, result.output
    assert _lines(result.output) == [f"error: cannot write {run / 'samples' / 'step_0000020.png'}: "
                                     f"No space left on device"]
    assert [p.name for p in ckpt.list_checkpoints(run / "checkpoints")] == ["step_0000010.pt"]
    assert read_checkpoint(run / "checkpoints" / "step_0000010.pt")["step"] == 10


@fault
def test_wandb_that_cannot_start_leaves_one_warning_and_local_logs(tiny_config, monkeypatch, capsys):
    wandb = pytest.importorskip("wandb")  # in requirements.txt; a machine without it runs the next test

    def broken_init(**kwargs):
        raise RuntimeError("wandb backend failed to start")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setattr(wandb, "init", broken_init)
    cfg = tiny_config(**{"log.wandb": "offline"})
    assert Trainer(cfg, progress=False).run()["step"] == 20
    warnings = [l for l in capsys.readouterr().err.splitlines() if "wandb" in l and not l.startswith("wandb: ")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: wandb disabled for this run (RuntimeError")
    assert _logged_steps(cfg.resolved_run_dir) == [5, 10, 15, 20]


@fault
def test_without_wandb_installed_a_run_warns_once_and_logs_locally(tiny_config, monkeypatch, capsys):
    """On a machine without wandb (an offline GPU node, say), a run asked to log to it still trains and
    keeps its local logs."""
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = tiny_config(**{"log.wandb": "offline"})
    assert Trainer(cfg, progress=False).run()["step"] == 20
    warnings = [l for l in capsys.readouterr().err.splitlines() if "wandb" in l and not l.startswith("wandb: ")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: wandb disabled for this run (ModuleNotFoundError")
    assert _logged_steps(cfg.resolved_run_dir) == [5, 10, 15, 20]
    assert sorted(p.name for p in (cfg.resolved_run_dir / "samples").iterdir())[-1] == "step_0000020.png"


@fault
def test_wandb_that_fails_mid_run_leaves_one_warning_and_local_logs(tiny_config, monkeypatch, capsys):
    _fake_wandb(monkeypatch, fail_log=True)
    cfg = tiny_config(**{"log.wandb": "offline"})
    assert Trainer(cfg, progress=False).run()["step"] == 20
    warnings = [l for l in capsys.readouterr().err.splitlines() if "wandb" in l and not l.startswith("wandb: ")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: wandb stopped logging (OSError")
    assert _logged_steps(cfg.resolved_run_dir) == [5, 10, 15, 20]
    assert (cfg.resolved_run_dir / "checkpoints" / "step_0000020.pt").exists()
