"""MixtureNorm2d/1d (models/mixture_norm.py) against docs/mixture-normalization.md."""
from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn as nn

from models import mixture_core as core
from gan.tools.diagnose import fit_gmm
from models.mixture_norm import MixtureNorm1d, MixtureNorm2d
from tests.conftest import assert_k1_is_batchnorm, assert_trains_finite
from tests import mn_spec


pytestmark = pytest.mark.usefixtures("torch_seed0")


def two_mode_batch(n=16, c=4, h=4, w=4, weight=0.3):
    """(N, C, H, W) samples from a 2-component diagonal mixture with known means."""
    mu = torch.stack([torch.linspace(-2.0, 1.0, c), torch.linspace(3.0, -1.0, c)])  # (2, C)
    z = (torch.rand(n, 1, h, w) < weight).long()  # component of each sample
    means = mu[z.squeeze(1)].permute(0, 3, 1, 2)  # (N, C, H, W)
    return means + 0.25 * torch.randn(n, c, h, w), mu


def train_steps(m: nn.Module, steps=3, shape=(8, 6, 5, 5), dtype=torch.float32):
    m.train()
    for _ in range(steps):
        x = torch.randn(shape, dtype=dtype) * 2 + 1
        m(x).square().mean().backward()
    return m


# --------------------------------------------------------------------------------------
# K = 1 is BatchNorm
# --------------------------------------------------------------------------------------


# Identities (K = 1 is BatchNorm, the layer computes the spec, two code paths agree) are checked in float64
# to 1e-10 (relative and absolute): float64's unit roundoff is 1.1e-16 and the sums in these tests have at
# most 200 terms, so rounding stays below ~1e-13 on any processor, whatever order they are summed in. In float32 the same comparison differs by rounding
# that depends on the processor (SIMD width, threads). A real difference in the maths is far above
# 1e-10: eps added outside the square root instead of inside moves outputs by ~1e-6 relative (eps =
# 1e-5, Var = 4), the biased instead of the unbiased variance moves running_var by 1 / n (0.5% at n = 200).
F64_TOL = dict(rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mn_cls,bn_cls,shape,fmt", [
    (MixtureNorm2d, nn.BatchNorm2d, (8, 6, 5, 5), torch.contiguous_format),
    (MixtureNorm2d, nn.BatchNorm2d, (8, 6, 5, 5), torch.channels_last),  # the trainer's layout
    (MixtureNorm1d, nn.BatchNorm1d, (32, 6), torch.contiguous_format),
])
def test_k1_equals_batchnorm(mn_cls, bn_cls, shape, fmt):
    """K = 1 is BatchNorm: outputs, input and affine gradients, running statistics, eval outputs (float64)."""
    c = shape[1]
    bn, mn = bn_cls(c).double(), mn_cls(c, num_components=1).double()
    with torch.no_grad():  # non-trivial affine, identical in both
        w, b = torch.rand(c) + 0.5, torch.randn(c)
        bn.weight.copy_(w), mn.weight.copy_(w), bn.bias.copy_(b), mn.bias.copy_(b)
    assert_k1_is_batchnorm(mn, bn, shape, fmt, F64_TOL)


# --------------------------------------------------------------------------------------
# Posteriors, tauhat, E_k, V_k
# --------------------------------------------------------------------------------------


def test_posteriors_and_tauhat_normalized():
    """The layer computes the spec's quantities: identities, so float64 and 1e-10 (as for K = 1 above; the
    sums have at most 128 terms). In float32 the nearly hard posteriors of this well-separated mixture
    amplify rounding by a data-dependent factor, which made any fixed float32 tolerance processor-tuned."""
    x, _ = two_mode_batch(n=8, c=5)
    x = x.double()
    m = MixtureNorm2d(5, num_components=3).double()
    tol = F64_TOL
    y, info = m.forward_with_info(x)
    assert info["tau"].shape == (8, 3, 4, 4)
    tau, n = info["tau"].reshape(8, 3, 16), info["n"]
    torch.testing.assert_close(tau.sum(1), torch.ones(8, 16, dtype=torch.float64), **tol)
    tauhat = tau / n[None, :, None]
    torch.testing.assert_close(tauhat.sum((0, 2)), torch.ones(3, dtype=torch.float64), **tol)
    # E_k and V_k are the tauhat-weighted moments of the spec (computed naively here).
    xs = x.reshape(8, 5, 16)  # (x is channels-last here: the layout the trainer uses)
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    E = torch.einsum("nkl,ncl->kc", tauhat, xs)
    V = torch.einsum("nkl,nkcl->kc", tauhat, (xs[:, None] - E[None, :, :, None]) ** 2)
    torch.testing.assert_close(info["E"], E, **tol)
    torch.testing.assert_close(info["V"], V, **tol)
    # ... and the output is the spec's xhat with these statistics.
    w = tau * info["scale"][None, :, None]  # tau_k / sqrt(lambda_k)
    xhat = torch.einsum("nkl,nkcl->ncl", w, (xs[:, None] - E[None, :, :, None])
                        / (V[None, :, :, None] + m.eps).sqrt())
    torch.testing.assert_close(y.reshape(8, 5, 16), xhat, **tol)
    # The spec's posteriors under the mixture the layer reports are the layer's.
    tau2 = mn_spec.posteriors(xs.transpose(1, 2).reshape(-1, 5), info["lam"][:, None], info["mu"], info["sigma2"])
    torch.testing.assert_close(tau2[:, :, 0], tau.transpose(1, 2).reshape(-1, 3), **tol)

    m.eval()
    _, info = m.forward_with_info(x)
    torch.testing.assert_close(info["tau"].sum(1), torch.ones(8, 4, 4, dtype=torch.float64), **tol)


