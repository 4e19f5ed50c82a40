"""What an MN layer keeps between steps: the state a training step writes back
(the mixture, dead components reseeded, BatchNorm-like running averages) and the eval-mode transform's
coefficients read from it. `next_state` computes the new values and `write_back` copies them into the
layer's buffers in one call; the maths is docs/mixture-normalization.md, "Running estimates".
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from models import gmm_per_channel as pc
from models.gmm import GMM, TINY, centered, is_rows, mixture_mean, scale_of
from models.mixture_transform import coefficients


# Dead components, branch-free (no device->host sync): every step draws one k-means++ candidate per
# component, with probability proportional to the (Mahalanobis) distance to the nearest live component;
# only components dead for dead_steps consecutive steps take theirs. In three parts: the weights of the draw,
# the draw, and the new components.


def dead_components(lam: Tensor, dead_count: Tensor, logj: Tensor, log_norm: Tensor, lambda_min: float,
                    dead_steps: int):
    """From the last E-step on EM's features, (logj, log_norm) of em_step: (dead_count after this step, low =
    lambda below lambda_min, again = reseed now, the k-means++ weights of EM's samples)."""
    low = lam < lambda_min
    dead = torch.addcmul(low, dead_count, low)  # (count + 1) * low: consecutive steps dead
    again = dead >= dead_steps
    # logj = log_norm - (squared Mahalanobis distance) / 2: d2 is half the distance to the nearest live component.
    d2 = (log_norm.masked_fill(low, float("inf"))[:, None] - logj).amin(1).flatten()
    return dead.masked_fill(again, 0), low, again, d2.clamp_min(TINY)


