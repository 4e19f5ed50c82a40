"""The MN variants: posteriors=per_channel (one mixture per channel: the core's G = C groups) and fit=fresh.

Identities are tested in float64, where the two sides differ only by the rounding of sums taken in
another order: relative 1e-16 per operation, a few hundred operations over inputs of size ~10, so
1e-10 is far above rounding and far below any real error (a wrong mean or variance is O(1)).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from models.mixture_core import GMM, align
from models.mixture_norm import MixtureNorm1d, MixtureNorm2d
from tests.conftest import assert_k1_is_batchnorm, assert_trains_finite

# (posteriors, fit) of the new variants; ("joint", "warm") is the default, tested in test_mixture_norm.py.
VARIANTS = [("per_channel", "warm"), ("joint", "fresh"), ("per_channel", "fresh")]
IDS = ["per_channel", "fresh", "per_channel+fresh"]
TOL64 = dict(rtol=1e-10, atol=1e-10)


pytestmark = pytest.mark.usefixtures("torch_seed0")


def _mn(c, posteriors, fit, cls=MixtureNorm2d, **kw):
    return cls(c, posteriors=posteriors, fit=fit, **kw)


# --------------------------------------------------------------------------------------
# K = 1 is BatchNorm
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("posteriors,fit", VARIANTS, ids=IDS)
@pytest.mark.parametrize("mn_cls,bn_cls,shape,fmt", [
    (MixtureNorm2d, nn.BatchNorm2d, (8, 6, 5, 5), torch.contiguous_format),
    (MixtureNorm2d, nn.BatchNorm2d, (8, 6, 5, 5), torch.channels_last),
    (MixtureNorm1d, nn.BatchNorm1d, (32, 6), torch.contiguous_format),
], ids=["2d", "2d-channels-last", "1d"])
def test_k1_equals_batchnorm_float64(posteriors, fit, mn_cls, bn_cls, shape, fmt):
    c = shape[1]
    bn = bn_cls(c).double()
    mn = _mn(c, posteriors, fit, mn_cls, num_components=1, em_samples=64).double()  # EM subsamples
    with torch.no_grad():
        w, b = torch.rand(c, dtype=torch.float64) + 0.5, torch.randn(c, dtype=torch.float64)
        bn.weight.copy_(w), mn.weight.copy_(w), bn.bias.copy_(b), mn.bias.copy_(b)
    assert_k1_is_batchnorm(mn, bn, shape, fmt, TOL64)


# --------------------------------------------------------------------------------------
# Per-channel posteriors: the spec's statistics per (component, channel)
# --------------------------------------------------------------------------------------


def test_per_channel_statistics_and_output_follow_the_formulas():
    """E_kc, V_kc, tau and y against a naive evaluation of the module docstring's formulas."""
    x = (torch.randn(6, 5, 4, 4, dtype=torch.float64) * 2).relu().contiguous(memory_format=torch.channels_last)
    m = _mn(5, "per_channel", "warm").double()
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5), m.bias.normal_()
    y, info = m.forward_with_info(x)
    tau = info["tau"]  # (N, K, C, H, W)
    assert tau.shape == (6, 3, 5, 4, 4) and info["lam"].shape == (3, 5)
    torch.testing.assert_close(tau.sum(1), torch.ones(6, 5, 4, 4, dtype=torch.float64))
    # The posteriors are channel c's own mixture's.
    lam, mu, s2 = info["lam"], info["mu"], info["sigma2"]
    logp = (lam.log()[None, :, :, None, None] - 0.5 * (2 * torch.pi * s2).log()[None, :, :, None, None]
            - 0.5 * (x[:, None] - mu[None, :, :, None, None]) ** 2 / s2[None, :, :, None, None])
    torch.testing.assert_close(tau, torch.softmax(logp, 1), rtol=1e-9, atol=1e-12)
    n = tau.sum((0, 3, 4))
    torch.testing.assert_close(info["n"], n)
    E = torch.einsum("nkchw,nchw->kc", tau, x) / n
    V = torch.einsum("nkchw,nkchw->kc", tau, (x[:, None] - E[None, :, :, None, None]) ** 2) / n
    torch.testing.assert_close(info["E"], E, **TOL64)
    torch.testing.assert_close(info["V"], V, **TOL64)
    s = lam.clamp_min(m.lambda_min).rsqrt()
    xhat = (tau * s[None, :, :, None, None] * (x[:, None] - E[None, :, :, None, None])
            / (V[None, :, :, None, None] + m.eps).sqrt()).sum(1)
    torch.testing.assert_close(y, m.weight[:, None, None] * xhat + m.bias[:, None, None], **TOL64)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_per_channel_layer_has_the_exact_gradient_through_its_posteriors(fmt):
    """The whole per-channel layer (mixture frozen by em_steps=0, gradients through tau) under gradcheck, in
    training and in eval mode. (At fixed posteriors: tests/test_mixture_norm.py's gradcheck of the core.)"""
    x = (torch.randn(3, 4, 2, 3, dtype=torch.float64) * 2).contiguous(memory_format=fmt)
    frozen = _mn(4, "per_channel", "warm", em_steps=0, detach_posteriors=False).double()
    frozen(x)
    assert torch.autograd.gradcheck(frozen, (x.clone().requires_grad_(),))
    frozen.eval()
    assert torch.autograd.gradcheck(frozen, (x.clone().requires_grad_(),))


