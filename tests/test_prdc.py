"""Precision, recall, density and coverage (gan/eval/prdc.py) against the `prdc` package of Naeem et al., the
metrics' reference implementation, on the same features; and how the Evaluator reports them."""
from __future__ import annotations

import io
from contextlib import redirect_stdout

import pytest
import torch

from gan.eval import prdc

reference_prdc = pytest.importorskip("prdc")  # a test dependency (requirements.txt)


def _features(n: int, d: int, seed: int, shift: float = 0.0, spread: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) * spread + shift


def _oracle(real: torch.Tensor, fake: torch.Tensor) -> dict:
    """prdc's four metrics: precision and recall with k = 3, density and coverage with k = 5 (its function
    takes one k for all four)."""
    with redirect_stdout(io.StringIO()):  # it prints the set sizes
        pr = reference_prdc.compute_prdc(real.numpy(), fake.numpy(), nearest_k=prdc.K_PRECISION_RECALL)
        dc = reference_prdc.compute_prdc(real.numpy(), fake.numpy(), nearest_k=prdc.K_DENSITY_COVERAGE)
    return {"precision": pr["precision"], "recall": pr["recall"], "density": dc["density"],
            "coverage": dc["coverage"]}


@pytest.mark.parametrize("n_real, n_fake, shift, spread", [
    (200, 200, 0.0, 1.0),    # the same distribution
    (300, 150, 0.7, 1.0),    # shifted: fidelity and diversity both drop
    (150, 300, 0.0, 0.4),    # collapsed towards the mode: high precision, low recall
    (120, 120, 0.0, 2.5),    # too spread: low precision, high recall
])
def test_the_four_metrics_equal_the_prdc_package(n_real, n_fake, shift, spread):
    real = _features(n_real, 16, seed=0)
    fake = _features(n_fake, 16, seed=1, shift=shift, spread=spread)
    ours = prdc.manifold_metrics(real, fake)
    want = _oracle(real, fake)
    assert ours.keys() == want.keys()
    for k in want:
        assert ours[k] == pytest.approx(float(want[k]), abs=1e-6), k


def test_they_tell_fidelity_from_diversity():
    real = _features(400, 8, seed=0)
    collapsed = prdc.manifold_metrics(real, _features(400, 8, seed=1, spread=0.3))
    spread = prdc.manifold_metrics(real, _features(400, 8, seed=1, spread=3.0))
    assert collapsed["precision"] > 0.9 > 0.3 > collapsed["recall"]
    assert spread["recall"] > 0.9 > 0.3 > spread["precision"]


def test_blocks_bound_memory_without_changing_the_result(monkeypatch):
    real, fake = _features(90, 8, seed=0), _features(70, 8, seed=1, shift=0.3)
    whole = prdc.manifold_metrics(real, fake)
    monkeypatch.setattr(prdc, "BLOCK_ELEMENTS", 100)  # one or two rows a block
    assert prdc.manifold_metrics(real, fake) == whole
    torch.testing.assert_close(prdc.knn_radii(real), prdc.knn_radii(real, ks=(3, 5)))


def test_cached_radii_give_the_same_result():
    real, fake = _features(60, 8, seed=0), _features(50, 8, seed=1)
    assert prdc.manifold_metrics(real, fake, prdc.knn_radii(real).float()) == prdc.manifold_metrics(real, fake)


def test_reference_subset_is_fixed_and_as_large_as_the_generated_set():
    a = prdc.reference_subset(1000, 100)
    assert torch.equal(a, prdc.reference_subset(1000, 100)) and len(a.unique()) == 100
    assert torch.equal(prdc.reference_subset(50, 100), torch.arange(50))


def test_evaluator_reports_them_and_caches_the_reference_radii(tmp_path):
    from gan.eval.inception import InceptionWeights
    from gan.eval.metrics import Evaluator

    class _Features:
        """Stands in for Inception: the flattened first 64 pixels as features."""
        def __call__(self, images):
            return (images.flatten(1)[:, :64].float(),)

    real_images = torch.randint(0, 256, (40, 3, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    fake_images = torch.randint(0, 256, (30, 3, 8, 8), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    weights = InceptionWeights(path="unused", identity="pixels", has_head=False)
    ev = Evaluator(weights, torch.device("cpu"), lambda: real_images, "pixels-40", cache_dir=str(tmp_path),
                   verbose=False)
    ev._model = _Features()
    out = ev.score(fake_images)
    real = real_images.flatten(1)[:, :64].float()[prdc.reference_subset(40, 30)]
    want = prdc.manifold_metrics(real, fake_images.flatten(1)[:, :64].float())
    assert {k: out[k] for k in prdc.KEYS} == want
    cached = torch.load(ev.reference_cache_path, weights_only=True)
    torch.testing.assert_close(cached["knn_radii_30"], prdc.knn_radii(real))
    off = Evaluator(weights, torch.device("cpu"), lambda: real_images, "pixels-40", cache_dir=str(tmp_path),
                    verbose=False, manifold=False)
    off._model = _Features()
    assert not set(prdc.KEYS) & set(off.score(fake_images))
