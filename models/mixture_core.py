"""Mixture Normalization's maths (docs/mixture-normalization.md) as plain tensor functions, in the spec's order.

Samples are the rows of x (M, C). A mixture is GMM(lam (K, G), mu (K, C), sigma2 (K, C)) with G groups of
D = C / G channels: G = 1 is the joint mixture (one posterior per sample), G = C one 1-D mixture per channel
(one posterior per sample and channel). Posteriors tau are (M, K, G). Every formula is the same for both; the
group dimension is where the spec's "per (component, channel)" lives.

Squares are taken of x - shift, with shift = sum_k lambda_k mu_k of the stored mixture, so that variances do
not cancel catastrophically when a channel's mean is large against its spread (the spec's last paragraph on
fitting). EM's mixtures live in those centered coordinates; E (the transform's means) is in input units.

`sums` is how a layer sums over samples: its own rows, or all-reduced over processes (models/sync_norms.py).
`first_rank_only` makes rank 0's random draws every rank's.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

Sums = Callable[[Tensor], Tensor]
# k-means++ weights: an all-zero distribution (constant data) draws uniformly.
TINY = 1e-20
# log(0) is -inf for a component that lost all its mass; log(1e-30) = -69 is "never" in practice.
LAMBDA_LOG_FLOOR = 1e-30
# Posteriors at or below this are 0: nearly hard posteriors otherwise underflow into float32 denormals, which
# make every product with tau several times slower on CPU. Their total weight is negligible.
TAU_MIN = 1e-20


def identity(t: Tensor) -> Tensor:
    return t


class GMM(NamedTuple):
    """Diagonal Gaussian mixture: lam (K, G), mu (K, C), sigma2 (K, C)."""
    lam: Tensor
    mu: Tensor
    sigma2: Tensor


class Options(NamedTuple):
    """A layer's hyperparameters, as the spec's table names them."""
    num_components: int
    groups: int                 # 1: posteriors="joint"; C: "per_channel"
    eps: float
    em_steps: int
    em_samples: int             # this process's share
    init_em_steps: int          # after k-means++ seeding in a warm fit
    lambda_min: float
    var_floor: float
    prior_scaling: bool
    detach_posteriors: bool
    dead_steps: int
    fresh: bool


def spread(t: Tensor, C: int) -> Tensor:
    """(K, G) -> (K, C): each group's value for each of its channels."""
    return t[:, :, None].expand(-1, -1, C // t.shape[1]).reshape(t.shape[0], C)


def grouped(t: Tensor, G: int) -> Tensor:
    """(..., C) -> (..., G, D), a view."""
    return t.unflatten(-1, (G, -1))


def mixture_mean(gmm: GMM) -> Tensor:
    """sum_k lambda_k mu_k (C,): the shift."""
    return (spread(gmm.lam, gmm.mu.shape[1]) * gmm.mu).sum(0)


def gain(lam: Tensor, o: Options) -> Tensor:
    """s_k = 1 / sqrt(max(lambda_k, lambda_min)), or 1 without prior_scaling ("The transform")."""
    return lam.clamp_min(o.lambda_min).rsqrt() if o.prior_scaling else torch.ones_like(lam)


# -- The mixture and the posteriors ----------------------------------------------------------------------------


def features(xc: Tensor, G: int) -> Tensor:
    """(M, G, 1 + 2D): each group's [1, x - shift, (x - shift)^2]. An E-step is then one product with the
    mixture's natural parameters, and all of EM's sums one product with the posteriors."""
    f = grouped(xc, G)
    return torch.cat([torch.ones_like(f[:, :, :1]), f, f * f], 2)


def log_joint(f: Tensor, gmm: GMM) -> tuple[Tensor, Tensor]:
    """log(lambda_k N(x_i | mu_k, sigma2_k)) + (D/2) log(2 pi), (M, K, G), for the samples' features f (gmm
    centered like them); and log_norm (K, G) = log lambda_k - sum_c log(sigma2_kc) / 2, the same without the
    squared distance: logj = log_norm - |x - mu|^2_sigma / 2. The constant changes no posterior."""
    K, G = gmm.lam.shape
    prec = gmm.sigma2.reciprocal()
    lin = gmm.mu * prec
    # sum_c log(sigma2_kc) and sum_c mu_kc^2 / sigma2_kc over each group, in one reduction
    logdet, maha = grouped(torch.stack([gmm.sigma2.log(), lin * gmm.mu]), G).sum(3)
    log_norm = gmm.lam.clamp_min(LAMBDA_LOG_FLOOR).log() - 0.5 * logdet
    natural = torch.cat([(log_norm - 0.5 * maha)[:, :, None], grouped(lin, G), grouped(-0.5 * prec, G)], 2)
    return torch.einsum("mgf,kgf->mkg", f, natural), log_norm


def posteriors(logj: Tensor) -> Tensor:
    """tau_ik: a softmax over k (log-sum-exp), denormal-range values zeroed."""
    return F.threshold(torch.softmax(logj, 1), TAU_MIN, 0.0)


def moments(tau: Tensor, f: Tensor) -> Tensor:
    """(K, G, 1 + 2D): [n_k = sum_i tau_ik, sum_i tau_ik xc_i, sum_i tau_ik xc_i^2], this process's."""
    return torch.einsum("mkg,mgf->kgf", tau, f)


def m_step(S: Tensor, prev: GMM, o: Options) -> GMM:
    """The M-step from the (summed) moments S, with the variance floor var_floor * (Var + eps), Var each
    channel's variance over EM's samples, and the guard: a component with n_k < 1 keeps its mean and variance."""
    K, G, _ = S.shape
    n, s = S[:, :, 0], S[:, :, 1:]
    D = s.shape[2] // 2
    total = S.sum(0)  # (G, 1 + 2D): the sample count and each channel's sums
    lam = n / total[:, 0]
    m = total[:, 1:] / total[:, :1]
    floor = o.var_floor * ((m[:, D:] - m[:, :D] * m[:, :D]).clamp_min(0.0) + o.eps)
    mom = s / n[:, :, None]  # 0/0 where n < 1, which the guard drops
    mu = mom[:, :, :D]
    sigma2 = mom[:, :, D:] - mu * mu
    has_mass = (n >= 1.0)[:, :, None]
    mu = torch.where(has_mass, mu, grouped(prev.mu, G))
    sigma2 = torch.maximum(torch.where(has_mass, sigma2, grouped(prev.sigma2, G)), floor)
    return GMM(lam, mu.flatten(1), sigma2.flatten(1))


def em(f: Tensor, gmm: GMM, steps: int, o: Options, sums: Sums):
    """`steps` EM iterations on the features f; also (logj, log_norm) of the last E-step (None for 0 steps),
    from which re-seeding measures the samples' distances to the components."""
    last = None
    for _ in range(steps):
        last = log_joint(f, gmm)
        gmm = m_step(sums(moments(posteriors(last[0]), f)), gmm, o)
    return gmm, last


# -- Fitting the mixture: seeding, warm and fresh fits, dead components -------------------------------------------


def sampling_weights(w: Tensor) -> Tensor:
    """w >= TINY, non-finite entries TINY: a run that has diverged (NaN or inf activations) reaches the
    trainer's non-finite-loss stop instead of failing inside torch.multinomial."""
    return w.nan_to_num(0.0, 0.0, 0.0).clamp_min(TINY)


def draw(w: Tensor) -> Tensor:
    """One index per row of w (G, S) >= 0, with probability proportional to w: (G, 1). Many rows (one per
    channel) by inverse CDF, one uniform each: torch.multinomial draws one exponential per entry, 30x slower
    over every channel's samples."""
    w = sampling_weights(w)
    if w.shape[0] == 1:
        return torch.multinomial(w, 1)
    cdf = w.cumsum(1)
    u = torch.rand(w.shape[0], 1, dtype=w.dtype, device=w.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).clamp_max_(w.shape[1] - 1)


def pick(xs: Tensor, idx: Tensor) -> Tensor:
    """(k, C): row idx[g, j] of xs (S, C) in group g's channels, for j < k."""
    G, k = idx.shape
    g = grouped(xs, G)
    return g.gather(0, idx.t()[:, :, None].expand(k, G, g.shape[2])).flatten(1)


def kmeans_pp(xs: Tensor, k: int, G: int, var: Tensor) -> Tensor:
    """(k, C) seeds: k-means++ among the rows of xs (S, C), in each group, distances standardized by var.
    Sequential in k by definition; it runs when a mixture is first fitted (and in every fresh fit)."""
    z = grouped(xs * var.clamp_min(TINY).rsqrt(), G).transpose(0, 1)  # (G, S, D)
    idx = [torch.randint(xs.shape[0], (G, 1), device=xs.device)]

    def dist2(i: Tensor) -> Tensor:
        return (z - z.gather(1, i[:, :, None].expand(-1, -1, z.shape[2]))).square().sum(2)

    d2 = dist2(idx[0])
    for _ in range(k - 1):
        idx.append(draw(d2))
        d2 = torch.minimum(d2, dist2(idx[-1]))
    return pick(xs, torch.cat(idx, 1))


def seed(xs: Tensor, o: Options, sums: Sums, first_rank_only: Sums) -> GMM:
    """k-means++ seeds as means, weights 1/K, every variance the channel's (floored), on EM's samples xs."""
    K = o.num_components
    s = sums(torch.cat([xs.new_full((1,), xs.shape[0]), xs.sum(0), (xs * xs).sum(0)]))
    mean, sq = (s[1:] / s[0]).chunk(2)
    var = (sq - mean * mean).clamp_min(0.0)
    seeds = first_rank_only(kmeans_pp(xs, K, o.groups, var + o.eps))
    return GMM(xs.new_full((K, o.groups), 1.0 / K), seeds,
               torch.maximum(var, o.var_floor * (var + o.eps)).expand(K, -1).clone())


def align(new: GMM, prev: GMM) -> GMM:
    """new with its components relabelled to match prev's, in each group ("How the mixture is estimated").

    Cost of labelling new component j as k: sum_c (mu_jc - mu'_kc)^2 / (sigma2_jc + sigma2'_kc). Greedy: the
    cheapest remaining pair first, K rounds; exact when components are well separated, and it can only err
    between similar components, where the label matters little.
    """
    K, G = new.lam.shape
    m1, v1, m0, v0 = (grouped(t, G).transpose(0, 1) for t in (new.mu, new.sigma2, prev.mu, prev.sigma2))
    cost = ((m1[:, :, None] - m0[:, None]).square() / (v1[:, :, None] + v0[:, None])).sum(3)  # (G, K, K)
    perm = torch.zeros(G, K, dtype=torch.long, device=cost.device)  # perm[g, k]: the new component labelled k
    for _ in range(K):
        flat = cost.flatten(1).argmin(1, keepdim=True)
        j, k = flat // K, flat % K
        perm.scatter_(1, k, j)
        cost = cost.scatter(1, j[:, :, None].expand(G, 1, K), math.inf)
        cost = cost.scatter(2, k[:, :, None].expand(G, K, 1), math.inf)
    rows = perm.t()  # (K, G)
    D = new.mu.shape[1] // G
    return GMM(new.lam.gather(0, rows), *(grouped(t, G).gather(0, rows[:, :, None].expand(K, G, D)).flatten(1)
                                          for t in (new.mu, new.sigma2)))


def reseed(gmm: GMM, dead_count: Tensor, xs: Tensor, last: tuple[Tensor, Tensor], o: Options,
           first_rank_only: Sums) -> tuple[GMM, Tensor]:
    """Dead components: one whose weight stays below lambda_min for dead_steps steps moves to a sample of xs
    drawn k-means++-style (with probability proportional to its squared distance to the nearest live
    component), with weight 1/K and the live components' mean variance. Returns the mixture and the new
    dead_count (K, G). Branch-free: every step draws the candidates; only components due take theirs.

    The live variance, not the channel's: with the (much wider) variance of all the data, a new component loses
    every sample to the narrow ones. lambda_min < 1/K leaves each group a live component to measure from."""
    K, C = gmm.mu.shape
    low = gmm.lam < o.lambda_min
    dead = (dead_count + 1) * low  # consecutive steps dead
    again = dead >= o.dead_steps
    logj, log_norm = last
    d2 = (log_norm.masked_fill(low, math.inf) - logj).amin(1).t()  # (G, S): half the squared distance
    cand = first_rank_only(pick(xs, torch.multinomial(sampling_weights(d2), K, replacement=True)))
    alive = spread(gmm.lam.masked_fill(low, 0.0), C)
    mass, weighted = torch.stack([alive, alive * gmm.sigma2]).sum(1)  # one reduction over k for both
    width = weighted / mass
    lam = gmm.lam.masked_fill(again, 1.0 / K)
    moved = spread(again, C)
    new = GMM(lam / lam.sum(0), torch.where(moved, cand, gmm.mu), torch.where(moved, width, gmm.sigma2))
    return new, dead.masked_fill(again, 0)


def subsample(x: Tensor, budget: int) -> Tensor:
    """EM's samples: all rows of x if it has at most `budget`, else `budget` drawn with replacement."""
    if x.shape[0] <= budget:
        return x
    return x[torch.randint(x.shape[0], (budget,), device=x.device)]


def fit(xs: Tensor, f: Tensor, stored: Optional[GMM], o: Options, sums: Sums, first_rank_only: Sums):
    """The step's mixture on EM's samples xs (centered), with features f. Warm: `em_steps` EM iterations from the
    stored mixture (on the first step, from k-means++ seeds refined by init_em_steps iterations). Fresh: k-means++
    seeds and `em_steps` iterations, relabelled to match the stored mixture. Returns it and its last E-step (None:
    nothing to re-seed from, as with em_steps = 0, which freezes the mixture, and in fresh fits, re-seeded
    anyway)."""
    if o.fresh:
        gmm, _ = em(f, seed(xs, o, sums, first_rank_only), o.em_steps, o, sums)
        return (gmm if stored is None else align(gmm, stored)), None
    if stored is None:
        stored, _ = em(f, seed(xs, o, sums, first_rank_only), o.init_em_steps, o, sums)
    return em(f, stored, o.em_steps, o, sums)


# -- The transform ------------------------------------------------------------------------------------------


def statistics(S: Tensor, shift: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(n_k, E_k, V_k) from the moments S of all samples: n_k = sum_i tau_ik (K, G); E_k = sum_i tauhat_ik x_i in
    input units and V_k = sum_i tauhat_ik (x_i - E_k)^2 (K, C), tauhat_ik = tau_ik / n_k with n_k clamped at 1.
    V_k = m2 - (2 - n_true / n) E^2 in centered terms: the ratio differs from 1 only when the clamp is on."""
    n_true = S[:, :, 0]
    n = n_true.clamp_min(1.0)
    D = (S.shape[2] - 1) // 2
    mom = S[:, :, 1:] / n[:, :, None]
    E, m2 = mom[:, :, :D], mom[:, :, D:]
    V = (m2 + (n_true / n - 2.0)[:, :, None] * E * E).clamp_min(0.0)
    return n_true, E.flatten(1) + shift, V.flatten(1)


def coefficients(lam: Tensor, E: Tensor, V: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                 o: Options) -> tuple[Tensor, Tensor]:
    """y_i = sum_k tau_ik (P_k x_i + Q_k): P_k = gamma s_k / sqrt(V_k + eps), Q_k = beta - P_k E_k (K, C); the
    spec's y = gamma xhat + beta, since sum_k tau_ik = 1."""
    P = spread(gain(lam, o), E.shape[1]) * (V + o.eps).rsqrt()
    P = P if weight is None else P * weight
    return P, (-P * E if bias is None else bias - P * E)


def mix(x: Tensor, tau: Tensor, P: Tensor, Q: Tensor) -> Tensor:
    """x_i * sum_k tau_ik P_k + sum_k tau_ik Q_k, both sums in one product of the posteriors with [P | Q]."""
    G = tau.shape[2]
    AB = torch.einsum("mkg,kgd->mgd", tau, torch.cat([grouped(P, G), grouped(Q, G)], 2))
    A, B = AB.chunk(2, 2)
    return x * A.flatten(1) + B.flatten(1)


def transform(x: Tensor, f: Tensor, tau: Tensor, shift: Tensor, lam: Tensor, weight: Optional[Tensor],
              bias: Optional[Tensor], o: Options, sums: Sums = identity) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The training transform of x (features f) under posteriors tau: (y, n, E, V)."""
    n, E, V = statistics(sums(moments(tau, f)), shift)
    return mix(x, tau, *coefficients(lam, E, V, weight, bias, o)), n, E, V


class Step(NamedTuple):
    """What a training step computed: the output rows, and what the layer keeps and reports."""
    y: Tensor
    tau: Tensor                 # (M, K, G)
    shift: Tensor               # (C,)
    fit: GMM                    # the step's mixture, centered on shift
    n: Tensor                   # (K, G) sum_i tau_ik
    E: Tensor                   # (K, C) input units
    V: Tensor                   # (K, C)
    xs: Tensor                  # EM's samples, centered
    last: Optional[tuple]       # (logj, log_norm) of the last E-step on xs


def train_forward(x: Tensor, stored: Optional[GMM], weight: Optional[Tensor], bias: Optional[Tensor], o: Options,
                  sums: Sums = identity, first_rank_only: Sums = identity, transform_fn=transform) -> Step:
    """A training step of x (M, C) from the stored mixture (None before the first): EM without gradients, the
    posteriors of every sample under the fit, the transform. Gradients flow through x, E_k and V_k, and
    through tau unless detach_posteriors. `transform_fn` may be another implementation of `transform` with its
    own backward (models/mixture_fast.py)."""
    with torch.no_grad():
        if stored is None:
            s = sums(torch.cat([x.new_full((1,), x.shape[0]), x.detach().sum(0)]))
            shift = s[1:] / s[0]
        else:
            shift = mixture_mean(stored)
            stored = stored._replace(mu=stored.mu - shift)
        xs = subsample(x.detach(), max(o.num_components, o.em_samples)) - shift
        fs = features(xs, o.groups)
        gmm, last = fit(xs, fs, stored, o, sums, first_rank_only)
    # The features carry gradients where autograd differentiates them: in this module's transform, and in the
    # posteriors unless detached. Without gradients, EM's features serve when EM saw the whole batch (no copy:
    # at CPU sizes, writing the features costs more than the step's products).
    grad = torch.is_grad_enabled() and (transform_fn is transform or not o.detach_posteriors)
    with torch.set_grad_enabled(grad):
        f = fs if xs.shape[0] == x.shape[0] and not grad else features(x - shift, o.groups)
    tau = posteriors(log_joint(f.detach() if o.detach_posteriors else f, gmm)[0])
    y, n, E, V = transform_fn(x, f, tau, shift, gmm.lam, weight, bias, o, sums)
    return Step(y, tau, shift, gmm, n, E, V, xs, last)


def eval_forward(x: Tensor, running: GMM, E: Tensor, V: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                 o: Options) -> tuple[Tensor, Tensor]:
    """Eval mode: posteriors under the running mixture, the running E_k, V_k: (y, tau), no batch dependence."""
    shift = mixture_mean(running)
    with torch.set_grad_enabled(torch.is_grad_enabled() and not o.detach_posteriors):
        tau = posteriors(log_joint(features(x - shift, o.groups), running._replace(mu=running.mu - shift))[0])
    return mix(x, tau, *coefficients(running.lam, E, V, weight, bias, o)), tau


# -- Running estimates ----------------------------------------------------------------------------------------


class State(NamedTuple):
    """A layer's buffers after a step: the mixture the next step starts from (input units), dead counts, and the
    running estimates (None without track_running_stats)."""
    stored: GMM
    dead_count: Tensor
    running: Optional[GMM]
    running_E: Optional[Tensor]
    running_V: Optional[Tensor]


def next_state(step: Step, dead_count: Tensor, running: Optional[GMM], running_E: Optional[Tensor],
               running_V: Optional[Tensor], f, first: bool, o: Options, first_rank_only: Sums = identity) -> State:
    """Dead components re-seeded (when the step has a last E-step), then the running averages with factor f
    (momentum, or 1/count): of the fit (before re-seeding), and of E_k and BN's unbiased V_k n_k / (n_k - 1),
    which a component with n_k <= 2 leaves as they are. On the first step the running mixture is the fit."""
    kept = step.fit
    if step.last is not None:
        kept, dead_count = reseed(step.fit, dead_count, step.xs, step.last, o, first_rank_only)
    stored = kept._replace(mu=kept.mu + step.shift)
    if running is None:
        return State(stored, dead_count, None, None, None)
    fitted = step.fit._replace(mu=step.fit.mu + step.shift)
    nk = spread(step.n, step.E.shape[1])
    enough = nk > 2.0
    E_new, V_new = torch.where(enough, step.E, running_E), torch.where(enough, step.V * nk / (nk - 1.0), running_V)
    olds, news = [*(() if first else running), running_E, running_V], [*(() if first else fitted), E_new, V_new]
    # One call for every buffer when f is a number (momentum), and so one kernel when compiled.
    moved = torch._foreach_lerp(olds, news, f) if isinstance(f, float) else [a.lerp(b, f) for a, b in zip(olds, news)]
    return State(stored, dead_count, fitted if first else GMM(*moved[:3]), *moved[-2:])
