"""Images from a generator, and the real images they are scored against."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import torch

from gan.core.config import Config
from gan.core.data import IMAGE_SIZE, ImageData, dataset_identity, load_dataset
from gan.core.errors import UserError


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 pixels, the form real images and the Inception network use."""
    return images.float().add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)


@torch.no_grad()
def generate(G: torch.nn.Module, num: int, z_dim: int, seed: int, device: torch.device,
             batch_size: int = 500, g_mode: str = "eval", start: int = 0, stop: int | None = None) -> torch.Tensor:
    """`num` images in [-1, 1] from fixed noise; the caller's RNG streams and G are left untouched.

    start/stop: only images [start, stop) of those `num` (one process's share); with start a multiple
    of batch_size they come from the same forward batches, so the same pixels, as in the full call.
    """
    if g_mode == "train":
        G = copy.deepcopy(G)  # batch statistics without touching the real model's running state
    was_training = G.training
    G.train(g_mode == "train")
    stop = num if stop is None else stop
    z = torch.randn(num, z_dim, generator=torch.Generator().manual_seed(seed))[start:stop].to(device)
    forked = [device.index or 0] if device.type == "cuda" else []
    # Eagerly, even when G was compiled for training: sampling's batch size, grad mode and (eval) code path
    # would each compile G again, for a few forwards that cost little next to Inception's.
    with torch.random.fork_rng(devices=forked), torch.compiler.set_stance("force_eager"):  # EM draws from the global RNG
        out = [G(z[i:i + batch_size]).float() for i in range(0, len(z), batch_size)]
    G.train(was_training)
    return torch.cat(out) if out else torch.empty(0, 3, IMAGE_SIZE, IMAGE_SIZE, device=device)


def build_reference(cfg: Config, train_data: Callable[[], ImageData] | None = None, progress: bool = True
                    ) -> tuple[Callable[[], torch.Tensor], str]:
    """(loader, identity) of the real images FID/KID compare against.

    The identity is cheap (a hash of a zip; names and sizes in a folder), so a cached reference never
    decodes any images.
    """
    ref, d = cfg.eval.reference, cfg.data
    if ref == "train" and train_data is not None:  # already read: its identity was computed then
        ident, load = train_data().identity, train_data
    elif ref == "train":
        ident = dataset_identity(d.source, d.path, d.split, d.resize)
        load = lambda: load_dataset(d.source, d.path, d.split, d.download, d.resize, progress)
    elif ref == "test":
        if d.source != "cifar10":
            raise UserError("eval.reference: test needs data.source cifar10; "
                            "for a folder or zip dataset give the test images' path instead")
        ident = dataset_identity("cifar10", d.path, "test", d.resize)
        load = lambda: load_dataset("cifar10", d.path, "test", d.download)
    else:
        if not Path(ref).exists():
            raise UserError(f"eval.reference {ref} does not exist")
        ident = dataset_identity("folder", ref, "", d.resize)
        load = lambda: load_dataset("folder", ref, resize=d.resize, progress=progress)
    n = cfg.eval.reference_samples

    def images() -> torch.Tensor:
        x = load().images
        if n and n < len(x):  # a fixed random subset, the same every time
            x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:n]]
        return x
    return images, f"{ident}-n{n}" if n else ident


def evaluator_from_config(cfg: Config, device: torch.device, train_data: Callable[[], ImageData] | None = None,
                          progress: bool = True, weights=None):
    """The Evaluator a run's config describes: its Inception weights, reference images and metric settings.

    weights: already resolved InceptionWeights (under torchrun rank 0 resolves them first); else resolved here."""
    from gan.eval.metrics import Evaluator, resolve_inception_weights
    m = cfg.metrics
    if weights is None:
        weights = resolve_inception_weights(m.inception_weights, m.cache_dir, m.allow_download)
    load, ident = build_reference(cfg, train_data, progress)
    return Evaluator(weights, device, load, ident, cache_dir=m.cache_dir, batch_size=cfg.eval.batch_size,
                     kid_subset_size=m.kid_subset_size, kid_subsets=m.kid_subsets, verbose=progress)
