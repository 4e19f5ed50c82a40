"""Mixture Normalization (MN): Kalayeh & Shah, arXiv:1806.02892.

Implements docs/mixture-normalization.md (shared/docs). Notation, spec -> code, for a
layer with C channels and K components:

    x_i                 one sample = the C-vector at one batch item and spatial position.
                        Samples are handled as X (B, C, L) without copying the input:
                        (N, C, H*W) for NCHW input, (1, C, N*H*W) (a transposed view of the
                        (M, C) sample matrix) for channels-last or (N, C) input. Every sum
                        over samples is then a GEMM over L.
    lambda, mu, sigma2  the GMM: GMM.lam (K,), GMM.mu (K, C), GMM.sigma2 (K, C)
    tau_ik              posteriors, tensor (B, K, L); they sum to 1 over k
    n_k                 sum_i tau_ik;  tauhat_ik = tau_ik / n_k
    E_k, V_k            (K, C): E_k = sum_i tauhat_ik x_i, V_k = sum_i tauhat_ik (x_i - E_k)^2
    s_k                 1/sqrt(max(lambda_k, lambda_min)) (prior_scaling) or 1
    r_k                 1/sqrt(V_k + eps)

    y_i = gamma * sum_k tau_ik s_k r_k (x_i - E_k) + beta
        = x_i * A_i + B_i,  A_i = sum_k tau_ik P_k,  B_i = sum_k tau_ik Q_k,
          P_k = gamma s_k r_k,  Q_k = beta - P_k E_k          (uses sum_k tau_ik = 1)

A and B are (C, K) @ (K, L) GEMMs, so the transform is a K-weighted sum of BN-like ops
that never builds an N x K x C x L tensor; with tau constant (the default) its backward
is again a few such GEMMs (_MixtureNormFunction).

One training step (_MixtureNorm._batch_forward): em_steps EM iterations on at most
em_samples samples, warm-started from the previous step's GMM (k-means++ seeding on the
first step); posteriors of every sample under the result; the transform; then the
running averages, and dead components reseeded.

Squares are always taken of x - shift, with shift = sum_k lambda_k mu_k of the GMM state
(batch-independent, identical on every rank), so E[x^2] - E[x]^2 style formulas do not
cancel catastrophically when |mean| >> std; the output does not depend on the shift.

Two options switch to the variants of models/mixture_variants.py (defaults: the above):
posteriors="per_channel" (one 1-D mixture per channel, tau per (sample, channel)) and
fit="fresh" (a new k-means++ seeded fit on every training step).
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from models import mixture_variants as _mv

__all__ = [
    "GMM",
    "fit_gmm",
    "gmm_posteriors",
    "mixture_normalize",
    "MixtureNorm1d",
    "MixtureNorm2d",
    "convert_sync_mixturenorm",
]

_LOG_2PI = math.log(2.0 * math.pi)
# Keeps k-means++ sampling weights a valid distribution when every distance is 0
# (constant data): the draw then falls back to uniform.
_TINY = 1e-20
# log(0) would be -inf for a component that lost all its mass; -69 is "never" in practice.
_LAMBDA_LOG_FLOOR = 1e-30
# Posteriors below this are set to 0. Nearly hard posteriors otherwise underflow into
# float32 denormals, which make every matmul that touches tau several times slower on CPU
# (measured: a whole DCGAN step 20% slower). Their total weight is negligible.
_TAU_MIN = 1e-20

Reduce = Callable[[Tensor], Tensor]


def sum_over_ranks(t: Tensor, group) -> Tensor:
    """All-reduce (sum) that autograd differentiates: its backward all-reduces the gradient."""
    import torch.distributed._functional_collectives as funcol
    return funcol.wait_tensor(funcol.all_reduce(t, "sum", group))


def _identity(t: Tensor) -> Tensor:
    return t


class GMM(NamedTuple):
    """Diagonal Gaussian mixture: lam (K,), mu (K, C), sigma2 (K, C)."""

    lam: Tensor
    mu: Tensor
    sigma2: Tensor

    def shifted(self, shift: Tensor) -> "GMM":
        return GMM(self.lam, self.mu - shift, self.sigma2)


# ----------------------------------------------------------------------------------------
# EM building blocks. X is (B, C, L) ("channel-major"); an (M, C) matrix of samples is
# used as x.t().unsqueeze(0), i.e. B = 1, L = M.
#
# Centering: squares are always taken of x - shift (X2c), since x^2 would cancel
# catastrophically against the mean when |mean| >> std. Linear terms may use the raw X
# when `shift` is passed: there the shift is an exact, cheap correction on (K, C)
# statistics, and the batch needs no centered copy.
# ----------------------------------------------------------------------------------------


def _log_joint(X: Tensor, X2c: Tensor, gmm: GMM, shift: Optional[Tensor] = None) -> Tensor:
    """log(lambda_k N(x_i | mu_k, sigma2_k)), (B, K, L), for the samples of X (B, C, L).

    gmm is in centered coordinates (mu - shift). The quadratic form is expanded,
    sum_c xc^2/s - 2 xc mu/s + mu^2/s, so the batch is touched by two (K, C) @ (C, L)
    GEMMs instead of a (B, K, C, L) difference tensor.
    """
    inv = gmm.sigma2.reciprocal()
    lin = gmm.mu * inv
    # sum_c mu^2/s, written for raw X: mu.lin - 2 lin.(x - shift) = lin.(mu + 2 shift) - 2 lin.x
    center = gmm.mu if shift is None else gmm.mu + 2.0 * shift
    quad = torch.add((lin * center).sum(1), gmm.sigma2.log().sum(1)).add_(gmm.mu.shape[1] * _LOG_2PI)
    const = torch.add(gmm.lam.clamp_min(_LAMBDA_LOG_FLOOR).log(), quad, alpha=-0.5)
    logj = torch.matmul(-0.5 * inv, X2c)
    logj = logj.baddbmm_(lin.expand(X.shape[0], *lin.shape), X)
    return logj.add_(const[:, None])


def _mahalanobis(logj: Tensor, gmm: GMM) -> Tensor:
    """sum_c (x_c - mu_kc)^2 / sigma2_kc recovered from _log_joint's output."""
    log_norm = torch.add(gmm.lam.clamp_min(_LAMBDA_LOG_FLOOR).log(),
                         gmm.sigma2.log().sum(1).add_(gmm.mu.shape[1] * _LOG_2PI), alpha=-0.5)
    return (logj - log_norm[:, None]).mul_(-2.0)


