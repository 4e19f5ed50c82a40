"""Data parallelism in-process: 2 workers started with torch.multiprocessing (spawn) and a FileStore, for
checks that need tensors back: norm layers' outputs and gradients, the helpers the ranks agree with,
evaluation split over the ranks with the real Trainer.

The float64 comparisons hold to TOL, for the reasons tests/test_distributed.py's docstring gives.
"""
from __future__ import annotations

import itertools
import time
from pathlib import Path

import pytest
import torch

from gan.core.config import load_config
from gan.core.train import Trainer
from tests.conftest import DEFAULT_CONFIG, tiny_overrides
from tests.test_distributed import RUN, TOL

# Every test here starts several processes (torchrun or spawned ranks).
pytestmark = pytest.mark.slow


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

    def inception_outputs(self, images: torch.Tensor, on_device: bool = False):
        # The Trainer keeps one process's features on its device and gathers host copies under torchrun.
        assert on_device == (not torch.distributed.is_initialized())
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
            t = Trainer(cfg, progress=False, make_evaluator=lambda *args: _PixelEvaluator())
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
        t = Trainer(c, progress=False, make_evaluator=lambda *args: _PixelEvaluator())
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
