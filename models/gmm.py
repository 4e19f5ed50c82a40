"""The Gaussian mixture of Mixture Normalization (Kalayeh & Shah, arXiv:1806.02892) and its EM.

Implements the EM of docs/mixture-normalization.md (shared/docs); models/mixture_transform.py holds
the transform, models/mixture_norm.py the layer. Notation, spec -> code, for a layer with C channels
and K components:

    x_i                 one sample = the C-vector at one batch item and spatial position.
                        Samples are handled as X (B, C, L) without copying the input:
                        (N, C, H*W) for NCHW input, (1, C, N*H*W) (a transposed view of the
                        (M, C) sample matrix) for channels-last or (N, C) input. Every sum
                        over samples is then a GEMM over L.
    lambda, mu, sigma2  the GMM: GMM.lam (K,), GMM.mu (K, C), GMM.sigma2 (K, C)
    tau_ik              posteriors, tensor (B, K, L); they sum to 1 over k
    n_k                 sum_i tau_ik

This file is the joint mixture (one C-dimensional diagonal GMM per layer, so a sample has the same
posteriors in every channel), and what both kinds of mixture share: the GMM type, EM's subsample,
dead components, the relabelling of fresh fits (align). models/gmm_per_channel.py is the mixture of
posteriors="per_channel".
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

LOG_2PI = math.log(2.0 * math.pi)
# Keeps k-means++ sampling weights a valid distribution when every distance is 0
# (constant data): the draw then falls back to uniform.
TINY = 1e-20
# log(0) would be -inf for a component that lost all its mass; -69 is "never" in practice.
LAMBDA_LOG_FLOOR = 1e-30
# Posteriors below this are set to 0. Nearly hard posteriors otherwise underflow into
# float32 denormals, which make every matmul that touches tau several times slower on CPU
# (measured: a whole DCGAN step 20% slower). Their total weight is negligible.
TAU_MIN = 1e-20

Reduce = Callable[[Tensor], Tensor]


def identity(t: Tensor) -> Tensor:
    """The Reduce of a layer that is not synchronized over processes: its own sums."""
    return t


class GMM(NamedTuple):
    """Diagonal Gaussian mixture: lam (K,), mu (K, C), sigma2 (K, C)."""

    lam: Tensor
    mu: Tensor
    sigma2: Tensor

    def shifted(self, shift: Tensor) -> "GMM":
        return GMM(self.lam, self.mu - shift, self.sigma2)


def mixture_mean(gmm: GMM) -> Tensor:
    """sum_k lambda_k mu_k (C,), for a joint (lam (K,)) or a per-channel (lam (K, C)) mixture."""
    return gmm.lam @ gmm.mu if gmm.lam.dim() == 1 else (gmm.lam * gmm.mu).sum(0)


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
    return GMM(lam if per_channel else lam[:, 0], mu, sigma2)


# ----------------------------------------------------------------------------------------
# EM building blocks. X is (B, C, L) ("channel-major"); an (M, C) matrix of samples is
# used as x.t().unsqueeze(0), i.e. B = 1, L = M.
#
# Centering: squares are always taken of x - shift (X2c), since x^2 would cancel
# catastrophically against the mean when |mean| >> std. Linear terms may use the raw X
# when `shift` is passed: there the shift is an exact, cheap correction on (K, C)
# statistics, and the batch needs no centered copy.
# ----------------------------------------------------------------------------------------


def log_joint(X: Tensor, X2c: Tensor, gmm: GMM, shift: Optional[Tensor] = None) -> Tensor:
    """log(lambda_k N(x_i | mu_k, sigma2_k)), (B, K, L), for the samples of X (B, C, L).

    gmm is in centered coordinates (mu - shift). The quadratic form is expanded,
    sum_c xc^2/s - 2 xc mu/s + mu^2/s, so the batch is touched by two (K, C) @ (C, L)
    GEMMs instead of a (B, K, C, L) difference tensor.
    """
    inv = gmm.sigma2.reciprocal()
    lin = gmm.mu * inv
    # sum_c mu^2/s, written for raw X: mu.lin - 2 lin.(x - shift) = lin.(mu + 2 shift) - 2 lin.x
    center = gmm.mu if shift is None else gmm.mu + 2.0 * shift
    quad = torch.add((lin * center).sum(1), gmm.sigma2.log().sum(1)).add_(gmm.mu.shape[1] * LOG_2PI)
    const = torch.add(gmm.lam.clamp_min(LAMBDA_LOG_FLOOR).log(), quad, alpha=-0.5)
    logj = torch.matmul(-0.5 * inv, X2c)
    logj = logj.baddbmm_(lin.expand(X.shape[0], *lin.shape), X)
    return logj.add_(const[:, None])


def _mahalanobis(logj: Tensor, gmm: GMM) -> Tensor:
    """sum_c (x_c - mu_kc)^2 / sigma2_kc recovered from log_joint's output."""
    log_norm = torch.add(gmm.lam.clamp_min(LAMBDA_LOG_FLOOR).log(),
                         gmm.sigma2.log().sum(1).add_(gmm.mu.shape[1] * LOG_2PI), alpha=-0.5)
    return (logj - log_norm[:, None]).mul_(-2.0)


