"""FID (gan/eval/fid.py) and KID (gan/eval/kid.py) against closed forms and against torch-fidelity 0.4's own
functions, the oracle: FID within 1e-4 relative of fid_statistics_to_metric (NumPy's general eigenvalues of
the covariances' product), KID within 1e-6 of kid_features_to_metric. Synthetic features here (real Inception
features: tests/test_metrics.py).

The oracle's eigenvalues of a 2048x2048 product take seconds on a 2-core CPU, so the quick tests use 256-d
features (the same maths at a size where the oracle costs milliseconds) and the 2048-d ones are marked slow.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

from gan.eval import fid, kid
from gan.eval.fid import frechet_distance, psd_sqrt, statistics
from gan.eval.kid import kernel_inception_distance

SEED = 2020  # torch-fidelity's default rng_seed, which the Evaluator uses


def torch_fidelity_fid(feats1: torch.Tensor, feats2: torch.Tensor) -> float:
    """torch-fidelity's FID of two feature sets, from float64 statistics as its own pipeline computes them."""
    s1, s2 = fid_features_to_statistics(feats1.double().cpu()), fid_features_to_statistics(feats2.double().cpu())
    return fid_statistics_to_metric(s1, s2, verbose=False)[KEY_METRIC_FID]


def torch_fidelity_kid(feats1: torch.Tensor, feats2: torch.Tensor, subsets: int, subset_size: int
                       ) -> tuple[float, float]:
    out = kid_features_to_metric(feats1.cpu(), feats2.cpu(), kid_subsets=subsets, kid_subset_size=subset_size,
                                 rng_seed=SEED, verbose=False)
    return out[KEY_METRIC_KID_MEAN], out[KEY_METRIC_KID_STD]


def ours(feats1: torch.Tensor, feats2: torch.Tensor) -> float:
    return frechet_distance(*statistics(feats1), *statistics(feats2))


