"""The Mixture Normalization variants that the paper leaves open (issue 15), beside the default
of models/mixture_norm.py (one C-dimensional mixture per layer, warm-started EM).

posteriors = "per_channel": one 1-D K-component mixture per channel. Notation as in
models/mixture_norm.py, with every per-component quantity now per (component, channel):

    lambda, mu, sigma2   (K, C): channel c's mixture is sum_k lambda_kc N(mu_kc, sigma2_kc)
    tau_ikc              posteriors, tensor (K, B, C, L), from channel c's mixture alone;
                         sum_k tau_ikc = 1 for every sample i and channel c
    n_kc  = sum_i tau_ikc,   E_kc = sum_i tau_ikc x_ic / n_kc,
    V_kc  = sum_i tau_ikc (x_ic - E_kc)^2 / n_kc
    s_kc  = 1/sqrt(max(lambda_kc, lambda_min)) (prior_scaling) or 1,   r_kc = 1/sqrt(V_kc + eps)
    y_ic  = gamma_c sum_k tau_ikc s_kc r_kc (x_ic - E_kc) + beta_c
          = sum_k tau_ikc (P_kc x_ic + Q_kc),  P = gamma s r,  Q = beta - P E

This is the joint transform with tau_ik replaced by tau_ikc, so the spec's guards carry over
per (k, c): n_kc clamped at 1, running E/V updated only where n_kc > 2, lambda_kc floored in
s_kc, sigma2_kc floored relative to the channel's variance, a component dead in one channel
reseeded in that channel. K = 1 gives tau = 1, lambda = 1: BatchNorm. Everything is
elementwise over (K, B, C, L) or a sum over samples: vectorized over channels. The price is
memory: tau is K activation-sized tensors (the joint tau is K/C of one), kept for backward.

fit = "fresh" (either posteriors): each training step fits the mixture from scratch on EM's
subsample (k-means++ seeding, then em_steps EM iterations) instead of warm-starting from the
previous step's fit. The fit's components are then relabelled to match the previous step's
(align): the transform is a sum over k, so labels do not change the output, but the running
averages (eval mode) average component k over steps and need k to mean the same mode.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

# A module import, and no use of its names at import time: mixture_norm imports this file at its
# top, so either may be imported first.
from models import mixture_norm as _mn

if TYPE_CHECKING:
    from models.mixture_norm import GMM


def _b(t: Tensor) -> Tensor:
    """(K, C) -> (K, 1, C, 1): broadcasts against (K, B, C, L)."""
    return t[:, None, :, None]


def snapshot(gmm: GMM) -> GMM:
    """The GMM state read from the buffers, as values torch.compile's partitioner will save for
    backward instead of re-reading the buffers there. For use inside a compiled training step.

    The step overwrites these buffers (copy_) at its end. The partitioner may recompute a cheap
    function of them (the shift, a posterior) in the backward instead of saving it, and it then
    reads the overwritten state: silently wrong gradients (seen with aot_eager and inductor,
    torch 2.14; pytorch/pytorch PR 197039 is the upstream fix). A matmul is never recomputed,
    so the state goes through one: identity @ packed state, in float64 so that no reduced-
    precision matmul mode (TF32) can round it. Exact: every output is 1 * x + 0 * (others).
    """
    per_channel = gmm.lam.dim() == 2
    lam = gmm.lam if per_channel else gmm.lam[:, None]
    packed = torch.cat([lam, gmm.mu, gmm.sigma2], 1)
    eye = torch.eye(packed.shape[0], dtype=torch.float64, device=packed.device)
    c = gmm.mu.shape[1]
    lam, mu, sigma2 = (eye @ packed.double()).to(packed.dtype).split([lam.shape[1], c, c], 1)
    return _mn.GMM(lam if per_channel else lam[:, 0], mu, sigma2)


def mixture_mean(gmm: GMM) -> Tensor:
    """sum_k lambda_k mu_k (C,), for a joint (lam (K,)) or a per-channel (lam (K, C)) mixture."""
    return gmm.lam @ gmm.mu if gmm.lam.dim() == 1 else (gmm.lam * gmm.mu).sum(0)


# ----------------------------------------------------------------------------------------
# Per-channel EM. X is (B, C, L) as in mixture_norm; `shift` given: X raw and the GMM in
# centered coordinates (mu - shift); no shift: both centered.
#
# Layout: per-(k, c) tensors of samples are (K, B, C, L), component-major, each [k] slab laid
# out like X (_slabs). Then every elementwise op with X runs over matching memory, and the
# softmax over K reads K contiguous slabs. (torch's CPU softmax copies a non-contiguous input
# first; with K as dim 1 every step was several times slower.)
# ----------------------------------------------------------------------------------------


def _eager_buffers(*ts: Tensor) -> bool:
    """Whether to write into preallocated buffers (out=, in place): not under autograd, whose
    graph needs the values, nor under torch.compile, which plans memory itself and refuses
    non-contiguous out= tensors."""
    return not torch.compiler.is_compiling() and not (
        torch.is_grad_enabled() and any(t.requires_grad for t in ts))


def _slabs(X: Tensor, k: int) -> Tensor:
    """An uninitialized (k, B, C, L) tensor whose [k] slabs have X's memory layout."""
    one = torch.empty_like(X)  # X's layout if X is dense, else contiguous; nothing is written
    return torch.empty_strided((k, *X.shape), (one.numel(), *one.stride()), dtype=X.dtype, device=X.device)


