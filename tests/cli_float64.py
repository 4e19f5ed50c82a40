"""`python tests/cli_float64.py ARGS` is `python cli.py ARGS` computing in float64 (see float64_mode).

The distributed tests launch it under torchrun, and run their one-process references inside
float64_mode(), so that "2 processes compute what 1 process computes" can be checked to ~1e-10 on
any processor: in float32, sums taken in another order differ by amounts that depend on the SIMD
width and thread count.
"""
from __future__ import annotations

import contextlib
import runpy
import sys
from pathlib import Path
from typing import Iterator

import torch

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def float64_mode() -> Iterator[None]:
    """Inside the block torch's default dtype is float64 (models, noise and batches follow it); restored after.

    The trainer computes the loss in the logits' precision when that is float32 or more (it upcasts only
    AMP's bf16/fp16), so a float64 run has float64's rounding everywhere, the loss included."""
    old_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old_dtype)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.argv[0] = str(ROOT / "cli.py")
    with float64_mode():
        runpy.run_path(sys.argv[0], run_name="__main__")
