"""Optional metrics on other networks' features: precision and recall on VGG16 features (Kynkäänniemi et al.
2019's own choice, k = 3) and the Fréchet distance on DINOv2 ViT-L/14 features (FD_DINOv2, Stein et al. 2023).
Off by default: metrics.vgg16_prc and metrics.fd_dinov2 turn them on.

The networks are torch-fidelity's extractors from its registry ("vgg16", "dinov2-vit-l-14"), each giving the
feature torch-fidelity itself uses for the metric; they take uint8 images and resize them to 224 inside. The
metrics are this package's (prdc.py, fid.py), the very functions the Inception features go through, so
FD_DINOv2 and FID differ in the features only. The weights come through torch hub (torchvision's VGG16 file;
the DINOv2 repository and its file) and are loaded with weights_only=True. A download is bounded by the
Inception download's timeout and refused outright when metrics.allow_download is false, so that only cached
files load then. Weights that cannot be had cost one line on stderr, and the evaluation goes on without them.

The reference side is cached per extractor beside the Inception reference (<cache_dir>/ref-...-<extractor>-
<layer>.pt): for FD the statistics of the whole reference; for precision and recall the features and k-NN radii
of the reference subset the Inception metrics use (prdc.reference_subset), so only those images go through VGG16.
"""
from __future__ import annotations

import contextlib
import http.client
import logging
import os
import socket
import sys
import urllib.error
from typing import Callable, Sequence

import torch
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor

from gan.core.checkpoint import atomic_save
from gan.eval import fid, inception, prdc

__all__ = ["EXTRAS", "ExtraMetrics", "unavailable_message"]

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
# Errors that mean the network could not be reached (offline, refused, timed out): "(offline?)" in the line.
NETWORK_ERRORS = (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException)
# (extra, allow_download) whose weights could not be had: said once, and not tried again, in this process.
_unavailable: set[tuple[str, bool]] = set()

Forward = Callable[[torch.nn.Module, torch.Tensor, str], list]  # the Evaluator's batched forward


class Extra:
    """One optional metric family: the torch-fidelity extractor it runs and what it computes on its features.

    key: the metrics.<key> switch; extractor: torch-fidelity's registry name; metric: whose default feature
    layer torch-fidelity picks ("fid", "prc"); label and weights: for the line saying it is unavailable."""
    min_samples = 2

    def __init__(self, key: str, extractor: str, metric: str, label: str, weights: str):
        self.key, self.extractor, self.metric, self.label, self.weights = key, extractor, metric, label, weights

    @property
    def layer(self) -> str:
        return FEATURE_EXTRACTORS_REGISTRY[self.extractor].get_default_feature_layer_for_metric(self.metric)

    def entry(self, n_reference: int, n: int) -> str:
        """The cache entry the reference side of n generated images is kept under."""
        raise NotImplementedError

    def reference_rows(self, n_reference: int, n: int) -> torch.Tensor | None:
        """The reference images it needs (None: all of them)."""
        raise NotImplementedError

    def reference_stats(self, feats: torch.Tensor) -> dict:
        raise NotImplementedError

    def score(self, feats: torch.Tensor, ref: dict) -> dict:
        raise NotImplementedError


class FrechetDistance(Extra):
    """The Fréchet distance (fid.py) between Gaussians fitted to the features, against the whole reference."""

    def entry(self, n_reference, n):
        return "all"

    def reference_rows(self, n_reference, n):
        return None

    def reference_stats(self, feats):
        mu, sigma = fid.statistics(feats)
        return {"mu": mu, "sigma": sigma, "sigma_sqrt": fid.psd_sqrt(sigma)}

    def score(self, feats, ref):
        mu, sigma = fid.statistics(feats)
        return {self.key: fid.frechet_distance(mu, sigma, ref["mu"], ref["sigma"], ref["sigma_sqrt"])}


class PrecisionRecall(Extra):
    """Precision and recall (prdc.py, k = 3) against the fixed reference subset as large as the generated set."""
    min_samples = prdc.K_DENSITY_COVERAGE + 1  # prdc's radii include k = 5's, as for the Inception metrics

    def __init__(self, key, extractor, metric, label, weights, suffix: str):
        super().__init__(key, extractor, metric, label, weights)
        self.suffix = suffix

    def entry(self, n_reference, n):
        return f"n{min(n, n_reference)}"

    def reference_rows(self, n_reference, n):
        return prdc.reference_subset(n_reference, min(n, n_reference))

    def reference_stats(self, feats):
        return {"features": feats, "knn_radii": prdc.knn_radii(feats)}

    def score(self, feats, ref):
        m = prdc.manifold_metrics(ref["features"], feats, ref["knn_radii"])
        return {f"precision_{self.suffix}": m["precision"], f"recall_{self.suffix}": m["recall"]}


