"""gan/tools/diagnose.py: per-layer plots and statistics of a generator's normalization layers."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from gan.tools.diagnose import channel_moments, diagnose, format_report
from models.mixture_norm import MixtureNorm2d


class TinyGenerator(nn.Module):
    """z -> 4x4 (BN) -> 8x8 (MN) -> image, like the DCGAN generator but small."""

    def __init__(self, z_dim=8):
        super().__init__()
        self.z_dim = z_dim
        self.net = nn.Sequential(
            nn.ConvTranspose2d(z_dim, 16, 4, 1, 0, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.ConvTranspose2d(16, 8, 4, 2, 1, bias=False), MixtureNorm2d(8), nn.ReLU(),
            nn.ConvTranspose2d(8, 3, 4, 2, 1), nn.Tanh(),
        )

    def forward(self, z):
        return self.net(z.view(z.shape[0], self.z_dim, 1, 1))


class LogNormalLayer(nn.Module):
    """Pre-norm activations exp(z): known positive skewness (about 6.2) and kurtosis."""

    def __init__(self, z_dim=4):
        super().__init__()
        self.norm = nn.BatchNorm1d(z_dim)

    def forward(self, z):
        return self.norm(torch.exp(z))


def test_diagnose_writes_plots_and_finite_stats(tmp_path):
    torch.manual_seed(0)
    G = TinyGenerator()
    for _ in range(3):  # MN's running GMM comes from training steps
        G(torch.randn(16, 8)).mean().backward()
    G.train()
    rng = torch.get_rng_state()
    rows = diagnose(G, 8, tmp_path / "diag", "cpu", num_samples=32, channels=3, seed=1)
    assert torch.equal(torch.get_rng_state(), rng) and G.training  # caller's state untouched

    assert [(r["name"], r["kind"]) for r in rows] == [("net.1", "bn"), ("net.4", "mn")]
    for r in rows:
        png = tmp_path / "diag" / f"layer{r['index']:02d}_{r['name'].replace('.', '_')}.png"
        assert r["png"] == str(png) and png.stat().st_size > 1000
        assert png.read_bytes()[:4] == b"\x89PNG"
        assert math.isfinite(r["skewness"]) and math.isfinite(r["excess_kurtosis"])
        # Each weight is rounded to 4 decimals (<= 5e-5 off); unrounded, the float32 weights sum to 1 up to
        # a few float32 roundoffs (u = 6e-8) per EM or running-average step, covered by 1e-5 (~170 u).
        assert len(r["mixture_weights"]) == 3 and abs(sum(r["mixture_weights"]) - 1) <= 3 * 5e-5 + 1e-5
        assert len(r["channels"]) == 3
    mn = G.net[4]
    assert rows[1]["mixture_weights"] == [round(float(v), 4) for v in mn.running_lambda]
    # Same seed, same report; and the table names every layer.
    again = diagnose(G, 8, tmp_path / "diag2", "cpu", num_samples=32, channels=3, seed=1)
    assert [r["skewness"] for r in again] == [r["skewness"] for r in rows]
    assert [r["mixture_weights"] for r in again] == [r["mixture_weights"] for r in rows]
    report = format_report(rows)
    assert "net.1" in report and "net.4" in report and "mn" in report


def test_skewed_input_has_positive_skewness(tmp_path):
    rows = diagnose(LogNormalLayer(), 4, tmp_path, "cpu", num_samples=4096, channels=2)
    (row,) = rows
    assert row["kind"] == "bn"
    assert row["skewness"] > 2.0 and row["excess_kurtosis"] > 5.0
    # Symmetric data: near zero; constant channels do not produce NaNs.
    x = torch.randn(20000, 3)
    x[:, 2] = 1.5
    skew, kurt, valid = channel_moments(x)
    assert valid.tolist() == [True, True, False]
    # Sampling error, not rounding: for 20000 normal samples the standard errors are sqrt(6 / n) = 0.017 and
    # sqrt(24 / n) = 0.035, so these bounds sit ~6 standard errors out.
    assert skew[:2].abs().max() < 0.1 and kurt[:2].abs().max() < 0.2
    assert torch.isfinite(skew).all() and torch.isfinite(kurt).all()


def test_mode_overlap_is_0_for_separated_and_1_for_identical_components():
    from gan.tools.diagnose import mode_overlap
    from models.mixture_core import GMM
    c = 4
    lam = torch.tensor([0.5, 0.3, 0.2])
    # 20 std apart: BC = exp(-20^2 / 8) = exp(-50) for every pair and channel.
    separated = GMM(lam, torch.tensor([[0.0] * c, [20.0] * c, [-20.0] * c]), torch.ones(3, c))
    assert mode_overlap(separated) < 1e-20
    identical = GMM(lam, torch.full((3, c), 1.5), torch.full((3, c), 0.3))
    assert mode_overlap(identical) == pytest.approx(1.0, abs=1e-12)
    # Two unit-variance components 2 apart: BC = exp(-d^2 / (4 (1 + 1))) = exp(-0.5) in every channel.
    two = GMM(torch.tensor([0.7, 0.3]), torch.tensor([[0.0] * c, [2.0] * c]), torch.ones(2, c))
    assert mode_overlap(two) == pytest.approx(math.exp(-0.5), rel=1e-12)
    # Unequal variances: BC = sqrt(2 s1 s2 / (s1^2 + s2^2)) for equal means (s = std).
    wide = GMM(torch.tensor([0.5, 0.5]), torch.zeros(2, c), torch.tensor([[1.0] * c, [4.0] * c]))
    assert mode_overlap(wide) == pytest.approx(math.sqrt(2 * 1 * 2 / (1 + 4)), rel=1e-12)
    # Per-channel weights: channel 0's components separated, channel 1's identical -> the mean, 0.5.
    pc = GMM(torch.full((2, 2), 0.5), torch.tensor([[0.0, 1.0], [30.0, 1.0]]), torch.ones(2, 2))
    assert mode_overlap(pc) == pytest.approx(0.5, abs=1e-12)
    # A nearly dead component counts by its weight: the figure is the other pair's.
    dying = GMM(torch.tensor([0.5, 0.5 - 1e-9, 1e-9]), torch.tensor([[0.0] * c, [2.0] * c, [0.0] * c]),
                torch.ones(3, c))
    assert mode_overlap(dying) == pytest.approx(math.exp(-0.5), rel=1e-6)
    assert mode_overlap(GMM(torch.ones(1), torch.zeros(1, c), torch.ones(1, c))) is None


def test_diagnose_reports_per_channel_mixtures(tmp_path):
    torch.manual_seed(0)
    G = TinyGenerator()
    G.net[4] = MixtureNorm2d(8, posteriors="per_channel")
    for _ in range(3):
        G(torch.randn(16, 8)).mean().backward()
    rows = diagnose(G, 8, tmp_path, "cpu", num_samples=32, channels=2)
    mn = rows[1]
    assert mn["kind"] == "mn" and len(mn["mixture_weights"]) == 3
    assert abs(sum(mn["mixture_weights"]) - 1) < 1e-3
    assert mn["mixture_weights"] == sorted(mn["mixture_weights"], reverse=True)
    assert all(0.0 <= r["mode_overlap"] <= 1.0 for r in rows)
    assert "overlap" in format_report(rows)