def _softmax_k(logj: Tensor) -> Tensor:
    """Softmax over K (dim 0), on the memory-order view when that is contiguous (no copy)."""
    if not logj.is_contiguous() and logj.transpose(2, 3).is_contiguous():
        return torch.softmax(logj.transpose(2, 3), 0).transpose(2, 3)
    return torch.softmax(logj, 0)


def posteriors(logj: Tensor) -> Tensor:
    """tau (K, B, C, L) = softmax over K, values below _TAU_MIN zeroed (no denormals; see there)."""
    tau = _softmax_k(logj)
    if not _eager_buffers(tau):
        return F.threshold(tau, _mn._TAU_MIN, 0.0)
    return F.threshold_(tau, _mn._TAU_MIN, 0.0)


def _log_norm(gmm: GMM) -> Tensor:
    """log(lambda_kc / sqrt(2 pi sigma2_kc)), (K, C)."""
    return gmm.lam.clamp_min(_mn._LAMBDA_LOG_FLOOR).log() - 0.5 * (gmm.sigma2.log() + _mn._LOG_2PI)


def log_joint(X: Tensor, gmm: GMM, shift: Optional[Tensor] = None) -> Tensor:
    """log(lambda_kc N(x_ic | mu_kc, sigma2_kc)), (K, B, C, L). In 1-D the difference x - mu is
    cheap and exact, so unlike the joint code no expanded quadratic form is needed."""
    mu = gmm.mu if shift is None else gmm.mu + shift
    const, rs = _b(_log_norm(gmm)), _b(gmm.sigma2.rsqrt())
    if not _eager_buffers(X):
        z = (X - _b(mu)) * rs
        return torch.addcmul(const, z, z, value=-0.5)
    z = torch.sub(X, _b(mu), out=_slabs(X, mu.shape[0])).mul_(rs)
    return torch.addcmul(const, z, z, value=-0.5, out=z)


def _sums(tau: Tensor, Y: Tensor, tmp: Optional[Tensor] = None) -> Tensor:
    """sum_i tau_ikc y_ic, (K, C), for Y (B, C, L). Without autograd, slab by slab through one
    X-sized buffer: on CPU a fresh K-times-activation-sized product costs page faults on top
    of its pass. (einsum would reorder tau for a batched GEMM: far slower.)"""
    if not _eager_buffers(tau, Y):
        return (tau * Y).sum((1, 3))
    tmp = torch.empty_like(Y) if tmp is None else tmp
    return torch.stack([torch.mul(tau[k], Y, out=tmp).sum((0, 2)) for k in range(tau.shape[0])])


def _moments(tau: Tensor, X: Tensor, X2c: Tensor, shift: Optional[Tensor] = None):
    """sum_i tau_ikc, sum_i tau_ikc xc_ic, sum_i tau_ikc xc_ic^2: three (K, C)."""
    n = tau.sum((1, 3))
    s1 = _sums(tau, X)
    if shift is not None:
        s1 = s1 - n * shift
    return n, s1, _sums(tau, X2c)


def _reduce(reduce, *stats: Tensor) -> tuple[Tensor, ...]:
    """Sums (K, C) statistics over ranks in one collective (identity when not distributed)."""
    if reduce is _mn._identity:
        return stats
    return tuple(reduce(torch.cat(stats, 1)).chunk(len(stats), 1))