def _posteriors(logj: Tensor) -> Tensor:
    """tau = softmax over components (log-sum-exp), with denormal-range values zeroed."""
    tau = torch.softmax(logj, dim=1)
    if tau.requires_grad:
        return torch.where(tau < _TAU_MIN, torch.zeros_like(tau), tau)
    return tau.masked_fill_(tau < _TAU_MIN, 0.0)


def _moments(tau: Tensor, X: Tensor, X2c: Tensor, shift: Optional[Tensor] = None):
    """sum_i tau_ik, sum_i tau_ik xc_i, sum_i tau_ik xc_i^2: (K,), (K, C), (K, C)."""
    n = tau.sum((0, 2))
    s1 = torch.matmul(tau, X.transpose(1, 2)).sum(0)
    if shift is not None:
        s1 = s1 - n[:, None] * shift
    s2 = torch.matmul(tau, X2c.transpose(1, 2)).sum(0)
    return n, s1, s2


def _reduce_moments(n: Tensor, s1: Tensor, s2: Tensor, reduce: Reduce):
    """Sums the moments over ranks with a single collective (identity when not distributed)."""
    if reduce is _identity:
        return n, s1, s2
    c = s1.shape[1]
    packed = reduce(torch.cat([n[:, None], s1, s2], 1))
    return packed[:, 0], packed[:, 1 : c + 1], packed[:, c + 1 :]


def _m_step(n: Tensor, s1: Tensor, s2: Tensor, prev: GMM, var_floor: float, eps: float):
    """M-step from (already all-reduced) sufficient statistics."""
    total = n.sum()
    lam = n / total
    mean_all = s1.sum(0) / total
    var_all = (s2.sum(0) / total - mean_all * mean_all).clamp_min(0.0)
    # Relative floor keeps EM scale-invariant like BN; the eps term keeps it > 0 on
    # constant channels.
    floor = var_floor * (var_all + eps)
    # With less than one sample's worth of mass the estimates are noise: keep the previous
    # ones; such a component is dead and gets reseeded if it stays so.
    has_mass = (n >= 1.0)[:, None]
    n_safe = n.clamp_min(1.0)[:, None]
    mu = s1 / n_safe
    sigma2 = s2 / n_safe - mu * mu
    mu = torch.where(has_mass, mu, prev.mu)
    sigma2 = torch.maximum(torch.where(has_mass, sigma2, prev.sigma2), floor)
    return GMM(lam, mu, sigma2)


def _em_step(X, X2c, gmm: GMM, var_floor: float, eps: float, reduce: Reduce, shift=None,
             want_maha: bool = False):
    """One EM iteration; with want_maha also the E-step's Mahalanobis distances (reseeding)."""
    logj = _log_joint(X, X2c, gmm, shift)
    maha = _mahalanobis(logj, gmm) if want_maha else None
    n, s1, s2 = _reduce_moments(*_moments(_posteriors(logj), X, X2c, shift), reduce)
    return _m_step(n, s1, s2, gmm, var_floor, eps), maha


def _kmeans_pp(xs: Tensor, k: int, var: Tensor) -> Tensor:
    """k-means++ seeds (k, C) among the rows of xs (S, C), distances standardized by var.

    k-means++ is sequential by definition (each seed depends on the previous ones); the
    loop runs k - 1 times and only when the GMM is first initialized.
    """
    z = xs * var.clamp_min(_TINY).rsqrt()
    idx = [torch.randint(xs.shape[0], (1,), device=xs.device)]
    d2 = (z - z[idx[0]]).square().sum(1)
    for _ in range(k - 1):
        i = torch.multinomial(d2.clamp_min(_TINY), 1)
        idx.append(i)
        d2 = torch.minimum(d2, (z - z[i]).square().sum(1))
    return xs[torch.cat(idx)]


def _init_gmm(
    Xc: Tensor,
    X2c: Tensor,
    k: int,
    iters: int,
    var_floor: float,
    eps: float,
    reduce: Reduce = _identity,
    first_rank_only: Reduce = _identity,
) -> GMM:
    """k-means++ seeding on the (centered) samples of Xc (B, C, L), then `iters` EM iterations."""
    c = Xc.shape[1]
    count = Xc.new_full((1,), float(Xc.shape[0] * Xc.shape[2]))
    stats = reduce(torch.cat([count, Xc.sum((0, 2)), X2c.sum((0, 2))]))
    mean = stats[1 : c + 1] / stats[0]
    var = (stats[c + 1 :] / stats[0] - mean * mean).clamp_min(0.0)
    seeds = _kmeans_pp(Xc.transpose(1, 2).reshape(-1, c), k, var + eps)
    gmm = GMM(
        Xc.new_full((k,), 1.0 / k),
        first_rank_only(seeds),
        torch.maximum(var, var_floor * (var + eps)).expand(k, c).clone(),
    )
    for _ in range(iters):
        gmm, _ = _em_step(Xc, X2c, gmm, var_floor, eps, reduce)
    return gmm


