"""The real images FID/KID compare against, as a run's config names them (eval.reference)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from gan.core.config import Config
from gan.core.data import ImageData, dataset_identity, load_dataset
from gan.core.errors import UserError


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