def _m_step(n: Tensor, s1: Tensor, s2: Tensor, prev: GMM, var_floor: float, eps: float) -> GMM:
    """The joint M-step (mixture_norm._m_step) channel by channel: same floors, same guards."""
    total = n.sum(0)
    lam = n / total
    mean_all = s1.sum(0) / total
    var_all = (s2.sum(0) / total - mean_all * mean_all).clamp_min(0.0)
    floor = var_floor * (var_all + eps)
    has_mass = n >= 1.0
    n_safe = n.clamp_min(1.0)
    mu = s1 / n_safe
    sigma2 = s2 / n_safe - mu * mu
    mu = torch.where(has_mass, mu, prev.mu)
    sigma2 = torch.maximum(torch.where(has_mass, sigma2, prev.sigma2), floor)
    return _mn.GMM(lam, mu, sigma2)


def em_step(X, X2c, gmm: GMM, var_floor: float, eps: float, reduce, shift=None, want_maha: bool = False):
    """One EM iteration; with want_maha also (x_ic - mu_kc)^2 / sigma2_kc, (K, B, C, L)."""
    logj = log_joint(X, gmm, shift)
    maha = (logj - _b(_log_norm(gmm))).mul_(-2.0) if want_maha else None
    n, s1, s2 = _reduce(reduce, *_moments(posteriors(logj), X, X2c, shift))
    return _m_step(n, s1, s2, gmm, var_floor, eps), maha


def _draw(w: Tensor) -> Tensor:
    """One index per row of w (G, S) >= 0, drawn with probability proportional to w, as (G, 1).

    Inverse CDF: one uniform per row and a binary search. (torch.multinomial draws one
    exponential per entry instead: 30x slower over all channels' samples on CPU.)
    """
    cdf = w.clamp_min(_mn._TINY).cumsum(1)  # the clamp: an all-zero row draws uniformly
    u = torch.rand(w.shape[0], 1, dtype=w.dtype, device=w.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).clamp_max_(w.shape[1] - 1)


def _kmeans_pp(xs: Tensor, k: int, var: Tensor) -> Tensor:
    """(k, C) seeds: k-means++ in every channel at once, among that channel's values in xs (S, C).

    Standardized by var so that a channel of tiny values does not fall under the _TINY clamp.
    Sequential in k (k - 1 draws, each vectorized over channels).
    """
    z = (xs * var.clamp_min(_mn._TINY).rsqrt()).t().contiguous()  # (C, S)
    i = torch.randint(z.shape[1], (z.shape[0], 1), device=xs.device)
    idx = [i]
    d2 = (z - z.gather(1, i)).square()
    for _ in range(k - 1):
        i = _draw(d2)
        idx.append(i)
        d2 = torch.minimum(d2, (z - z.gather(1, i)).square())
    return xs.t().gather(1, torch.cat(idx, 1)).t()


def init_gmm(Xc: Tensor, X2c: Tensor, k: int, iters: int, var_floor: float, eps: float,
             reduce=None, first_rank_only=None) -> GMM:
    """Per-channel twin of mixture_norm._init_gmm: k-means++ seeds, every variance the channel's,
    uniform weights, then `iters` EM iterations. Xc (B, C, L) centered."""
    reduce = reduce or _mn._identity
    first_rank_only = first_rank_only or _mn._identity
    c = Xc.shape[1]
    count = Xc.new_full((1,), float(Xc.shape[0] * Xc.shape[2]))
    stats = reduce(torch.cat([count, Xc.sum((0, 2)), X2c.sum((0, 2))]))
    mean = stats[1 : c + 1] / stats[0]
    var = (stats[c + 1 :] / stats[0] - mean * mean).clamp_min(0.0)
    seeds = _kmeans_pp(Xc.transpose(1, 2).reshape(-1, c), k, var + eps)
    gmm = _mn.GMM(Xc.new_full((k, c), 1.0 / k), first_rank_only(seeds),
                  torch.maximum(var, var_floor * (var + eps)).expand(k, c).clone())
    for _ in range(iters):
        gmm, _ = em_step(Xc, X2c, gmm, var_floor, eps, reduce)
    return gmm