def _independent_channels(n=16, c=4, hw=8, generator=None):
    """Channel c: its own bimodal distribution (modes `mu[:, c]`, std 0.3, weight p_c on the second),
    with the mode drawn independently in every channel. The joint distribution then has 2^C modes,
    which no K=2 mixture shared over channels can represent."""
    mu = torch.stack([torch.linspace(-3.0, 0.0, c), torch.linspace(2.0, 4.0, c)])  # (2, C), gap >= 4
    p = torch.linspace(0.25, 0.45, c)
    z = (torch.rand(n, c, hw, hw, generator=generator) < p[:, None, None]).long()
    x = torch.where(z == 1, mu[1][:, None, None], mu[0][:, None, None])
    return x + 0.3 * torch.randn(n, c, hw, hw, generator=generator), z, mu, p


def _accuracy(tau_mode1: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Per channel: how often argmax posterior == the true mode, up to the labelling (K=2)."""
    agree = ((tau_mode1 > 0.5).long() == z).double().mean((0, 2, 3))
    return torch.maximum(agree, 1 - agree)


@pytest.mark.parametrize("fit", ["warm", "fresh"])
def test_per_channel_recovers_independent_channel_mixtures_a_joint_fit_cannot(fit):
    """Per-channel EM recovers every channel's modes and assigns (sample, channel) pairs to them; a
    joint K=2 fit gives one posterior per sample for all channels. Its posterior can follow the true
    mode of at most one channel: with independent modes, it agrees with any other channel's mode half
    the time, so its accuracy averaged over C=4 channels is at most (1 + 3 * 0.5) / 4 = 0.625 (up to
    sampling noise of ~0.01 on 1024 samples)."""
    pc = _mn(4, "per_channel", fit, num_components=2, em_steps=5 if fit == "fresh" else 1, momentum=0.3)
    joint = _mn(4, "joint", fit, num_components=2, em_steps=5 if fit == "fresh" else 1, momentum=0.3)
    for _ in range(15):
        x, z, mu, p = _independent_channels()
        _, info_pc = pc.forward_with_info(x)
        _, info_j = joint.forward_with_info(x)
    # Per channel, sorted by mean: both modes' means and the weights within the noise of 1024 samples.
    order = pc.gmm_mu.argsort(0)
    torch.testing.assert_close(pc.gmm_mu.gather(0, order), mu, atol=0.1, rtol=0)
    torch.testing.assert_close(pc.gmm_lambda.gather(0, order)[1], p, atol=0.06, rtol=0)
    torch.testing.assert_close(pc.gmm_sigma2.gather(0, order), torch.full((2, 4), 0.09), atol=0.03, rtol=0)
    torch.testing.assert_close(pc.running_mu.sort(0).values, mu, atol=0.15, rtol=0)
    acc_pc = _accuracy(info_pc["tau"][:, 1], z)
    acc_joint = _accuracy(info_j["tau"][:, 1, None].expand_as(z), z)
    assert acc_pc.min() > 0.99, acc_pc  # modes 4 std apart or more: misassignment ~1e-4
    assert acc_joint.mean() < 0.7, acc_joint
    # ... and so the joint components' means miss the modes in the channels it does not split.
    err = (joint.gmm_mu.sort(0).values - mu).abs().amax(0)
    assert err.max() > 1.0, err


# --------------------------------------------------------------------------------------
# Fresh fits
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("posteriors", ["joint", "per_channel"])
def test_fresh_fit_is_deterministic_under_a_seed_and_forgets_the_previous_state(posteriors):
    x = torch.randn(64, 6, 8, 8, dtype=torch.float64).relu()  # 4096 samples > em_samples: subsampled
    a = _mn(6, posteriors, "fresh", em_steps=3, em_samples=1024).double()
    for _ in range(3):
        a(torch.randn(16, 6, 8, 8, dtype=torch.float64) * 3 + 1)
    b = copy.deepcopy(a)
    torch.manual_seed(5)
    ya = a(x)
    torch.manual_seed(5)
    yb = b(x)
    assert torch.equal(ya, yb)
    for k, v in a.state_dict().items():
        assert torch.equal(b.state_dict()[k], v), k
    # A fresh layer that saw different batches: the same draws give the same fit and the same output.
    # The state before the step enters only through the shift (rounding) and the labels (which the
    # output does not depend on), so the outputs agree to float64 rounding.
    c = _mn(6, posteriors, "fresh", em_steps=3, em_samples=1024).double()
    c(torch.rand(8, 6, 8, 8, dtype=torch.float64) - 5)
    torch.manual_seed(5)
    yc = c(x)
    torch.testing.assert_close(yc, ya, rtol=1e-9, atol=1e-9)
    # A different seed draws different seeds (em_steps=0 keeps them: each is one of the samples).
    s = _mn(6, posteriors, "fresh", em_steps=0).double()
    x0 = torch.randn(4, 6, 4, 4, dtype=torch.float64)
    mus = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        s(x0)
        mus.append(s.gmm_mu.clone())
        rows = x0.movedim(1, -1).reshape(-1, 6)
        if posteriors == "joint":  # every seed is one sample's C-vector
            assert ((s.gmm_mu[:, None] - rows[None]).abs().amax(2).amin(1) < 1e-12).all()
        else:  # every seed is one of its channel's values
            assert ((s.gmm_mu[:, None] - rows[None]).abs().amin(1) < 1e-12).all()
    assert not torch.equal(*mus)


def test_align_relabels_to_the_previous_components():
    prev = GMM(torch.tensor([[0.2], [0.3], [0.5]]), torch.tensor([[0.0, 5.0], [10.0, 0.0], [-10.0, -5.0]]),
               torch.ones(3, 2))
    perm = torch.tensor([2, 0, 1])
    new = GMM(prev.lam[perm], prev.mu[perm] + 0.1, prev.sigma2[perm] * 1.5)
    out = align(new, prev)
    torch.testing.assert_close(out.mu, prev.mu + 0.1)
    torch.testing.assert_close(out.lam, prev.lam)
    # Per channel: each channel's components relabelled on their own.
    prev_pc = GMM(torch.full((3, 2), 1 / 3), torch.tensor([[0.0, 7.0], [4.0, -7.0], [8.0, 0.0]]), torch.ones(3, 2))
    perms = torch.tensor([[1, 2], [2, 0], [0, 1]])  # component perms[k, c] of prev is new component k
    new_pc = GMM(prev_pc.lam.gather(0, perms), prev_pc.mu.gather(0, perms) - 0.2, prev_pc.sigma2.gather(0, perms))
    torch.testing.assert_close(align(new_pc, prev_pc).mu, prev_pc.mu - 0.2)


# --------------------------------------------------------------------------------------
# Guards on degenerate input
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("posteriors,fit", VARIANTS, ids=IDS)
def test_constant_channels_and_batch_of_one_in_eval(posteriors, fit):
    x = torch.randn(8, 6, 4, 4)
    x[:, 0] = 0.0
    x[:, 1] = 5.0
    m = _mn(6, posteriors, fit)
    # A constant channel normalizes to beta = 0, up to the rounding of x - E_k (a few float32 ulps of
    # 5.0) divided by sqrt(V + eps) = sqrt(eps) and multiplied by the prior scaling (at most
    # 1/sqrt(lambda_min)).
    tol = 4 * 5.0 * 2.0 ** -23 / m.eps ** 0.5 / m.lambda_min ** 0.5
    for _ in range(3):
        xi = x.clone().requires_grad_()
        y = m(xi)
        y.sum().backward()
        assert torch.isfinite(y).all() and torch.isfinite(xi.grad).all()
        assert y[:, :2].abs().max() < tol
    assert torch.isfinite(m.gmm_sigma2).all() and (m.gmm_sigma2 > 0).all()
    m.eval()
    y = m(x)
    assert torch.isfinite(y).all()
    for i in (0, 5):  # eval: one sample's output does not depend on the rest of the batch
        torch.testing.assert_close(m(x[i:i + 1]), y[i:i + 1], rtol=1e-5, atol=1e-5)
    m1 = _mn(6, posteriors, fit, MixtureNorm1d)
    for _ in range(3):
        m1(torch.randn(16, 6))
    m1.eval()
    assert torch.isfinite(m1(torch.randn(1, 6))).all()


@pytest.mark.parametrize("posteriors,fit", VARIANTS, ids=IDS)
def test_collapsed_component_stays_finite(posteriors, fit):
    """Component 2 with no mass, far away and collapsed: the transform stays finite (n_kc clamped),
    its running E/V keep their values (n_kc <= 2); warm per-channel fits reseed it channel by channel."""
    c = 8
    m = _mn(c, posteriors, fit, dead_steps=2, em_steps=1 if fit == "warm" else 0)
    x = torch.randn(8, c, 4, 4) + 20.0
    m(x)
    with torch.no_grad():
        lam = torch.tensor([0.5, 0.5, 0.0])
        m.gmm_lambda.copy_(lam if posteriors == "joint" else lam[:, None].expand(3, c))
        m.gmm_mu[2].fill_(1e3)
        m.gmm_sigma2[2].fill_(1e-12)
        for name in ("lambda", "mu", "sigma2"):
            getattr(m, f"running_{name}").copy_(getattr(m, f"gmm_{name}"))
    E2, V2 = m.running_E[2].clone(), m.running_V[2].clone()
    for _ in range(2):
        xi = x.clone().requires_grad_()
        y, info = m.forward_with_info(xi)
        y.square().sum().backward()
        assert torch.isfinite(y).all() and torch.isfinite(xi.grad).all()
    if fit == "warm":
        assert (info["n"][2] < 1.0).all()  # the transform ran with an empty component
        assert torch.equal(m.running_E[2], E2) and torch.equal(m.running_V[2], V2)
        # Dead in every channel for dead_steps steps: reseeded at one of its channel's values.
        assert (m.dead_count == 0).all() and (m.gmm_lambda[2] > 0.1).all()
        # The running mixture averages the fits, in which component 2 has no weight, not the re-seeded mixture
        # (one step of momentum 0.1 towards a weight of over 0.1 would give over 0.01).
        assert (m.running_lambda[2] < 1e-3).all()
        rows = x.movedim(1, -1).reshape(-1, c)
        assert ((m.gmm_mu[2][None] - rows).abs().amin(0) < 1e-4).all()
    m.eval()
    assert torch.isfinite(m(x)).all()
    # A point mass: half the samples identical, so a component collapses onto them.
    x = torch.randn(8, c, 4, 4)
    x[:4] = 0.7
    m = _mn(c, posteriors, fit)
    assert_trains_finite(m, x)


@pytest.mark.parametrize("posteriors", ["joint", "per_channel"])
def test_backward_all_reduces_only_for_the_input_gradient(posteriors):
    """Like SyncBatchNorm, the backward's global sums feed the input gradient only: for an input that needs
    none, the parameters' gradients are the same and the backward all-reduces nothing (every process skips
    it alike). A counting identity stands in for the all-reduce of several processes."""
    reduced = []

    class Counting(torch.autograd.Function):
        """A sum over one process, counted when called (the eager backward's sums) and when differentiated
        (autograd's, through the forward's sums)."""

        @staticmethod
        def forward(ctx, t):
            reduced.append(t.shape)
            return t.clone()

        @staticmethod
        def backward(ctx, grad):
            reduced.append(grad.shape)
            return grad

    counting = Counting.apply

    base = _mn(4, posteriors, "warm").double()
    x = torch.randn(3, 4, 2, 3, dtype=torch.float64) * 2
    base(x)  # fit once: both steps below start from the same mixture
    g = torch.randn_like(x)
    grads = {}
    for input_grad in (True, False):
        m = copy.deepcopy(base)
        m._reducer = lambda: counting
        torch.manual_seed(1)
        y = m(x.clone().requires_grad_(input_grad))
        reduced.clear()
        (y * g).sum().backward()
        grads[input_grad] = (m.weight.grad, m.bias.grad, len(reduced))
    assert grads[True][2] == 1 and grads[False][2] == 0
    torch.testing.assert_close(grads[False][:2], grads[True][:2], **TOL64)
