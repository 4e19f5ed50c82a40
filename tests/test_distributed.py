"""Data parallelism on CPU: 2 processes with gloo must compute what 1 process with the doubled batch does.

Two kinds of multi-process runs, both on this machine:
- `torchrun --standalone --nproc_per_node 2 cli.py train ...` in a subprocess: the real launch path
  (env:// rendezvous, DDP, synchronized norms, rank-0-only files, checkpoint and resume);
- a module fixture that starts 2 workers with torch.multiprocessing (spawn) and a FileStore, for
  checks that need tensors back (norm layers' outputs and gradients, the helpers' agreement,
  evaluation split over the ranks with the real Trainer).

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

import itertools
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

from gan.core.checkpoint import list_checkpoints, load_checkpoint
from gan.core.config import load_config
from gan.core.train import Trainer
from tests.cli_float64 import float64_mode
from tests.conftest import ROOT, tiny_overrides

DEFAULT_CONFIG = ROOT / "configs" / "default.yaml"
LR = 2e-4
TOL = 1e-10  # float64 agreement, relative to max(1, |value|): see the module docstring
# Global batch 16 = 2 processes x 8; 48 images = 3 batches an epoch, so 6 steps cross an epoch boundary.
RUN = {"train.batch_size": 16, "train.steps": 6, "train.threads": 1, "ckpt.every": 3, "log.every": 3,
       "log.sample_every": 3, "train.lr_g": LR, "train.lr_d": LR}
# Reseeding a dead component draws its candidate from rank 0's samples only (not world-size invariant).
MN = {"model.norm": "mn", "model.mn.dead_steps": 100}


# ---------------------------------------------------------------- launching

def _set_args(overrides: dict) -> list[str]:
    args = []
    for key, value in overrides.items():
        args += ["--set", f"{key}={value}"]
    return args


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
    return load_checkpoint(run / "checkpoints" / f"step_{step:07d}.pt")


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
    one = in_process(image_zip, root / "one")
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


# ---------------------------------------------------------------- in-process workers: layers, helpers, evaluation

def _mixture_data(n: int, c: int, hw: int, seed: int) -> torch.Tensor:
    """Three well-separated modes per channel, like post-ReLU generator activations."""
    g = torch.Generator().manual_seed(seed)
    mode = torch.randint(3, (n, 1, hw, hw), generator=g).float()
    return (mode * 3.0 - 2.0) + 0.5 * torch.randn(n, c, hw, hw, generator=g) + torch.arange(c).view(1, c, 1, 1)


# name -> (kind, channels_last, detach_posteriors); every one in float64 (the identity) and float32 (the
# training dtype: it runs synchronized too).
PER_CHANNEL = {"posteriors": "per_channel"}
# name -> (kind, channels_last, detach_posteriors, MixtureNorm options)
NORM_CASES = {
    "bn": ("bn", False, True, {}), "bn-channels-last": ("bn", True, True, {}),
    "mn": ("mn", False, True, {}), "mn-channels-last": ("mn", True, True, {}),
    "mn-posterior-gradients": ("mn", False, False, {}),
    "mn-per-channel": ("mn", False, True, PER_CHANNEL), "mn-per-channel-channels-last": ("mn", True, True, PER_CHANNEL),
    "mn-per-channel-posterior-gradients": ("mn", False, False, PER_CHANNEL),
}
# Fresh fits seed from rank 0's share of the batch: the ranks agree with each other, not with one process.
RANKS_ONLY_CASES = {"mn-per-channel-fresh": ("mn", True, True, {**PER_CHANNEL, "fit": "fresh"})}


def _norm_cases() -> dict:
    """name -> module factory args, a warmed-up state, input and upstream gradient (batch 64)."""
    from models.mixture_norm import MixtureNorm2d
    cases = {}
    for (name, (kind, channels_last, detach, opts)), dtype in itertools.product(
            {**NORM_CASES, **RANKS_ONLY_CASES}.items(), (torch.float64, torch.float32)):
        torch.manual_seed(0)
        c = 6
        m = (torch.nn.BatchNorm2d(c) if kind == "bn" else
             MixtureNorm2d(c, num_components=3, em_samples=4096, detach_posteriors=detach, **opts))
        torch.nn.init.normal_(m.weight, 1.0, 0.2)
        torch.nn.init.normal_(m.bias, 0.0, 0.2)
        m.to(dtype).train()
        with torch.no_grad():  # warm-up: the mixture is seeded (k-means++ on one process) and fitted once
            m(_mixture_data(64, c, 4, seed=1).to(dtype))
        cases[f"{name}-{str(dtype)[6:]}"] = {
            "kind": kind, "channels_last": channels_last, "detach": detach, "channels": c, "opts": opts,
            "state": {k: v.clone() for k, v in m.state_dict().items()},
            "x": _mixture_data(64, c, 4, seed=2).to(dtype), "grad": torch.randn(64, c, 4, 4).to(dtype)}
    return cases


def _build(case: dict) -> torch.nn.Module:
    """The layer inside a Sequential (sync_norms converts children, as in the real networks)."""
    from models.mixture_norm import MixtureNorm2d
    c = case["channels"]
    m = (torch.nn.BatchNorm2d(c) if case["kind"] == "bn" else
         MixtureNorm2d(c, num_components=3, em_samples=4096, detach_posteriors=case["detach"], **case["opts"]))
    m.to(case["x"].dtype).load_state_dict(case["state"])
    return torch.nn.Sequential(m).train()


def _run_case(m: torch.nn.Module, case: dict, rows: slice) -> dict:
    x = case["x"][rows].clone()
    if case["channels_last"]:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    y = m(x)
    (y * case["grad"][rows]).sum().backward()
    return {"y": y.detach().contiguous(), "dx": x.grad.contiguous(),
            "dparams": {n: p.grad.clone() for n, p in m.named_parameters()},
            "state": {k: v.clone() for k, v in m.state_dict().items()}}


class _PixelEvaluator:
    """Stands in for the Inception evaluator: features are pixels; the score is sensitive to their order."""

    def inception_outputs(self, images: torch.Tensor):
        return images.flatten(1).float()[:, :64], None

    def score(self, images: torch.Tensor) -> dict:
        return self.score_features(*self.inception_outputs(images))

    def score_features(self, feats: torch.Tensor, logits=None) -> dict:
        w = torch.arange(1, len(feats) + 1, dtype=torch.float64)
        return {"fid": float(feats.double().sum()), "kid_mean": float((w[:, None] * feats.double()).sum()),
                "num_samples": len(feats)}


def _worker(rank: int, world: int, store: str, cases_file: str, cfg_dict: dict, out_dir: str) -> None:
    import torch.distributed as dist
    from gan.core import distributed
    from gan.core.config import config_from_dict
    from models.sync_norms import sync_norms
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    out: dict = {"norms": {}}
    try:
        half = 64 // world
        rows = slice(rank * half, (rank + 1) * half)
        for name, case in torch.load(cases_file, weights_only=True).items():
            m = sync_norms(_build(case))
            assert type(m[0]).__name__ == ("SyncBatchNorm2d" if case["kind"] == "bn" else "MixtureNorm2d")
            assert case["kind"] == "bn" or m[0].sync
            out["norms"][name] = _run_case(m, case, rows)
        # The helpers the trainer uses to agree: a stop signal or a bad step on one rank is everyone's.
        out["max_int"] = distributed.max_int(15 if rank == 1 else 0)
        out["first_step"] = distributed.first_step(7 if rank == 1 else -1)
        out["all_true"] = distributed.all_true(rank == 0)
        # Evaluation split over the ranks, with the real Trainer (BN generator; both g_modes).
        evals = {}
        for g_mode in ("eval", "train"):
            cfg = config_from_dict({**cfg_dict, "eval": {**cfg_dict["eval"], "g_mode": g_mode},
                                    "run_dir": f"{out_dir}/run-{g_mode}"})
            t = Trainer(cfg, progress=False)
            t.evaluator = _PixelEvaluator()
            evals[g_mode] = t.evaluate()
            t.logger.close()
        out["evaluate"] = evals
    finally:
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def worker_results(image_zip, tmp_path_factory):
    import torch.multiprocessing as mp
    d = tmp_path_factory.mktemp("workers")
    cases = _norm_cases()
    torch.save(cases, d / "cases.pt")
    # Samples: 40 in forward batches of 16 -> rank 0 makes batches 0 (16 images), rank 1 batches 1-2 (24).
    cfg = load_config(DEFAULT_CONFIG, tiny_overrides(image_zip, d / "run", **RUN, **{
        "eval.num_samples": 40, "eval.batch_size": 16}))
    t0 = time.monotonic()
    mp.start_processes(_worker, args=(2, str(d / "store"), str(d / "cases.pt"), cfg.to_dict(), str(d)),
                       nprocs=2, start_method="spawn")
    print(f"workers: {time.monotonic() - t0:.1f} s")
    ranks = [torch.load(d / f"rank{r}.pt", weights_only=True) for r in range(2)]
    single = {}
    for g_mode in ("eval", "train"):
        c = load_config(DEFAULT_CONFIG, tiny_overrides(image_zip, d / f"single-{g_mode}", **RUN, **{
            "eval.num_samples": 40, "eval.batch_size": 16, "eval.g_mode": g_mode}))
        t = Trainer(c, progress=False)
        t.evaluator = _PixelEvaluator()
        single[g_mode] = t.evaluate()
    return {"cases": cases, "ranks": ranks, "single_eval": single}


def _one_process_and_ranks(worker_results, name: str) -> tuple[dict, dict, list[dict]]:
    case = worker_results["cases"][name]
    return case, _run_case(_build(case), case, slice(0, 64)), [r["norms"][name] for r in worker_results["ranks"]]


@pytest.mark.parametrize("name", list(NORM_CASES))
def test_norm_layer_two_ranks_of_32_equal_one_process_of_64(worker_results, name):
    """Outputs, input gradients, parameter gradients and running statistics / mixture state agree to TOL in
    float64 (module docstring): the maths is the same. Every sum here has at most 1024 terms, so plain
    rounding is below 1e-13 relative; MN's variances lose a few digits more to E[(x - shift)^2] -
    (E[x] - shift)^2 inside the M-step, and its nearly hard posteriors amplify the rest by a data-dependent
    factor. To first order rounding differences scale with the unit roundoff, 5e8 times smaller in float64
    than in float32: a difference of 1e-2 in float32 (far more than MN shows) would be 2e-11 here."""
    case, want, ranks = _one_process_and_ranks(worker_results, f"{name}-float64")

    def close(a, b, what):
        assert a.shape == b.shape and a.dtype == b.dtype, what
        err = (a - b).abs().max().item()
        assert err <= TOL * max(1.0, b.abs().max().item()), f"{name} {what}: {err:.3g}"

    close(torch.cat([r["y"] for r in ranks]), want["y"], "output")
    close(torch.cat([r["dx"] for r in ranks]), want["dx"], "input gradient")
    for p, g in want["dparams"].items():  # each rank's gradient of its own part of the loss: they add up
        close(ranks[0]["dparams"][p] + ranks[1]["dparams"][p], g, f"{p} gradient")
    for r in ranks:
        for k, v in want["state"].items():
            if v.is_floating_point():
                close(r["state"][k], v, k)
            else:
                assert torch.equal(r["state"][k], v), f"{name} {k}"
    if case["kind"] == "mn":
        assert int(want["state"]["0.num_batches_tracked"]) == 2  # warm-up + this step: the warm path ran


@pytest.mark.parametrize("name", list(NORM_CASES))
def test_norm_layer_two_ranks_run_in_float32(worker_results, name):
    """float32, the training dtype, goes through the same synchronized code: it runs, keeps the dtype, and
    updates the same state as one process (counters equal, every value finite). Its numbers are not
    compared with a tolerance: that 2 ranks compute what 1 process computes is the float64 test's claim;
    in float32 the two summation orders differ by processor-dependent rounding that MN's nearly hard
    posteriors amplify by a data-dependent factor (see the module docstring)."""
    case, want, ranks = _one_process_and_ranks(worker_results, f"{name}-float32")
    for r in ranks:
        assert r["y"].dtype == r["dx"].dtype == torch.float32
        assert torch.isfinite(r["y"]).all() and torch.isfinite(r["dx"]).all()
        assert r["y"].shape == r["dx"].shape == (32, *case["x"].shape[1:])
        assert r["dparams"].keys() == want["dparams"].keys()
        assert all(torch.isfinite(g).all() for g in r["dparams"].values())
        assert r["state"].keys() == want["state"].keys()
        for k, v in want["state"].items():
            assert r["state"][k].dtype == v.dtype, k
            if v.is_floating_point():
                assert torch.isfinite(r["state"][k]).all(), k
            else:
                assert torch.equal(r["state"][k], v), k


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_fresh_fit_ranks_agree(worker_results, dtype):
    """A fresh fit draws its k-means++ seeds on rank 0 and shares them; EM then uses all-reduced sums,
    so every rank holds the same mixture (bit for bit) and the step's outputs are finite."""
    ranks = [r["norms"][f"mn-per-channel-fresh-{dtype}"] for r in worker_results["ranks"]]
    for k, v in ranks[0]["state"].items():
        assert torch.equal(ranks[1]["state"][k], v), k
    assert all(torch.isfinite(r["y"]).all() and torch.isfinite(r["dx"]).all() for r in ranks)


def test_ranks_agree_on_stop_signals_and_divergence(worker_results):
    for r in worker_results["ranks"]:
        assert r["max_int"] == 15
        assert r["first_step"] == 7
        assert r["all_true"] is False


@pytest.mark.parametrize("g_mode", ["eval", "train"])
def test_evaluation_split_over_ranks_equals_one_process(worker_results, g_mode):
    """Each rank generates and featurizes its share; rank 0 scores the gathered features (in order)
    and every rank gets the same result, equal to one process's, exactly. The stand-in evaluator's
    features are pixels, so this checks the split (the same images), the gather (their order), the
    scoring on rank 0 and the broadcast; the real Evaluator adds Inception's batch-dependent rounding."""
    want = worker_results["single_eval"][g_mode]
    for r in worker_results["ranks"]:
        assert r["evaluate"][g_mode] == want
    assert want["num_samples"] == 40.0
