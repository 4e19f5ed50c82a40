"""Nothing lost, nothing let in: kills, signals, divergence, disk and wandb failures, bad and hostile inputs.

Tests marked `fault` are faults a run must survive; tests marked `bad_input` are inputs the CLI must
reject with one clear line. tests/conftest.py tallies both into the line
"faults survived: N/N, bad inputs rejected: M/M" at the end of the pytest output.

Process-level behaviour (SIGKILL, SIGTERM, SIGINT, exit codes) runs `python cli.py train` in a
subprocess; everything else runs in-process (CliRunner or the Trainer), which is much faster.
"""
from __future__ import annotations

import errno
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cli import cli
from gan.core import checkpoint as ckpt
from gan.core.checkpoint import CheckpointError, load_checkpoint
from gan.core.config import ConfigError, load_config
from gan.core.train import Diverged, Interrupted, Trainer
from tests.conftest import ROOT, tiny_overrides, write_image_folder

fault = pytest.mark.fault
bad_input = pytest.mark.bad_input

DEFAULT_CONFIG = ROOT / "configs" / "default.yaml"
# Subprocess runs: long enough that a kill lands mid-run, short enough (~10 ms a step) to finish fast.
STEPS = 150
# One thread makes CPU runs bit-for-bit reproducible between this process and the subprocesses.
SUB = {"train.steps": STEPS, "train.threads": 1, "ckpt.every": 10, "log.sample_every": 25}
SEED = int(os.environ.get("MNGAN_FAULT_SEED", random.randrange(1 << 30)))


# ---------------------------------------------------------------- helpers

def _set_args(overrides: dict) -> list[str]:
    args = []
    for key, value in overrides.items():
        args += ["--set", f"{key}={value}"]
    return args


def _spawn(data: Path, run: Path, *extra: str, slow_write: float | None = None) -> subprocess.Popen:
    """`cli.py train` in a subprocess; slow_write: each checkpoint write pauses that long (tests/cli_slow_save.py)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"}
    cli_py = [str(ROOT / "cli.py")] if slow_write is None else [str(ROOT / "tests" / "cli_slow_save.py"), str(slow_write)]
    cmd = [sys.executable, *cli_py, "train", "--wandb", "disabled", "--quiet",
           *_set_args(tiny_overrides(data, run, **SUB)), *extra]
    return subprocess.Popen(cmd, cwd=run.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _wait_for(cond, proc: subprocess.Popen, what: str, timeout: float = 90):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = cond()
        if value:
            return value
        if proc.poll() is not None:
            rc, out, err = _finish(proc)
            raise AssertionError(f"process exited ({rc}) while waiting for {what}:\n{out}\n{err}")
        time.sleep(0.01)
    proc.kill()
    raise AssertionError(f"timed out waiting for {what}")


def _logged_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):
            pass  # a line a kill cut short
    return steps


def _temps(run: Path) -> list[Path]:
    d = run / "checkpoints"
    return sorted(d.glob(".*.tmp*")) if d.is_dir() else []


def _newest_complete(run: Path) -> Path | None:
    """The newest step_*.pt, after checking that every one present loads: a kill never leaves half of one."""
    found = ckpt.list_checkpoints(run / "checkpoints")
    for path in found:
        load_checkpoint(path)
    return found[0] if found else None


def _assert_resumed_from(newest: Path | None, err: str, note: str) -> None:
    if newest is None:
        assert "resuming from" not in err, f"{note}\n{err}"
    else:
        step = int(newest.stem.split("_")[1])
        assert f"resuming from {newest} at step {step}\n" in err, f"{note}\n{err}"


def _assert_same(a, b, where: str = "state") -> None:
    """Tensors equal bit for bit, everything else equal, recursively."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: {sorted(a)} != {sorted(b)}"
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _training_state(state: dict) -> dict:
    """What must match between an interrupted-and-resumed run and an uninterrupted one."""
    return {k: state[k] for k in ("step", "G", "D", "opt_g", "opt_d", "ema", "rng", "history", "best")}


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


@pytest.fixture(scope="module")
def reference_run(image_zip, tmp_path_factory):
    """The uninterrupted run the subprocess runs must reproduce, in-process: its final checkpoint state."""
    run = tmp_path_factory.mktemp("reference") / "run"
    cfg = load_config(DEFAULT_CONFIG, tiny_overrides(image_zip, run, **SUB))
    Trainer(cfg, progress=False).run()
    return load_checkpoint(run / "checkpoints" / f"step_{STEPS:07d}.pt")


