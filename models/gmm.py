"""The joint mixture (one C-dimensional diagonal GMM per layer, so a sample has the same
posteriors in every channel), and what both kinds of mixture share: the GMM type, the samples'
features, EM's subsample, the relabelling of fresh fits (align). models/gmm_per_channel.py is the
mixture of posteriors="per_channel"; dead components are models/mixture_state.py's.

Few kernels: on a GPU every tensor operation costs about one kernel launch whatever its size, and
MN's per-component quantities are tiny (K x C), so the cost of a step follows the number of
operations. Hence one feature matrix per batch (`features`), from which an E-step is one GEMM and
all sufficient statistics are another; the K components are always batched; the M-step works on the
packed statistics.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

# Keeps k-means++ sampling weights a valid distribution when every distance is 0
# (constant data): the draw then falls back to uniform.
TINY = 1e-20
# log(0) would be -inf for a component that lost all its mass; -69 is "never" in practice.
LAMBDA_LOG_FLOOR = 1e-30
# Posteriors at or below this are set to 0. Nearly hard posteriors otherwise underflow into
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
    if gmm.lam.dim() == 1 and not torch.compiler.is_compiling():
        return gmm.lam @ gmm.mu
    # Compiled: a reduction Inductor fuses with its neighbours, not a library GEMM call of its own.
    return ((gmm.lam[:, None] if gmm.lam.dim() == 1 else gmm.lam) * gmm.mu).sum(0)


def scale_of(lam: Tensor, lambda_min: float, prior_scaling: bool) -> Tensor:
    """The transform's gain s_k = 1 / sqrt(max(lambda_k, lambda_min)) (the floor is the spec's guard: a dying
    component must not blow up the output), or 1 without prior_scaling."""
    return lam.clamp_min(lambda_min).rsqrt() if prior_scaling else torch.ones_like(lam)


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
# Features. Samples are the columns of X (B, C, L) ("channel-major"); for a sample-major
# layout (an (M, C) matrix of rows) B = 1 and L = M. Each sample's features are
# [1, xc, xc^2] with xc = x - shift, stacked along dim 1: D (B, 1 + 2C, L). Then
# log(lambda_k N(x | mu_k, sigma2_k)) is W_k . d (one GEMM for all components), and
# tau^T D holds sum tau, sum tau xc, sum tau xc^2 at once (one GEMM for all statistics).
#
# Centering: squares are always taken of x - shift, since x^2 would cancel catastrophically
# against the mean when |mean| >> std. The GMMs of EM are in the same centered coordinates.
# ----------------------------------------------------------------------------------------


def is_rows(D: Tensor) -> bool:
    """Whether D (B, F, L) is a sample-major (L, F) matrix of rows (B = 1)."""
    return D.shape[0] == 1 and D.stride(1) == 1


def features(X: Tensor, shift: Tensor) -> Tensor:
    """D (B, 1 + 2C, L) = [1, x - shift, (x - shift)^2] for X (B, C, L), in X's layout (rows of
    (L, 1 + 2C) when X is sample-major). Differentiable when X needs it (then built by cat)."""
    B, C, L = X.shape
    xc = X - shift[:, None] if torch.is_grad_enabled() and X.requires_grad else None
    if xc is not None or torch.compiler.is_compiling():  # functional: autograd, compile
        xc = X - shift[:, None] if xc is None else xc
        return torch.cat([X.new_ones(B, 1, L), xc, xc * xc], 1)
    if B == 1 and X.stride(1) == 1:
        D = X.new_empty(L, 1 + 2 * C).t().unsqueeze(0)
    else:
        D = X.new_empty(B, 1 + 2 * C, L)
    D[:, 0].fill_(1.0)
    xc = torch.sub(X, shift[:, None], out=D[:, 1 : C + 1])
    torch.mul(xc, xc, out=D[:, C + 1 :])
    return D


def natural(gmm: GMM, with_log_norm: bool = False):
    """W (K, 1 + 2C) such that W @ d = log(lambda_k N(x | mu_k, sigma2_k)) + (C/2) log(2 pi) for a
    sample's features d (gmm in the features' centered coordinates). The constant, the same for
    every component, changes no posterior. with_log_norm: also log(lambda_k) - sum_c log(sigma2_kc)
    / 2 (the density's factor in front of the exponential, with the same constant left out)."""
    K, C = gmm.mu.shape
    # Eagerly each block is computed in its place in W (out=), which saves a cat; torch.compile
    # refuses out= views (and fuses the cat away).
    W = None if torch.compiler.is_compiling() else gmm.mu.new_empty(K, 1 + 2 * C)
    const_out, lin_out, quad_out = (None, None, None) if W is None else (W[:, 0], W[:, 1 : C + 1], W[:, C + 1 :])
    inv = torch.reciprocal(gmm.sigma2, out=quad_out)
    lin = torch.mul(gmm.mu, inv, out=lin_out)
    log_lam = gmm.lam.clamp_min(LAMBDA_LOG_FLOOR).log_()
    if with_log_norm:  # sum_c log sigma2_kc and sum_c mu_kc^2 / sigma2_kc in one reduction
        parts = None if W is None else gmm.mu.new_empty(K, 2, C)
        if parts is None:
            parts = torch.stack([gmm.sigma2.log(), lin * gmm.mu], 1)
        else:
            torch.log(gmm.sigma2, out=parts[:, 0])
            torch.mul(lin, gmm.mu, out=parts[:, 1])
        sums = parts.sum(2)
        log_norm = torch.add(log_lam, sums[:, 0], alpha=-0.5)
        const = torch.add(log_norm, sums[:, 1], alpha=-0.5, out=const_out)
    else:
        log_norm = None
        const = torch.add(log_lam, torch.addcmul(gmm.sigma2.log(), lin, gmm.mu).sum(1), alpha=-0.5, out=const_out)
    if W is None:
        W = torch.cat([const[:, None], lin, inv * -0.5], 1)
    else:
        quad_out.mul_(-0.5)  # 1 / sigma2 -> -1 / (2 sigma2)
    return (W, log_norm) if with_log_norm else W


def log_joint(D: Tensor, W: Tensor) -> Tensor:
    """W @ d for every sample: (B, K, L), laid out for a softmax over K on contiguous memory."""
    if is_rows(D):
        return torch.mm(D[0].t(), W.t()).t().unsqueeze(0)
    return torch.matmul(W, D)


def posteriors(logj: Tensor) -> Tensor:
    """tau = softmax over components (dim 1, log-sum-exp), with denormal-range values zeroed."""
    if logj.dim() == 3 and logj.stride(1) == 1:  # softmax over the contiguous dimension: no copy
        tau = torch.softmax(logj.transpose(1, 2), 2).transpose(1, 2)
    else:
        tau = torch.softmax(logj, 1)
    if torch.is_grad_enabled() and tau.requires_grad or torch.compiler.is_compiling():
        return torch.nn.functional.threshold(tau, TAU_MIN, 0.0)
    return torch.nn.functional.threshold_(tau, TAU_MIN, 0.0)


def moments(tau: Tensor, D: Tensor) -> Tensor:
    """S (K, 1 + 2C) = sum_i tau_ik d_i: [n_k, sum_i tau_ik xc_i, sum_i tau_ik xc_i^2]."""
    if is_rows(D):
        return torch.mm(tau[0], D[0].t())
    return torch.matmul(tau, D.transpose(1, 2)).sum(0)


def m_step(S: Tensor, prev: GMM, var_floor: float, eps: float) -> GMM:
    """M-step from (already all-reduced) statistics S (K, 1 + 2C) = [n | s1 | s2] (centered)."""
    C = prev.mu.shape[1]
    n = S[:, 0]
    tot = S.sum(0)  # [total mass | sum s1 | sum s2] over components
    lam = n / tot[0]
    all_m = tot[1:] / tot[0]
    # Relative floor keeps EM scale-invariant like BN; the eps term keeps it > 0 on
    # constant channels.
    floor = torch.addcmul(all_m[C:], all_m[:C], all_m[:C], value=-1.0).clamp_min_(0.0).add_(eps).mul_(var_floor)
    mom = S[:, 1:] / n[:, None]  # [mu | E_k xc^2]
    mu = mom[:, :C]
    sigma2 = mom[:, C:].addcmul_(mu, mu, value=-1.0)
    # With less than one sample's worth of mass the estimates are noise: keep the previous
    # ones; such a component is dead and gets reseeded if it stays so. (The noise can be 0/0
    # here; where never passes it on.)
    has_mass = (n >= 1.0)[:, None]
    mu = torch.where(has_mass, mu, prev.mu)
    sigma2 = torch.maximum(torch.where(has_mass, sigma2, prev.sigma2), floor)
    return GMM(lam, mu, sigma2)


def em_step(D: Tensor, gmm: GMM, var_floor: float, eps: float, reduce: Reduce, want_dist: bool = False):
    """One EM iteration on the features D; with want_dist also (logj, log_norm) of its E-step, from
    which reseed measures the samples' distances to the components."""
    if want_dist:
        W, log_norm = natural(gmm, with_log_norm=True)
    else:
        W, log_norm = natural(gmm), None
    logj = log_joint(D, W)
    S = reduce(moments(posteriors(logj), D))
    return m_step(S, gmm, var_floor, eps), ((logj, log_norm) if want_dist else None)


# The warm EM of a training step: `centered` reads the stored mixture, then each iteration is one GEMM for the
# E-step's log-densities, a softmax, one GEMM for the sums, and `fit_step` for everything between the sums and
# the next E-step.


def centered(lam: Tensor, mu: Tensor, sigma2: Tensor):
    """The stored mixture in the coordinates its own mean centers: (shift, GMM centered on it, W, log_norm), W
    and log_norm as natural's (None for a per-channel mixture, whose E-step needs no W)."""
    gmm = GMM(lam, mu, sigma2)
    shift = mixture_mean(gmm)
    gmm = gmm.shifted(shift)
    if lam.dim() == 2:
        return shift, gmm, None, None
    W, log_norm = natural(gmm, with_log_norm=True)
    return shift, gmm, W, log_norm


def natural_scaled(gmm: GMM, lambda_min: float, prior_scaling: bool):
    """(W, log_norm) of natural, and the transform's gain scale_of(lam)."""
    W, log_norm = natural(gmm, with_log_norm=True)
    return W, log_norm, scale_of(gmm.lam, lambda_min, prior_scaling)


def fit_step(S: Tensor, prev: GMM, var_floor: float, eps: float, lambda_min: float, prior_scaling: bool):
    """The M-step from the sums S, then what the next E-step and the transform need of the new mixture:
    (GMM, W, log_norm, scale)."""
    gmm = m_step(S, prev, var_floor, eps)
    return (gmm, *natural_scaled(gmm, lambda_min, prior_scaling))


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


def channel_variance(D: Tensor, reduce: Reduce = identity) -> Tensor:
    """Each channel's variance over the samples of D, summed over ranks."""
    c = (D.shape[1] - 1) // 2
    stats = reduce(D.sum((0, 2)))
    mean = stats[1 : c + 1] / stats[0]
    return (stats[c + 1 :] / stats[0] - mean * mean).clamp_min(0.0)


def sample_rows(D: Tensor) -> Tensor:
    """The centered samples xc of D as the rows of an (M, C) matrix (a view when sample-major)."""
    c = (D.shape[1] - 1) // 2
    return D[:, 1 : c + 1].transpose(1, 2).reshape(-1, c)


def init_gmm(D: Tensor, k: int, iters: int, var_floor: float, eps: float, reduce: Reduce = identity,
             first_rank_only: Reduce = identity) -> GMM:
    """k-means++ seeding on the samples of D (centered coordinates), then `iters` EM iterations."""
    c = (D.shape[1] - 1) // 2
    var = channel_variance(D, reduce)
    seeds = _kmeans_pp(sample_rows(D), k, var + eps)
    gmm = GMM(D.new_full((k,), 1.0 / k), first_rank_only(seeds),
              torch.maximum(var, var_floor * (var + eps)).expand(k, c).clone())
    for _ in range(iters):
        gmm, _ = em_step(D, gmm, var_floor, eps, reduce)
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
    gmm = init_gmm(features(x.t().unsqueeze(0), shift), num_components, iters, var_floor, eps)
    return GMM(gmm.lam, gmm.mu + shift, gmm.sigma2)


# ----------------------------------------------------------------------------------------
# Around EM: the samples it runs on, and the labels of fresh fits (dead components: models/mixture_state.py)
# ----------------------------------------------------------------------------------------


def subsample(D: Tensor, budget: int) -> Tensor:
    """EM's samples: all of D (B, F, L) if it has at most `budget`, else a random subset drawn
    with replacement; for (N, C, L) layouts stratified over batch items (budget // N positions
    each), which gathers cache-friendly rows."""
    B, F, L = D.shape
    if B * L <= budget:
        return D
    if is_rows(D):
        return D[0].t()[torch.randint(L, (budget,), device=D.device)].t().unsqueeze(0)
    if B >= budget:
        b = torch.randint(B, (budget,), device=D.device)
        p = torch.randint(L, (budget,), device=D.device)
        return D[b, :, p].t().unsqueeze(0)  # (1, F, budget)
    q = budget // B
    p = torch.randint(L, (B, 1, q), device=D.device).expand(B, F, q)
    return torch.gather(D, 2, p)  # (B, F, q)


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