def reseed(gmm: GMM, dead_count: Tensor, maha: Tensor, Xs: Tensor, cand_shift: Optional[Tensor],
           lambda_min: float, dead_steps: int, first_rank_only) -> tuple[GMM, Tensor]:
    """Dead components, channel by channel: the joint rule of mixture_norm._update_state per (k, c).

    gmm in input units; maha (K, B, C, L) the last E-step's distances (overwritten here) of EM's
    samples Xs (B, C, L), which are raw if cand_shift is None, else x - cand_shift. Branch-free:
    every step draws one k-means++ candidate per (k, c); only (k, c) dead for dead_steps steps
    take it.
    lambda_min * K < 1 leaves every channel a live component to measure distances from.
    """
    K, C = gmm.lam.shape
    alive = gmm.lam >= lambda_min
    dead = (dead_count + 1).masked_fill_(alive, 0)
    again = dead >= dead_steps
    d2 = maha.masked_fill_(~_b(alive), float("inf")).amin(0)  # (B, C, L): to the nearest live one
    d2 = d2.transpose(0, 1).reshape(C, -1)
    idx = torch.multinomial(d2.clamp_min_(_mn._TINY), K, replacement=True)  # (C, K)
    cand = first_rank_only(Xs.transpose(0, 1).reshape(C, -1).gather(1, idx).t())
    if cand_shift is not None:
        cand = cand + cand_shift
    w_alive = gmm.lam * alive
    width = (w_alive * gmm.sigma2).sum(0) / w_alive.sum(0).clamp_min(_mn._TINY)
    lam = torch.where(again, 1.0 / K, gmm.lam)
    new = _mn.GMM(lam / lam.sum(0), torch.where(again, cand, gmm.mu),
                  torch.where(again, width.expand(K, C), gmm.sigma2))
    return new, dead.masked_fill_(again, 0)


# ----------------------------------------------------------------------------------------
# Per-channel transform
# ----------------------------------------------------------------------------------------


def coefficients(scale: Tensor, r: Tensor, center: Tensor, weight, bias) -> tuple[Tensor, Tensor]:
    """P = scale r gamma, Q = beta - P center, all (K, C) (mixture_norm._coefficients per channel)."""
    P = scale * r
    if weight is not None:
        P = P * weight
    Q = -P * center
    if bias is not None:
        Q = Q + bias
    return P, Q