def posteriors(logj: Tensor) -> Tensor:
    """tau = softmax over components (log-sum-exp), with denormal-range values zeroed."""
    tau = torch.softmax(logj, dim=1)
    if tau.requires_grad:
        return torch.where(tau < TAU_MIN, torch.zeros_like(tau), tau)
    return tau.masked_fill_(tau < TAU_MIN, 0.0)


def moments(tau: Tensor, X: Tensor, X2c: Tensor, shift: Optional[Tensor] = None):
    """sum_i tau_ik, sum_i tau_ik xc_i, sum_i tau_ik xc_i^2: (K,), (K, C), (K, C)."""
    n = tau.sum((0, 2))
    s1 = torch.matmul(tau, X.transpose(1, 2)).sum(0)
    if shift is not None:
        s1 = s1 - n[:, None] * shift
    s2 = torch.matmul(tau, X2c.transpose(1, 2)).sum(0)
    return n, s1, s2


def reduce_moments(n: Tensor, s1: Tensor, s2: Tensor, reduce: Reduce):
    """Sums the moments over ranks with a single collective (identity when not distributed)."""
    if reduce is identity:
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


def em_step(X, X2c, gmm: GMM, var_floor: float, eps: float, reduce: Reduce, shift=None,
            want_maha: bool = False):
    """One EM iteration; with want_maha also the E-step's Mahalanobis distances (reseeding)."""
    logj = log_joint(X, X2c, gmm, shift)
    maha = _mahalanobis(logj, gmm) if want_maha else None
    n, s1, s2 = reduce_moments(*moments(posteriors(logj), X, X2c, shift), reduce)
    return _m_step(n, s1, s2, gmm, var_floor, eps), maha


def _kmeans_pp(xs: Tensor, k: int, var: Tensor) -> Tensor:
    """k-means++ seeds (k, C) among the rows of xs (S, C), distances standardized by var.

    k-means++ is sequential by definition (each seed depends on the previous ones); the
    loop runs k - 1 times and only when the GMM is first initialized.
    """
    z = xs * var.clamp_min(TINY).rsqrt()
    idx = [torch.randint(xs.shape[0], (1,), device=xs.device)]
    d2 = (z - z[idx[0]]).square().sum(1)
    for _ in range(k - 1):
        i = torch.multinomial(d2.clamp_min(TINY), 1)
        idx.append(i)
        d2 = torch.minimum(d2, (z - z[i]).square().sum(1))
    return xs[torch.cat(idx)]


def channel_variance(Xc: Tensor, X2c: Tensor, reduce: Reduce = identity) -> Tensor:
    """Each channel's variance over the (centered) samples of Xc (B, C, L), X2c = Xc², summed over ranks."""
    c = Xc.shape[1]
    count = Xc.new_full((1,), float(Xc.shape[0] * Xc.shape[2]))
    stats = reduce(torch.cat([count, Xc.sum((0, 2)), X2c.sum((0, 2))]))
    mean = stats[1 : c + 1] / stats[0]
    return (stats[c + 1 :] / stats[0] - mean * mean).clamp_min(0.0)


