"""What every benchmark shares: its result row, synthetic images, our Trainer on them, and timing that alternates between the
sides so that drift (other processes, clocks, thermals) hits both alike."""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Callable

import torch

from gan.core.config import load_config
from gan.core.data import ImageData


@dataclass
class Row:
    bench: str
    what: str
    ours: float
    baseline: float
    unit: str
    ratio_name: str
    ratio: float
    extra: dict = field(default_factory=dict)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def alternate_all(fns: list[Callable[[], None]], repeats: int, device: torch.device) -> list[float]:
    """Median seconds of each of `fns`, timed in turn (round robin) after one warm-up call each."""
    for fn in fns:
        fn()
    return timed_rounds(fns, repeats, device)


def timed_rounds(fns: list[Callable[[], None]], repeats: int, device: torch.device) -> list[float]:
    """Median seconds of each of `fns` over `repeats` rounds in which each runs once, in turn; no warm-up
    (for a side whose first call is as costly as the rest)."""
    return [statistics.median(t) for t in round_times(fns, repeats, device)]


def round_times(fns: list[Callable[[], None]], repeats: int, device: torch.device) -> list[list[float]]:
    """Seconds of each of `fns` in each of `repeats` rounds in which each runs once, in turn; no warm-up."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            out.append(time.perf_counter() - t0)
    return times


def paired_ratio(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """The median over rounds of a / b within each round, and its lower and upper quartiles. A round's two runs
    are seconds apart, so drift over the whole run (other processes, clocks) cancels in each round's ratio; the
    quartiles show how far one round's ratio can be trusted."""
    r = [x / y for x, y in zip(a, b)]
    if len(r) < 2:
        return r[0], r[0], r[0]
    q1, _, q3 = statistics.quantiles(r, n=4)
    return statistics.median(r), q1, q3


def alternate(a: Callable[[], None], b: Callable[[], None], repeats: int, device: torch.device
               ) -> tuple[float, float]:
    """Median seconds of `a` and of `b`, timed in alternation after one warm-up call each."""
    ta, tb = alternate_all([a, b], repeats, device)
    return ta, tb


def synthetic_data(n: int = 4096, seed: int = 0) -> ImageData:
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    return ImageData(images, torch.zeros(n, dtype=torch.int64), ["synthetic"], f"synthetic-{n}-{seed}")


def make_trainer(device: str, norm: str, data: ImageData, run_dir: Path, **overrides):
    """Our real Trainer, on in-memory data, with logging off: what a training run executes per step."""
    from gan.core.train import Trainer
    o = {"run_dir": str(run_dir), "model.norm": norm, "train.device": device, "eval.every": 0,
         "log.sample_every": 0, "ckpt.every": 0, "log.wandb": "disabled", "data.source": "folder",
         "data.path": "in-memory", **overrides}
    return Trainer(load_config(None, o), overwrite=True, progress=False, data=data)


def run_steps(trainer, n: int) -> None:
    for _ in range(n):
        trainer.train_step()
        trainer.step += 1


def activation_bytes(trainer) -> int:
    """Bytes autograd saves for backward in one generator+discriminator step: the memory a step needs
    beyond the weights, and the part MN changes. Measured by hooks, so it works on the CPU too."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        trainer.train_step()
    return total
