"""Kernel Inception Distance on the features' device, in float64, with torch-fidelity's subsets.

KID (Binkowski et al. 2018) is the unbiased estimate of the squared MMD with the polynomial kernel
k(x, y) = (x.y / D + 1)^3, averaged over `subsets` random subsets of `subset_size` features of each set:

    MMD^2 = (sum_{i!=j} k(x_i, x_j) + sum_{i!=j} k(y_i, y_j)) / (m (m - 1)) - 2 sum_{i,j} k(x_i, y_j) / m^2

The subsets are torch-fidelity's (kid_features_to_metric, the same in 0.3 and 0.4): numpy's RandomState(seed), and for each
subset one choice without replacement from the first set, then one from the second. So the same features
give the same KID, up to rounding. Each subset's three kernel sums come either from the subsets' own
kernel matrices (batched) or, when a set is small next to the subsets' total size, from that set's whole
kernel matrix, computed once: the sum over a subset's rows and columns is w^T K w for its 0/1 indicator w.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
from torch_fidelity.defaults import DEFAULTS

# Doubles per batch of subsets' gathered features and kernel matrices (256 MiB).
CHUNK_ELEMENTS = 1 << 25


@functools.lru_cache(maxsize=8)
def subset_indices(n1: int, n2: int, subsets: int, subset_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(subsets, subset_size) row indices into each set, drawn as torch-fidelity draws them; cached, since
    a run scores the same sizes again and again (callers must not modify them)."""
    rng = np.random.RandomState(seed)
    first = np.empty((subsets, subset_size), dtype=np.int64)
    second = np.empty((subsets, subset_size), dtype=np.int64)
    for i in range(subsets):
        first[i] = rng.choice(n1, subset_size, replace=False)
        second[i] = rng.choice(n2, subset_size, replace=False)
    return torch.from_numpy(first), torch.from_numpy(second)


def _kernel(x: torch.Tensor, y: torch.Tensor, degree: int, gamma: float, coef0: float) -> torch.Tensor:
    return (x @ y.transpose(-1, -2) * gamma + coef0) ** degree


def _block_sums(a: torch.Tensor, b: torch.Tensor, ia: torch.Tensor, ib: torch.Tensor, same: bool,
                kernel) -> tuple[torch.Tensor, torch.Tensor | None]:
    """For every subset s: the sum of k(a[ia[s, i]], b[ib[s, j]]) over all i, j, and, when a and b are one
    set with one draw (same), the sum of its diagonal. Both (subsets,) float64."""
    subsets, m = ia.shape
    if a.shape[0] * b.shape[0] * 2 <= subsets * m * m:  # the whole kernel matrix costs less than the subsets'
        k = kernel(a.double(), a.double() if same else b.double())
        wa = torch.zeros(subsets, a.shape[0], dtype=torch.float64, device=a.device).scatter_(1, ia, 1.0)
        wb = wa if same else torch.zeros(subsets, b.shape[0], dtype=torch.float64,
                                         device=b.device).scatter_(1, ib, 1.0)
        total = ((wa @ k) * wb).sum(1)
        return total, (wa @ k.diagonal() if same else None)
    chunk = max(1, CHUNK_ELEMENTS // (m * (2 * a.shape[1] + m)))
    totals, diags = [], []
    for s in range(0, subsets, chunk):
        x = a[ia[s:s + chunk]].double()
        k = kernel(x, x if same else b[ib[s:s + chunk]].double())
        totals.append(k.sum((1, 2)))
        if same:
            diags.append(k.diagonal(dim1=1, dim2=2).sum(1))
    return torch.cat(totals), (torch.cat(diags) if same else None)


def kernel_inception_distance(features_1: torch.Tensor, features_2: torch.Tensor,
                              subsets: int = DEFAULTS["kid_subsets"], subset_size: int = DEFAULTS["kid_subset_size"],
                              seed: int = DEFAULTS["rng_seed"], degree: int = DEFAULTS["kid_kernel_poly_degree"],
                              gamma: float | None = DEFAULTS["kid_kernel_poly_gamma"],
                              coef0: float = DEFAULTS["kid_kernel_poly_coef0"]
                              ) -> tuple[float, float]:
    """(mean, standard deviation) of the subsets' MMD^2 between features (N1, D) and (N2, D), computed on
    features_1's device; torch-fidelity's kid_features_to_metric with the same arguments."""
    if features_1.dim() != 2 or features_2.dim() != 2 or features_1.shape[1] != features_2.shape[1]:
        raise ValueError(f"KID: features of shapes {tuple(features_1.shape)} and {tuple(features_2.shape)}")
    n1, n2 = features_1.shape[0], features_2.shape[0]
    m = subset_size
    if m < 2 or n1 < m or n2 < m:
        raise ValueError(f"KID subset size {m} must be at least 2 and at most the number of samples "
                         f"(input_1: {n1}, input_2: {n2})")
    device = features_1.device
    features_2 = features_2.to(device)
    i1, i2 = (i.to(device) for i in subset_indices(n1, n2, subsets, m, seed))
    gamma = 1.0 / features_1.shape[1] if gamma is None else gamma

    def kernel(x, y):
        return _kernel(x, y, degree, gamma, coef0)
    xx, dx = _block_sums(features_1, features_1, i1, i1, True, kernel)
    yy, dy = _block_sums(features_2, features_2, i2, i2, True, kernel)
    xy, _ = _block_sums(features_1, features_2, i1, i2, False, kernel)
    mmd = (xx - dx + yy - dy) / (m * (m - 1)) - 2 * xy / (m * m)
    mean, std = torch.stack([mmd.mean(), mmd.std(correction=0)]).tolist()
    return mean, std