def _weighted(tau: Tensor, W: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """sum_k tau_ikc W_kc, (B, C, L): a loop over the K slabs (K is small), each an X-sized
    multiply-add, which beats building and reducing a (K, B, C, L) product."""
    w = W[:, :, None]
    acc = torch.mul(tau[0], w[0], out=out) if out is not None else tau[0] * w[0]
    for k in range(1, tau.shape[0]):
        acc = acc.addcmul_(tau[k], w[k]) if out is not None else torch.addcmul(acc, tau[k], w[k])
    return acc


def mix_apply(X: Tensor, tau: Tensor, P: Tensor, Q: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """y_ic = x_ic sum_k tau_ikc P_kc + sum_k tau_ikc Q_kc for X (B, C, L), tau (K, B, C, L).
    With `out` (no autograd), y is written there (unless compiling: see _eager_buffers)."""
    if out is None or torch.compiler.is_compiling():
        return torch.addcmul(_weighted(tau, Q), X, _weighted(tau, P))
    _weighted(tau, P, out).mul_(X)
    for k in range(tau.shape[0]):
        out.addcmul_(tau[k], Q[k, :, None])
    return out


def normalize_math(X, X2c, shift, tau, scale, weight, bias, eps: float, reduce, out: Optional[Tensor] = None):
    """The per-channel training transform (autograd-differentiable); as mixture_norm._normalize_math."""
    n_true, s1, s2 = _reduce(reduce, *_moments(tau, X, X2c, shift))
    n = n_true.clamp_min(1.0)  # the spec's guard against 0/0 for a component empty in a channel
    E = s1 / n
    V = ((s2 - 2.0 * E * s1) / n + (n_true / n) * E * E).clamp_min(0.0)
    r = torch.rsqrt(V + eps)
    P, Q = coefficients(scale, r, E + shift, weight, bias)
    return mix_apply(X, tau, P, Q, out), E, V, n_true, n, r


class PerChannelFunction(torch.autograd.Function):
    """Per-channel training transform with constant posteriors; mixture_norm._MixtureNormFunction's
    twin (same arguments, same output-buffer reuse) with tau (K, B, C, L).

    Backward: the joint derivation holds per (k, c) with tau_ikc in place of tau_ik:
        dx_ic = sum_k tau_ikc [P_kc dy_ic + beta_kc x_ic + alpha_kc]
    with the same beta, alpha (from the tau-weighted sums of dy and dy * x per (k, c)).
    """

    @staticmethod
    def forward(ctx, X, X2c, out, shift, tau, scale, weight, bias, eps, reduce):
        sm = _mn._sample_major(X)
        if out is not None:
            ctx.mark_dirty(out)
        y, E, V, n_true, n, r = normalize_math(_mn._as_ncl(X, sm), X2c, shift, tau, scale, weight, bias,
                                               eps, reduce, out=None if out is None else X2c)
        if out is None:  # under torch.compile, which manages memory itself
            out = _mn._from_ncl(y, X.shape, sm)
        ctx.save_for_backward(X, shift, tau, scale, weight, E, n_true, n, r)
        ctx.reduce, ctx.sample_major = reduce, sm
        ctx.mark_non_differentiable(E, V, n_true)
        return out, E, V, n_true

    @staticmethod
    def backward(ctx, dy_in, _dE, _dV, _dn):
        X_in, shift, tau, scale, weight, E, n_true, n, r = ctx.saved_tensors
        sm = ctx.sample_major
        X, dy = _mn._as_ncl(X_in, sm), _mn._as_ncl(dy_in, sm)
        tmp = dy * X
        gy = _sums(tau, dy)
        hy = _sums(tau, tmp) - shift * gy
        d_x = d_w = d_b = None
        if ctx.needs_input_grad[6]:
            d_w = (scale * r * (hy - E * gy)).sum(0)
        if ctx.needs_input_grad[7]:
            d_b = gy.sum(0)
        if ctx.needs_input_grad[0]:
            gy, hy = _reduce(ctx.reduce, gy, hy)  # global sums, local parameter grads (as SyncBN)
            sg = scale if weight is None else scale * weight
            P, G, H = sg * r, sg * gy, sg * hy
            beta = -(r ** 3) * (H - E * G) / n
            alpha = -r * G / n - beta * (2.0 - n_true / n) * E - beta * shift
            if not _eager_buffers():
                dx = _weighted(tau, P) * dy + _weighted(tau, beta) * X + _weighted(tau, alpha)
                return _mn._from_ncl(dx, X_in.shape, sm), None, None, None, None, None, d_w, d_b, None, None
            d_x = torch.empty_like(X_in)
            dx = _weighted(tau, P, out=_mn._as_ncl(d_x, sm)).mul_(dy)
            dx.addcmul_(_weighted(tau, beta, out=tmp), X)
            for k in range(tau.shape[0]):
                dx.addcmul_(tau[k], alpha[k, :, None])
        return d_x, None, None, None, None, None, d_w, d_b, None, None


def tau_like_input(tau: Tensor, shape: torch.Size, sample_major: bool) -> Tensor:
    """Per-channel tau (K, B, C, L) as (N, K, C, *spatial) for an input of `shape` (N, C, *spatial)."""
    K = tau.shape[0]
    if sample_major:  # (K, 1, C, M), M running over (n, *spatial)
        return tau[:, 0].reshape(K, shape[1], shape[0], *shape[2:]).movedim(2, 0)
    return tau.movedim(0, 1).reshape(shape[0], K, *shape[1:])


# ----------------------------------------------------------------------------------------
# Fresh fits: component labels
# ----------------------------------------------------------------------------------------


def align(new: GMM, prev: GMM) -> GMM:
    """new with its components relabelled to match prev's, per channel for per-channel mixtures.

    Cost of labelling new component j as k: sum over dimensions of (mu_j - mu'_k)^2 /
    (sigma2_j + sigma2'_k), a symmetric standardized distance. Greedy assignment (the cheapest
    remaining pair first, K rounds, vectorized over channels): exact whenever the components
    are well separated; it can only err between similar components, where the label matters
    little. Branch-free, no host sync.
    """
    K = new.lam.shape[0]
    if K == 1:
        return new
    per_channel = new.lam.dim() == 2
    # Groups g of K components with D dimensions: per channel (C, K, 1); joint (1, K, C).
    grp = (lambda t: t.t()[..., None]) if per_channel else (lambda t: t[None])
    m1, v1, m0, v0 = grp(new.mu), grp(new.sigma2), grp(prev.mu), grp(prev.sigma2)
    cost = ((m1[:, :, None] - m0[:, None]).square() / (v1[:, :, None] + v0[:, None])).sum(-1)  # (G, K, K)
    G = cost.shape[0]
    perm = torch.zeros(G, K, dtype=torch.long, device=cost.device)  # perm[g, k]: the new component labelled k
    inf = torch.tensor(float("inf"), dtype=cost.dtype, device=cost.device)
    for _ in range(K):
        flat = cost.flatten(1).argmin(1, keepdim=True)
        j, k = flat // K, flat % K
        perm.scatter_(1, k, j)
        cost = cost.scatter(1, j[:, :, None].expand(G, 1, K), inf.expand(G, 1, K))
        cost = cost.scatter(2, k[:, :, None].expand(G, K, 1), inf.expand(G, K, 1))
    if per_channel:
        idx = perm.t()
        return _mn.GMM(*(t.gather(0, idx) for t in new))
    return _mn.GMM(*(t[perm[0]] for t in new))