def candidates(Ds: Tensor, d2: Tensor, k: int) -> Tensor:
    """k samples (k, C) of EM's features Ds drawn with probabilities proportional to d2."""
    idx = torch.multinomial(d2, k, replacement=True)
    C = (Ds.shape[1] - 1) // 2
    if is_rows(Ds):
        return Ds[0, 1 : C + 1].t()[idx]
    L = Ds.shape[2]
    return Ds[idx // L, 1 : C + 1, idx % L]


def reseeded(gmm: GMM, low: Tensor, again: Tensor, cand: Tensor) -> GMM:
    """gmm with the components `again` moved to their candidates (gmm, cand in the same centered coordinates),
    weight 1/K before renormalizing, and the live components' typical width: with the (much wider) variance of
    all the data, a new component loses every sample to the narrow ones in high dimension."""
    K = gmm.lam.shape[0]
    w_alive = gmm.lam.masked_fill(low, 0.0)  # sums to >= 1 - K lambda_min > 0: some component is alive
    width = mixture_mean(GMM(w_alive / w_alive.sum(), gmm.sigma2, gmm.sigma2))  # the live variances' weighted mean
    lam = gmm.lam.masked_fill(again, 1.0 / K)
    again = again[:, None]
    return GMM(lam / lam.sum(), torch.where(again, cand, gmm.mu), torch.where(again, width, gmm.sigma2))


def next_state(fitted: GMM, kept: Optional[GMM], shift: Tensor, E: Tensor, V: Tensor, n_true: Tensor,
               running: Optional[tuple], count: Optional[Tensor], momentum: Optional[float], ready: bool):
    """The buffers' values after a training step: the mixture to warm-start the next step from (lam, mu, sigma2,
    mu in input units), and with running statistics (running = the buffers running_lambda, _mu, _sigma2, _E,
    _V; count = num_batches_tracked) their new values and count + 1.

    fitted: the step's fit, centered on shift; kept: fitted with its dead components re-seeded, the mixture the
    next step starts from (None: fitted itself). E in input units; n_true = sum_i tau_ik, (K,) or (K, C).
    """
    gmm = fitted if kept is None else kept
    store = (gmm.lam, gmm.mu + shift, gmm.sigma2)
    if running is None:
        return store, None
    r_lam, r_mu, r_sigma2, r_E, r_V = running
    count = count + 1
    # momentum None: a cumulative average, 1/count (a device value: no host read).
    f = 1.0 / count.to(E.dtype) if momentum is None else momentum
    # The running GMM averages the fits, before any reseeding.
    fit = (fitted.lam, store[1] if kept is None else fitted.mu + shift, fitted.sigma2)
    # BN's update with its unbiased correction n/(n-1), n_k = sum_i tau_ik; a component with too little mass
    # for the correction (n_k <= 2) keeps its values: its targets are the running values themselves, which
    # lerp returns exactly (the non-finite corrections of n_k <= 1 are never selected). (Per-channel
    # posteriors: n_kc, per component and channel.)
    nk = n_true if n_true.dim() == 2 else n_true[:, None]
    enough = nk > 2.0
    stats = (torch.where(enough, E, r_E), torch.where(enough, torch.addcdiv(V, V, nk - 1.0), r_V))
    # Before the first fit the running GMM means nothing: it starts from the fit.
    olds, news = (((r_lam, r_mu, r_sigma2) if ready else ()) + (r_E, r_V), (fit if ready else ()) + stats)
    if isinstance(f, float):  # eagerly one call for all of them
        moved = torch._foreach_lerp(list(olds), list(news), f)
    else:
        moved = [torch.lerp(a, b, f) for a, b in zip(olds, news)]
    return store, (*(moved[:3] if ready else fit), *moved[-2:], count)


def write_back(layer, gmm: GMM, shift, E, V, n_true, ready: bool, Ds, dist) -> None:
    """Writes back a MixtureNorm layer's GMM (with dead components reseeded) and running statistics, in one copy.

    gmm is centered (on shift), E in input units; Ds are EM's features and dist what the last E-step
    measured on them (None when em_steps == 0, which also freezes the GMM).
    """
    bufs, values, kept = [], [], None
    if dist is not None:
        if layer.posteriors == "per_channel":  # it counts dead steps in dead_count itself
            kept = pc.reseed(gmm, layer.dead_count, dist, Ds, layer.lambda_min, layer.dead_steps,
                             layer._first_rank_only)
        else:
            dead, low, again, d2 = dead_components(gmm.lam, layer.dead_count, *dist, layer.lambda_min,
                                                   layer.dead_steps)
            kept = reseeded(gmm, low, again, layer._first_rank_only(candidates(Ds, d2, layer.num_components)))
            bufs.append(layer.dead_count)
            values.append(dead)
    track = layer.track_running_stats
    running = ((layer.running_lambda, layer.running_mu, layer.running_sigma2, layer.running_E, layer.running_V)
               if track else None)
    store, moved = next_state(gmm, kept, shift, E, V, n_true, running,
                              layer.num_batches_tracked if track else None, layer.momentum, ready)
    bufs += [layer.gmm_lambda, layer.gmm_mu, layer.gmm_sigma2]
    if track:
        bufs += [*running, layer.num_batches_tracked]
    values += [*store, *(moved or ())]
    torch._foreach_copy_(bufs, values)


def running_transform(lam: Tensor, mu: Tensor, sigma2: Tensor, E: Tensor, V: Tensor, weight: Optional[Tensor],
                      bias: Optional[Tensor], eps: float, lambda_min: float, prior_scaling: bool):
    """Eval mode's mixture and coefficients from the running buffers: (shift, the running GMM centered on it, W
    for joint posteriors (None per channel), scale, P, Q, the transform's y = sum_k tau_k (P_k x + Q_k))."""
    shift, gmm, W, _ = centered(lam, mu, sigma2)
    scale = scale_of(lam, lambda_min, prior_scaling)
    sr = (scale if lam.dim() == 2 else scale[:, None]) * torch.rsqrt(V + eps)
    P, Q = coefficients(sr, E, weight, bias)
    return shift, gmm, W, scale, P, Q
