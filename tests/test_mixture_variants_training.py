"""The MN variants (posteriors=per_channel, fit=fresh) in training: one compiled graph, state and old
checkpoints, the config that builds them, and the Trainer's exact resume. Their maths:
tests/test_mixture_variants.py."""
from __future__ import annotations

import copy

import pytest
import torch

from models.mixture_norm import MixtureNorm2d
from tests.test_mixture_variants import IDS, VARIANTS, _mn

pytestmark = pytest.mark.usefixtures("torch_seed0")


# --------------------------------------------------------------------------------------
# Graph capture, state, config
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("posteriors,fit", [("joint", "warm")] + [pytest.param(*v, marks=pytest.mark.slow)
                                                                  for v in VARIANTS], ids=["joint"] + IDS)
def test_initialized_layer_captures_into_one_graph(posteriors, fit):
    """fullgraph=True fails on any graph break, and a host sync (.item(), bool(tensor), a Python `if` on
    data) is one. aot_eager traces forward and backward like inductor does, without compiling kernels
    (minutes on CPU); the outputs and the layer's state then equal eager mode."""
    torch._dynamo.reset()
    m = _mn(6, posteriors, fit, em_samples=64)
    m(torch.randn(8, 6, 4, 4))  # the first step seeds the mixture (data-dependent by design)
    ref = copy.deepcopy(m)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    x = torch.randn(8, 6, 4, 4).contiguous(memory_format=torch.channels_last)
    for mode in ("train", "eval"):
        m.train(mode == "train"), ref.train(mode == "train")
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        torch.manual_seed(3)
        y1 = compiled(x1)
        torch.manual_seed(3)
        y2 = ref(x2)
        y1.square().sum().backward(), y2.square().sum().backward()
        torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-5)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(m.state_dict()[k], v, rtol=1e-5, atol=1e-5, msg=k)


def test_state_dict_roundtrip_and_old_checkpoints(tmp_path):
    a = _mn(6, "per_channel", "fresh")
    for _ in range(3):
        a(torch.randn(8, 6, 5, 5))
    torch.save(a.state_dict(), tmp_path / "pc.pt")
    b = _mn(6, "per_channel", "fresh")
    b.load_state_dict(torch.load(tmp_path / "pc.pt", weights_only=True))
    a.eval(), b.eval()
    x = torch.randn(4, 6, 5, 5)
    assert torch.equal(a(x), b(x))
    # A checkpoint of the default layer has the same keys and shapes as before the variants existed:
    # the weights are (K,) for joint posteriors, (K, C) only for per-channel ones.
    shapes = {k: tuple(v.shape) for k, v in MixtureNorm2d(6).state_dict().items()}
    assert shapes["gmm_lambda"] == shapes["running_lambda"] == shapes["dead_count"] == (3,)
    # ... and a config written before the variants existed reads as the defaults.
    from gan.core.config import config_from_dict, load_config
    old = load_config(None, {}).to_dict()
    del old["model"]["mn"]["posteriors"], old["model"]["mn"]["fit"]
    cfg = config_from_dict(old)
    assert (cfg.model.mn.posteriors, cfg.model.mn.fit) == ("joint", "warm")


def test_config_builds_the_variants_and_refuses_unknown_ones():
    from gan.core.config import ConfigError, load_config
    from models.dcgan import build_models
    cfg = load_config(None, {"model.norm": "mn", "model.ngf": 4, "model.ndf": 4,
                             "model.mn.posteriors": "per_channel", "model.mn.fit": "fresh"})
    G, _ = build_models(cfg)
    mns = [m for m in G.modules() if isinstance(m, MixtureNorm2d)]
    assert len(mns) == 3 and all((m.posteriors, m.fit) == ("per_channel", "fresh") for m in mns)
    G(torch.randn(4, cfg.model.z_dim)).mean().backward()
    with pytest.raises(ConfigError, match="model.mn.posteriors"):
        load_config(None, {"model.mn.posteriors": "per_sample"})
    with pytest.raises(ConfigError, match="model.mn.fit"):
        load_config(None, {"model.mn.fit": "cold"})


def test_training_run_with_the_variants_resumes_exactly(tiny_config, tmp_path):
    """The real Trainer with per-channel posteriors and fresh fits: finite, checkpointed with the (K, C)
    state, and a resumed run retraces the same steps (k-means++ draws included) bit for bit."""
    from gan.core.train import Trainer
    variant = {"model.norm": "mn", "model.mn.posteriors": "per_channel", "model.mn.fit": "fresh",
               "model.mn.em_steps": 2, "train.steps": 6, "ckpt.every": 3, "log.every": 3, "log.sample_every": 0}
    full = tiny_config(**variant)
    t = Trainer(full, progress=False)
    t.run()
    mns = [m for m in t.G.modules() if isinstance(m, MixtureNorm2d)]
    assert len(mns) == 3 and all(m.gmm_lambda.shape == (3, m.num_features) for m in mns)
    resumed = Trainer(tiny_config(run_dir=str(tmp_path / "resumed"), **variant),
                      resume=str(full.resolved_run_dir / "checkpoints" / "step_0000003.pt"), progress=False)
    resumed.run()
    want, got = t.G.state_dict(), resumed.G.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
