"""A steady-state training step makes no host-device synchronisation, BN or MN, EMA on or off, with the
settings of a GPU run; and D's weights take no gradient from G's loss.

On the CPU a TorchDispatchMode sees every aten op of the steps after the first (the first fits MN's
mixtures, which reads them on the host), and none may be one that makes the host wait for a GPU. On a
GPU, the same steps run under torch.cuda.set_sync_debug_mode("error"), which raises at any sync."""
from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gan.core.config import load_config
from gan.core.data import ImageData
from gan.core.train import Trainer
from tests.conftest import make_images

# Ops whose result the host must read from the device (a scalar, a data-dependent size, a bool), and
# lift_fresh: a tensor made from Python data, which on a GPU is a blocking host-to-device copy.
SYNC_OPS = {"aten._local_scalar_dense", "aten.item", "aten.nonzero", "aten.masked_select", "aten.unique",
            "aten._unique", "aten._unique2", "aten.unique_consecutive", "aten.unique_dim", "aten.equal",
            "aten.is_nonzero", "aten.allclose", "aten.lift_fresh", "aten.lift_fresh_copy"}
GPU_DEFAULTS = {"train.amp": "bf16", "train.fused_adam": "always", "train.channels_last": True,
                "data.on_device": True}
CASES = [pytest.param(norm, ema, id=f"{norm}-ema{'on' if ema else 'off'}") for norm in ("bn", "mn")
         for ema in (0.0, 0.9)]


class SyncOps(TorchDispatchMode):
    """Counts the dispatched ops that are in SYNC_OPS."""

    def __init__(self):
        super().__init__()
        self.found: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name in SYNC_OPS:
            self.found[name] += 1
        return func(*args, **(kwargs or {}))


def _trainer(tmp_path, device: str, norm: str, ema: float, **extra) -> Trainer:
    # 48 images, batch 8: an epoch is 6 steps, so the steps watched below include an epoch's start.
    images = make_images(48, seed=3)
    data = ImageData(images, torch.zeros(len(images), dtype=torch.long), ["x"], "sync-48")
    o = {"run_dir": str(tmp_path / f"{norm}-{ema}"), "model.norm": norm, "train.device": device,
         "train.ema_decay": ema, "model.ngf": 8, "model.ndf": 8, "model.z_dim": 16, "train.batch_size": 8,
         "eval.every": 0, "log.sample_every": 0, "ckpt.every": 0, "log.wandb": "disabled",
         "data.source": "folder", "data.path": "in-memory", **extra}
    return Trainer(load_config(None, o), progress=False, data=data)


def _steps(t: Trainer, n: int) -> None:
    for _ in range(n):
        t.train_step()
        t.step += 1


def test_the_recorder_sees_a_sync():
    with SyncOps() as rec:
        torch.ones(3).sum().item()
        torch.tensor([1.0, 2.0])
        torch.arange(4).nonzero()
    assert set(rec.found) >= {"aten._local_scalar_dense", "aten.lift_fresh", "aten.nonzero"}


@pytest.mark.parametrize("norm, ema", CASES)
def test_steady_state_steps_dispatch_no_sync_op(tmp_path, norm, ema):
    t = _trainer(tmp_path, "cpu", norm, ema, **GPU_DEFAULTS)
    _steps(t, 2)
    with SyncOps() as rec:
        _steps(t, 6)
    assert not rec.found, f"ops that sync the host with a GPU, in 6 steps: {dict(rec.found)}"


def test_d_takes_no_gradient_from_g_step_and_the_run_is_unchanged(tmp_path, monkeypatch):
    """D's .grad after the G step is what D's own update used, D trains again after it, and the weights
    equal those of the same run whose G step also computes (and discards) D's gradients (float64)."""
    import contextlib

    from gan.core import step
    t = _trainer(tmp_path, "cpu", "mn", 0.0)
    g_step, seen = t.gan_step._g_step, []

    def checked(fake):
        before = [p.grad.clone() for p in t.D.parameters()]
        out = g_step(fake)
        seen.append(all(torch.equal(p.grad, b) for p, b in zip(t.D.parameters(), before)))
        seen.append(all(p.requires_grad for p in t.D.parameters()))
        return out
    t.gan_step._g_step = checked
    _steps(t, 3)
    assert seen == [True] * 6

    runs = []
    for freeze in (True, False):
        if not freeze:  # the G step as it was: D's weights keep requires_grad
            monkeypatch.setattr(step, "frozen", lambda module: contextlib.nullcontext(module))
        torch.set_default_dtype(torch.float64)
        try:
            r = _trainer(tmp_path / str(freeze), "cpu", "mn", 0.9)
            _steps(r, 4)
        finally:
            torch.set_default_dtype(torch.float32)
        assert all(p.grad is not None for p in r.D.parameters())
        runs.append({k: v.clone() for k, v in [*r.G.state_dict().items(), *r.D.state_dict().items()]})
    assert runs[0].keys() == runs[1].keys()
    for k in runs[0]:
        assert torch.equal(runs[0][k], runs[1][k]), k


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("norm, ema", CASES)
def test_steady_state_steps_on_cuda_never_sync(tmp_path, norm, ema):
    """The GPU run's defaults (bf16, fused Adam, channels_last, data on the device), as configured."""
    t = _trainer(tmp_path, "cuda", norm, ema)
    assert t.opt_g.defaults.get("fused") and t.stream.images.is_cuda
    _steps(t, 2)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _steps(t, 6)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert all(torch.isfinite(p).all() for p in t.G.parameters())