# ---------------------------------------------------------------- SIGKILL anywhere, then --resume auto

@fault
def test_sigkill_anywhere_then_resume_auto_ends_with_the_same_weights(image_zip, tmp_path, reference_run):
    rng = random.Random(SEED)
    note = f"(MNGAN_FAULT_SEED={SEED})"
    run = tmp_path / "run"

    # 1. Killed at a random moment of training: mid-step, mid-log, mid-sample or mid-save.
    p = _spawn(image_zip, run)
    _wait_for(lambda: _logged_steps(run), p, "the first metrics line")
    time.sleep(rng.uniform(0.0, 0.5))
    p.kill()
    assert _finish(p)[0] == -signal.SIGKILL

    # 2. Killed in the middle of a checkpoint write (slowed down to be hit: tests/cli_slow_save.py).
    newest = _newest_complete(run)
    p = _spawn(image_zip, run, "--resume", "auto", slow_write=30)
    tmp = _wait_for(lambda: [t for t in _temps(run) if t.name.endswith(f".tmp{p.pid}")], p,
                    "a checkpoint write to start")[0]
    writing = run / "checkpoints" / tmp.name[1:].split(".tmp")[0]
    p.kill()
    rc, _, err = _finish(p)
    assert rc == -signal.SIGKILL
    _assert_resumed_from(newest, err, note)
    assert tmp.exists() and not writing.exists(), note  # the half-written file never got the real name
    assert _newest_complete(run) == newest, note

    # 3. Killed at a random moment from start-up (imports, data loading) to mid-training.
    p = _spawn(image_zip, run, "--resume", "auto")
    time.sleep(rng.uniform(0.5, 6.0))
    p.kill()
    assert _finish(p)[0] in (-signal.SIGKILL, 0), note

    # 4. Resumed to the end: from the newest complete checkpoint, to the very weights the
    #    uninterrupted run ended with, bit for bit.
    newest = _newest_complete(run)
    p = _spawn(image_zip, run, "--resume", "auto")
    rc, out, err = _finish(p)
    assert rc == 0, f"{note}\n{err}"
    _assert_resumed_from(newest, err, note)
    assert json.loads(out.strip().splitlines()[-1])["step"] == STEPS
    assert "skipping" not in err, err  # nothing broken was ever given a checkpoint's name
    final = load_checkpoint(run / "checkpoints" / f"step_{STEPS:07d}.pt")
    _assert_same(_training_state(final), _training_state(reference_run), "final")
    assert _logged_steps(run) == list(range(5, STEPS + 1, 5)), note  # no step twice, none missing
    assert _temps(run) == []  # leftovers of killed writes are cleaned up on start


# ---------------------------------------------------------------- SIGTERM / SIGINT

@fault
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_signal_finishes_step_saves_and_exits_with_its_code(sig, code, image_zip, tmp_path, reference_run):
    run = tmp_path / "run"
    p = _spawn(image_zip, run)
    _wait_for(lambda: _logged_steps(run), p, "the first metrics line")
    p.send_signal(sig)
    rc, out, err = _finish(p, timeout=30)
    assert rc == code, err
    assert "Traceback" not in err
    name = signal.Signals(sig).name
    m = re.search(rf"^error: stopped by {name} at step (\d+); checkpoint saved at (\S+) "
                  rf"\(continue with --resume auto\)$", err, re.M)
    assert m, err
    step, path = int(m.group(1)), Path(m.group(2))
    assert 5 <= step < STEPS and path.parent == run / "checkpoints"
    assert load_checkpoint(path)["step"] == step
    assert _temps(run) == []

    # The checkpoint a signal saved (often between two periodic ones) continues exactly.
    cfg = load_config(DEFAULT_CONFIG, tiny_overrides(image_zip, run, **SUB))
    t = Trainer(cfg, resume="auto", progress=False)
    assert t.step == step
    t.run()
    _assert_same(_training_state(t.state_dict()), _training_state(reference_run), "resumed")


