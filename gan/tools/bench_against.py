"""`bench norm --against REV`: this checkout's MN beside MN as it is at git revision REV, in one process.

REV's `models/` is exported into a temporary package and its MixtureNorm2d swapped into a copy of the same
DCGAN (same weights, same state), so that one run times both codes side by side, with BN as the common baseline:
step time, tensors saved for backward, and, for one layer, the aten ops it dispatches eagerly and the kernels and
library calls it launches compiled (`fuse`). A change to how MN is computed shows here what it costs or saves.
"""
from __future__ import annotations

import importlib
import io
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

from gan.core.errors import UserError
from gan.tools.bench_common import (Row, activation_bytes, make_trainer, paired_ratio, round_times, run_steps,
                                    synthetic_data)
from gan.tools.op_count import compiled_launches, count_ops

ROOT = Path(__file__).resolve().parents[2]


def mixture_norm_at(rev: str) -> type:
    """MixtureNorm2d of `models/` at git revision `rev`, imported as its own package beside ours."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--verify", f"{rev}^{{commit}}"], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout.strip()
        archive = subprocess.run(["git", "archive", sha, "models"], cwd=ROOT, check=True, capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise UserError(f"--against {rev}: not a revision of this git checkout") from e
    package = f"models_at_{sha[:12]}"
    tmp = Path(tempfile.mkdtemp(prefix="mn-against-"))
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(tmp, filter="data")
    (tmp / "models").rename(tmp / package)
    for f in (tmp / package).glob("*.py"):  # its imports of its own modules point at the exported package
        f.write_text(re.sub(r"\b(from|import) models\b", rf"\1 {package}", f.read_text()))
    sys.path.insert(0, str(tmp))
    return importlib.import_module(f"{package}.mixture_norm").MixtureNorm2d


def swap_layers(model: nn.Module, cls: type) -> None:
    """Replaces every MixtureNorm of model by cls with the same options and state, sharing the parameters (an
    optimizer built on model keeps updating them)."""
    from models.mixture_norm import OPTIONS, MixtureNorm  # REV's layer takes the same options
    for parent in list(model.modules()):
        for name, layer in list(parent.named_children()):
            if isinstance(layer, MixtureNorm):
                like = layer.gmm_mu
                twin = cls(layer.num_features, **{o: getattr(layer, o) for o in OPTIONS}).to(like.device, like.dtype)
                twin.load_state_dict(layer.state_dict())
                if layer.affine:
                    twin.weight, twin.bias = layer.weight, layer.bias
                twin.train(layer.training)
                setattr(parent, name, twin)


def bench_against(device: torch.device, rev: str, steps: int, repeats: int, ngf: int = 64,
                  batch_size: int = 64) -> list[Row]:
    """The default MN's DCGAN step, this code vs REV's (and each vs BN), then one layer's ops and launches."""
    other = mixture_norm_at(rev)
    data = synthetic_data()
    common = {"model.ngf": ngf, "model.ndf": ngf, "train.batch_size": batch_size}
    with tempfile.TemporaryDirectory() as tmp:
        ours, theirs, bn = (make_trainer(device.type, norm, data, Path(tmp) / name, **common)
                            for name, norm in (("ours", "mn"), ("theirs", "mn"), ("bn", "bn")))
        swap_layers(theirs.G, other)
        trainers = [ours, theirs, bn]
        fns = [lambda tr=tr: run_steps(tr, steps) for tr in trainers]
        for fn in fns:  # warm-up
            fn()
        times = round_times(fns, repeats, device)
        saved = [activation_bytes(tr) / 2**20 for tr in trainers]
    t_ours, t_theirs, t_bn = (statistics.median(t) for t in times)
    ratio, low, high = paired_ratio(times[0], times[1])
    ms = 1e3 / steps
    # The ratio is the median of each round's: a few percent is within reach only if the quartiles are close.
    rows = [Row("norm", f"DCGAN step, MN (K=3, 1 EM step), this code vs {rev}", t_ours * ms, t_theirs * ms,
                "ms/step", f"MN step time, this code / {rev}", ratio,
                {"per-round ratio, lower quartile": low, "per-round ratio, upper quartile": high,
                 "MN/BN step time, this code": t_ours / t_bn, f"MN/BN step time, {rev}": t_theirs / t_bn}),
            Row("norm", f"tensors saved for backward per step, MN, this code vs {rev}", saved[0], saved[1], "MiB",
                f"MN memory, this code / {rev}", saved[0] / saved[1], {"BN MiB": saved[2]})]
    return rows + _layer_counts(device, other, rev)


def _layer_counts(device: torch.device, other: type, rev: str) -> list[Row]:
    """One default MN layer's training forward+backward at batch 4x64x4x4: aten ops eagerly, launches compiled."""
    from models.mixture_norm import MixtureNorm2d
    torch.manual_seed(0)
    x = torch.randn(4, 64, 4, 4, device=device).to(memory_format=torch.channels_last).requires_grad_()
    g = torch.randn_like(x)
    counts = []
    for cls in (MixtureNorm2d, other):
        eager, fused = cls(64, fuse="never").to(device), cls(64, fuse="always").to(device)
        for layer in (eager, fused):  # the first steps seed the mixture (and compile)
            for _ in range(3):
                layer(x).backward(g)
        counts.append((count_ops(lambda: eager(x).backward(g)).ops, compiled_launches(lambda: fused(x).backward(g))))
    (ops, launched), (ops_then, launched_then) = counts
    return [Row("norm", f"one MN layer's eager forward+backward (4x64x4x4), this code vs {rev}", ops, ops_then,
                "aten ops", f"MN eager ops, this code / {rev}", ops / ops_then),
            Row("norm", f"one MN layer compiled (fuse), this code vs {rev}", launched.total, launched_then.total,
                "launches", f"MN fused launches, this code / {rev}", launched.total / launched_then.total,
                {"generated kernels, this code": launched.kernels, f"generated kernels, {rev}": launched_then.kernels})]
