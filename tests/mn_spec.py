"""Mixture Normalization straight from docs/mixture-normalization.md, for tests to hold the layer against.

Nothing here comes from models/: each function is the spec's formulas, in its notation, as plain tensor code
with no care for speed. Samples are the rows of x (M, C). A mixture is (lam, mu, sigma2) with lam (K, G) and
mu, sigma2 (K, C): G = 1 is one joint mixture over the C channels (posteriors per sample), G = C one 1-D
mixture per channel (posteriors per sample and channel). Posteriors tau are (M, K, G).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def posteriors(x: Tensor, lam: Tensor, mu: Tensor, sigma2: Tensor) -> Tensor:
    """tau_ik = lam_k N(x_i | mu_k, sigma2_k) / sum_j lam_j N(x_i | mu_j, sigma2_j), by log-sum-exp ("The mixture
    and the posteriors"); per channel when lam is (K, C)."""
    log_density = -0.5 * ((x[:, None, :] - mu) ** 2 / sigma2 + torch.log(2 * math.pi * sigma2))  # (M, K, C)
    if lam.shape[1] == 1:
        log_density = log_density.sum(2, keepdim=True)  # a diagonal Gaussian: channels multiply
    return torch.softmax(torch.log(lam) + log_density, dim=1)


def em_step(x: Tensor, lam: Tensor, mu: Tensor, sigma2: Tensor, var_floor: float, eps: float):
    """One EM iteration: the E-step under (lam, mu, sigma2), then the M-step with its floor and its guard (a
    component with n_k < 1 keeps its mean and variance)."""
    tau = posteriors(x, lam, mu, sigma2)
    n = tau.sum(0)                                                    # (K, G)
    new_lam = n / x.shape[0]
    new_mu = (tau * x[:, None, :]).sum(0) / n                         # (K, C)
    spread = (x[:, None, :] - new_mu) ** 2                            # (M, K, C)
    new_sigma2 = (tau * spread).sum(0) / n
    floor = var_floor * (x.var(0, unbiased=False) + eps)
    kept = n < 1
    new_mu = torch.where(kept, mu, new_mu)
    new_sigma2 = torch.maximum(torch.where(kept, sigma2, new_sigma2), floor)
    return new_lam, new_mu, new_sigma2


def statistics(x: Tensor, tau: Tensor):
    """(n_k, E_k, V_k) of "The transform": n_k = sum_i tau_ik clamped at 1, E_k and V_k weighted by
    tauhat_ik = tau_ik / n_k."""
    n = tau.sum(0).clamp_min(1.0)                                     # (K, G)
    tauhat = tau / n
    E = (tauhat * x[:, None, :]).sum(0)                               # (K, C)
    V = (tauhat * (x[:, None, :] - E) ** 2).sum(0)
    return n, E, V


def transform(x: Tensor, tau: Tensor, lam: Tensor, E: Tensor, V: Tensor, eps: float, lambda_min: float,
              prior_scaling: bool, gamma: Tensor | None, beta: Tensor | None) -> Tensor:
    """y_i = gamma * sum_k tau_ik s_k (x_i - E_k) / sqrt(V_k + eps) + beta, s_k = 1 / sqrt(max(lam_k, lambda_min))."""
    s = lam.clamp_min(lambda_min).rsqrt() if prior_scaling else torch.ones_like(lam)
    xhat = (tau * s * (x[:, None, :] - E) / torch.sqrt(V + eps)).sum(1)
    if gamma is not None:
        xhat = gamma * xhat + beta
    return xhat


def train_forward(x: Tensor, mixture: tuple, *, em_steps: int, var_floor: float, eps: float, lambda_min: float,
                  prior_scaling: bool, detach_posteriors: bool, gamma=None, beta=None):
    """A training step's output from the stored mixture (warm fit): em_steps EM iterations on x, then the
    posteriors of every sample under the fit and the transform. Gradients flow through x, E and V, and through
    tau unless detach_posteriors. Returns (y, fitted mixture, n, E, V)."""
    with torch.no_grad():
        fit = mixture
        for _ in range(em_steps):
            fit = em_step(x.detach(), *fit, var_floor, eps)
    tau = posteriors(x.detach() if detach_posteriors else x, *fit)
    n, E, V = statistics(x, tau)
    return transform(x, tau, fit[0], E, V, eps, lambda_min, prior_scaling, gamma, beta), fit, n, E, V


def running_update(running: dict, fit: tuple, n: Tensor, E: Tensor, V: Tensor, momentum: float) -> dict:
    """"Running estimates": new = (1 - momentum) old + momentum batch, for the mixture and for E_k and the
    unbiased V_k n_k / (n_k - 1); a component with n_k <= 2 keeps its E_k and V_k."""
    def blend(old, new):
        return (1 - momentum) * old + momentum * new
    out = {"lambda": blend(running["lambda"], fit[0]), "mu": blend(running["mu"], fit[1]),
           "sigma2": blend(running["sigma2"], fit[2])}
    enough = n > 2
    out["E"] = torch.where(enough, blend(running["E"], E), running["E"])
    out["V"] = torch.where(enough, blend(running["V"], V * n / (n - 1).clamp_min(1)), running["V"])
    return out


def eval_forward(x: Tensor, running: dict, eps: float, lambda_min: float, prior_scaling: bool,
                 detach_posteriors: bool, gamma=None, beta=None) -> Tensor:
    """Eval mode: posteriors under the running mixture, normalization with the running E_k, V_k."""
    tau = posteriors(x.detach() if detach_posteriors else x, running["lambda"], running["mu"], running["sigma2"])
    return transform(x, tau, running["lambda"], running["E"], running["V"], eps, lambda_min, prior_scaling,
                     gamma, beta)


def as_rows(x: Tensor) -> Tensor:
    """(N, C, H, W) activations -> the (N*H*W, C) samples of "Notation"."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def from_rows(rows: Tensor, shape) -> Tensor:
    n, c, h, w = shape
    return rows.reshape(n, h, w, c).permute(0, 3, 1, 2)
