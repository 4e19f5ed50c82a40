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
is elementwise over (K, B, C, L) or a sum over samples, batched over components and channels. The
price is memory: tau is K activation-sized tensors (the joint tau is K/C of one), kept for backward.

EM runs on the features D (B, 1 + 2C, L) of models/gmm.py, whose xc and xc^2 blocks are each
channel's centered values and their squares; the GMMs are in the same centered coordinates.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from models.gmm import GMM, LAMBDA_LOG_FLOOR, TAU_MIN, TINY, channel_variance, identity, sample_rows


def bcast(t: Tensor) -> Tensor:
    """(K, C) -> (K, 1, C, 1): broadcasts against (K, B, C, L)."""
    return t[:, None, :, None]


def _blocks(D: Tensor) -> Tensor:
    """D's [xc, xc^2] blocks as (B, 2, C, L) (a view)."""
    B, F_, L = D.shape
    return D[:, 1:].unflatten(1, (2, (F_ - 1) // 2))


def in_place(*ts: Tensor) -> bool:
    """Whether to overwrite fresh (K, B, C, L) temporaries: not under autograd, whose graph may need
    them, nor under torch.compile, which plans memory itself. On CPU every fresh tensor this size
    costs about a pass over it (page faults)."""
    return not torch.compiler.is_compiling() and not (torch.is_grad_enabled() and any(t.requires_grad for t in ts))


def _slabs(D: Tensor, k: int) -> Tensor:
    """An uninitialized (k, B, C, L) tensor whose [k] slabs are laid out like the samples of D (rows of
    an (L, C) matrix when D is sample-major): elementwise ops with D's blocks then run over matching
    memory, and the softmax over K reads K contiguous slabs."""
    B, F_, L = D.shape
    if B == 1 and D.stride(1) == 1:
        return D.new_empty(k, L, (F_ - 1) // 2).transpose(1, 2).unsqueeze(1)
    return D.new_empty(k, B, (F_ - 1) // 2, L)


def _softmax_k(logj: Tensor) -> Tensor:
    """Softmax over K (dim 0), on the memory-order view when that is contiguous (no copy).
    (torch's CPU softmax copies a non-contiguous input first.)"""
    if not logj.is_contiguous() and logj.transpose(2, 3).is_contiguous():
        return torch.softmax(logj.transpose(2, 3), 0).transpose(2, 3)
    return torch.softmax(logj, 0)


def posteriors(logj: Tensor) -> Tensor:
    """tau (K, B, C, L) = softmax over K, values at or below TAU_MIN zeroed (no denormals; see models/gmm.py)."""
    tau = _softmax_k(logj)
    return F.threshold_(tau, TAU_MIN, 0.0) if in_place(tau) else F.threshold(tau, TAU_MIN, 0.0)


def log_norm(gmm: GMM) -> Tensor:
    """log(lambda_kc / sqrt(sigma2_kc)), (K, C): the density's factor, with the 1/sqrt(2 pi) that every
    component shares (and that changes no posterior) left out."""
    return torch.add(gmm.lam.clamp_min(LAMBDA_LOG_FLOOR).log(), gmm.sigma2.log(), alpha=-0.5)


def log_joint(D: Tensor, gmm: GMM, norm: Tensor | None = None) -> Tensor:
    """log(lambda_kc N(x_ic | mu_kc, sigma2_kc)) + log(2 pi) / 2, (K, B, C, L), for the samples of
    the features D (gmm centered like them). In 1-D the difference x - mu is cheap and exact, so
    unlike the joint code no expanded quadratic form is needed."""
    norm = log_norm(gmm) if norm is None else norm
    xc, rs = _blocks(D)[:, 0], bcast(gmm.sigma2.rsqrt())
    if not in_place(D):
        z = (xc - bcast(gmm.mu)) * rs
        return torch.addcmul(bcast(norm), z, z, value=-0.5)
    z = torch.sub(xc, bcast(gmm.mu), out=_slabs(D, gmm.mu.shape[0])).mul_(rs)
    return torch.addcmul(bcast(norm), z, z, value=-0.5, out=z)


def moments(tau: Tensor, D: Tensor) -> Tensor:
    """(K, 3C): [n_kc, sum_i tau_ikc xc_ic, sum_i tau_ikc xc_ic^2]. (One product of tau with both
    blocks at once, broadcast over the pair, runs several times slower on CPU than these two.)"""
    xc, xc2 = _blocks(D).unbind(1)
    buf = torch.empty_like(tau) if in_place(tau, D) else None  # both products in one buffer
    return torch.cat([tau.sum((1, 3)), torch.mul(tau, xc, out=buf).sum((1, 3)),
                      torch.mul(tau, xc2, out=buf).sum((1, 3))], 1)


def m_step(S: Tensor, prev: GMM, var_floor: float, eps: float) -> GMM:
    """The joint M-step (models/gmm.py) channel by channel, from S = [n | s1 | s2] (K, 3C): same
    floors, same guards."""
    K, C = prev.mu.shape
    n = S[:, :C]
    s12 = S[:, C:].view(K, 2, C)
    total = n.sum(0)
    lam = n / total
    all_m = s12.sum(0) / total
    floor = torch.addcmul(all_m[1], all_m[0], all_m[0], value=-1.0).clamp_min_(0.0).add_(eps).mul_(var_floor)
    mom = s12 / n[:, None]  # [mu | E_kc xc^2]; 0/0 where n < 1, which the where below drops
    mu = mom[:, 0]
    sigma2 = mom[:, 1].addcmul_(mu, mu, value=-1.0)
    has_mass = n >= 1.0
    mu = torch.where(has_mass, mu, prev.mu)
    sigma2 = torch.maximum(torch.where(has_mass, sigma2, prev.sigma2), floor)
    return GMM(lam, mu, sigma2)


def em_step(D: Tensor, gmm: GMM, var_floor: float, eps: float, reduce, want_dist: bool = False):
    """One EM iteration; with want_dist also (logj, log_norm) of its E-step (reseed's distances)."""
    norm = log_norm(gmm)
    logj = log_joint(D, gmm, norm)
    S = reduce(moments(posteriors(logj), D))
    return m_step(S, gmm, var_floor, eps), ((logj, norm) if want_dist else None)


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


def init_gmm(D: Tensor, k: int, iters: int, var_floor: float, eps: float, reduce=identity,
             first_rank_only=identity) -> GMM:
    """Per-channel twin of models/gmm.py's init_gmm: k-means++ seeds, every variance the channel's,
    uniform weights, then `iters` EM iterations, on the features D (centered coordinates)."""
    c = (D.shape[1] - 1) // 2
    var = channel_variance(D, reduce)
    seeds = _kmeans_pp(sample_rows(D), k, var + eps)
    gmm = GMM(D.new_full((k, c), 1.0 / k), first_rank_only(seeds),
              torch.maximum(var, var_floor * (var + eps)).expand(k, c).clone())
    for _ in range(iters):
        gmm, _ = em_step(D, gmm, var_floor, eps, reduce)
    return gmm


def reseed(gmm: GMM, dead_count: Tensor, dist, Ds: Tensor, lambda_min: float, dead_steps: int,
           first_rank_only) -> GMM:
    """Dead components, channel by channel: the joint rule (models/mixture_state.py) per (k, c).

    gmm in the centered coordinates of EM's features Ds; dist = (logj, log_norm) of the last E-step
    on them. Branch-free: every step draws one k-means++ candidate per (k, c); only (k, c) dead for
    dead_steps steps take it. lambda_min * K < 1 leaves every channel a live component to measure
    distances from. Counts steps dead in dead_count (in place).
    """
    K, C = gmm.lam.shape
    low = gmm.lam < lambda_min
    dead = torch.addcmul(low, dead_count, low, out=dead_count)  # (count + 1) * low, in the buffer
    again = dead >= dead_steps
    logj, norm = dist  # logj = norm - (x - mu)^2 / (2 sigma2): half the distance to the nearest live one
    d2 = (bcast(norm.masked_fill(low, float("inf"))) - logj).amin(0)  # (B, C, L)
    d2 = d2.transpose(0, 1).reshape(C, -1)
    idx = torch.multinomial(d2.clamp_min_(TINY), K, replacement=True)  # (C, K)
    xs = _blocks(Ds)[:, 0].transpose(0, 1).reshape(C, -1)
    cand = first_rank_only(xs.gather(1, idx).t())
    w_alive = gmm.lam.masked_fill(low, 0.0)  # > 0 in sum: some component is alive in every channel
    width = (w_alive * gmm.sigma2).sum(0) / w_alive.sum(0)
    lam = gmm.lam.masked_fill(again, 1.0 / K)
    new = GMM(lam / lam.sum(0), torch.where(again, cand, gmm.mu), torch.where(again, width, gmm.sigma2))
    dead.masked_fill_(again, 0)
    return new