@fault
def test_second_sigint_during_the_save_exits_at_once(image_zip, tmp_path):
    run = tmp_path / "run"
    # No periodic checkpoints: the only write is the one the first Ctrl-C asks for, slowed to 30 s.
    p = _spawn(image_zip, run, "--set", "ckpt.every=0", slow_write=30)
    _wait_for(lambda: _logged_steps(run), p, "the first metrics line")
    p.send_signal(signal.SIGINT)
    _wait_for(lambda: _temps(run), p, "the checkpoint write to start")
    t0 = time.monotonic()
    p.send_signal(signal.SIGINT)
    rc, out, err = _finish(p, timeout=20)
    assert time.monotonic() - t0 < 10  # not after the 30 s write
    assert rc == 130, err
    assert "press Ctrl-C again to quit at once" in err and err.strip().splitlines()[-1] == "interrupted"
    assert "Traceback" not in err
    assert _temps(run) == [] and ckpt.list_checkpoints(run / "checkpoints") == []


@fault
def test_interrupt_inside_torch_save_stays_an_interrupt(tmp_path, monkeypatch):
    """The race the test above can hit: Ctrl-C lands inside torch.save's zip writer, whose close then
    fails with its own RuntimeError. It must still reach the CLI as an interrupt (exit 130), not an error."""
    def save_interrupted_midway(obj, f):
        f.write(b"PK partial")
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos")

    monkeypatch.setattr(ckpt.torch, "save", save_interrupted_midway)
    with pytest.raises(KeyboardInterrupt):
        ckpt.atomic_save({"x": 1}, tmp_path / "step_0000001.pt")
    assert list(tmp_path.iterdir()) == []


@fault
def test_sigterm_in_process_closes_wandb_and_restores_handlers(tiny_config, monkeypatch):
    finished = _fake_wandb(monkeypatch)
    cfg = tiny_config(**{"log.wandb": "offline"})
    t = Trainer(cfg, progress=False)
    handler = signal.getsignal(signal.SIGTERM)
    sent = []

    def send():
        if not sent:
            sent.append(1)
            signal.raise_signal(signal.SIGTERM)
    forward = t.D.forward
    t.D.forward = lambda x: (send() if t.step + 1 == 7 else None, forward(x))[1]
    with pytest.raises(Interrupted) as e:
        t.run()
    assert e.value.exit_code == 143
    path = cfg.resolved_run_dir / "checkpoints" / "step_0000007.pt"
    assert str(e.value) == (f"stopped by SIGTERM at step 7; checkpoint saved at {path} "
                            f"(continue with --resume auto)")
    assert load_checkpoint(path)["step"] == 7
    assert finished == [True]
    assert signal.getsignal(signal.SIGTERM) is handler


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
    state = load_checkpoint(good)
    assert all(torch.isfinite(v).all() for v in state["G"].values())
    assert _logged_steps(cfg.resolved_run_dir) == [5]


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
    final = load_checkpoint(cfg.resolved_run_dir / "checkpoints" / "step_0000020.pt")
    assert all(torch.isfinite(v).all() for part in ("G", "D") for v in final[part].values())


@fault
def test_fp16_loss_scaling_overflow_is_not_divergence(tiny_config):
    # GradScaler starts at 2**16, so the first fp16 updates overflow on purpose; that is not a NaN run.
    cfg = tiny_config(**{"train.amp": "fp16", "train.steps": 10, "train.channels_last": False})
    t = Trainer(cfg, progress=False)
    assert t.scaler.is_enabled()
    assert t.run()["step"] == 10
    assert t.scaler.get_scale() < 2.0 ** 16  # it did overflow, and the scaler dealt with it


# ---------------------------------------------------------------- resume restores everything

