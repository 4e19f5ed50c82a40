"""Fidelity and diversity apart: precision and recall (Kynkäänniemi et al. 2019), density and coverage (Naeem
et al. 2020), from the k-nearest-neighbour balls of Inception features.

Each real feature r_i gets a ball whose radius is the distance to its k-th nearest other real feature; each
generated feature f_j one from the generated set. With [.] the indicator and d the Euclidean distance:

    precision = mean_j [ d(f_j, r_i) < radius(r_i) for some i ]            k = 3   fidelity: fakes on the real manifold
    recall    = mean_i [ d(r_i, f_j) < radius(f_j) for some j ]            k = 3   diversity: reals on the fake manifold
    density   = mean_j  sum_i [ d(f_j, r_i) < radius(r_i) ] / k            k = 5   how crowded the real balls are with fakes
    coverage  = mean_i [ d(r_i, f_j) < radius(r_i) for some j ]            k = 5   reals with a fake in their ball

FID mixes the two failures GANs have (samples that look wrong, modes never made); these four keep them apart.
Distances are computed in float64 on the features' device, a block of rows at a time, so that memory stays
bounded whatever the sizes; only squared distances are compared, so no square roots are taken.
"""
from __future__ import annotations

import torch

K_PRECISION_RECALL = 3  # Kynkäänniemi et al.'s and torch-fidelity's default
K_DENSITY_COVERAGE = 5  # Naeem et al.'s
# Float64 distances per block of rows (256 MiB).
BLOCK_ELEMENTS = 1 << 25
KEYS = ("precision", "recall", "density", "coverage")


def _blocks(n_rows: int, n_cols: int):
    step = max(1, BLOCK_ELEMENTS // max(n_cols, 1))
    for start in range(0, n_rows, step):
        yield start, min(start + step, n_rows)


def _sq_dist(a: torch.Tensor, b: torch.Tensor, b_sq: torch.Tensor) -> torch.Tensor:
    """Squared distances between the rows of a and b (b_sq: b's squared norms), clamped at 0."""
    return ((a * a).sum(1, keepdim=True) + b_sq - 2 * a @ b.T).clamp_min_(0)


def knn_radii(feats: torch.Tensor, ks: tuple[int, ...] = (K_PRECISION_RECALL, K_DENSITY_COVERAGE)) -> torch.Tensor:
    """(N, len(ks)) squared distance of each row to its k-th nearest other row, for each k in ks."""
    x = feats.double()
    n = x.shape[0]
    if n <= max(ks):
        raise ValueError(f"k-NN radii need more than {max(ks)} features, got {n}")
    x_sq = (x * x).sum(1)
    out = torch.empty(n, len(ks), dtype=torch.float64, device=x.device)
    for start, stop in _blocks(n, n):
        d = _sq_dist(x[start:stop], x, x_sq)
        # The k-th nearest other row is the (k + 1)-th smallest distance, the row itself (0) being the first.
        nearest = d.topk(max(ks) + 1, dim=1, largest=False).values
        out[start:stop] = nearest[:, list(ks)]
    return out


def manifold_metrics(real: torch.Tensor, fake: torch.Tensor, real_radii: torch.Tensor | None = None) -> dict:
    """Precision, recall, density and coverage of the generated features `fake` (M, D) against `real` (N, D).

    real_radii: knn_radii(real), when already known (they depend on the real set alone, so callers cache them)."""
    real, fake = real.double(), fake.to(real.device).double()
    r_radii = knn_radii(real) if real_radii is None else real_radii.to(real.device, torch.float64)
    f_radii = knn_radii(fake)
    r_pr, r_dc = r_radii[:, 0], r_radii[:, 1]
    real_sq = (real * real).sum(1)
    in_some_real_ball = torch.zeros(fake.shape[0], dtype=torch.bool, device=real.device)
    real_balls_hit = torch.zeros(fake.shape[0], dtype=torch.float64, device=real.device)
    real_in_fake_ball = torch.zeros(real.shape[0], dtype=torch.bool, device=real.device)
    nearest_fake = torch.full((real.shape[0],), torch.inf, dtype=torch.float64, device=real.device)
    for start, stop in _blocks(fake.shape[0], real.shape[0]):
        d = _sq_dist(fake[start:stop], real, real_sq)                       # (fakes of the block, reals)
        in_some_real_ball[start:stop] = (d < r_pr).any(1)
        real_balls_hit[start:stop] = (d < r_dc).sum(1, dtype=torch.float64)
        real_in_fake_ball |= (d < f_radii[start:stop, 0, None]).any(0)
        nearest_fake = torch.minimum(nearest_fake, d.min(0).values)
    return {"precision": in_some_real_ball.double().mean().item(),
            "recall": real_in_fake_ball.double().mean().item(),
            "density": (real_balls_hit.mean() / K_DENSITY_COVERAGE).item(),
            "coverage": (nearest_fake < r_dc).double().mean().item()}


def reference_subset(n_reference: int, n: int) -> torch.Tensor:
    """The rows of the reference features the metrics use: a fixed random subset as large as the generated set
    (Kynkäänniemi et al.'s protocol: both manifolds from as many samples), or all of them when there are fewer."""
    if n >= n_reference:
        return torch.arange(n_reference)
    return torch.randperm(n_reference, generator=torch.Generator().manual_seed(0))[:n].sort().values
