"""The per-channel Gaussian mixture of Mixture Normalization (posteriors="per_channel") and its EM:
one 1-D K-component mixture per channel, beside the joint mixture of models/gmm.py (one C-dimensional
mixture per layer). Notation as in models/gmm.py, with every per-component quantity now per
(component, channel):

    lambda, mu, sigma2   (K, C): channel c's mixture is sum_k lambda_kc N(mu_kc, sigma2_kc)
    tau_ikc              posteriors, tensor (K, B, C, L), from channel c's mixture alone;
                         sum_k tau_ikc = 1 for every sample i and channel c
    n_kc  = sum_i tau_ikc

The joint EM's guards carry over per (k, c): sigma2_kc floored relative to the channel's variance,
a component dead in one channel reseeded in that channel. K = 1 gives tau = 1, lambda = 1. Everything
is elementwise over (K, B, C, L) or a sum over samples: vectorized over channels. The price is memory:
tau is K activation-sized tensors (the joint tau is K/C of one), kept for backward.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from models.gmm import GMM, LAMBDA_LOG_FLOOR, LOG_2PI, TAU_MIN, TINY, channel_variance, identity


def _b(t: Tensor) -> Tensor:
    """(K, C) -> (K, 1, C, 1): broadcasts against (K, B, C, L)."""
    return t[:, None, :, None]


# ----------------------------------------------------------------------------------------
# Per-channel EM. X is (B, C, L) as in models/gmm.py; `shift` given: X raw and the GMM in
# centered coordinates (mu - shift); no shift: both centered.
#
# Layout: per-(k, c) tensors of samples are (K, B, C, L), component-major, each [k] slab laid
# out like X (_slabs). Then every elementwise op with X runs over matching memory, and the
# softmax over K reads K contiguous slabs. (torch's CPU softmax copies a non-contiguous input
# first; with K as dim 1 every step was several times slower.)
# ----------------------------------------------------------------------------------------


def eager_buffers(*ts: Tensor) -> bool:
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
    """tau (K, B, C, L) = softmax over K, values below TAU_MIN zeroed (no denormals; see there)."""
    tau = _softmax_k(logj)
    if not eager_buffers(tau):
        return F.threshold(tau, TAU_MIN, 0.0)
    return F.threshold_(tau, TAU_MIN, 0.0)


def _log_norm(gmm: GMM) -> Tensor:
    """log(lambda_kc / sqrt(2 pi sigma2_kc)), (K, C)."""
    return gmm.lam.clamp_min(LAMBDA_LOG_FLOOR).log() - 0.5 * (gmm.sigma2.log() + LOG_2PI)


def log_joint(X: Tensor, gmm: GMM, shift: Optional[Tensor] = None) -> Tensor:
    """log(lambda_kc N(x_ic | mu_kc, sigma2_kc)), (K, B, C, L). In 1-D the difference x - mu is
    cheap and exact, so unlike the joint code no expanded quadratic form is needed."""
    mu = gmm.mu if shift is None else gmm.mu + shift
    const, rs = _b(_log_norm(gmm)), _b(gmm.sigma2.rsqrt())
    if not eager_buffers(X):
        z = (X - _b(mu)) * rs
        return torch.addcmul(const, z, z, value=-0.5)
    z = torch.sub(X, _b(mu), out=_slabs(X, mu.shape[0])).mul_(rs)
    return torch.addcmul(const, z, z, value=-0.5, out=z)


def sums(tau: Tensor, Y: Tensor, tmp: Optional[Tensor] = None) -> Tensor:
    """sum_i tau_ikc y_ic, (K, C), for Y (B, C, L). Without autograd, slab by slab through one
    X-sized buffer: on CPU a fresh K-times-activation-sized product costs page faults on top
    of its pass. (einsum would reorder tau for a batched GEMM: far slower.)"""
    if not eager_buffers(tau, Y):
        return (tau * Y).sum((1, 3))
    tmp = torch.empty_like(Y) if tmp is None else tmp
    return torch.stack([torch.mul(tau[k], Y, out=tmp).sum((0, 2)) for k in range(tau.shape[0])])


def moments(tau: Tensor, X: Tensor, X2c: Tensor, shift: Optional[Tensor] = None):
    """sum_i tau_ikc, sum_i tau_ikc xc_ic, sum_i tau_ikc xc_ic^2: three (K, C)."""
    n = tau.sum((1, 3))
    s1 = sums(tau, X)
    if shift is not None:
        s1 = s1 - n * shift
    return n, s1, sums(tau, X2c)


def reduce_stats(reduce, *stats: Tensor) -> tuple[Tensor, ...]:
    """Sums (K, C) statistics over ranks in one collective (identity when not distributed)."""
    if reduce is identity:
        return stats
    return tuple(reduce(torch.cat(stats, 1)).chunk(len(stats), 1))


def _m_step(n: Tensor, s1: Tensor, s2: Tensor, prev: GMM, var_floor: float, eps: float) -> GMM:
    """The joint M-step (models/gmm.py) channel by channel: same floors, same guards."""
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
    return GMM(lam, mu, sigma2)


def em_step(X, X2c, gmm: GMM, var_floor: float, eps: float, reduce, shift=None, want_maha: bool = False):
    """One EM iteration; with want_maha also (x_ic - mu_kc)^2 / sigma2_kc, (K, B, C, L)."""
    logj = log_joint(X, gmm, shift)
    maha = (logj - _b(_log_norm(gmm))).mul_(-2.0) if want_maha else None
    n, s1, s2 = reduce_stats(reduce, *moments(posteriors(logj), X, X2c, shift))
    return _m_step(n, s1, s2, gmm, var_floor, eps), maha


def _draw(w: Tensor) -> Tensor:
    """One index per row of w (G, S) >= 0, drawn with probability proportional to w, as (G, 1).

    Inverse CDF: one uniform per row and a binary search. (torch.multinomial draws one
    exponential per entry instead: 30x slower over all channels' samples on CPU.)
    """
    cdf = w.clamp_min(TINY).cumsum(1)  # the clamp: an all-zero row draws uniformly
    u = torch.rand(w.shape[0], 1, dtype=w.dtype, device=w.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).clamp_max_(w.shape[1] - 1)


def _kmeans_pp(xs: Tensor, k: int, var: Tensor) -> Tensor:
    """(k, C) seeds: k-means++ in every channel at once, among that channel's values in xs (S, C).

    Standardized by var so that a channel of tiny values does not fall under the TINY clamp.
    Sequential in k (k - 1 draws, each vectorized over channels).
    """
    z = (xs * var.clamp_min(TINY).rsqrt()).t().contiguous()  # (C, S)
    i = torch.randint(z.shape[1], (z.shape[0], 1), device=xs.device)
    idx = [i]
    d2 = (z - z.gather(1, i)).square()
    for _ in range(k - 1):
        i = _draw(d2)
        idx.append(i)
        d2 = torch.minimum(d2, (z - z.gather(1, i)).square())
    return xs.t().gather(1, torch.cat(idx, 1)).t()


def init_gmm(Xc: Tensor, X2c: Tensor, k: int, iters: int, var_floor: float, eps: float,
             reduce=identity, first_rank_only=identity) -> GMM:
    """Per-channel twin of models/gmm.py's init_gmm: k-means++ seeds, every variance the channel's,
    uniform weights, then `iters` EM iterations. Xc (B, C, L) centered."""
    c = Xc.shape[1]
    var = channel_variance(Xc, X2c, reduce)
    seeds = _kmeans_pp(Xc.transpose(1, 2).reshape(-1, c), k, var + eps)
    gmm = GMM(Xc.new_full((k, c), 1.0 / k), first_rank_only(seeds),
              torch.maximum(var, var_floor * (var + eps)).expand(k, c).clone())
    for _ in range(iters):
        gmm, _ = em_step(Xc, X2c, gmm, var_floor, eps, reduce)
    return gmm


def reseed(gmm: GMM, dead_count: Tensor, maha: Tensor, Xs: Tensor, cand_shift: Optional[Tensor],
           lambda_min: float, dead_steps: int, first_rank_only) -> tuple[GMM, Tensor]:
    """Dead components, channel by channel: the joint rule (models/gmm.py's reseed) per (k, c).

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
    idx = torch.multinomial(d2.clamp_min_(TINY), K, replacement=True)  # (C, K)
    cand = first_rank_only(Xs.transpose(0, 1).reshape(C, -1).gather(1, idx).t())
    if cand_shift is not None:
        cand = cand + cand_shift
    w_alive = gmm.lam * alive
    width = (w_alive * gmm.sigma2).sum(0) / w_alive.sum(0).clamp_min(TINY)
    lam = torch.where(again, 1.0 / K, gmm.lam)
    new = GMM(lam / lam.sum(0), torch.where(again, cand, gmm.mu),
              torch.where(again, width.expand(K, C), gmm.sigma2))
    return new, dead.masked_fill_(again, 0)
