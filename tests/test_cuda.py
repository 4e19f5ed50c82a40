"""The CUDA paths: run with `pytest -m cuda` on a GPU machine (scripts/gpu_check.sh does); skipped, and
reported as skipped, where torch sees no CUDA device.

Each test pins down one thing the default GPU run relies on: MN's maths on the device, the GPU training
defaults (bf16 autocast, channels_last, fused Adam, data on the device), torch.compile with and without
CUDA graphs, exact resume, FID that does not depend on the device, and the NCCL backend.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

from tests.conftest import ROOT, make_images

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _k1_pair(c: int, dtype: torch.dtype):
    from models.mixture_norm import MixtureNorm2d
    bn, mn = nn.BatchNorm2d(c), MixtureNorm2d(c, num_components=1)
    with torch.no_grad():
        w, b = torch.rand(c) + 0.5, torch.randn(c)
        bn.weight.copy_(w), mn.weight.copy_(w), bn.bias.copy_(b), mn.bias.copy_(b)
    return bn.to("cuda", dtype), mn.to("cuda", dtype)


def test_k1_mixture_norm_is_batchnorm_on_cuda_float64():
    """An identity, so float64: outputs, input and affine gradients, running statistics agree to 1e-10."""
    torch.manual_seed(0)
    bn, mn = _k1_pair(16, torch.float64)
    for _ in range(3):
        x = (torch.randn(32, 16, 8, 8, dtype=torch.float64, device="cuda") * 2 + 3).contiguous(
            memory_format=torch.channels_last)
        xb, xm = x.clone().requires_grad_(), x.clone().requires_grad_()
        g = torch.randn_like(x)
        yb, ym = bn(xb), mn(xm)
        (yb * g).sum().backward()
        (ym * g).sum().backward()
        tol = dict(rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(ym, yb, **tol)
        torch.testing.assert_close(xm.grad, xb.grad, **tol)
        torch.testing.assert_close(mn.weight.grad, bn.weight.grad, **tol)
    torch.testing.assert_close(mn.running_E[0], bn.running_mean, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(mn.running_V[0], bn.running_var, rtol=1e-10, atol=1e-10)


def test_k1_mixture_norm_is_batchnorm_under_bf16_autocast():
    """Under autocast both layers take the same bf16 activations; MN keeps float32 statistics.

    Tolerance: the outputs are normalized values of size up to ~4 rounded once to bf16 (8 bits of
    mantissa, a relative step of 2^-8 = 0.0039), so the two may differ by one bf16 step of the larger
    value: |y| * 2^-7 covers two roundings. 0.04 absolute + 2 % relative is above that for |y| <= 4 and
    far below the size of any real error (a wrong mean or variance moves outputs by O(1))."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 16, 3, padding=1).cuda()
    bn, mn = _k1_pair(16, torch.float32)
    x = torch.randn(32, 3, 8, 8, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        h = conv(x)
        yb, ym = bn(h), mn(h)
    assert h.dtype == torch.bfloat16 and ym.dtype == torch.bfloat16
    assert mn.running_V.dtype == torch.float32
    torch.testing.assert_close(ym.float(), yb.float(), rtol=0.02, atol=0.04)


def _gpu_trainer(tmp_path, norm: str, **extra):
    from gan.core.config import load_config
    from gan.core.data import ImageData
    from gan.core.train import Trainer
    images = make_images(256, seed=1)
    data = ImageData(images, torch.zeros(len(images), dtype=torch.long), ["x"], "cuda-test-256")
    overrides = {"run_dir": str(tmp_path / norm), "model.norm": norm, "model.ngf": 64, "model.ndf": 64,
                 "train.steps": 50, "train.batch_size": 64, "train.device": "cuda", "eval.every": 0,
                 "log.every": 10, "log.sample_every": 0, "log.wandb": "disabled", "ckpt.every": 25}
    overrides.update(extra)
    return Trainer(load_config(None, overrides), progress=False, data=data)


@pytest.fixture
def fresh_dynamo():
    """Compiled tests start from no compiled code and no CUDA graphs, and leave none behind."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    torch._dynamo.reset()  # also clears CUDA graph trees
    counters.clear()
    yield counters
    torch._dynamo.reset()


@pytest.mark.parametrize("mode", [None, "auto", "reduce-overhead"], ids=["eager", "compiled", "cuda-graphs"])
@pytest.mark.parametrize("norm", ["bn", "mn"])
def test_fifty_steps_with_the_gpu_defaults_stay_finite(tmp_path, norm, mode, fresh_dynamo):
    """The default GPU run's settings, and with train.compile: compile_mode auto (torch's default mode) and
    reduce-overhead (CUDA graphs, with bf16 autocast inside them); the first step eager."""
    t = _gpu_trainer(tmp_path, norm, **{"train.compile": mode is not None, "train.compile_mode": mode or "auto"})
    # The defaults of a GPU run, as configured (not assumed): bf16, channels_last, fused Adam, data on the GPU.
    assert t.amp == torch.bfloat16 and t.cfg.train.channels_last
    assert t.opt_g.defaults.get("fused") and t.opt_d.defaults.get("fused")
    assert t.stream.images.is_cuda
    before = [p.detach().clone() for p in t.G.parameters()]
    summary = t.run()
    assert summary["step"] == 50
    assert all(torch.isfinite(p).all() for p in t.G.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, t.G.parameters()))
    import json
    records = [json.loads(l) for l in (t.run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "loss_d" in r]
    assert {10, 20, 30, 40, 50} <= {r["step"] for r in logged}
    assert all(torch.isfinite(torch.tensor([r["loss_d"], r["loss_g"]])).all() for r in logged)


def _steps(t, n: int) -> list[dict]:
    out = []
    for _ in range(n):
        out.append(t.train_step())
        t.step += 1
    return out


@pytest.mark.parametrize("norm", ["bn", "mn"])
def test_cuda_graph_steps_equal_eager_steps_and_never_sync(tmp_path, norm, fresh_dynamo):
    """train.compile with compile_mode reduce-overhead (torch's CUDA graph trees) vs eager: 8 steps from the
    same seed in float64 (amp off), with the other GPU defaults (channels_last, fused Adam, data on the
    device) and EMA on.

    - Step 1 runs eagerly (MN's first fit), step 2 warms every graph up, step 3 records them, later steps
      replay them. Steps 5-8 run under sync debug mode "error": a replay makes no host sync (recording
      again would: it synchronizes), and no graph was skipped (a CUDA graph skip falls back silently).
    - Losses of every step, read after all 8 (so none may live in memory a later graph overwrote), and
      weights, buffers and the EMA generator agree to 1e-9 relative: float64 kernels that sum in another
      order differ by ~1e-16 relative per reduction; a graph that read G's output or saved activations
      after they were overwritten, or replayed stale inputs, is off by far more (or raises).
    - Batch 16: MN's largest layer (16x16) has 16 * 256 = 4096 samples, all of them EM's (em_samples), so no
      random subsample, whose draws differ between compiled and eager code, enters the comparison."""
    from torch._inductor import cudagraph_trees
    runs = []
    for mode in ("reduce-overhead", None):
        torch.set_default_dtype(torch.float64)
        try:
            t = _gpu_trainer(tmp_path / str(mode), norm, **{
                "train.compile": mode is not None, "train.compile_mode": mode or "auto", "train.amp": "off",
                "train.ema_decay": 0.9, "model.ngf": 32, "model.ndf": 32, "train.batch_size": 16})
            assert t.opt_g.defaults.get("fused") and t.cfg.train.channels_last and t.stream.images.is_cuda
            scalars = _steps(t, 4)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                scalars += _steps(t, 4)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        finally:
            torch.set_default_dtype(torch.float32)
        if mode is not None:
            assert fresh_dynamo["inductor"]["cudagraph_skips"] == 0, dict(fresh_dynamo["inductor"])
            manager = cudagraph_trees.get_manager(t.device.index or 0, create_if_none_exists=False)
            assert manager is not None and any(manager.roots.values()), "no CUDA graph was recorded"
        losses = torch.tensor([[s["loss_d"].item(), s["loss_g"].item()] for s in scalars], dtype=torch.float64)
        runs.append((losses, {f"{part}.{k}": v.detach().cpu() for part, m in (("G", t.G), ("D", t.D), ("ema", t.ema))
                              for k, v in m.state_dict().items()}))
    (losses_g, state_g), (losses_e, state_e) = runs
    assert torch.isfinite(losses_g).all()
    torch.testing.assert_close(losses_g, losses_e, rtol=1e-9, atol=1e-12)
    assert state_g.keys() == state_e.keys()
    for k, v in state_e.items():
        assert state_g[k].dtype == v.dtype, k
        torch.testing.assert_close(state_g[k], v, rtol=1e-9, atol=1e-12, msg=lambda m: f"{k}: {m}")


def test_resume_on_cuda_continues_the_same_run(tmp_path):
    """25 steps, a new process-like Trainer resumes to 50: the same weights as 50 steps in one go.

    float32 (amp off) with deterministic cuDNN: the only difference left is the order of float32
    atomics in a few backward kernels, so weights agree to 1e-4 relative to their size (50 Adam steps of
    lr 2e-4 move weights by up to 1e-2, so 1e-4 still tells a resumed run from a restarted one)."""
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        straight = _gpu_trainer(tmp_path / "a", "mn", **{"train.amp": "off"})
        straight.run()
        first = _gpu_trainer(tmp_path / "b", "mn", **{"train.amp": "off", "train.steps": 25})
        first.run()
        from gan.core.config import load_config
        from gan.core.train import Trainer
        cfg = load_config(None, {**_flat(first.cfg), "train.steps": 50})
        resumed = Trainer(cfg, resume="auto", progress=False, data=first.data)
        assert resumed.step == 25
        resumed.run()
        for (name, a), b in zip(straight.G.state_dict().items(), resumed.G.state_dict().values()):
            if a.is_floating_point():
                scale = a.abs().max().clamp_min(1.0)
                assert (a - b).abs().max() <= 1e-4 * scale, name
            else:
                assert torch.equal(a, b), name
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, False


def _flat(cfg) -> dict:
    from gan.core.config import flatten
    return flatten(cfg.to_dict())


def _weights():
    from gan.eval.inception import resolve_inception_weights
    path = os.environ.get("MNGAN_INCEPTION_WEIGHTS")
    try:
        return resolve_inception_weights(path, None, False)
    except Exception as e:  # no converter here and no file given: say how to provide one
        pytest.skip(f"no Inception weights on this machine (set MNGAN_INCEPTION_WEIGHTS): {e}")


def test_fid_on_cuda_equals_fid_on_cpu(tmp_path):
    """The same 200 vs 200 images scored on both devices: FID within 0.1 %, KID within 1e-4 absolute.

    Inception runs in float32 on both; the features differ by convolution algorithms' summation order
    (relative ~1e-6), which moves an FID of this size by far less than 0.1 %."""
    from gan.eval.metrics import Evaluator
    weights = _weights()
    real, fake = make_images(200, seed=3), make_images(200, seed=4)
    scores = {}
    for dev in ("cpu", "cuda"):
        ev = Evaluator(weights, torch.device(dev), lambda: real, "cuda-vs-cpu", cache_dir=str(tmp_path / dev),
                       batch_size=50, verbose=False)
        scores[dev] = ev.score(fake)
    assert abs(scores["cuda"]["fid"] - scores["cpu"]["fid"]) <= 1e-3 * scores["cpu"]["fid"]
    assert abs(scores["cuda"]["kid_mean"] - scores["cpu"]["kid_mean"]) <= 1e-4


def test_one_process_torchrun_uses_nccl(tmp_path):
    """`torchrun --nproc_per_node 1`: the NCCL process group starts, all_reduce works, and the
    differentiable all-reduce that synchronized MN and BN use runs forward and backward through NCCL."""
    script = tmp_path / "nccl_probe.py"
    script.write_text(textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(ROOT)!r})
        import copy, torch, torch.distributed as dist
        from gan.core import distributed
        from models.sync_norms import sum_over_ranks
        distributed._init("cuda", __import__("datetime").timedelta(seconds=60))
        assert dist.get_backend() == "nccl", dist.get_backend()
        t = torch.ones(3, device="cuda"); dist.all_reduce(t)
        # MN's and the synchronized BN's differentiable sum, through NCCL: identity for one rank, gradient too.
        x = torch.arange(4.0, device="cuda", requires_grad=True)
        y = sum_over_ranks(x * 2, dist.group.WORLD)
        y.sum().backward()
        assert torch.equal(y.detach(), x.detach() * 2) and torch.equal(x.grad, torch.full_like(x, 2.0))
        print("backend", dist.get_backend(), "sum", t.tolist())
        distributed.teardown()
    """))
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", str(script)],
                       capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "backend nccl sum [1.0, 1.0, 1.0]" in r.stdout


@pytest.mark.parametrize("posteriors", ["joint", "per_channel"])
def test_fused_mixture_norm_on_cuda_computes_what_the_eager_layer_computes(posteriors):
    """fuse (the GPU default) against the eager layer in float64: training steps with re-seeding, eval mode."""
    from tests.test_fused import _assert_same, _run
    _assert_same(_run("never", posteriors, 0.1, "cuda"), _run("always", posteriors, 0.1, "cuda"))
