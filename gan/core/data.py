"""Datasets as one uint8 tensor (N, 3, 32, 32), and a batch stream that is a pure function of the step.

Small images make the whole dataset fit in memory (CIFAR-10 is 150 MB as uint8), so there is no
DataLoader: batches are index lookups, on the GPU when the data lives there. Epoch order and flips
come from (seed, epoch) alone, which is what makes resume exact without saving loader state.
"""
from __future__ import annotations

import hashlib
import io
import socket
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torchvision
from PIL import Image, UnidentifiedImageError
from torchvision.transforms.v2 import functional as TF

from gan.core.errors import UserError

IMAGE_SIZE = 32
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")


class DataError(UserError):
    pass


@dataclass
class ImageData:
    images: torch.Tensor  # uint8 (N, 3, 32, 32)
    labels: torch.Tensor  # int64 (N,)
    classes: list[str]
    identity: str  # stable key for caches: what was read, and which version of it


def _content_identity(path: Path, extra: str) -> str:
    """A key that follows the data, not where it lives or when it was copied.

    A file (a zip) is hashed whole: a few tenths of a second for CIFAR-10. A folder is keyed by every
    file's relative path and size, which is cheap for 60k images; editing an image in place to the
    same byte count is the one change this misses.
    """
    h = hashlib.sha256(extra.encode())
    if path.is_file():
        with open(path, "rb") as f:
            h.update(hashlib.file_digest(f, "sha256").digest())
    else:
        for f in sorted(q for q in path.rglob("*") if q.is_file()):
            h.update(f"{f.relative_to(path).as_posix()}|{f.stat().st_size}\n".encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- CIFAR-10 through torchvision

def load_cifar10(root: str | Path, split: str = "train", download: bool = True) -> ImageData:
    root = Path(root)
    train = split == "train"
    try:
        ds = torchvision.datasets.CIFAR10(str(root), train=train, download=False)
    except RuntimeError:
        if not download:
            raise DataError(_cifar_missing(root, "download is off (data.download: false)")) from None
        ds = _download_cifar10(root, train)
    images = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))
    labels = torch.tensor(ds.targets, dtype=torch.int64)
    return ImageData(images, labels, list(ds.classes), dataset_identity("cifar10", root, split))


def _download_cifar10(root: Path, train: bool):
    # A download that cannot connect must fail fast, not hang the run.
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)
    try:
        return torchvision.datasets.CIFAR10(str(root), train=train, download=True)
    except Exception as e:  # URLError, timeouts, DNS failures: all mean "offline" to the user
        raise DataError(_cifar_missing(root, f"the download failed: {type(e).__name__}: {e}")) from None
    finally:
        socket.setdefaulttimeout(old)


def _cifar_missing(root: Path, why: str) -> str:
    return (f"CIFAR-10 not found in {root.resolve() / 'cifar-10-batches-py'} and {why}. "
            f"Put the official cifar-10-batches-py folder under data.path (--set data.path=DIR), "
            f"or train on an image folder or zip with --data PATH")


# ---------------------------------------------------------------- image folders and zips

def _list_folder(root: Path) -> list[tuple[str, Callable[[], bytes]]]:
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    return [(str(p.relative_to(root)), p.read_bytes) for p in files]


def _list_zip(zf: zipfile.ZipFile) -> list[tuple[str, Callable[[], bytes]]]:
    names = sorted(n for n in zf.namelist() if n.lower().endswith(IMAGE_EXTS) and not n.endswith("/")
                   and "__MACOSX" not in n)
    return [(n, (lambda n=n: zf.read(n))) for n in names]


def _to_32(img: torch.Tensor, name: str, resize: bool) -> torch.Tensor:
    if img.shape[-2:] == (IMAGE_SIZE, IMAGE_SIZE):
        return img
    if not resize:
        raise DataError(f"image {name} is {img.shape[-1]}x{img.shape[-2]}, not {IMAGE_SIZE}x{IMAGE_SIZE}, "
                        f"and resizing is off (data.resize: false)")
    img = TF.resize(img, IMAGE_SIZE, antialias=True)  # shorter side to 32, then the centre square
    return TF.center_crop(img, [IMAGE_SIZE, IMAGE_SIZE])