@fault
def test_crash_then_resume_restores_everything(tiny_config, tmp_path, monkeypatch):
    fids = {10: 5.0, 20: 3.0, 30: 4.0}
    monkeypatch.setattr(Trainer, "evaluate", lambda self: {"fid": fids[self.step], "ema": True})
    extra = {"train.steps": 30, "ckpt.keep": 2, "eval.every": 10, "train.ema_decay": 0.9}
    ref = Trainer(tiny_config(run_dir=tmp_path / "ref", **extra), progress=False)
    ref.run()

    cfg = tiny_config(**extra)
    crashing = Trainer(cfg, progress=False)
    _poison(crashing, at_step=27, also=lambda: (_ for _ in ()).throw(MemoryError("simulated crash")))
    with pytest.raises(MemoryError):
        crashing.run()
    assert 25 in _logged_steps(cfg.resolved_run_dir)  # logged past the checkpoint it will resume from

    t = Trainer(cfg, resume="auto", progress=False)
    saved = load_checkpoint(cfg.resolved_run_dir / "checkpoints" / "step_0000020.pt")
    assert t.step == 20 and t.best == {"step": 20, "fid": 3.0}
    assert [h["step"] for h in t.history] == [10, 20]
    _assert_same(t.ema.state_dict(), saved["ema"], "ema")
    _assert_same(torch.get_rng_state(), saved["rng"]["torch"], "rng")
    t.run()
    _assert_same(_training_state(t.state_dict()), _training_state(ref.state_dict()), "resumed")

    files = sorted(p.name for p in (cfg.resolved_run_dir / "checkpoints").iterdir())
    assert files == ["best.pt", "step_0000020.pt", "step_0000030.pt"]  # ckpt.keep plus best.pt
    assert load_checkpoint(cfg.resolved_run_dir / "checkpoints" / "best.pt")["step"] == 20
    steps = _logged_steps(cfg.resolved_run_dir)
    assert steps == [5, 10, 15, 20, 25, 30]


