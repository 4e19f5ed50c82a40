"""FID / KID / IS, precision / recall / density / coverage for generated images: torch-fidelity's Inception, our FID and KID on the evaluation device.

Features come from torch-fidelity's ``FeatureExtractorInceptionV3`` (uint8 in, its TF-compatible bilinear resize
to 299 inside), run in batches under ``torch.inference_mode`` with the model in channels_last. FID (gan/eval/fid.py)
and KID (gan/eval/kid.py) are computed in float64 where the features are, with torch-fidelity's definitions
and KID subsets, and tested against torch-fidelity's own functions; IS is torch-fidelity's
``isc_features_to_metric``. Reference (real-image) features, their FID statistics and the square root of their
covariance are cached on disk. Optional extras on other networks' features (precision/recall on VGG16, FD_DINOv2)
are in gan/eval/extras.py.

    weights = resolve_inception_weights(None, cache_dir=None)           # gan.eval.inception; offline: no IS
    ev = Evaluator(weights, torch.device("cuda"), lambda: real_uint8, "cifar10-train-50000")
    ev.score(fake_uint8)  # {"fid", "kid_mean", "kid_std", ["isc_mean", "isc_std"], "precision", "recall",
                          #  "density", "coverage", [the extras' keys], "num_samples"}
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
from typing import Callable, Sequence

import torch
from torch_fidelity.defaults import DEFAULTS
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
from tqdm.auto import tqdm

from gan.core.checkpoint import atomic_save
from gan.eval import extras as extra_metrics, fid, inception, prdc
from gan.eval.inception import InceptionExtractor, InceptionWeights, default_cache_dir
from gan.eval.kid import kernel_inception_distance

__all__ = ["Evaluator", "IS_UNAVAILABLE_MESSAGE"]

log = logging.getLogger(__name__)

IS_UNAVAILABLE_MESSAGE = "IS unavailable: needs the full torch-fidelity Inception weights"
_is_unavailable_reported = False  # the message above is printed once per process

# On CPU, forwards of more than this many images do not get faster per image and use GBs of activations at 299x299.
# Measured on the shared 2-core dev CPU (channels_last, inference_mode), ms/img at 16/32/64/128: quiet machine
# ~49/54/60/83; under load from other jobs 16 is the worst and 64 the best. 32 is the compromise.
# `batch_size` still sets the forward batch on CUDA.
CPU_MAX_FORWARD_BATCH = 32
# 2: the file also holds sigma_sqrt, the covariance's square root FID needs. A version-1 file is upgraded in
# place (the root is computed from its sigma), so its features are not extracted again.
REFERENCE_CACHE_FORMAT = 2
_REFERENCE_STATS = ("mu", "sigma", "sigma_sqrt", "features")


def _report_is_unavailable() -> None:
    global _is_unavailable_reported
    if not _is_unavailable_reported:
        _is_unavailable_reported = True
        print(IS_UNAVAILABLE_MESSAGE, file=sys.stderr, flush=True)
        log.debug(IS_UNAVAILABLE_MESSAGE)


def _check_images(images: torch.Tensor, what: str, min_count: int = 2) -> None:
    if not torch.is_tensor(images) or images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        desc = (f"{tuple(images.shape)} {images.dtype}" if torch.is_tensor(images) else type(images).__name__)
        raise TypeError(f"{what}: expected a uint8 tensor (N,3,H,W), got {desc}")
    if images.shape[0] < min_count:
        raise ValueError(f"{what}: need at least {min_count} images, got {images.shape[0]}")


def _reference_cache_slug(reference_id: str) -> str:
    """The reference's part of its cache files' names (one per feature extractor)."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", reference_id)[:64]
    rid = hashlib.sha1(reference_id.encode()).hexdigest()[:8]
    return f"ref-{slug}-{rid}"


def _reference_cache_name(reference_id: str, weights_identity: str) -> str:
    return f"{_reference_cache_slug(reference_id)}-inception{weights_identity}.pt"


