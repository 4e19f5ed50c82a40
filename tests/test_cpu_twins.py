"""CPU twins of the GPU-only paths: what a default CUDA run executes (bf16 autocast, fused Adam, data kept
on the training device, EMA, torch.compile) runs here on the CPU, so that a bug in it shows up without a GPU.
tests/test_cuda.py runs the same paths on a GPU."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from gan.core.train import Trainer
from models.mixture_norm import MixtureNorm2d

GPU_DEFAULTS = {"train.amp": "bf16", "train.fused_adam": "always", "train.channels_last": True,
                "data.on_device": True}


def _losses(run_dir) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss_d" in r]


@pytest.mark.parametrize("norm", ["bn", "mn"])
def test_gpu_defaults_train_on_the_cpu(tiny_config, norm):
    """bf16 autocast + fused Adam + channels_last + on-device data + EMA: finite, learning, float32 weights."""
    t = Trainer(tiny_config(**GPU_DEFAULTS, **{"model.norm": norm, "train.ema_decay": 0.9}), progress=False)
    assert t.amp == torch.bfloat16
    assert t.opt_g.defaults["fused"] and t.opt_d.defaults["fused"]
    before = [p.detach().clone() for p in t.G.parameters()]
    t.run()
    logged = _losses(t.run_dir)
    assert len(logged) >= 4 and all(torch.isfinite(torch.tensor([r["loss_d"], r["loss_g"]])).all() for r in logged)
    for p, p0 in zip(t.G.parameters(), before):
        assert p.dtype == torch.float32 and torch.isfinite(p).all()
    assert any(not torch.equal(p, p0) for p, p0 in zip(t.G.parameters(), before))
    # EMA under autocast: a float32 average that lags the weights, and buffers copied over.
    ema = list(t.ema.module.parameters())
    assert all(e.dtype == torch.float32 and torch.isfinite(e).all() for e in ema)
    assert any(not torch.equal(e, p) for e, p in zip(ema, t.G.parameters()))
    for b_ema, b in zip(t.ema.module.buffers(), t.G.buffers()):
        assert torch.equal(b_ema, b)


def test_mixture_norm_keeps_float32_statistics_under_bf16_autocast():
    torch.manual_seed(0)
    conv, mn = nn.Conv2d(3, 8, 3, padding=1), MixtureNorm2d(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = conv(torch.randn(16, 3, 8, 8))
        y, info = mn.forward_with_info(h)
    assert h.dtype == y.dtype == torch.bfloat16
    assert info["E"].dtype == info["V"].dtype == info["n"].dtype == torch.float32
    assert all(b.dtype == torch.float32 for name, b in mn.named_buffers() if b.is_floating_point())


def test_k1_mixture_norm_is_batchnorm_under_cpu_bf16_autocast():
    """The CUDA test's twin; the tolerance is derived there (two bf16 roundings of outputs up to ~4)."""
    torch.manual_seed(0)
    conv, bn, mn = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), MixtureNorm2d(16, num_components=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = conv(torch.randn(32, 3, 8, 8))
        yb, ym = bn(h), mn(h)
    torch.testing.assert_close(ym.float(), yb.float(), rtol=0.02, atol=0.04)


def test_fused_adam_computes_adam():
    """One step of the fused kernel equals the reference Adam on the same gradients (float64: 1e-12)."""
    torch.manual_seed(0)
    params = [torch.randn(5, 7, dtype=torch.float64), torch.randn(3, dtype=torch.float64)]
    grads = [torch.randn_like(p) for p in params]
    results = []
    for fused in (True, False):
        ps = [p.clone().requires_grad_() for p in params]
        opt = torch.optim.Adam(ps, 2e-4, (0.5, 0.999), fused=fused or None, foreach=False if not fused else None)
        for _ in range(3):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            opt.step()
        results.append([p.detach() for p in ps])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_data_on_device_and_streamed_give_the_same_run(tiny_config, tmp_path):
    """data.on_device true (index a device tensor) or false (copy each batch over): the same batches."""
    runs = {}
    for on in (True, False):
        t = Trainer(tiny_config(**{"data.on_device": on, "train.steps": 6, "run_dir": tmp_path / str(on)}),
                    progress=False)
        first = t.stream.batch(0).clone()
        t.run()
        runs[on] = (first, [(r["loss_d"], r["loss_g"]) for r in _losses(t.run_dir)])
    assert torch.equal(runs[True][0], runs[False][0])
    assert runs[True][1] == runs[False][1]