EXTRAS: dict[str, Extra] = {e.key: e for e in (
    PrecisionRecall("vgg16_prc", "vgg16", "prc", "VGG16 precision/recall", "torchvision's VGG16 weights",
                    suffix="vgg16"),
    FrechetDistance("fd_dinov2", "dinov2-vit-l-14", "fid", "FD_DINOv2", "the DINOv2 weights"),
)}


def _is_network_error(e: BaseException | None) -> bool:
    """Whether e, or an error it was raised from or while handling, is the network's (torchvision retries a
    failed download once, and torch hub wraps its own in a RuntimeError)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, urllib.error.HTTPError):  # the server answered: not offline
            return False
        if isinstance(e, NETWORK_ERRORS):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def unavailable_message(extra: Extra, error: BaseException | None, allow_download: bool) -> str:
    """The one line saying the extra is skipped, and why."""
    if _is_network_error(error):
        why = "offline?" if allow_download else "not cached, and metrics.allow_download is false"
        return f"{extra.label} unavailable: could not fetch {extra.weights} ({why})"
    first = (str(error).splitlines() or [""])[0][:120]
    return f"{extra.label} unavailable: could not load {extra.weights} ({type(error).__name__}: {first})"


def _refuse_download(*args, **kwargs):
    raise urllib.error.URLError("downloads are off (metrics.allow_download: false)")


class _HeldOutput:
    """Stands in for stdout or stderr while an extractor loads. What the libraries write ("Downloading: ...",
    retries) is held back until a download really gets an answer, then it and the progress bar go through;
    if the load fails it is dropped, so that an offline machine gets the one line saying why, not theirs too."""

    def __init__(self, stream):
        self.stream, self.held, self.passing = stream, [], False

    def write(self, text: str) -> int:
        if self.passing:
            return self.stream.write(text)
        self.held.append(text)
        return len(text)

    def flush(self) -> None:
        if self.passing:
            self.stream.flush()

    def release(self) -> None:
        self.passing = True
        self.stream.write("".join(self.held))
        self.held.clear()

    def __getattr__(self, name):  # isatty, encoding, ... of the real stream
        return getattr(self.stream, name)


@contextlib.contextmanager
def _fetching(allowed: bool):
    """Every torch hub download (torchvision's weights go through it too) bounded as the Inception one is, or,
    when not allowed, refused at once, torch hub then using what it has cached; the libraries' output held
    back meanwhile (_HeldOutput). Yields the held output: dropped unless released."""
    urlopen, timeout, streams = torch.hub.urlopen, socket.getdefaulttimeout(), (sys.stdout, sys.stderr)
    held = [_HeldOutput(s) for s in streams]

    def answered(*args, **kwargs):
        response = urlopen(*args, **kwargs)
        for h in held:
            h.release()
        return response
    if allowed:
        # torch hub sets no timeout of its own: without one, a network that drops packets would hang here.
        socket.setdefaulttimeout(inception.DOWNLOAD_TIMEOUT)
    torch.hub.urlopen = answered if allowed else _refuse_download
    sys.stdout, sys.stderr = held
    try:
        yield held
    finally:
        sys.stdout, sys.stderr = streams
        torch.hub.urlopen = urlopen
        socket.setdefaulttimeout(timeout)


def load_extractor(extra: Extra, device: torch.device, allow_download: bool, verbose: bool
                   ) -> torch.nn.Module | None:
    """torch-fidelity's extractor for `extra` on `device`, or None (said once) when its weights cannot be had."""
    memo = (extra.key, allow_download)
    if memo in _unavailable:
        return None
    try:
        with inception._weights_only_loads(), _fetching(allow_download) as held:
            model = create_feature_extractor(extra.extractor, [extra.layer], cuda=False, verbose=verbose)
            for h in held:
                h.release()
    except Exception as e:  # offline, or a cache it cannot read: the run goes on without this metric
        _unavailable.add(memo)
        message = unavailable_message(extra, e, allow_download)
        print(message, file=sys.stderr, flush=True)
        log.debug("%s; the libraries said: %r", message, [h.held for h in held], exc_info=True)
        return None
    return model.eval().to(device)


class ExtraMetrics:
    """The extras one Evaluator computes: their networks, loaded once, and their cached reference side."""

    def __init__(self, keys: Sequence[str], device: torch.device, cache_dir: str, reference_id: str,
                 cache_slug: str, allow_download: bool, verbose: bool):
        unknown = [k for k in keys if k not in EXTRAS]
        if unknown:
            raise ValueError(f"unknown extra metric(s) {unknown}; known: {', '.join(EXTRAS)}")
        self.keys = tuple(dict.fromkeys(keys))  # requested
        self.device, self.cache_dir, self.reference_id = device, cache_dir, reference_id
        self.cache_slug, self.allow_download, self.verbose = cache_slug, allow_download, verbose
        self.models: dict[str, torch.nn.Module] = {}
        self._tried = False
        self._cache: dict[str, dict] = {}  # per extra: its reference file's contents, on the CPU
        self._on_device: dict[tuple[str, str], dict] = {}

    def load(self) -> tuple[str, ...]:
        """Loads the requested networks (once); returns the keys whose network is there."""
        if not self._tried:
            self._tried = True
            for key in self.keys:
                model = load_extractor(EXTRAS[key], self.device, self.allow_download, self.verbose)
                if model is not None:
                    self.models[key] = model
        return tuple(self.models)

    def keep(self, keys: Sequence[str]) -> None:
        """Only these (e.g. those every process of a job could load, so that all score the same ones)."""
        self.models = {k: m for k, m in self.models.items() if k in keys}

    def features(self, images: torch.Tensor, forward: Forward) -> dict[str, torch.Tensor]:
        """{key: float32 features on the evaluation device} of uint8 images, for every extra that is on."""
        self.load()
        return {key: forward(model, images, f"{EXTRAS[key].extractor} features")[0]
                for key, model in self.models.items()}

    def score(self, feats: dict[str, torch.Tensor], n_reference: int, reference: Callable[[], torch.Tensor],
              forward: Forward) -> dict:
        """The extras' metrics of generated features against the reference images (`reference()` is called
        only when a cache entry is missing)."""
        out = {}
        for key, f in feats.items():
            extra = EXTRAS[key]
            if key in self.models and f.shape[0] >= extra.min_samples:
                ref = self._reference(extra, n_reference, int(f.shape[0]), reference, forward)
                out.update(extra.score(f.to(self.device), ref))
        return out

    # ------------------------------------------------------------------------------------------ reference
    def cache_path(self, extra: Extra) -> str:
        return os.path.join(self.cache_dir, f"{self.cache_slug}-{extra.extractor}-{extra.layer}.pt")

    def _load_cache(self, extra: Extra) -> dict:
        path = self.cache_path(extra)
        fresh = {"format": CACHE_FORMAT, "reference_id": self.reference_id, "extractor": extra.extractor,
                 "layer": extra.layer, "entries": {}}
        if not os.path.isfile(path):
            return fresh
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True)
            if any(cached.get(k) != v for k, v in fresh.items() if k != "entries"):
                raise ValueError("metadata mismatch")
            if not isinstance(cached.get("entries"), dict):
                raise ValueError("no entries")
        except Exception as e:  # unreadable / stale: recompute
            log.warning("ignoring reference cache %s (%s)", path, e)
            return fresh
        return cached

    def _reference(self, extra: Extra, n_reference: int, n: int, reference: Callable[[], torch.Tensor],
                   forward: Forward) -> dict:
        if extra.key not in self._cache:
            self._cache[extra.key] = self._load_cache(extra)
        cache, entry = self._cache[extra.key], extra.entry(n_reference, n)
        if (extra.key, entry) in self._on_device:
            return self._on_device[(extra.key, entry)]
        if entry in cache["entries"]:
            stats = {k: v.to(self.device) for k, v in cache["entries"][entry].items()}
        else:
            images = reference()
            rows = extra.reference_rows(n_reference, n)
            if rows is not None:
                images = images[rows]
            feats = forward(self.models[extra.key], images, f"Reference {extra.extractor} features")[0]
            del images
            stats = extra.reference_stats(feats)
            cache["entries"][entry] = {k: v.cpu() for k, v in stats.items()}
            path = self.cache_path(extra)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            atomic_save(cache, path)
            if self.verbose:
                print(f"Cached {extra.extractor} reference statistics ({feats.shape[0]} images) at {path}",
                      file=sys.stderr)
        self._on_device[(extra.key, entry)] = stats
        return stats


def requested(metrics_config) -> tuple[str, ...]:
    """The extras a config's metrics section turns on."""
    return tuple(k for k in EXTRAS if getattr(metrics_config, k))