class Evaluator:
    """Scores generated images against a fixed set of real images (FID, KID, and IS when the head exists).

    ``reference()`` returns the real images as a uint8 tensor (N,3,H,W); it is called only when the reference
    cache (``<cache_dir>/ref-<reference_id>-...-inception<weights.identity>.pt``) is missing. The file holds the
    reference features (float32, as the network produces them), their FID statistics and the covariance's
    square root (float64), so ``reference_id`` must change whenever the reference images do (include e.g. the
    split and N in it). Features, statistics and scores stay on ``device`` until the scores are read.
    ``extras``: keys of gan/eval/extras.py's EXTRAS to compute as well, where their weights can be had
    (downloaded only if ``allow_download``).
    """

    def __init__(self, weights: InceptionWeights, device: torch.device, reference: Callable[[], torch.Tensor],
                 reference_id: str, cache_dir: str | None = None, batch_size: int = 200,
                 kid_subset_size: int = DEFAULTS["kid_subset_size"], kid_subsets: int = DEFAULTS["kid_subsets"],
                 verbose: bool = True, manifold: bool = True, extras: Sequence[str] = (),
                 allow_download: bool = True):
        if batch_size < 1 or kid_subset_size < 2 or kid_subsets < 1:
            raise ValueError("batch_size must be >= 1, kid_subset_size >= 2, kid_subsets >= 1")
        self.weights = weights
        self.device = torch.device(device)
        self.reference = reference
        self.reference_id = reference_id
        self.cache_dir = os.path.abspath(os.path.expanduser(cache_dir)) if cache_dir else default_cache_dir()
        self.batch_size = int(batch_size)
        self.kid_subset_size = int(kid_subset_size)
        self.kid_subsets = int(kid_subsets)
        self.verbose = verbose
        self.manifold = manifold  # precision, recall, density and coverage (gan/eval/prdc.py)
        self.has_head = weights.has_head
        self._features_list = ["2048", "logits_unbiased"] if self.has_head else ["2048"]
        self._model: InceptionExtractor | None = None
        self._ref: dict | None = None  # as cached, on the CPU
        self._ref_on_device: dict | None = None  # the same tensors on the evaluation device
        if not self.has_head:
            _report_is_unavailable()
        self.extras = extra_metrics.ExtraMetrics(extras, self.device, self.cache_dir, reference_id,
                                                 _reference_cache_slug(reference_id), allow_download, verbose)

    @classmethod
    def from_config(cls, cfg, device: torch.device, train_data=None, progress: bool = True) -> "Evaluator":
        """The Evaluator a run's config describes: its Inception weights (metrics.*), reference images
        (eval.reference, eval.reference_samples) and metric settings. `train_data`: a callable returning
        the training ImageData already in memory, used when the reference is the training set."""
        from gan.core import distributed
        from gan.eval.reference import build_reference
        m = cfg.metrics

        def resolve():
            return inception.resolve_inception_weights(m.inception_weights, m.cache_dir, m.allow_download)
        # Under torchrun rank 0 first: it may convert or download the weights into the cache the others then read.
        weights = distributed.on_main(resolve)
        if not distributed.is_main():
            weights = resolve()
        load, ident = build_reference(cfg, train_data, progress)
        ev = cls(weights, device, load, ident, cache_dir=m.cache_dir, batch_size=cfg.eval.batch_size,
                 kid_subset_size=m.kid_subset_size, kid_subsets=m.kid_subsets, verbose=progress,
                 manifold=m.prdc, extras=extra_metrics.requested(m), allow_download=m.allow_download)
        if ev.extras.keys:
            # Rank 0 first, as for the Inception weights; then only the extras every rank has, since rank 0
            # scores the features all of them send.
            distributed.on_main(ev.extras.load)
            loaded = ev.extras.load()
            ev.extras.keep([k for k in ev.extras.keys if distributed.all_true(k in loaded)])
        return ev

    @property
    def model(self) -> InceptionExtractor:
        """The Inception network, loaded on first use: a cached reference and no images to score need none."""
        if self._model is None:
            model = InceptionExtractor("inception-v3-compat", self._features_list, self.weights.path,
                                       has_head=self.has_head)
            self._model = model.eval().to(self.device, memory_format=torch.channels_last)
        return self._model

    # ----------------------------------------------------------------------------------------------- features
    def _forward_batch_size(self) -> int:
        return self.batch_size if self.device.type == "cuda" else min(self.batch_size, CPU_MAX_FORWARD_BATCH)

    def _forward(self, model: torch.nn.Module, images: torch.Tensor, desc: str) -> list[torch.Tensor]:
        """A torch-fidelity extractor's outputs (float32) of uint8 images, each concatenated over the batches,
        on the evaluation device: no copy to the host per batch, whose wait would stall the next batch's
        launch on a GPU."""
        n = images.shape[0]
        step = self._forward_batch_size()
        outs = []
        with torch.inference_mode(), tqdm(total=n, desc=desc, unit="img", leave=False,
                                          disable=not self.verbose) as bar:
            for start in range(0, n, step):
                batch = images[start:start + step].to(self.device, non_blocking=True)
                outs.append([o.float() for o in model(batch)])
                bar.update(batch.shape[0])
        return [torch.cat(parts) for parts in zip(*outs)]

    def _extract(self, images: torch.Tensor, desc: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(2048-d float32 features, float32 logits_unbiased or None), both on the evaluation device."""
        out = self._forward(self.model, images, desc)
        return out[0], (out[1] if self.has_head else None)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Inception pool features (N, 2048) float64 on CPU of uint8 images (N,3,H,W) on any device."""
        _check_images(images, "features", min_count=1)
        return self._extract(images, "Inception features")[0].double().cpu()

    # ---------------------------------------------------------------------------------------------- reference
    @property
    def reference_cache_path(self) -> str:
        return os.path.join(self.cache_dir, _reference_cache_name(self.reference_id, self.weights.identity))

    def _load_reference_cache(self, path: str) -> dict | None:
        """The cached reference, upgraded from format 1 (no sigma_sqrt) in place; None when missing or stale."""
        if not os.path.isfile(path):
            return None
        try:
            ref = torch.load(path, map_location="cpu", weights_only=True)
            if (ref.get("format") not in (1, REFERENCE_CACHE_FORMAT) or ref.get("reference_id") != self.reference_id
                    or ref.get("weights_identity") != self.weights.identity):
                raise ValueError("metadata mismatch")
            needed = _REFERENCE_STATS if ref["format"] == REFERENCE_CACHE_FORMAT else ("mu", "sigma", "features")
            if missing := [k for k in needed if k not in ref]:
                raise ValueError(f"no {', '.join(missing)}")
        except Exception as e:  # unreadable / stale: recompute
            log.warning("ignoring reference cache %s (%s)", path, e)
            return None
        if ref["format"] == 1:
            ref["sigma_sqrt"] = fid.psd_sqrt(ref["sigma"].to(self.device)).cpu()
            ref["format"] = REFERENCE_CACHE_FORMAT
            atomic_save(ref, path)
        if self.verbose:
            print(f"Loaded reference statistics ({ref['num_samples']} images) from {path}", file=sys.stderr)
        return ref

    def prepare_reference(self) -> dict:
        """Loads the reference features/statistics from the cache, computing and caching them on a miss."""
        if self._ref is not None:
            return self._ref
        path = self.reference_cache_path
        ref = self._load_reference_cache(path)
        if ref is None:
            images = self.reference()
            _check_images(images, "reference()")
            feats, _ = self._extract(images, f"Reference features ({self.reference_id})")
            del images
            mu, sigma = fid.statistics(feats)
            # float32 features, as produced by the network; the statistics in float64
            self._ref_on_device = {"features": feats, "mu": mu, "sigma": sigma, "sigma_sqrt": fid.psd_sqrt(sigma)}
            ref = {"format": REFERENCE_CACHE_FORMAT, "reference_id": self.reference_id,
                   "weights_identity": self.weights.identity, "num_samples": int(feats.shape[0]),
                   **{k: v.cpu() for k, v in self._ref_on_device.items()}}
            os.makedirs(os.path.dirname(path), exist_ok=True)
            atomic_save(ref, path)
            if self.verbose:
                print(f"Cached reference statistics ({ref['num_samples']} images) at {path}", file=sys.stderr)
        self._ref = ref
        return ref

    def _reference_on_device(self) -> dict:
        if self._ref_on_device is None:
            ref = self.prepare_reference()
            self._ref_on_device = {k: ref[k].to(self.device) for k in _REFERENCE_STATS}
        return self._ref_on_device

    # -------------------------------------------------------------------------------------------------- score
    def score(self, images: torch.Tensor) -> dict:
        """FID, KID (and IS with the head) of uint8 images (N,3,H,W) against the reference set."""
        _check_images(images, "score")
        self.prepare_reference()  # first: on a cache miss it extracts the real images' features
        return self.score_features(*self.inception_outputs(images, on_device=True))

    def inception_outputs(self, images: torch.Tensor, on_device: bool = False
                          ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
        """(pool features, logits or None, {extra: its network's features}) of uint8 images: what
        score_features takes. On the CPU (one copy to the host at the end), e.g. to be gathered from several
        processes; or left on the evaluation device."""
        feats, logits = self._extract(images, "Inception features")
        extras = self.extras.features(images, self._forward)
        if on_device:
            return feats, logits, extras
        return (feats.cpu(), (logits.cpu() if logits is not None else None),
                {k: v.cpu() for k, v in extras.items()})

    def score_features(self, feats: torch.Tensor, logits: torch.Tensor | None = None,
                       extras: dict[str, torch.Tensor] | None = None) -> dict:
        """FID, KID (and IS with the head) from Inception outputs already computed (on any device), and the
        extras from their features."""
        ref = self._reference_on_device()
        feats = feats.to(self.device)
        n = int(feats.shape[0])
        mu, sigma = fid.statistics(feats)
        out = {"fid": fid.frechet_distance(mu, sigma, ref["mu"], ref["sigma"], ref["sigma_sqrt"])}
        subset = min(self.kid_subset_size, n, int(ref["features"].shape[0]))
        out["kid_mean"], out["kid_std"] = kernel_inception_distance(
            feats, ref["features"], subsets=self.kid_subsets, subset_size=subset, seed=DEFAULTS["rng_seed"])
        if self.has_head:
            # torch-fidelity's 10 splits; fewer for small N so that every split holds at least 2 images.
            splits = min(DEFAULTS["isc_splits"], max(1, n // 2))
            isc = isc_features_to_metric(logits.cpu(), splits=splits, shuffle=True, rng_seed=DEFAULTS["rng_seed"])
            out["isc_mean"] = isc[KEY_METRIC_ISC_MEAN]
            out["isc_std"] = isc[KEY_METRIC_ISC_STD]
        if self.manifold and n > prdc.K_DENSITY_COVERAGE:  # k-NN balls need more than k samples
            out.update(self._manifold_metrics(feats))
        if extras:
            n_ref = int(self.prepare_reference()["num_samples"])
            out.update(self.extras.score(extras, n_ref, self.reference, self._forward))
        out["num_samples"] = n
        return out

    def _manifold_metrics(self, feats: torch.Tensor) -> dict:
        """Precision, recall, density and coverage against a fixed subset of the reference as large as the
        generated set (gan/eval/prdc.py); the subset's k-NN radii are cached in the reference file."""
        ref = self._reference_on_device()
        n_ref = int(ref["features"].shape[0])
        n = min(int(feats.shape[0]), n_ref)
        real = ref["features"][prdc.reference_subset(n_ref, n).to(self.device)]
        key = f"knn_radii_{n}"
        if key not in self._ref:
            self._ref[key] = prdc.knn_radii(real).cpu()
            atomic_save(self._ref, self.reference_cache_path)
        return prdc.manifold_metrics(real, feats, self._ref[key])