# --------------------------------------------------------------------------------------
# Degenerate inputs
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("em_samples", [4096, 32])  # EM on the whole batch / on a subsample
def test_collapsed_component_is_finite_and_reseeded(em_samples):
    c = 8
    m = MixtureNorm2d(c, num_components=3, dead_steps=2, em_samples=em_samples)
    x, _ = two_mode_batch(n=8, c=c)
    x = x + 20.0  # far from 0, so that coordinates that are off by the mean show
    m(x)  # initializes the GMM
    with torch.no_grad():  # component 2: no mass, far away, collapsed variance
        m.gmm_lambda.copy_(torch.tensor([0.5, 0.5, 0.0]))
        m.gmm_mu[2].fill_(1e3)
        m.gmm_sigma2[2].fill_(1e-12)
        m.running_lambda.copy_(m.gmm_lambda)
        m.running_mu.copy_(m.gmm_mu)
        m.running_sigma2.copy_(m.gmm_sigma2)
    E0, E2, V2 = m.running_E[0].clone(), m.running_E[2].clone(), m.running_V[2].clone()
    for step in range(2):
        xi = x.clone().requires_grad_()
        y, info = m.forward_with_info(xi)
        y.square().sum().backward()
        assert torch.isfinite(y).all() and torch.isfinite(xi.grad).all()
        assert info["n"][2] < 1.0  # the transform really ran with an (almost) empty component
    # Too little mass for the unbiased correction (n_k <= 2): running E_k, V_k kept as they were.
    assert torch.equal(m.running_E[2], E2) and torch.equal(m.running_V[2], V2)
    assert not torch.equal(m.running_E[0], E0)  # while live components are updated
    # Dead for dead_steps steps -> reseeded k-means++ style: at one of the batch's samples,
    # with its weight restored.
    assert int(m.dead_count[2]) == 0 and m.gmm_lambda[2] > 0.1
    # The running mixture averages the fits (component 2 weightless), not the re-seeded mixture.
    assert m.running_lambda[2] < 1e-3
    dist_to_samples = (x.permute(0, 2, 3, 1).reshape(-1, c) - m.gmm_mu[2]).abs().amax(1)
    # Exactly a sample when EM sees the whole batch. With a subsample EM's samples are x - shift, so the
    # seed is (x - shift) + shift, within u (|x - shift| + |x|) <= u (2 |x| + |shift|) of x, u = float32's
    # unit roundoff, whatever the processor; shift is a convex combination of the mixture's means, so
    # |shift| <= 1e3 (component 2's, the largest). That is 6e-5, while a fitted mean is 0.2 from every sample.
    u = torch.finfo(torch.float32).eps / 2
    assert dist_to_samples.min() <= u * (2 * x.abs().max() + 1e3) * (1 + u)
    m.eval()
    assert torch.isfinite(m(x)).all()

    # A point mass: half the samples identical, so a component collapses onto them.
    x = torch.randn(8, c, 4, 4)
    x[:4] = 0.7
    m = MixtureNorm2d(c, em_samples=em_samples)
    assert_trains_finite(m, x)
    m.eval()
    assert torch.isfinite(m(x)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_constant_channels_are_finite(dtype):
    """A constant channel (V_k = 0) gives finite outputs and gradients, and normalizes to beta (= 0 here).

    "To beta" up to rounding that is bounded here from the dtype's unit roundoff u and the sizes of the
    sums, so that the bound holds on any processor. With V_k = 0 the factor P_k = s_k gamma / sqrt(V_k +
    eps) is s_k / sqrt(eps) (~800 here), and y = x A + B, A = sum_k tau_k P_k, B = sum_k tau_k (beta -
    P_k (E_k + shift)), is a cancellation between terms of size P_k |c| for the channel's value c: the
    mean E_k + shift of n = 128 samples (sums of n terms, then the shift subtracted) is c within
    (2 n + 4) u |c| in any summation order, the GEMMs over K = 3 components and the final multiply-add add
    (2 K + 4) u P_k |c|. So |y - beta| <= (2 n + 2 K + 8) u max_k P_k |c|, and 4 n u max_k P_k |c| is used
    (room for second-order terms): 0.12 in float32, 2e-10 in float64. In float32 that is what "about
    beta" can mean at all after an amplification by 1/sqrt(eps); float64 shows it is beta exactly up to
    rounding. Without the eps or the clamp of V_k at 0, P_k is infinite or NaN and so is y.
    """
    x = torch.randn(8, 6, 4, 4, dtype=dtype)
    c = 5.0
    x[:, 0] = 0.0
    x[:, 1] = c
    m = MixtureNorm2d(6).to(dtype)
    n, u = 8 * 4 * 4, torch.finfo(dtype).eps / 2
    for _ in range(3):
        xi = x.clone().requires_grad_()
        y, info = m.forward_with_info(xi)
        y.sum().backward()
        assert torch.isfinite(y).all() and torch.isfinite(xi.grad).all()
        p_max = (info["scale"].max() * m.weight[:2].abs().max() / math.sqrt(m.eps)).item()
        beta = m.bias[:2].view(1, 2, 1, 1)
        assert (y[:, :2] - beta).abs().max() <= 4 * n * u * p_max * c
    m.eval()
    assert torch.isfinite(m(x)).all()


@pytest.mark.parametrize("cls,shape", [(MixtureNorm2d, (8, 6, 4, 4)), (MixtureNorm1d, (16, 6))])
def test_batch_size_one_eval(cls, shape):
    m = train_steps(cls(6), shape=shape)
    m.eval()
    y = m(torch.randn(1, *shape[1:]))
    assert y.shape == (1, *shape[1:]) and torch.isfinite(y).all()
    m.train()
    if len(shape) == 2:  # like BN: one value per channel cannot be normalized in training
        with pytest.raises(ValueError):
            m(torch.randn(1, 6))


# --------------------------------------------------------------------------------------
# EM
# --------------------------------------------------------------------------------------


def _match(est: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """est rows reordered to best match true's rows."""
    best = min(itertools.permutations(range(len(true))),
               key=lambda p: (est[list(p)] - true).abs().sum().item())
    return est[list(best)]


def test_em_recovers_mixture_means():
    m = MixtureNorm2d(4, num_components=2, momentum=0.3)
    for _ in range(15):
        x, mu = two_mode_batch(n=16, c=4, h=8, w=8, weight=0.3)  # 1024 samples
        m(x)
    # Statistical bounds (estimation from 1024 samples: the means' standard error is ~0.25 / sqrt(300) =
    # 0.015); rounding moves these estimates by ~1e-6, on any processor.
    torch.testing.assert_close(_match(m.gmm_mu, mu), mu, atol=0.1, rtol=0)
    torch.testing.assert_close(_match(m.running_mu, mu), mu, atol=0.1, rtol=0)
    lam = m.gmm_lambda if (m.gmm_mu[0] - mu[0]).abs().sum() < 1 else m.gmm_lambda.flip(0)
    torch.testing.assert_close(lam, torch.tensor([0.7, 0.3]), atol=0.06, rtol=0)
    torch.testing.assert_close(_match(m.gmm_sigma2, torch.full((2, 4), 0.0625)),
                               torch.full((2, 4), 0.0625), atol=0.02, rtol=0)
    # The reusable fitter (used by diagnose) gives the same answer on (M, C) rows.
    x, mu = two_mode_batch(n=16, c=4, h=8, w=8, weight=0.3)
    gmm = fit_gmm(x.permute(0, 2, 3, 1).reshape(-1, 4), num_components=2)
    torch.testing.assert_close(_match(gmm.mu, mu), mu, atol=0.1, rtol=0)


# --------------------------------------------------------------------------------------
# Eval mode
# --------------------------------------------------------------------------------------


def test_eval_output_independent_of_batch():
    """Eval mode transforms each sample alone, in either memory layout: identities, so float64 and 1e-10 (as
    for K = 1 above). Without running statistics it normalizes with the batch like BN: the batch mean of
    each channel's output is then beta (= 0 here) exactly, since sum_i tau_ik (x_i - E_k) = 0 for each
    component; in float64 that is 1e-10 too (sums of 200 terms of size ~3)."""
    m = train_steps(MixtureNorm2d(6).double(), dtype=torch.float64)
    m.eval()
    x = torch.randn(8, 6, 5, 5, dtype=torch.float64) * 2 + 1
    y = m(x)
    for i in (0, 5):
        torch.testing.assert_close(m(x[i:i + 1]), y[i:i + 1], **F64_TOL)
    y_cl = m(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(y_cl, y, **F64_TOL)
    # track_running_stats=False: eval normalizes with the batch, like BN.
    m = train_steps(MixtureNorm2d(6, track_running_stats=False).double(), dtype=torch.float64)
    m.eval()
    assert m.running_E is None
    y, info = m.forward_with_info(x)
    assert info["n"].min() >= 1  # (with less than one sample's mass, E_k would shrink toward the shift)
    torch.testing.assert_close(y.mean((0, 2, 3)), m.bias.detach(), **F64_TOL)
    assert not torch.allclose(m(x[:1]), y[:1], atol=1e-3)  # one sample's statistics are not the batch's


# --------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("groups", [1, 4], ids=["joint", "per_channel"])
@pytest.mark.parametrize("detach", [True, False], ids=["detached", "through-tau"])
@pytest.mark.parametrize("empty", [False, True], ids=["", "empty-component"])
def test_gradcheck_of_the_core(groups, detach, empty):
    """The core's training transform (models/mixture_core.py) has the exact gradient in x, gamma and beta: at
    fixed posteriors (what detach_posteriors differentiates), and through them (the whole step, mixture kept by
    em_steps 0); also when a component holds almost no sample and the n_k clamp is on (its mean far away)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(18, 4, dtype=torch.float64, generator=g, requires_grad=True)
    w = (torch.rand(4, dtype=torch.float64, generator=g) + 0.5).requires_grad_()
    b = torch.randn(4, dtype=torch.float64, generator=g, requires_grad=True)
    mu = torch.randn(3, 4, dtype=torch.float64, generator=g)
    if empty:
        mu[2] += 30.0
    stored = core.GMM(torch.full((3, groups), 1 / 3, dtype=torch.float64), mu,
                      torch.rand(3, 4, dtype=torch.float64, generator=g) + 0.5)
    o = core.Options(3, groups, 1e-5, 0, 4096, 10, 1e-2, 1e-4, True, detach, 5, False)
    step = core.train_forward(x, stored, w, b, o)
    assert (step.n[2].max() < 1) == empty
    shift, tau = step.shift, step.tau.detach()

    def at_fixed_posteriors(x, w, b):
        n, E, V = core.statistics(core.moments(tau, core.features(x - shift, groups)), shift)  # core.transform
        return core.mix(x, tau, *core.coefficients(stored.lam, E, V, w, b, o))

    def whole_step(x, w, b):
        return core.train_forward(x, stored, w, b, o).y

    if detach:
        torch.testing.assert_close(at_fixed_posteriors(x, w, b), step.y, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(at_fixed_posteriors if detach else whole_step, (x, w, b))


def test_channels_last_and_contiguous_input_give_the_same_numbers():
    """The layer reads channels-last input as a view and contiguous input through a copy: the same numbers,
    and the output in the input's memory layout."""
    m = MixtureNorm2d(4).double()
    m_cl = copy.deepcopy(m)
    x = torch.randn(3, 4, 2, 3, dtype=torch.float64)
    g = torch.randn(3, 4, 2, 3, dtype=torch.float64)
    x1 = x.clone().requires_grad_()
    x2 = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    torch.manual_seed(0)  # the same k-means++ seeds on both
    y1 = m(x1)
    torch.manual_seed(0)
    y2 = m_cl(x2)
    (y1 * g).sum().backward()
    (y2 * g).sum().backward()
    torch.testing.assert_close(y2, y1, **F64_TOL)
    torch.testing.assert_close(x2.grad, x1.grad, **F64_TOL)
    torch.testing.assert_close(m_cl.weight.grad, m.weight.grad, **F64_TOL)
    # and each output in its input's layout, as BatchNorm's is: the next convolution's speed depends on it
    assert y1.is_contiguous() and y2.is_contiguous(memory_format=torch.channels_last)
    assert y2.stride() == x2.stride() and y1.stride() == x1.stride()


def test_gradcheck_through_posteriors():
    """detach_posteriors=False: the full layer (GMM frozen with em_steps=0) passes gradcheck."""
    m = MixtureNorm2d(4, em_steps=0, detach_posteriors=False).double()
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_()
    x = torch.randn(4, 4, 3, 3, dtype=torch.float64)
    m(x)  # initializes the GMM, which em_steps=0 then keeps fixed
    x_cl = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    x.requires_grad_()
    assert torch.autograd.gradcheck(m, (x,))
    assert torch.autograd.gradcheck(m, (x_cl,))
    m.eval()
    assert torch.autograd.gradcheck(m, (x,))
