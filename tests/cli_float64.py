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
    """Inside the block torch's default dtype is float64 (models, noise and batches follow it) and
    Tensor.float() leaves float64 tensors as they are; both are restored after.

    Why Tensor.float(): the trainer calls it on D's logits so that the loss is computed in at least
    float32 (it upcasts AMP's bf16/fp16 logits; in float32 training it does nothing). On float64
    logits it would round them to float32, and the loss's elementwise kernels (softplus and its
    gradient) then round differently for a batch of 16 in one process than for 8 in each of two,
    depending on the processor: with AVX2 a batch of 16 fills the vectorized loop and 8 takes the
    scalar one, which differ by an ulp. Every gradient would carry that float32 rounding, and
    Adam would turn it into weight differences of ~1e-10. Left float64, the loss has float64's
    rounding like everything else.
    """
    old_dtype, old_float = torch.get_default_dtype(), torch.Tensor.float

    def at_least_float32(self, *args, **kwargs):
        return self if self.dtype == torch.float64 else old_float(self, *args, **kwargs)

    torch.set_default_dtype(torch.float64)
    torch.Tensor.float = at_least_float32
    try:
        yield
    finally:
        torch.Tensor.float = old_float
        torch.set_default_dtype(old_dtype)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.argv[0] = str(ROOT / "cli.py")
    with float64_mode():
        runpy.run_path(sys.argv[0], run_name="__main__")
