"""Data parallelism on CPU: 2 processes with gloo must compute what 1 process with the doubled batch does.

Two kinds of multi-process runs, both on this machine:
- `torchrun --standalone --nproc_per_node 2 cli.py train ...` in a subprocess: the real launch path
  (env:// rendezvous, DDP, synchronized norms, rank-0-only files, checkpoint and resume);
- a module fixture that starts 2 workers with torch.multiprocessing (spawn) and a FileStore, for
  checks that need tensors back (norm layers' outputs and gradients, the helpers' agreement,
  evaluation split over the ranks with the real Trainer): tests/test_distributed_workers.py.

Why the comparisons run in float64: one process sums a batch's statistics and gradients in one
reduction; two processes sum two halves and add them (all-reduce). Both are the same maths, but the
two summation orders round differently, and how differently depends on the processor (SIMD width,
thread count). Adam (each step divided by the gradient's RMS, so a gradient that is ~0 up to rounding
takes a step of up to lr) and MN (nearly hard posteriors; EM carried from step to step) amplify that
rounding by factors that depend on the data, so no float32 tolerance is both tight and valid on every
processor. "2 processes compute what 1 process computes" is an identity, so it is checked where
rounding is negligible: in float64 (tests/cli_float64.py's float64_mode, in torchrun's workers and
around the one-process runs: models, noise, batches and the loss are float64), to TOL = 1e-10
relative to max(1, |value|). Float64's unit roundoff is u = 2**-53 = 1.1e-16; a sum of n terms in any
order is off by at most (n - 1) u times the sum of their magnitudes (1e-13 relative for the 1024 to
4096 samples summed here), which leaves a factor of ~1000 for the amplification above, while any real
difference in the maths (statistics of one rank's half instead of the global batch, a rank's gradient
left out) changes the weights by a sizable fraction of lr = 2e-4 per step: 5 to 6 orders of magnitude
above TOL.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gan.core.checkpoint import list_checkpoints, read_checkpoint
from gan.core.config import load_config
from gan.core.train import Trainer
from tests.cli_float64 import float64_mode
from tests.conftest import DEFAULT_CONFIG, ROOT, tiny_overrides
from tests.conftest import set_args as _set_args

# Every test here starts several processes (torchrun or spawned ranks).
pytestmark = pytest.mark.slow

LR = 2e-4
TOL = 1e-10  # float64 agreement, relative to max(1, |value|): see the module docstring
# Global batch 16 = 2 processes x 8; 48 images = 3 batches an epoch, so 6 steps cross an epoch boundary.
RUN = {"train.batch_size": 16, "train.steps": 6, "train.threads": 1, "ckpt.every": 3, "log.every": 3,
       "log.sample_every": 3, "train.lr_g": LR, "train.lr_d": LR}
# Reseeding a dead component draws its candidate from rank 0's samples only (not world-size invariant).
MN = {"model.norm": "mn", "model.mn.dead_steps": 100}


# ---------------------------------------------------------------- launching

def _env() -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _train_args(data: Path, run: Path, script: str = "cli.py", **extra) -> list[str]:
    return [script, "train", "--wandb", "disabled", "--quiet",
            *_set_args(tiny_overrides(data, run, **{**RUN, **extra}))]


def torchrun(data: Path, run: Path, *more: str, **extra) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node 2 cli.py train ...` (tiny model, CPU, gloo), in float64:
    tests/cli_float64.py is cli.py inside float64_mode() (see the module docstring)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           *_train_args(data, run, "tests/cli_float64.py", **extra), *more]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=180)


def in_process(data: Path, run: Path, resume: str | None = None, **extra) -> Trainer:
    """The same config in this process, in float64 like torchrun(): one process with the whole (global) batch."""
    cfg = load_config(DEFAULT_CONFIG, tiny_overrides(data, run, **{**RUN, **extra}))
    with float64_mode():
        t = Trainer(cfg, resume=resume, progress=False)
        t.run()
    return t


def _ckpt(run: Path, step: int) -> dict:
    return read_checkpoint(run / "checkpoints" / f"step_{step:07d}.pt")


def _assert_same_maths(got: dict, want: dict, init: dict, what: str) -> None:
    """Every float64 weight, mixture state and running statistic of G and D agrees to TOL (module docstring);
    integer buffers (step counters, MN's dead counts, its initialized flag) are equal."""
    for net in ("G", "D"):
        assert got[net].keys() == want[net].keys()
        for k, w in want[net].items():
            if not w.is_floating_point():
                assert torch.equal(got[net][k], w), f"{what} {net}.{k}"
                continue
            assert w.dtype == got[net][k].dtype == torch.float64, f"{what} {net}.{k}: {w.dtype}"
            err = (got[net][k] - w).abs().max().item()
            assert err <= TOL * max(1.0, w.abs().max().item()), f"{what} {net}.{k}: differs by {err:.3g}"
    # And the weights did move since `init`, by far more than TOL, so that the agreement is not vacuous:
    # Adam's steps are about lr each (its first one is lr g / (|g| + eps): +-lr for every gradient well
    # above eps = 1e-8), and lr / 20 = 1e-5 is 1e5 x TOL.
    moved = torch.cat([(want["G"][k] - init["G"][k]).abs().flatten() for k in want["G"] if k.endswith("weight")])
    assert moved.mean() > LR / 20, f"{what}: G's weights moved by {moved.mean():.3g} on average"


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- training: torchrun vs one process

@pytest.fixture(scope="module")
def bn_runs(image_zip, tmp_path_factory):
    """One process, 6 steps; 2 processes: 3 steps (one checkpoint), then --resume auto to 6."""
    root = tmp_path_factory.mktemp("bn")
    in_process(image_zip, root / "one")  # read back from its folder by the tests
    t0 = time.monotonic()
    first = torchrun(image_zip, root / "two", **{"train.steps": 3})
    t1 = time.monotonic()
    ckpts_after_first = [p.name for p in list_checkpoints(root / "two" / "checkpoints")]
    second = torchrun(image_zip, root / "two", "--resume", "auto")
    t2 = time.monotonic()
    print(f"torchrun launches: {t1 - t0:.1f} s, {t2 - t1:.1f} s")
    return {"one": root / "one", "two": root / "two", "first": first, "second": second,
            "ckpts_after_first": ckpts_after_first, "init": _initial_weights(image_zip, root / "init")}


def _initial_weights(data: Path, run: Path) -> dict:
    cfg = load_config(DEFAULT_CONFIG, tiny_overrides(data, run, **RUN))
    with float64_mode():
        t = Trainer(cfg, progress=False)
    return {"G": t.G.state_dict(), "D": t.D.state_dict()}


def test_two_processes_train_the_weights_of_one_with_the_doubled_batch(bn_runs):
    """Weights, running statistics and the logged losses agree to TOL in float64 (module docstring)."""
    for proc in (bn_runs["first"], bn_runs["second"]):
        assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = bn_runs["one"], bn_runs["two"]
    # Step 3 comes from the first launch alone; step 6 from the resumed one.
    _assert_same_maths(_ckpt(two, 3), _ckpt(one, 3), bn_runs["init"], "step 3")
    _assert_same_maths(_ckpt(two, 6), _ckpt(one, 6), bn_runs["init"], "step 6")
    # Logged losses are those of the global batch (the mean over ranks), as one process logs them.
    for a, b in zip(_metrics(two), _metrics(one), strict=True):
        assert a["step"] == b["step"]
        for k in ("loss_d", "loss_g", "d_real", "d_fake"):
            assert abs(a[k] - b[k]) <= TOL * max(1.0, abs(b[k])), (a["step"], k, a[k], b[k])


def test_two_processes_checkpoint_once_resume_and_finish(bn_runs):
    first, second, run = bn_runs["first"], bn_runs["second"], bn_runs["two"]
    assert first.returncode == 0, first.stderr[-3000:]
    assert bn_runs["ckpts_after_first"] == ["step_0000003.pt"]
    assert second.returncode == 0, second.stderr[-3000:]
    ckpt3 = run / "checkpoints" / "step_0000003.pt"
    # Every rank resumed, but only rank 0 says so (and only rank 0 prints the summary).
    assert second.stderr.count(f"resuming from {ckpt3} at step 3\n") == 1, second.stderr[-3000:]
    summaries = [json.loads(line) for line in second.stdout.splitlines() if line.startswith("{")]
    assert [s["step"] for s in summaries] == [6]
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step_0000006.pt", "step_0000003.pt"]
    assert _ckpt(run, 6)["step"] == 6
    # Rank 0 alone writes: one line per logged step, one grid per sample step.
    assert [m["step"] for m in _metrics(run)] == [3, 6]
    assert sorted(p.name for p in (run / "samples").iterdir()) == [
        "step_0000000.png", "step_0000003.png", "step_0000006.png"]
    assert "Traceback" not in first.stderr + second.stderr


def test_mixture_norm_two_processes_resume_a_one_process_checkpoint_to_the_same_weights(image_zip, tmp_path):
    """MN trains synchronized: from the same checkpoint, 2 processes end with 1 process's weights, mixtures'
    state and running statistics, to TOL in float64 (module docstring).

    From a checkpoint because MN's first step seeds its mixture (k-means++) from rank 0's samples only,
    so step 1 itself is not world-size invariant; every later step is: EM, posteriors, E_k, V_k and
    the running statistics use all-reduced sums. em_samples (4096) >= every layer's samples per
    process, so EM sees every sample and no random subsample differs.

    MN amplifies rounding far more than BN does (EM's warm start carries it from step to step; nearly
    hard posteriors, prior scaling and Adam amplify it), so in float32 two runs that differ only in
    summation order end apart by an amount that depends on the processor. To first order rounding
    differences scale with the unit roundoff, and float64's is 2**29 (5e8) times smaller than float32's:
    even a float32 difference of 1e-2 (far more than training survives) is 2e-11 in float64, below TOL.
    (A discrete choice that rounding could flip, such as a component's mass crossing 1 sample, flips
    only when the quantity is within ~1e-13 of its threshold in float64.)
    """
    one = tmp_path / "one"
    in_process(image_zip, one, **MN)
    start = one / "checkpoints" / "step_0000003.pt"
    proc = torchrun(image_zip, tmp_path / "two", "--resume", str(start), **MN)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming from {start} at step 3" in proc.stderr
    _assert_same_maths(_ckpt(tmp_path / "two", 6), _ckpt(one, 6), _ckpt(one, 3), "step 6")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_processes_started_with_different_configs_fail_with_one_clear_line(image_zip, tmp_path):
    """Like two nodes launched with different --set options: refused before anything is written."""
    port = _free_port()
    procs = []
    for rank, lr in ((0, "0.0002"), (1, "0.0001")):
        env = {**_env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        cmd = [sys.executable, *_train_args(image_zip, tmp_path / "run"), "--set", f"train.lr_g={lr}"]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    results = [p.communicate(timeout=120) for p in procs]
    codes = [p.returncode for p in procs]
    assert codes == [2, 2], results
    err0 = results[0][1].strip().splitlines()
    assert err0[-1] == ("error: the 2 processes were started with different configs (train.lr_g: 0.0002 on "
                        "rank 0, 0.0001 on rank 1); launch every node with the same config file and --set options")
    assert results[1][1].strip() == ""  # said once, by rank 0
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_a_crashed_process_brings_the_job_down_without_hanging(image_zip, tmp_path):
    """SIGKILL one worker mid-run: torchrun stops the other and fails, naming the rank, in seconds."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           *_train_args(image_zip, tmp_path / "run", **{"train.steps": 100000, "log.every": 1})]
    p = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        metrics = tmp_path / "run" / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
            assert p.poll() is None and time.monotonic() < deadline, p.communicate()
            time.sleep(0.05)
        victim = _worker_pid(p.pid, rank=1)
        os.kill(victim, signal.SIGKILL)
        t0 = time.monotonic()
        _, err = p.communicate(timeout=90)
        took = time.monotonic() - t0
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode != 0
    assert took < 60, took
    assert "rank      : 1" in err and "Signal 9 (SIGKILL)" in err, err[-3000:]


def _worker_pid(agent_pid: int, rank: int) -> int:
    """The pid of torchrun's worker process of that rank (its child with RANK=rank in its environment)."""
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) != agent_pid:
                continue
            if f"RANK={rank}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                return int(proc.name)
        except (OSError, IndexError, ValueError):
            continue  # a process that ended meanwhile
    raise AssertionError(f"no worker with RANK={rank} under {agent_pid}")