def load_image_folder(path: str | Path, resize: bool = True, progress: bool = True) -> ImageData:
    """Every image below `path` (a folder or a .zip); its class is the name of its parent folder."""
    from tqdm import tqdm

    path = Path(path)
    if not path.exists():
        raise DataError(f"dataset not found: {path}")
    zf = None
    try:
        if path.is_dir():
            entries = _list_folder(path)
        elif zipfile.is_zipfile(path):
            zf = zipfile.ZipFile(path)
            entries = _list_zip(zf)
        else:
            raise DataError(f"dataset {path} is neither a folder nor a .zip file")
        if not entries:
            raise DataError(f"no images ({', '.join(IMAGE_EXTS)}) found in {path}")
        class_of = [Path(name).parent.name for name, _ in entries]
        classes = sorted(set(class_of))
        images = torch.empty(len(entries), 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)
        for i, (name, read) in enumerate(tqdm(entries, desc=f"decoding {path.name}", unit="img",
                                              disable=not progress, leave=False)):
            try:
                with Image.open(io.BytesIO(read())) as pil:
                    img = TF.pil_to_tensor(pil.convert("RGB"))
            except UnidentifiedImageError:
                raise DataError(f"cannot decode image {name} in {path}: not a readable image file") from None
            except OSError as e:
                raise DataError(f"cannot decode image {name} in {path}: not a readable image file ({e})") from None
            images[i] = _to_32(img, name, resize)
    except (OSError, zipfile.BadZipFile) as e:
        raise DataError(f"cannot read dataset {path}: {e}") from None
    finally:
        if zf is not None:
            zf.close()
    labels = torch.tensor([classes.index(c) for c in class_of], dtype=torch.int64)
    return ImageData(images, labels, classes, dataset_identity("folder", path, "", resize))


# ---------------------------------------------------------------- registry

def load_dataset(source: str, path: str, split: str = "train", download: bool = True,
                 resize: bool = True, progress: bool = True) -> ImageData:
    if source == "cifar10":
        return load_cifar10(path, split, download)
    if source == "folder":
        return load_image_folder(path, resize, progress)
    raise DataError(f"unknown data source {source!r}; choose cifar10 or folder")


def dataset_identity(source: str, path: str | Path, split: str = "", resize: bool = True) -> str:
    """A cache key for a dataset that is cheap to compute: no image is decoded."""
    if source == "cifar10":
        path = Path(path) / "cifar-10-batches-py"
        return f"cifar10-{split}-" + (_content_identity(path, split) if path.exists() else "absent")
    return f"folder-{Path(path).stem}-" + _content_identity(Path(path), f"resize{int(resize)}")


def guess_source(path: str) -> str:
    """`--data PATH`: a folder holding (or named) cifar-10-batches-py is torchvision's CIFAR-10; the rest are images."""
    p = Path(path)
    if p.name == "cifar-10-batches-py" or (p / "cifar-10-batches-py").is_dir():
        return "cifar10"
    return "folder"


def cifar_root(path: str) -> str:
    p = Path(path)
    return str(p.parent) if p.name == "cifar-10-batches-py" else str(p)


# ---------------------------------------------------------------- batches

class BatchStream:
    """Batch `step` of a shuffled, flipped, [-1, 1] stream; epochs drop the last partial batch.

    Under data parallelism each rank takes its slice of the same global batch, so N ranks see
    exactly what one process with the whole batch sees.
    """

    def __init__(self, images: torch.Tensor, batch_size: int, seed: int, hflip: bool,
                 device: torch.device, rank: int = 0, world_size: int = 1):
        if len(images) < batch_size:
            raise DataError(f"the dataset has {len(images)} images, fewer than one batch "
                            f"(train.batch_size {batch_size})")
        if batch_size % world_size:
            raise DataError(f"train.batch_size {batch_size} is not divisible by the {world_size} processes")
        self.images, self.batch_size, self.seed, self.hflip = images, batch_size, seed, hflip
        self.device, self.rank, self.world_size = device, rank, world_size
        self.steps_per_epoch = len(images) // batch_size
        self._epoch = -1

    def _start_epoch(self, epoch: int) -> None:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        self._perm = _upload(torch.randperm(len(self.images), generator=g), self.images.device)
        self._flip = _upload(torch.rand(len(self.images), generator=g) < 0.5, self.device)
        self._epoch = epoch

    def batch(self, step: int) -> torch.Tensor:
        epoch, pos = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._start_epoch(epoch)
        per_rank = self.batch_size // self.world_size
        start = pos * self.batch_size + self.rank * per_rank
        idx = self._perm[start:start + per_rank]
        x = self.images[idx].to(self.device, torch.get_default_dtype(), non_blocking=True).div_(127.5).sub_(1.0)
        if self.hflip:
            flip = self._flip[idx.to(self.device)].view(-1, 1, 1, 1)
            x = torch.where(flip, x.flip(3), x)
        return x


def _upload(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on `device`; to a GPU from pinned memory without blocking the host, so that a step
    that starts an epoch does not wait for the GPU (torch keeps the pinned block until the copy is done)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