def realistic_features(n: int, d: int, seed: int, shift: float = 0.0, decay: float = 1.2) -> torch.Tensor:
    """Features like Inception's: non-negative means, a covariance whose spectrum decays as a power law
    (the k-th standard deviation ~ k^-decay/2, so ~3.5 decades of eigenvalues at d = 2048) in a random basis."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    scale = torch.arange(1, d + 1, dtype=torch.float64) ** (-decay / 2)
    mean = 0.4 + 0.2 * torch.rand(d, generator=g, dtype=torch.float64) + shift
    return (torch.randn(n, d, generator=g, dtype=torch.float64) * scale) @ q.T + mean


# ------------------------------------------------------------------------------------------------------ FID

def test_statistics_are_torch_fidelitys():
    """Mean and N-1 covariance as numpy.cov computes them, from float32 features too (converted first)."""
    x = realistic_features(300, 64, seed=0).float()
    mu, sigma = statistics(x)
    ref = fid_features_to_statistics(x.double())
    assert mu.dtype == sigma.dtype == torch.float64
    assert torch.allclose(mu, torch.from_numpy(ref["mu"]), rtol=1e-13, atol=0)
    assert torch.allclose(sigma, torch.from_numpy(ref["sigma"]), rtol=0, atol=1e-14 * ref["sigma"].max())
    with pytest.raises(ValueError):
        statistics(x[:1])


@pytest.mark.parametrize("n", [500, 20])  # full rank; rank 19 of 64
def test_psd_sqrt_is_the_symmetric_root(n):
    """R symmetric, R R = S to rounding (relative to S's largest eigenvalue), R's eigenvalues the roots of S's:
    for a rank-deficient S, rounding's small negative eigenvalues are clipped to a root of 0."""
    s = statistics(realistic_features(n, 64, seed=1))[1]
    r = psd_sqrt(s)
    lam_max = torch.linalg.eigvalsh(s).max()
    assert torch.equal(r, r.T) or (r - r.T).abs().max() <= 1e-14 * lam_max.sqrt()
    assert (r @ r - s).abs().max() <= 1e-12 * lam_max
    roots = torch.linalg.eigvalsh(r)
    assert roots.min() >= -1e-12 * lam_max.sqrt()
    assert torch.allclose(roots[-min(n - 1, 64):], torch.linalg.eigvalsh(s)[-min(n - 1, 64):].sqrt(), rtol=1e-8)


@pytest.mark.parametrize("zeros", [0, 10])
def test_frechet_distance_closed_form_of_commuting_covariances(zeros):
    """Covariances with common eigenvectors Q: FID = |mu1 - mu2|^2 + sum(a + b - 2 sqrt(a b)) over their
    eigenvalues a, b, exactly. Float64 rounding: ~1e-13 relative, but for S1's `zeros` zero eigenvalues,
    which R S1 R's eigensolver returns as rounding of size up to ~d u |R S1 R| (u = 2**-53): the square
    root of each may add sqrt(d u |R S1 R|) to the trace term, twice that to FID."""
    g = torch.Generator().manual_seed(2)
    d = 128
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    a, b = torch.rand(d, generator=g, dtype=torch.float64) * 3, torch.rand(d, generator=g, dtype=torch.float64) * 3
    a[:zeros] = 0
    mu1, mu2 = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    s1, s2 = (q * a) @ q.T, (q * b) @ q.T
    expected = float(((mu1 - mu2) ** 2).sum() + (a + b - 2 * (a * b).sqrt()).sum())
    u = torch.finfo(torch.float64).eps / 2
    tol = 1e-12 * expected + 2 * zeros * math.sqrt(d * u * float((a * b).max()))
    assert abs(frechet_distance(mu1, s1, mu2, s2) - expected) <= tol
    assert abs(frechet_distance(mu2, s2, mu2, s2)) <= 1e-12 * float(b.sum())


@pytest.mark.parametrize("n1,n2", [(3000, 4000), (100, 150)])  # full rank; ranks 99 and 149 of 256
def test_frechet_distance_equals_torch_fidelity_256d(n1, n2):
    """Full rank: the two routes agree to ~1e-12 (both backward stable on well-conditioned inputs).
    Rank-deficient: the oracle's square roots of the product's ~100 zero eigenvalues are rounding noise of
    size ~sqrt(d u) lam_max each, so the routes differ by ~1e-9 relative; the bar is the oracle's 1e-4."""
    a = realistic_features(n1, 256, seed=3)
    b = realistic_features(n2, 256, seed=4, shift=0.05)
    theirs = torch_fidelity_fid(a, b)
    assert ours(a, b) == pytest.approx(theirs, rel=1e-4 if n1 < 256 else 1e-10)


def test_cached_root_gives_the_same_distance():
    a, b = realistic_features(400, 96, seed=5), realistic_features(300, 96, seed=6, shift=0.1)
    (m1, s1), (m2, s2) = statistics(a), statistics(b)
    assert frechet_distance(m1, s1, m2, s2, psd_sqrt(s2)) == frechet_distance(m1, s1, m2, s2)


def test_non_finite_trace_retried_with_torch_fidelitys_offset(monkeypatch, caplog):
    """torch-fidelity's fallback, mirrored: a non-finite trace term is computed again with 1e-6 added to
    both covariances' diagonals, and a warning says so; statistics that are not finite give NaN."""
    a, b = realistic_features(200, 32, seed=7), realistic_features(200, 32, seed=8, shift=0.1)
    (m1, s1), (m2, s2) = statistics(a), statistics(b)
    eye = torch.eye(32, dtype=torch.float64)
    with_offset = frechet_distance(m1, s1 + 1e-6 * eye, m2, s2 + 1e-6 * eye)
    real_trace = fid._trace_sqrt_product
    calls = []

    def first_one_fails(s, r):
        calls.append(1)
        return torch.tensor(math.nan, dtype=torch.float64) if len(calls) == 1 else real_trace(s, r)
    monkeypatch.setattr(fid, "_trace_sqrt_product", first_one_fails)
    with caplog.at_level(logging.WARNING, logger="gan.eval.fid"):
        got = frechet_distance(m1, s1, m2, s2)
    assert len(calls) == 2 and got == pytest.approx(with_offset, rel=1e-12)
    assert "adding 1e-06 to diagonal of cov estimates" in caplog.text
    monkeypatch.setattr(fid, "_trace_sqrt_product", real_trace)
    s_nan = s1.clone()
    s_nan[3, 3] = math.nan
    assert math.isnan(frechet_distance(m1, s_nan, m2, s2))


def test_frechet_distance_refuses_mismatched_shapes():
    mu, s = statistics(realistic_features(50, 8, seed=9))
    with pytest.raises(ValueError, match="shapes differ"):
        frechet_distance(mu, s, mu[:4], s[:4, :4])


@pytest.mark.slow
def test_fid_kid_equal_torch_fidelity_on_10k_synthetic_2048d():
    """10k features of 2048 dimensions with a decaying spectrum, against 10k others: both covariances full
    rank (condition ~1e4), where the oracle's route and ours agree to ~1e-11 relative. KID on 25 subsets
    of 1000 (the default's size; a quarter of its count, for time)."""
    a = realistic_features(10_000, 2048, seed=10)
    b = realistic_features(10_000, 2048, seed=11, shift=0.02)
    theirs = torch_fidelity_fid(a, b)
    assert ours(a, b) == pytest.approx(theirs, rel=1e-4)
    got, want = kernel_inception_distance(a, b, 25, 1000, SEED), torch_fidelity_kid(a, b, 25, 1000)
    assert abs(got[0] - want[0]) <= 1e-6 and abs(got[1] - want[1]) <= 1e-6


# ------------------------------------------------------------------------------------------------------ KID

@pytest.mark.parametrize("n1,n2,subsets,m", [
    (300, 400, 20, 300),   # every block from the sets' whole kernel matrices
    (300, 400, 5, 50),     # every block from the subsets' own kernel matrices
    (100, 2000, 10, 100),  # the first set's whole matrix, the second set and the cross term by subsets
])
def test_kid_equals_torch_fidelity(n1, n2, subsets, m):
    """The same subsets (torch-fidelity's RNG and draws) and the same unbiased estimate: on float64
    features only the order of summation differs, ~1e-16 of the kernel sums (~1 per entry, m^2 entries
    each), so 1e-12 here. On float32 features, which torch-fidelity's own pipeline hands it (its maths
    then in float32), the difference is float32 rounding, ~1e-7: the oracle's bar of 1e-6."""
    a = realistic_features(n1, 64, seed=12).float()
    b = realistic_features(n2, 64, seed=13, shift=0.05).float()
    got = kernel_inception_distance(a, b, subsets, m, SEED)
    want = torch_fidelity_kid(a.double(), b.double(), subsets, m)
    assert abs(got[0] - want[0]) <= 1e-12 and abs(got[1] - want[1]) <= 1e-12
    assert got[0] > 1e-3  # a real difference, not two zeros
    want32 = torch_fidelity_kid(a, b, subsets, m)
    assert abs(got[0] - want32[0]) <= 1e-6 and abs(got[1] - want32[1]) <= 1e-6


def test_kid_subsets_are_torch_fidelitys_draws():
    """numpy's RandomState(seed): for each subset a choice without replacement from the first set, then
    from the second."""
    first, second = kid.subset_indices(50, 70, 3, 10, SEED)
    rng = np.random.RandomState(SEED)
    for i in range(3):
        assert first[i].tolist() == rng.choice(50, 10, replace=False).tolist()
        assert second[i].tolist() == rng.choice(70, 10, replace=False).tolist()


def test_kid_refuses_subsets_larger_than_a_set():
    a, b = torch.zeros(10, 4), torch.zeros(20, 4)
    with pytest.raises(ValueError, match="subset size 11"):
        kernel_inception_distance(a, b, 2, 11)
    with pytest.raises(ValueError):
        kernel_inception_distance(a, torch.zeros(20, 5), 2, 5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fid_kid_on_cuda_equal_cpu():
    """The same float64 maths on the GPU: eigensolvers and matrix products of other libraries, so rounding
    differs, by ~1e-12 relative for these well-conditioned statistics."""
    a = realistic_features(4000, 2048, seed=14).float()
    b = realistic_features(3000, 2048, seed=15, shift=0.02).float()
    on = {dev: (ours(a.to(dev), b.to(dev)), kernel_inception_distance(a.to(dev), b.to(dev), 50, 1000, SEED))
          for dev in ("cpu", "cuda")}
    assert on["cuda"][0] == pytest.approx(on["cpu"][0], rel=1e-9)
    assert abs(on["cuda"][1][0] - on["cpu"][1][0]) <= 1e-10 and abs(on["cuda"][1][1] - on["cpu"][1][1]) <= 1e-10


def test_bench_times_our_distance_against_torch_fidelitys_on_the_same_statistics():
    """`bench eval`'s Fréchet-distance row: both sides scored the same statistics (their FIDs agree), and
    the row is a time ratio."""
    from gan.tools.bench_eval import bench_frechet_distance
    a, b = realistic_features(300, 64, seed=16).float(), realistic_features(400, 64, seed=17, shift=0.1).float()
    row = bench_frechet_distance(torch.device("cpu"), a, b, repeats=1)
    assert row.what == "Fréchet distance from 64-d statistics: ours vs torch-fidelity's"
    assert row.ratio == pytest.approx(row.baseline / row.ours) and row.unit == "ms"
    assert row.extra["fid_ours"] == pytest.approx(ours(a, b), rel=1e-12)
    assert row.extra["fid_rel_diff"] <= 1e-10 and row.extra["reference_root_once_ms"] > 0
