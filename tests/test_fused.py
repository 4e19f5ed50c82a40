"""MN compiled as one graph (models/fused.py, `fuse`): it computes what the eager layer computes, to float64
rounding, in every part of a training step (EM, the transform, its backward, re-seeding, the running averages)
and in eval mode; it cuts the launches of a step; a region that cannot compile falls back and says so.

Every test here compiles (tens of seconds each on a 2-core CPU): all are marked slow. The quick check's MN-graph
test is tests/test_mixture_variants_training.py's capture of the joint layer (Dynamo only, no Inductor)."""
from __future__ import annotations

import warnings

import pytest
import torch

import models.mixture_core as core
from models.fused import Region
from models.mixture_norm import MixtureNorm2d

pytestmark = pytest.mark.slow


def _run(fuse: str, posteriors: str, momentum, device: str = "cpu", steps: int = 5):
    """A few training steps (scaled batches, so that the mixture moves and components die: lambda_min 0.2
    with dead_steps 1 reseeds often), then an eval-mode forward: everything a step produces or changes."""
    torch.manual_seed(0)
    m = MixtureNorm2d(6, num_components=3, fuse=fuse, posteriors=posteriors, lambda_min=0.2, dead_steps=1,
                      momentum=momentum).to(device, torch.float64)
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(2)  # the reseeding draws
    out = []
    for step in range(steps):
        x = (torch.randn(4, 6, 5, 5, dtype=torch.float64, generator=gen) * (1 + step) + step).to(device)
        x = x.to(memory_format=torch.channels_last).requires_grad_()
        y = m(x)
        (y * torch.cos(y)).sum().backward()
        out += [y.detach(), x.grad, m.weight.grad.clone(), m.bias.grad.clone()]
        m.weight.grad = m.bias.grad = None
    out += [b.clone() for b in m.buffers()]
    m.eval()
    with torch.no_grad():
        out.append(m(torch.randn(4, 6, 5, 5, dtype=torch.float64, generator=gen).to(device)))
    return out


def _assert_same(eager, fused):
    assert len(eager) == len(fused)
    for a, b in zip(eager, fused):
        if a.is_floating_point():
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)
        else:
            assert torch.equal(a, b)


@pytest.mark.parametrize("posteriors,momentum", [("joint", 0.1), ("joint", None), ("per_channel", 0.1)])
def test_the_fused_layer_computes_what_the_eager_layer_computes(posteriors, momentum, monkeypatch):
    """Five training steps (the first, k-means++ seeding, eager either way), then eval mode."""
    reseeds = []
    reseed = core.reseed

    def counting(gmm, dead_count, xs, last, o, first_rank_only):
        reseeds.append(bool(((gmm.lam < o.lambda_min) & (dead_count + 1 >= o.dead_steps)).any()))
        return reseed(gmm, dead_count, xs, last, o, first_rank_only)

    monkeypatch.setattr(core, "reseed", counting)
    eager = _run("never", posteriors, momentum)
    monkeypatch.undo()
    if posteriors == "joint":
        assert any(reseeds), "the data never killed a component: the reseeding path went untested"
    torch._dynamo.utils.counters.clear()
    with warnings.catch_warnings():
        # A layer that fell back to eager would warn so. (Only that warning: torch's own, such as the
        # DeprecationWarning torch 2.11's Dynamo raises while tracing Function.apply, are not the layer's.)
        warnings.filterwarnings("error", message="MN: compiling")
        fused = _run("always", posteriors, momentum)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # it did compile
    _assert_same(eager, fused)


def test_fused_layer_launches_a_fraction_of_the_eager_ops():
    """One MN layer's steady-state forward+backward: the eager code dispatches about 150 aten ops (BN: 6); fused,
    the compiled forward and backward launch about 41 kernels and library calls (Inductor's CPU code, each loop
    nest counted as the kernel a GPU would launch)."""
    from gan.tools.op_count import compiled_launches, count_ops
    torch.manual_seed(0)
    x = torch.randn(16, 64, 8, 8).to(memory_format=torch.channels_last).requires_grad_()
    g = torch.randn_like(x)
    layer = MixtureNorm2d(64, fuse="always")
    for _ in range(2):  # the first step seeds the mixture (k-means++, eager), the second compiles
        layer(x).backward(g)
    eager = count_ops(lambda: layer(x).backward(g))  # compiled code does not run under the counter
    fused = compiled_launches(lambda: layer(x).backward(g))
    assert eager.syncs == 0 and fused.kernels > 0 and fused.library > 0
    assert fused.total <= 44
    assert fused.total < eager.ops / 2


def test_a_region_that_cannot_compile_warns_once_and_runs_eagerly():
    def needs_a_graph_break(x):
        torch._dynamo.graph_break()
        return x * 2

    r = Region(needs_a_graph_break)
    x = torch.arange(3.0)
    with pytest.warns(UserWarning, match="compiling needs_a_graph_break failed"):
        assert torch.equal(r(True, x), x * 2)
    assert r.failed
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(r(True, x), x * 2)


def test_bad_input_is_refused_before_the_compiled_code_and_the_layer_stays_compiled():
    import models.fused as fused
    m = MixtureNorm2d(4, fuse="always")
    for _ in range(2):  # seeded eagerly, then compiled
        m(torch.randn(8, 4, 2, 2))
    with pytest.raises(ValueError, match="expected 4 channels, got 3"):
        m(torch.randn(8, 3, 2, 2))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        m(torch.randn(1, 4, 1, 1))
    assert fused._REGIONS and not any(r.failed for r in fused._REGIONS.values())
