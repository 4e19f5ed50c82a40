"""Fréchet distance between Gaussians fitted to Inception features, in float64 on the features' device.

    FID = |mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2)

S1 S2 is similar to R S1 R, with R the symmetric square root of the reference covariance S2 (when S2 is
singular the two still share their nonzero eigenvalues, since AB and BA do), and R S1 R is symmetric
positive semi-definite. So the trace term is sum(sqrt(eigvalsh(R S1 R))): two matrix products and a
symmetric eigenvalue problem, where torch-fidelity 0.4 takes the general (non-symmetric) eigenvalues of
S1 S2 with NumPy on the CPU, and the original TTUR code a matrix square root (SciPy's sqrtm). R depends on
the reference only: it is computed once and kept with the reference statistics. Eigenvalues that rounding pushes below zero
are taken as zero, which is what they are.
"""
from __future__ import annotations

import contextlib
import logging
import math

import torch

log = logging.getLogger(__name__)

# torch-fidelity's (and TTUR's) offset: when the trace term comes out non-finite, FID is computed again with
# this added to the diagonal of both covariances.
SINGULAR_OFFSET = 1e-6


@contextlib.contextmanager
def _lapack_threads(device: torch.device):
    """One CPU thread for the eigenvalue problems. Their Householder reduction is mostly matrix-vector work
    that more threads barely speed up, and whose threads wait for each other when other processes load
    the cores: on a 2-core machine beside other jobs, eigvalsh of a 2048x2048 matrix took 1.5-4 s with
    two threads against 0.65 s with one."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, covariance) of features (N, D), float64 on their device; the covariance divides by N - 1,
    as numpy.cov does (torch-fidelity's fid_features_to_statistics)."""
    if features.dim() != 2 or features.shape[0] < 2:
        raise ValueError(f"statistics: need features (N >= 2, D), got {tuple(features.shape)}")
    x = features.to(torch.float64, copy=True)
    mu = x.mean(0)
    x.sub_(mu)
    return mu, (x.T @ x).div_(x.shape[0] - 1)


def psd_sqrt(sigma: torch.Tensor) -> torch.Tensor:
    """The symmetric positive semi-definite square root of a covariance (float64), negative eigenvalues
    (rounding) taken as 0."""
    with _lapack_threads(sigma.device):
        lam, v = torch.linalg.eigh(sigma.double())
    return (v * lam.clamp(min=0).sqrt()) @ v.T


def _trace_sqrt_product(sigma1: torch.Tensor, sigma2_sqrt: torch.Tensor) -> torch.Tensor:
    """tr sqrt(S1 S2) = sum sqrt(eig(R S1 R)) with R = sqrt(S2); NaN where the eigensolver fails."""
    m = sigma2_sqrt @ sigma1 @ sigma2_sqrt
    m = (m + m.T) / 2  # symmetric up to rounding; eigvalsh reads one triangle
    try:
        with _lapack_threads(m.device):
            lam = torch.linalg.eigvalsh(m)
    except torch.linalg.LinAlgError:  # no convergence: non-finite input
        return torch.tensor(float("nan"), dtype=torch.float64, device=m.device)
    return lam.clamp(min=0).sqrt().sum()


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor,
                     sigma2_sqrt: torch.Tensor | None = None) -> float:
    """FID between N(mu1, sigma1) and N(mu2, sigma2), all float64 on one device. `sigma2_sqrt`: psd_sqrt(sigma2)
    when the caller keeps it (the reference's); computed here otherwise.

    As torch-fidelity 0.3 did when its matrix square root was not finite, a non-finite trace term is
    computed again with SINGULAR_OFFSET added to both diagonals (a warning says so); our eigenvalue route
    stays finite for any finite covariances, so only non-finite statistics get there, and give NaN."""
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.numel(), mu1.numel()):
        raise ValueError(f"frechet_distance: shapes differ: mu {tuple(mu1.shape)}, {tuple(mu2.shape)}; "
                         f"sigma {tuple(sigma1.shape)}, {tuple(sigma2.shape)}")
    if sigma2_sqrt is None:
        sigma2_sqrt = psd_sqrt(sigma2)
    diff = mu1 - mu2
    rest = diff.dot(diff) + sigma1.diagonal().sum() + sigma2.diagonal().sum()
    fid = float(rest - 2 * _trace_sqrt_product(sigma1, sigma2_sqrt))
    if math.isfinite(fid):
        return fid
    log.warning("fid calculation produces singular product; adding %g to diagonal of cov estimates",
                SINGULAR_OFFSET)
    offset = SINGULAR_OFFSET * torch.eye(sigma1.shape[0], dtype=sigma1.dtype, device=sigma1.device)
    sigma1, sigma2 = sigma1 + offset, sigma2 + offset
    try:
        root = psd_sqrt(sigma2)
    except torch.linalg.LinAlgError:
        return float("nan")
    tr = _trace_sqrt_product(sigma1, root)
    return float(diff.dot(diff) + sigma1.diagonal().sum() + sigma2.diagonal().sum() - 2 * tr)