@fault
def test_resume_auto_skips_a_broken_checkpoint_without_deleting_it(tiny_config, capsys):
    cfg = tiny_config()
    Trainer(cfg, progress=False).run()
    newest = cfg.resolved_run_dir / "checkpoints" / "step_0000020.pt"
    expected = load_checkpoint(newest)
    broken = newest.read_bytes()[: newest.stat().st_size // 2]
    newest.write_bytes(broken)
    t = Trainer(cfg, resume="auto", progress=False)
    err = capsys.readouterr().err
    assert t.step == 10
    assert re.search(rf"warning: skipping {re.escape(str(newest))} is not a readable checkpoint", err), err
    assert newest.read_bytes() == broken  # reported and skipped, not deleted
    t.run()
    _assert_same(_training_state(load_checkpoint(newest)), _training_state(expected), "rerun")


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
    assert load_checkpoint(ckpts / "step_0000010.pt")["step"] == 10
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
    assert load_checkpoint(run / "checkpoints" / "step_0000010.pt")["step"] == 10


def _fake_wandb(monkeypatch, fail_log: bool = False) -> list:
    """wandb.init returns a stand-in run; returns a list that gets True when finish() is called."""
    import wandb
    finished: list = []

    class FakeRun:
        summary: dict = {}

        def log(self, values, step=None):
            if fail_log:
                raise OSError(errno.EIO, "wandb's disk went away")

        def finish(self):
            finished.append(True)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setattr(wandb, "init", lambda **kw: FakeRun())
    return finished


@fault
def test_wandb_that_cannot_start_leaves_one_warning_and_local_logs(tiny_config, monkeypatch, capsys):
    import wandb

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
def test_wandb_that_fails_mid_run_leaves_one_warning_and_local_logs(tiny_config, monkeypatch, capsys):
    _fake_wandb(monkeypatch, fail_log=True)
    cfg = tiny_config(**{"log.wandb": "offline"})
    assert Trainer(cfg, progress=False).run()["step"] == 20
    warnings = [l for l in capsys.readouterr().err.splitlines() if "wandb" in l and not l.startswith("wandb: ")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: wandb stopped logging (OSError")
    assert _logged_steps(cfg.resolved_run_dir) == [5, 10, 15, 20]
    assert (cfg.resolved_run_dir / "checkpoints" / "step_0000020.pt").exists()


# ---------------------------------------------------------------- bad inputs, through the CLI

def _lines(text: str) -> list[str]:
    return [l for l in text.splitlines() if l.strip()]


@pytest.fixture(scope="module")
def finished_run(image_zip, tmp_path_factory) -> Path:
    """A finished 2-step CLI run, whose checkpoint the checkpoint cases start from."""
    run = tmp_path_factory.mktemp("finished") / "run"
    result = CliRunner().invoke(cli, _train_args(image_zip, run, "--steps", "2", "--set", "ckpt.every=2"))
    assert result.exit_code == 0, result.output
    return run


def _train_args(data, run, *extra) -> list[str]:
    return ["train", "--wandb", "disabled", "--quiet", *_set_args(tiny_overrides(data, run)), *extra]


def _checkpoint_file(finished_run: Path) -> Path:
    return finished_run / "checkpoints" / "step_0000002.pt"


def _truncated(tmp, run):
    path = tmp / "truncated.pt"
    data = _checkpoint_file(run).read_bytes()
    path.write_bytes(data[: len(data) // 3])
    return path


def _text_file(tmp, run):
    path = tmp / "notes.pt"
    path.write_text("these are my notes, not a checkpoint\n")
    return path


def _other_torch_file(tmp, run):
    path = tmp / "tensors.pt"
    torch.save({"weights": torch.zeros(3)}, path)
    return path


def _newer_format(tmp, run):
    path = tmp / "future.pt"
    state = load_checkpoint(_checkpoint_file(run))
    state["format_version"] = ckpt.FORMAT_VERSION + 1
    torch.save(state, path)
    return path


def _mixed_sizes(tmp):
    folder = write_image_folder(tmp / "mixed", n_per_class=8, classes=("small",))
    write_image_folder(folder, n_per_class=8, classes=("large",), size=48)
    return folder


def _bad_zip(tmp):
    path = tmp / "broken.zip"
    path.write_bytes(os.urandom(2048))
    return path


def _corrupt_image(tmp):
    folder = write_image_folder(tmp / "corrupt", n_per_class=8)
    (folder / "cats" / "0003.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(100))
    return folder


def _empty_zip(tmp):
    path = tmp / "empty.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("train/readme.txt", "no images here")
    return path


# (id, how to build the argument list from (tmp_path, image_zip, finished_run), expected message regex)
CLI_CASES = [
    ("unknown-key", lambda t, z, r: _train_args(z, t / "o", "--set", "train.stepz=3"),
     r"config: unknown key 'train\.stepz' \(known under 'train': .*\)"),
    ("wrong-type", lambda t, z, r: _train_args(z, t / "o", "--set", "train.lr_g=fast"),
     r"config: train\.lr_g = 'fast' is not valid; expected float"),
    ("negative-steps", lambda t, z, r: _train_args(z, t / "o", "--steps", "-5"),
     r"config: train\.steps = -5 is out of range; must be >= 1"),
    ("batch-size-0", lambda t, z, r: _train_args(z, t / "o", "--batch-size", "0"),
     r"config: train\.batch_size = 0 is out of range; must be >= 1"),
    ("unknown-norm", lambda t, z, r: _train_args(z, t / "o", "--set", "model.norm=ln"),
     r"config: model\.norm = 'ln' is not valid; expected one of bn, mn, none"),
    ("missing-config-file", lambda t, z, r: _train_args(z, t / "o", "--config", str(t / "nope.yaml")),
     r"config: no such file: .*nope\.yaml"),
    ("missing-dataset", lambda t, z, r: _train_args(t / "nowhere", t / "o"),
     r"dataset not found: .*nowhere"),
    ("unreadable-dataset", lambda t, z, r: _train_args(_bad_zip(t), t / "o"),
     r"dataset .*broken\.zip is neither a folder nor a \.zip file"),
    ("corrupt-image", lambda t, z, r: _train_args(_corrupt_image(t), t / "o"),
     r"cannot decode image cats/0003\.png in .*corrupt: not a readable image file"),
    ("zip-without-images", lambda t, z, r: _train_args(_empty_zip(t), t / "o"),
     r"no images \(\.png, .*\) found in .*empty\.zip"),
    ("mixed-sizes-no-resize", lambda t, z, r: _train_args(_mixed_sizes(t), t / "o", "--set", "data.resize=false"),
     r"image large/0000\.png is 48x48, not 32x32, and resizing is off \(data\.resize: false\)"),
    ("fewer-images-than-a-batch", lambda t, z, r: _train_args(z, t / "o", "--batch-size", "64"),
     r"the dataset has 48 images, fewer than one batch \(64\)"),
    ("truncated-checkpoint", lambda t, z, r: _train_args(z, t / "o", "--resume", str(_truncated(t, r))),
     r".*truncated\.pt is not a readable checkpoint \(truncated or not a torch file: RuntimeError: "
     r"PytorchStreamReader failed reading zip archive: failed finding central directory\)"),
    ("text-file-as-checkpoint", lambda t, z, r: _train_args(z, t / "o", "--resume", str(_text_file(t, r))),
     r".*notes\.pt is not a readable checkpoint \(truncated or not a torch file: .*\)"),
    ("foreign-torch-file", lambda t, z, r: _train_args(z, t / "o", "--resume", str(_other_torch_file(t, r))),
     r".*tensors\.pt is not a checkpoint of this project \(no format_version / generator\)"),
    ("other-architecture", lambda t, z, r: _train_args(z, t / "o", "--resume", str(_checkpoint_file(r)),
                                                       "--set", "model.ngf=16"),
     r".*step_0000002\.pt is from a different run configuration \(model\.ngf: 8 -> 16\); use --out for a new run"),
    ("other-norm", lambda t, z, r: _train_args(z, t / "o", "--resume", str(_checkpoint_file(r)), "--norm", "none"),
     r".*step_0000002\.pt is from a different run configuration \(model\.norm: 'bn' -> 'none'\); "
     r"use --out for a new run"),
    ("newer-format", lambda t, z, r: _train_args(z, t / "o", "--resume", str(_newer_format(t, r))),
     rf".*future\.pt has checkpoint format {ckpt.FORMAT_VERSION + 1}, newer than this program's "
     rf"{ckpt.FORMAT_VERSION}: update the program"),
    ("evaluate-truncated", lambda t, z, r: ["evaluate", str(_truncated(t, r)), "--quiet"],
     r".*truncated\.pt is not a readable checkpoint .*"),
    ("unwritable-out", lambda t, z, r: _train_args(z, Path(shutil.copy(z, t / "a-file")) / "run"),
     r"run folder .*a-file/run is not writable: Not a directory"),
    ("folder-holds-another-run", lambda t, z, r: _train_args(z, Path(shutil.copytree(r, t / "copy")),
                                                             "--set", "model.ngf=16"),
     r"run folder .*copy already holds a different run \(model\.ngf: 8 -> 16\); use --out for a new folder, "
     r"or --overwrite to replace it"),
    ("folder-holds-this-run", lambda t, z, r: _train_args(z, Path(shutil.copytree(r, t / "copy"))),
     r"run folder .*copy already holds a run; pass --resume auto .*"),
]


@bad_input
@pytest.mark.parametrize("make_args, message", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_bad_input_is_one_line_and_nonzero_exit(make_args, message, tmp_path, image_zip, finished_run):
    before = {p: p.stat().st_mtime_ns for p in finished_run.rglob("*")}
    result = CliRunner().invoke(cli, make_args(tmp_path, image_zip, finished_run))
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)  # not an exception escaping as a traceback
    lines = _lines(result.output)
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert re.fullmatch("error: " + message, lines[0]), lines[0]
    assert {p: p.stat().st_mtime_ns for p in finished_run.rglob("*")} == before  # nothing of it touched


@bad_input
def test_debug_shows_the_traceback(tmp_path, image_zip):
    result = CliRunner().invoke(cli, _train_args(image_zip, tmp_path / "o", "--set", "train.stepz=3", "--debug"))
    assert isinstance(result.exception, ConfigError) and result.exc_info[2] is not None
    assert "unknown key 'train.stepz'" in str(result.exception)


# ---------------------------------------------------------------- hostile checkpoints

class _Payload:
    """Unpickling this runs exec(): it writes the marker file. A checkpoint must never do that."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


@bad_input
def test_malicious_checkpoint_is_refused_and_its_payload_never_runs(tmp_path, image_zip, finished_run):
    marker = tmp_path / "PWNED"
    state = load_checkpoint(_checkpoint_file(finished_run))
    evil = tmp_path / "evil.pt"
    torch.save({**state, "G": _Payload(marker)}, evil)  # a valid-looking checkpoint, payload inside
    legacy = tmp_path / "evil-legacy.pt"
    import pickle
    legacy.write_bytes(pickle.dumps({"format_version": 1, "G": _Payload(marker)}, protocol=2))

    for path in (evil, legacy):
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(path)
        assert str(e.value).startswith(f"{path} was refused: it holds more than tensors and plain values, "
                                       f"and nothing in it was run (")
        assert "(Unsupported global: GLOBAL exec was not an allowed global by default)" in str(e.value)
        for args in (_train_args(image_zip, tmp_path / "o", "--resume", str(path)),
                     ["evaluate", str(path), "--quiet"]):
            result = CliRunner().invoke(cli, args)
            assert result.exit_code == 2 and _lines(result.output)[0].startswith(f"error: {path} was refused")
            assert len(_lines(result.output)) == 1, result.output
    assert not marker.exists()

    # Control: the payload is live; an unrestricted unpickler would have run it.
    torch.load(evil, weights_only=False)
    assert marker.read_text() == "pwned"
