"""`python tests/cli_float64.py ARGS` is `python cli.py ARGS` with float64 as torch's default dtype.

The distributed tests launch it under torchrun: models, noise and batches are then float64, so that
"2 processes compute what 1 process computes" can be checked to ~1e-10 on any processor (in float32,
sums taken in another order differ by amounts that depend on the SIMD width and thread count).
"""
import runpy
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    torch.set_default_dtype(torch.float64)
    sys.path.insert(0, str(ROOT))
    sys.argv[0] = str(ROOT / "cli.py")
    runpy.run_path(sys.argv[0], run_name="__main__")