@torch.no_grad()
def fit_gmm(
    x: Tensor,
    num_components: int = 3,
    iters: int = 20,
    var_floor: float = 1e-4,
    eps: float = 1e-5,
    max_samples: Optional[int] = None,
) -> GMM:
    """Fits a diagonal GMM to the rows of x (M, C): k-means++ seeding, then `iters` EM
    iterations, with the code MixtureNorm uses (same floors and guards). At most
    max_samples random rows are used. Randomness comes from torch's global RNG.
    """
    if x.dim() != 2:
        raise ValueError(f"fit_gmm expects an (M, C) tensor, got shape {tuple(x.shape)}")
    x = x.detach()
    x = x.double() if x.dtype == torch.float64 else x.float()
    if max_samples is not None and x.shape[0] > max_samples:
        x = x[torch.randint(x.shape[0], (max_samples,), device=x.device)]
    shift = x.mean(0)
    Xc = (x - shift).t().unsqueeze(0)
    gmm = _init_gmm(Xc, Xc * Xc, num_components, iters, var_floor, eps)
    return GMM(gmm.lam, gmm.mu + shift, gmm.sigma2)


@torch.no_grad()
def gmm_posteriors(x: Tensor, gmm: GMM) -> Tensor:
    """Posteriors tau (M, K) of the rows of x (M, C) under gmm (log-sum-exp)."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    gmm = GMM(*(t.to(device=x.device, dtype=dtype) for t in gmm))
    shift = gmm.lam @ gmm.mu
    Xc = (x.to(dtype) - shift).t().unsqueeze(0)
    return _posteriors(_log_joint(Xc, Xc * Xc, gmm.shifted(shift)))[0].t()


# ----------------------------------------------------------------------------------------
# The transform
# ----------------------------------------------------------------------------------------


def _sample_major(t: Tensor) -> bool:
    """True when t's samples are best seen as rows of an (M, C) matrix: (N, C) input,
    one position per item, or a channels-last 4-D tensor (the trainer's default)."""
    if t.dim() == 2 or t.numel() == t.shape[0] * t.shape[1]:
        return True
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _viewable(t: Tensor) -> Tensor:
    """t, or a contiguous copy if its layout is one _as_ncl would have to copy (rare):
    the training path writes its output through an _as_ncl view."""
    sm = _sample_major(t)
    return t if (t.movedim(1, -1) if sm else t).is_contiguous() else t.contiguous()


def _as_ncl(t: Tensor, sample_major: bool) -> Tensor:
    """(N, C, *) as (B, C, L): (N, C, L) for contiguous t; for sample-major t, (1, C, M), the
    transpose of the (M, C) sample matrix, so that every sum over samples is one plain GEMM.
    A view whenever t's layout is the one sample_major says (it copies otherwise)."""
    if sample_major:
        return t.movedim(1, -1).reshape(-1, t.shape[1]).t().unsqueeze(0)
    return t.reshape(t.shape[0], t.shape[1], -1)


def _from_ncl(t3: Tensor, shape: torch.Size, sample_major: bool) -> Tensor:
    """Inverse of _as_ncl."""
    if sample_major:
        return t3[0].t().reshape(shape[0], *shape[2:], shape[1]).movedim(-1, 1)
    return t3.reshape(shape)


def _contract_into(out: Tensor, W: Tensor, tau: Tensor, accumulate: bool = False) -> Tensor:
    """out[b, c, l] (+)= sum_k W[k, c] tau[b, k, l], as a GEMM in whichever orientation
    matches out's memory (channel-major or sample-major)."""
    B, C, K = out.shape[0], out.shape[1], tau.shape[1]
    if out.stride(2) == 1 or out.stride(1) != 1:
        W = W.t().expand(B, C, K)
        return out.baddbmm_(W, tau) if accumulate else torch.bmm(W, tau, out=out)
    out_t, tau_t, W = out.transpose(1, 2), tau.transpose(1, 2), W.expand(B, K, C)
    if accumulate:
        out_t.baddbmm_(tau_t, W)
    else:
        torch.bmm(tau_t, W, out=out_t)
    return out


def _mix_apply(X: Tensor, tau: Tensor, P: Tensor, Q: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """y_i = x_i * sum_k tau_ik P_k + sum_k tau_ik Q_k for X (B, C, L), tau (B, K, L).

    With `out` (no autograd), y is written there: on CPU a fresh activation-sized tensor
    costs about as much as a pass over it (page faults), so the training path reuses one.
    """
    if out is None:
        return torch.addcmul(torch.matmul(Q.t(), tau), X, torch.matmul(P.t(), tau))
    _contract_into(out, P, tau).mul_(X)
    return _contract_into(out, Q, tau, accumulate=True)


def _normalize_math(X, X2c, shift, tau, scale, weight, bias, eps: float, reduce: Reduce,
                    out: Optional[Tensor] = None):
    """Spec's training-mode transform; differentiable by autograd when tau/X require grad.

    X2c = (X - shift)^2. Returns y (written to `out` if given, which may be X2c itself) and
    E_k (centered), V_k, n_true = sum_i tau_ik, the clamped n_k, r_k.
    """
    n_true, s1, s2 = _reduce_moments(*_moments(tau, X, X2c, shift), reduce)
    # A component can hold almost no sample of a batch (nearly hard posteriors in wide
    # layers): clamping n_k keeps E_k, V_k finite instead of 0/0 (E_k then shrinks toward
    # the shift, i.e. the mixture's mean).
    n = n_true.clamp_min(1.0)
    E = s1 / n[:, None]
    # = sum_i tau_ik (xc_i - E_k)^2 / n_k; the n_true/n factor differs from 1 only when
    # the clamp is active.
    V = ((s2 - 2.0 * E * s1) / n[:, None] + (n_true / n)[:, None] * E * E).clamp_min(0.0)
    r = torch.rsqrt(V + eps)
    P, Q = _coefficients(scale, r, E + shift, weight, bias)  # E + shift: X is not centered
    return _mix_apply(X, tau, P, Q, out), E, V, n_true, n, r


def _coefficients(scale: Tensor, r: Tensor, center: Tensor, weight: Tensor | None, bias: Tensor | None
                  ) -> tuple[Tensor, Tensor]:
    """y = sum_k tau_k (P_k x + Q_k): P = scale_k r_k gamma, Q = beta - P center_k. One builder for the training
    and the running transform, so that the two stay the same maths."""
    P = scale[:, None] * r
    if weight is not None:
        P = P * weight
    Q = -P * center
    if bias is not None:
        Q = Q + bias
    return P, Q


class _MixtureNormFunction(torch.autograd.Function):
    """Training transform with constant posteriors (detach_posteriors=True).

    X is (N, C, *), X2c = (X - shift)^2 its _as_ncl view. If `out` (X's shape and layout)
    holds X2c's storage, the output overwrites X2c there and `out` is returned: the step
    then allocates one activation-sized tensor, like BN. Either way the output is not an
    autograd view (an in-place ReLU on a view would make autograd copy gradients around).

    Hand-written backward: with tau constant the transform is a tau-weighted sum of K
    BN-like ops, and its gradient is again a few (C, K) @ (K, L) matmuls. Saves only X and
    tau (N, K, L) for backward, about what BN keeps.
    """

    @staticmethod
    def forward(ctx, X, X2c, out, shift, tau, scale, weight, bias, eps, reduce):
        sm = _sample_major(X)
        if out is None:  # under torch.compile, which manages memory itself
            out = torch.empty_like(X)
            buf = _as_ncl(out, sm)
        else:
            buf = X2c
            ctx.mark_dirty(out)
        _, E, V, n_true, n, r = _normalize_math(_as_ncl(X, sm), X2c, shift, tau, scale, weight, bias,
                                                eps, reduce, out=buf)
        ctx.save_for_backward(X, shift, tau, scale, weight, E, n_true, n, r)
        ctx.reduce, ctx.sample_major = reduce, sm
        ctx.mark_non_differentiable(E, V, n_true)
        return out, E, V, n_true

    @staticmethod
    def backward(ctx, dy_in, _dE, _dV, _dn):
        X_in, shift, tau, scale, weight, E, n_true, n, r = ctx.saved_tensors
        sm = ctx.sample_major
        X, dy = _as_ncl(X_in, sm), _as_ncl(dy_in, sm)
        C = X.shape[1]
        sr = scale[:, None] * r
        # Per-component sums sum_i tau_ik dy_i and sum_i tau_ik dy_i xc_i (local).
        gy = torch.matmul(tau, dy.transpose(1, 2)).sum(0)
        tmp = dy * X
        hy = torch.matmul(tau, tmp.transpose(1, 2)).sum(0) - shift * gy
        d_x = d_w = d_b = None
        if ctx.needs_input_grad[6]:
            d_w = (sr * (hy - E * gy)).sum(0)
        if ctx.needs_input_grad[7]:
            d_b = gy.sum(0)  # sum_k tau_ik = 1
        if ctx.needs_input_grad[0]:
            # Like SyncBatchNorm: parameter grads stay local (DDP averages them), the sums
            # feeding the input gradient are global.
            if ctx.reduce is not _identity:
                packed = ctx.reduce(torch.cat([gy, hy], 1))
                gy, hy = packed[:, :C], packed[:, C:]
            sg = scale[:, None] if weight is None else scale[:, None] * weight
            P = sg * r
            G, H = sg * gy, sg * hy  # sum_i (s_k tau_ik) (gamma dy_i) (xc_i)
            # dx_i = sum_k tau_ik [P_k dy_i + beta_k xc_i + alpha_k], where
            #   dL/dV_k dV_k/dx_i = tau_ik beta_k (xc_i - c_k E_k), c_k = 2 - n_true/n,
            #   dL/dE_k dE_k/dx_i = tau_ik (-r_k G_k / n_k).
            beta = -(r ** 3) * (H - E * G) / n[:, None]
            alpha = -r * G / n[:, None] - beta * (2.0 - n_true / n)[:, None] * E
            alpha = alpha - beta * shift  # X is not centered
            d_x = torch.empty_like(X_in)
            dx = _contract_into(_as_ncl(d_x, sm), P, tau).mul_(dy)
            dx.addcmul_(_contract_into(tmp, beta, tau), X)
            _contract_into(dx, alpha, tau, accumulate=True)
        return d_x, None, None, None, None, None, d_w, d_b, None, None


def mixture_normalize(
    x: Tensor,
    tau: Tensor,
    scale: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    detach_posteriors: bool = True,
    shift: Optional[Tensor] = None,
) -> Tensor:
    """The training-mode MN transform for given posteriors (no GMM fitting).

    x (N, C, L), tau (N, K, L) summing to 1 over K, scale (K,) = 1/sqrt(lambda) or None.
    detach_posteriors=True uses the hand-written backward (tau constant); False lets
    autograd differentiate through tau as well. shift (C,): constant the squares are
    centered on (default 0); it matters only when a clamp on n_k is active, where E_k
    shrinks toward it.
    """
    if scale is None:
        scale = x.new_ones(tau.shape[1])
    if shift is None:
        shift = x.new_zeros(x.shape[1])
    shift = shift.detach()
    if detach_posteriors:
        x = _viewable(x)
        sm = _sample_major(x)
        x2c = _as_ncl(x.detach() - shift[:, None], sm).square_()
        tau = _as_ncl(tau.detach(), sm)  # the layout the Function sees x in
        return _MixtureNormFunction.apply(x, x2c, None, shift, tau, scale, weight, bias, eps, _identity)[0]
    x2c = (x - shift[:, None]).square()
    return _normalize_math(x, x2c, shift, tau, scale, weight, bias, eps, _identity)[0]


# ----------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------


class _MixtureNorm(nn.Module):
    """Base of MixtureNorm1d/2d: input (N, C, *), any memory layout (channels-last is the
    fast path on CPU: each sum over samples is a single GEMM).

    Buffers (all in state_dict, so a resumed run continues exactly):
      gmm_lambda, gmm_mu, gmm_sigma2   EM state: last step's fit, the warm start of the next
      initialized, dead_count          k-means++ done; consecutive steps with lambda < lambda_min
      running_lambda/_mu/_sigma2,      eval-mode GMM and per-component statistics, momentum
      running_E, running_V,            averages like BN's (only with track_running_stats)
      num_batches_tracked
    The weights (gmm_lambda, running_lambda) and dead_count are (K,) for joint posteriors and
    (K, C) for per-channel ones; the means and variances are (K, C) either way.
    """

    # "A few EM iterations" after the k-means++ seeding on the first training step.
    init_em_steps = 10

    def __init__(
        self,
        num_features: int,
        num_components: int = 3,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        em_steps: int = 1,
        em_samples: int = 4096,
        lambda_min: float = 1e-2,
        var_floor: float = 1e-4,
        prior_scaling: bool = True,
        detach_posteriors: bool = True,
        dead_steps: int = 5,
        posteriors: str = "joint",
        fit: str = "warm",
        device=None,
        dtype=None,
    ):
        """
        num_features: C.  num_components: K (K = 1 is exactly BatchNorm).
        eps, momentum, affine, track_running_stats: as in nn.BatchNorm2d (momentum=None:
            cumulative average). momentum also averages the eval-mode GMM.
        em_steps: EM iterations per training step, warm-started from the previous step's
            GMM. 0 freezes the GMM after its initialization.
        em_samples: EM runs on a random subsample of at most this many samples (per
            process: em_samples // world_size); posteriors for the transform use all.
        lambda_min: floor of lambda_k in the 1/sqrt(lambda_k) factor, and the weight below
            which a component counts as dead.
        var_floor: sigma2_kc >= var_floor * (Var_c + eps), Var_c the channel's variance
            over the EM samples. Relative, so EM is as scale-invariant as BN; 1e-4 lets a
            component be as narrow as 1% of the channel's std.
        prior_scaling: keep the Fisher-vector factor 1/sqrt(lambda_k).
        detach_posteriors: treat tau as constants in the backward pass.
        dead_steps: a component with lambda < lambda_min for this many consecutive
            training steps is reseeded (k-means++ against the others). 5 tolerates a few
            unlucky batches without leaving a dead component for long.
        posteriors: "joint": one C-dimensional diagonal GMM, so a sample has the same
            posteriors in every channel; "per_channel": one 1-D GMM per channel, posteriors
            per (sample, channel) (models/mixture_variants.py).
        fit: "warm": EM continues from the previous step's GMM; "fresh": every training step
            fits from scratch (k-means++ seeding on EM's subsample, then em_steps EM
            iterations; em_steps = 0 keeps the seeds), relabelled to match the previous
            step's components. Fresh fits need no dead-component reseeding: every component
            is re-seeded every step.
        """
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        if num_components < 1:
            raise ValueError("num_components must be >= 1")
        if not 0.0 <= lambda_min * num_components < 1.0:
            # Otherwise all components could be "dead" at once and reseeding has no anchor.
            raise ValueError("need 0 <= lambda_min < 1 / num_components")
        if em_steps < 0 or em_samples < num_components or dead_steps < 1:
            raise ValueError("need em_steps >= 0, em_samples >= num_components, dead_steps >= 1")
        if posteriors not in ("joint", "per_channel") or fit not in ("warm", "fresh"):
            raise ValueError("need posteriors in ('joint', 'per_channel') and fit in ('warm', 'fresh')")
        self.num_features = num_features
        self.num_components = num_components
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.em_steps = em_steps
        self.em_samples = em_samples
        self.lambda_min = lambda_min
        self.var_floor = var_floor
        self.prior_scaling = prior_scaling
        self.detach_posteriors = detach_posteriors
        self.dead_steps = dead_steps
        self.posteriors = posteriors
        self.fit = fit
        # Distributed: set by convert_sync_mixturenorm; not part of the state.
        self.sync = False
        self.process_group = None

        k, c = num_components, num_features
        lam_shape = (k,) if posteriors == "joint" else (k, c)
        if affine:
            self.weight = nn.Parameter(torch.empty(c, **factory))
            self.bias = nn.Parameter(torch.empty(c, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("gmm_lambda", torch.empty(lam_shape, **factory))
        self.register_buffer("gmm_mu", torch.empty(k, c, **factory))
        self.register_buffer("gmm_sigma2", torch.empty(k, c, **factory))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool, device=device))
        self.register_buffer("dead_count", torch.zeros(lam_shape, dtype=torch.long, device=device))
        if track_running_stats:
            self.register_buffer("running_lambda", torch.empty(lam_shape, **factory))
            self.register_buffer("running_mu", torch.empty(k, c, **factory))
            self.register_buffer("running_sigma2", torch.empty(k, c, **factory))
            self.register_buffer("running_E", torch.empty(k, c, **factory))
            self.register_buffer("running_V", torch.empty(k, c, **factory))
            self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long, device=device))
        else:
            for name in ("running_lambda", "running_mu", "running_sigma2", "running_E", "running_V",
                         "num_batches_tracked"):
                self.register_buffer(name, None)
        # Python mirror of `initialized`, so a training step does not read a device tensor
        # (a GPU sync) just to learn that the GMM exists.
        self._ready: Optional[bool] = None
        self.reset_parameters()

    # -- BN-like housekeeping ---------------------------------------------------------------

    def reset_running_stats(self) -> None:
        """Forgets the GMM and the running statistics (the next training step re-seeds)."""
        k = self.num_components
        with torch.no_grad():
            self.gmm_lambda.fill_(1.0 / k)
            self.gmm_mu.zero_()
            self.gmm_sigma2.fill_(1.0)
            self.initialized.fill_(False)
            self.dead_count.zero_()
            if self.track_running_stats:
                self.running_lambda.fill_(1.0 / k)
                self.running_mu.zero_()
                self.running_sigma2.fill_(1.0)
                self.running_E.zero_()
                self.running_V.fill_(1.0)
                self.num_batches_tracked.zero_()
        self._ready = False

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._ready = None

    def _check_input_dim(self, x: Tensor) -> None:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (
            "{num_features}, num_components={num_components}, eps={eps}, momentum={momentum}, "
            "affine={affine}, track_running_stats={track_running_stats}, em_steps={em_steps}, "
            "em_samples={em_samples}, lambda_min={lambda_min}, var_floor={var_floor}, "
            "prior_scaling={prior_scaling}, detach_posteriors={detach_posteriors}, "
            "dead_steps={dead_steps}, posteriors={posteriors}, fit={fit}".format(**self.__dict__)
        )

    # -- distributed --------------------------------------------------------------------------

    def _world(self) -> tuple[int, int]:
        if self.sync and dist.is_available() and dist.is_initialized():
            size = dist.get_world_size(self.process_group)
            if size > 1:
                return size, dist.get_rank(self.process_group)
        return 1, 0

    def _all_reduce(self, t: Tensor, differentiable: bool = False) -> Tensor:
        """Sums t over the process group (identity when not synced).

        Every cross-sample sum that feeds tauhat, E_k, V_k or EM goes through here, so that
        N ranks with batch B compute what one process with batch N*B would. Non-differentiable
        calls reduce t in place (callers pass fresh tensors).
        """
        if self._world()[0] == 1:
            return t
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        if differentiable:
            return sum_over_ranks(t, group)
        dist.all_reduce(t, group=group)
        return t

    def _reducer(self) -> Reduce:
        """_all_reduce, or the plain identity when not distributed (lets callers skip packing)."""
        return _identity if self._world()[0] == 1 else self._all_reduce

    def _first_rank_only(self, t: Tensor) -> Tensor:
        """Makes rank 0's t (k-means++ seeds, drawn locally) everybody's t."""
        size, rank = self._world()
        if size == 1:
            return t
        return self._all_reduce(t * float(rank == 0))

    @classmethod
    def convert_sync_mixturenorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        """Makes every MixtureNorm in `module` synchronize its statistics over process_group
        (None: the default group), like nn.SyncBatchNorm.convert_sync_batchnorm. In place."""
        for m in module.modules():
            if isinstance(m, _MixtureNorm):
                m.sync = True
                m.process_group = process_group
        return module

    # -- forward ------------------------------------------------------------------------------

    def forward(self, input: Tensor) -> Tensor:
        return self._forward(input, None)

    def forward_with_info(self, input: Tensor) -> tuple[Tensor, dict]:
        """forward plus what it used: posteriors tau (N, K, *) (the input's shape with C -> K),
        n = sum_i tau (K,), E, V (K, C) in input units, scale (K,) = 1/sqrt(lambda) or 1, and
        the GMM (lam, mu, sigma2) the posteriors came from. Per-channel posteriors: tau is
        (N, K, C, *), and n, scale and lam are (K, C)."""
        info: dict = {}
        return self._forward(input, info), info

    def _forward(self, input: Tensor, info: Optional[dict]) -> Tensor:
        self._check_input_dim(input)
        if input.shape[1] != self.num_features:
            raise ValueError(f"expected {self.num_features} channels, got {input.shape[1]}")
        dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
        # Statistics in float32 even under autocast: EM and variances in bf16 are useless.
        with torch.autocast(device_type=input.device.type, enabled=False):
            X = _viewable(input.to(dtype))
            if self.training or not self.track_running_stats:
                Y = self._batch_forward(X, self.training, info)
            else:
                Y = self._running_forward(X, info)
        return Y.to(input.dtype)

    def _scale(self, lam: Tensor) -> Tensor:
        if not self.prior_scaling:
            return torch.ones_like(lam)
        # Guard from the spec: a dying component must not blow up the output.
        return lam.clamp_min(self.lambda_min).rsqrt()

    def _affine(self, dtype):
        if not self.affine:
            return None, None
        return self.weight.to(dtype), self.bias.to(dtype)

    def _is_ready(self) -> bool:
        if not self._ready:
            self._ready = bool(self.initialized)
        return self._ready

    def _em_samples(self, X: Tensor, X2c: Tensor, shift: Tensor, budget: int):
        """EM's samples as (Xs, X2s, shift_s): the whole batch (raw X, shift_s = shift) if it
        has at most `budget` samples, else a centered random subset (shift_s = None) drawn
        with replacement; for (N, C, L) layouts stratified over batch items (budget // N
        positions each), which gathers cache-friendly rows.
        """
        B, C, L = X.shape
        if B * L <= budget:
            return X, X2c, shift
        if B == 1:  # sample-major: rows of the (M, C) matrix
            xs = X[0].t()[torch.randint(L, (budget,), device=X.device)].t().unsqueeze(0)
        elif B >= budget:
            b = torch.randint(B, (budget,), device=X.device)
            p = torch.randint(L, (budget,), device=X.device)
            xs = X[b, :, p].t().unsqueeze(0)  # (1, C, budget)
        else:
            q = budget // B
            p = torch.randint(L, (B, 1, q), device=X.device).expand(B, C, q)
            xs = torch.gather(X, 2, p)  # (B, C, q)
        xs = xs - shift[:, None]
        return xs, xs * xs, None

    def _batch_forward(self, X: Tensor, update: bool, info: Optional[dict]) -> Tensor:
        """Training mode (update=True), or eval without running stats (nothing is written)."""
        world, _ = self._world()
        K, dtype = self.num_components, X.dtype
        ready = self._is_ready()
        reduce = self._reducer()
        sm = _sample_major(X)
        per_channel, fresh = self.posteriors == "per_channel", self.fit == "fresh"
        with torch.no_grad():
            Xd = _as_ncl(X.detach(), sm)
            N, C, L = Xd.shape
            if update and N * L == 1 and world == 1:
                raise ValueError("Expected more than 1 value per channel when training")
            if ready:
                gmm = GMM(self.gmm_lambda.to(dtype), self.gmm_mu.to(dtype), self.gmm_sigma2.to(dtype))
                if update and torch.compiler.is_compiling():  # the buffers change before backward
                    gmm = _mv.snapshot(gmm)
                shift = _mv.mixture_mean(gmm)
            else:
                stats = self._all_reduce(torch.cat([X.new_full((1,), float(N * L)), Xd.sum((0, 2))]))
                shift = stats[1:] / stats[0]
            if torch.compiler.is_compiling():
                X2c_out, X2c = None, (Xd - shift[:, None]).square()
            else:  # X's shape and layout: it becomes the output buffer (_MixtureNormFunction)
                X2c_out = torch.empty_like(X)
                X2c = torch.sub(Xd, shift[:, None], out=_as_ncl(X2c_out, sm)).square_()

            # EM, warm-started from the previous step's GMM or fitted afresh (centered coordinates).
            Xs, X2s, s_shift = self._em_samples(Xd, X2c, shift, max(K, self.em_samples // world))
            if ready and not fresh:
                gmm = gmm.shifted(shift)
            else:
                Xsc = Xs if s_shift is None else Xs - s_shift[:, None]
                init = _mv.init_gmm if per_channel else _init_gmm
                fitted = init(Xsc, X2s, K, self.em_steps if fresh else self.init_em_steps, self.var_floor,
                              self.eps, reduce, self._first_rank_only)
                gmm = _mv.align(fitted, gmm.shifted(shift)) if ready else fitted
            em_step = _mv.em_step if per_channel else _em_step
            maha = None
            for it in range(0 if fresh else self.em_steps):
                gmm, maha = em_step(Xs, X2s, gmm, self.var_floor, self.eps, reduce, s_shift,
                                    want_maha=it == self.em_steps - 1)
            scale = self._scale(gmm.lam)
        weight, bias = self._affine(dtype)

        # Posteriors of every sample under the fitted GMM, then the transform.
        if self.detach_posteriors:
            with torch.no_grad():
                tau = (_mv.posteriors(_mv.log_joint(Xd, gmm, shift)) if per_channel
                       else _posteriors(_log_joint(Xd, X2c, gmm, shift)))
            fn = _mv.PerChannelFunction if per_channel else _MixtureNormFunction
            y, E, V, n_true = fn.apply(X, X2c, X2c_out, shift, tau, scale, weight, bias, self.eps, reduce)
        else:
            X3 = _as_ncl(X, sm)
            X2g = (X3 - shift[:, None]).square()
            tau = (_mv.posteriors(_mv.log_joint(X3, gmm, shift)) if per_channel
                   else _posteriors(_log_joint(X3, X2g, gmm, shift)))
            normalize = _mv.normalize_math if per_channel else _normalize_math
            y, E, V, n_true, _, _ = normalize(
                X3, X2g, shift, tau, scale, weight, bias, self.eps,
                lambda t: self._all_reduce(t, differentiable=True))
            y = _from_ncl(y, X.shape, sm)
            E, V, n_true = E.detach(), V.detach(), n_true.detach()

        if info is not None:
            tau_out = (_mv.tau_like_input(tau.detach(), X.shape, sm) if per_channel
                       else _from_ncl(tau.detach(), (X.shape[0], K, *X.shape[2:]), sm))
            info.update(tau=tau_out, n=n_true, E=E + shift, V=V, scale=scale,
                        lam=gmm.lam, mu=gmm.mu + shift, sigma2=gmm.sigma2)
        if update:
            with torch.no_grad():
                self._update_state(gmm, shift, E, V, n_true, ready, Xs, s_shift is None, maha)
        return y

    def _update_state(self, gmm: GMM, shift, E, V, n_true, ready: bool, Xs, xs_centered: bool,
                      maha) -> None:
        """Writes back the GMM (with dead components reseeded) and the running statistics.

        Xs are EM's samples (x - shift if xs_centered, else raw x); maha their last E-step
        distances (None when em_steps == 0, which also freezes the GMM).
        """
        K = self.num_components
        lam, mu, sigma2 = gmm.lam, gmm.mu + shift, gmm.sigma2
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            f = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            gmm_bufs = [self.running_lambda, self.running_mu, self.running_sigma2]
            if ready:
                torch._foreach_lerp_(gmm_bufs, [lam, mu, sigma2], f)
            else:
                # Before the first fit the running GMM means nothing: start from the fit.
                torch._foreach_copy_(gmm_bufs, [lam, mu, sigma2])
            # BN's update with its unbiased correction n/(n-1), n_k = sum_i tau_ik; a
            # component with too little mass for the correction (n_k <= 2) keeps its values.
            # (Per-channel posteriors: n_kc, per component and channel.)
            nk = n_true if n_true.dim() == 2 else n_true[:, None]
            w = (nk > 2.0).to(E.dtype).mul_(f)
            v_unbiased = V * (nk / (nk - 1.0).clamp_min(1.0))
            torch._foreach_lerp_([self.running_E, self.running_V], [E + shift, v_unbiased], [w, w])

        if maha is not None and self.posteriors == "per_channel":
            (lam, mu, sigma2), dead = _mv.reseed(GMM(lam, mu, sigma2), self.dead_count, maha, Xs,
                                                 shift if xs_centered else None, self.lambda_min,
                                                 self.dead_steps, self._first_rank_only)
            self.dead_count.copy_(dead)
        elif maha is not None:
            # Dead components, branch-free (no device->host sync): every step draws one
            # k-means++ candidate per component, with probability proportional to the
            # distance to the nearest live component; only components dead for
            # dead_steps consecutive steps take theirs.
            alive = lam >= self.lambda_min
            dead = (self.dead_count + 1).masked_fill_(alive, 0)
            reseed = (dead >= self.dead_steps)[:, None]
            d2 = maha.masked_fill(~alive[None, :, None], float("inf")).amin(1).flatten()
            idx = torch.multinomial(d2.clamp_min_(_TINY), K, replacement=True)
            L = Xs.shape[2]
            cand = self._first_rank_only(Xs[idx // L, :, idx % L])
            if xs_centered:
                cand = cand + shift
            # The live components' typical width: with the (much wider) variance of all the
            # data, a new component loses every sample to the narrow ones in high dimension.
            w_alive = (lam * alive)[:, None]
            width = (w_alive * sigma2).sum(0) / w_alive.sum().clamp_min(_TINY)
            mu = torch.where(reseed, cand, mu)
            sigma2 = torch.where(reseed, width, sigma2)
            lam = torch.where(reseed[:, 0], 1.0 / K, lam)
            lam = lam / lam.sum()
            self.dead_count.copy_(dead.masked_fill_(reseed[:, 0], 0))
        torch._foreach_copy_([self.gmm_lambda, self.gmm_mu, self.gmm_sigma2], [lam, mu, sigma2])
        if not ready:
            self.initialized.fill_(True)
            self._ready = True

    def _running_forward(self, X: Tensor, info: Optional[dict]) -> Tensor:
        """Eval mode: running GMM posteriors and running E_k, V_k; no batch dependence."""
        dtype, shape, sm = X.dtype, X.shape, _sample_major(X)
        X = _as_ncl(X, sm)
        gmm = GMM(self.running_lambda.to(dtype), self.running_mu.to(dtype), self.running_sigma2.to(dtype))
        shift = _mv.mixture_mean(gmm)
        per_channel = self.posteriors == "per_channel"
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.detach_posteriors):
            X2c = (X - shift[:, None]).square()
            tau = (_mv.posteriors(_mv.log_joint(X, gmm.shifted(shift), shift)) if per_channel
                   else _posteriors(_log_joint(X, X2c, gmm.shifted(shift), shift)))
        scale = self._scale(gmm.lam)
        E = self.running_E.to(dtype)
        r = torch.rsqrt(self.running_V.to(dtype) + self.eps)
        weight, bias = self._affine(dtype)
        P, Q = (_mv.coefficients if per_channel else _coefficients)(scale, r, E, weight, bias)
        if info is not None:
            tau_out = (_mv.tau_like_input(tau.detach(), shape, sm) if per_channel
                       else _from_ncl(tau.detach(), (shape[0], tau.shape[1], *shape[2:]), sm))
            n = tau.detach().sum((1, 3) if per_channel else (0, 2))
            info.update(tau=tau_out, n=n, E=E, V=self.running_V.to(dtype),
                        scale=scale, lam=gmm.lam, mu=gmm.mu, sigma2=gmm.sigma2)
        needs_grad = torch.is_grad_enabled() and (X.requires_grad or tau.requires_grad or P.requires_grad)
        mix = _mv.mix_apply if per_channel else _mix_apply
        return _from_ncl(mix(X, tau, P, Q, out=None if needs_grad else X2c), shape, sm)


class MixtureNorm2d(_MixtureNorm):
    """Mixture Normalization for (N, C, H, W) input; drop-in beside nn.BatchNorm2d."""

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"expected 4D input (got {x.dim()}D input)")


class MixtureNorm1d(_MixtureNorm):
    """Mixture Normalization for (N, C) or (N, C, L) input; drop-in beside nn.BatchNorm1d."""

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() not in (2, 3):
            raise ValueError(f"expected 2D or 3D input (got {x.dim()}D input)")


convert_sync_mixturenorm = _MixtureNorm.convert_sync_mixturenorm