def init_gmm(
    Xc: Tensor,
    X2c: Tensor,
    k: int,
    iters: int,
    var_floor: float,
    eps: float,
    reduce: Reduce = identity,
    first_rank_only: Reduce = identity,
) -> GMM:
    """k-means++ seeding on the (centered) samples of Xc (B, C, L), then `iters` EM iterations."""
    c = Xc.shape[1]
    var = channel_variance(Xc, X2c, reduce)
    seeds = _kmeans_pp(Xc.transpose(1, 2).reshape(-1, c), k, var + eps)
    gmm = GMM(
        Xc.new_full((k,), 1.0 / k),
        first_rank_only(seeds),
        torch.maximum(var, var_floor * (var + eps)).expand(k, c).clone(),
    )
    for _ in range(iters):
        gmm, _ = em_step(Xc, X2c, gmm, var_floor, eps, reduce)
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
    gmm = init_gmm(Xc, Xc * Xc, num_components, iters, var_floor, eps)
    return GMM(gmm.lam, gmm.mu + shift, gmm.sigma2)


@torch.no_grad()
def gmm_posteriors(x: Tensor, gmm: GMM) -> Tensor:
    """Posteriors tau (M, K) of the rows of x (M, C) under gmm (log-sum-exp)."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    gmm = GMM(*(t.to(device=x.device, dtype=dtype) for t in gmm))
    shift = gmm.lam @ gmm.mu
    Xc = (x.to(dtype) - shift).t().unsqueeze(0)
    return posteriors(log_joint(Xc, Xc * Xc, gmm.shifted(shift)))[0].t()


# ----------------------------------------------------------------------------------------
# Around EM: the samples it runs on, dead components, and the labels of fresh fits
# ----------------------------------------------------------------------------------------


def subsample(X: Tensor, X2c: Tensor, shift: Tensor, budget: int):
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


def reseed(gmm: GMM, dead_count: Tensor, maha: Tensor, Xs: Tensor, cand_shift: Optional[Tensor],
           lambda_min: float, dead_steps: int, first_rank_only: Reduce) -> tuple[GMM, Tensor]:
    """Dead components, branch-free (no device->host sync): every step draws one k-means++
    candidate per component, with probability proportional to the distance to the nearest live
    component; only components dead for dead_steps consecutive steps take theirs.

    gmm in input units; maha (B, K, L) the last E-step's distances of EM's samples Xs (B, C, L),
    which are raw if cand_shift is None, else x - cand_shift. Returns the new GMM and dead_count.
    """
    K = gmm.lam.shape[0]
    alive = gmm.lam >= lambda_min
    dead = (dead_count + 1).masked_fill_(alive, 0)
    again = (dead >= dead_steps)[:, None]
    d2 = maha.masked_fill(~alive[None, :, None], float("inf")).amin(1).flatten()
    idx = torch.multinomial(d2.clamp_min_(TINY), K, replacement=True)
    L = Xs.shape[2]
    cand = first_rank_only(Xs[idx // L, :, idx % L])
    if cand_shift is not None:
        cand = cand + cand_shift
    # The live components' typical width: with the (much wider) variance of all the
    # data, a new component loses every sample to the narrow ones in high dimension.
    w_alive = (gmm.lam * alive)[:, None]
    width = (w_alive * gmm.sigma2).sum(0) / w_alive.sum().clamp_min(TINY)
    lam = torch.where(again[:, 0], 1.0 / K, gmm.lam)
    new = GMM(lam / lam.sum(), torch.where(again, cand, gmm.mu), torch.where(again, width, gmm.sigma2))
    return new, dead.masked_fill_(again[:, 0], 0)


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
        return GMM(*(t.gather(0, idx) for t in new))
    return GMM(*(t[perm[0]] for t in new))
