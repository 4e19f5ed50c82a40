"""Mixture Normalization's pieces as free functions, for tests that check the layer against them: the
posteriors of rows under a given GMM, and the training-mode transform for given posteriors (no GMM
fitting), through the same code the layer runs (models/gmm.py, models/mixture_transform.py)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from models.gmm import GMM, features, identity, log_joint, natural, posteriors
from models.mixture_transform import MixtureNormFunction, as_ncl, is_sample_major, normalize_math, viewable


@torch.no_grad()
def gmm_posteriors(x: Tensor, gmm: GMM) -> Tensor:
    """Posteriors tau (M, K) of the rows of x (M, C) under gmm (log-sum-exp)."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    gmm = GMM(*(t.to(device=x.device, dtype=dtype) for t in gmm))
    shift = gmm.lam @ gmm.mu
    D = features(x.to(dtype).t().unsqueeze(0), shift)
    return posteriors(log_joint(D, natural(gmm.shifted(shift))))[0].t()


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
        x = viewable(x)
        sm = is_sample_major(x)
        with torch.no_grad():
            D = features(as_ncl(x.detach(), sm), shift)
        tau = as_ncl(tau.detach(), sm)  # the layout the Function sees x in
        return MixtureNormFunction.apply(x, D, shift, tau, scale, weight, bias, eps, identity)[0]
    return normalize_math(x, features(x, shift), shift, tau, scale, weight, bias, eps, identity)[0]
