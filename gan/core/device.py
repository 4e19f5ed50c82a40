"""Where and how the maths runs: the device, mixed precision, the optimizer's kernels, compilation.

Every choice here is made from the config and the device, never from a hard-coded device type in the
training loop, so that the lines a GPU run executes also run in a CPU test (bf16 autocast, fused Adam
and torch.compile all exist on the CPU too).
"""
from __future__ import annotations

import sys
from contextlib import nullcontext

import torch

from gan.core.errors import UserError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device is cuda but no CUDA device is available (use --device cpu or auto)")
    return torch.device(name)


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """train.amp -> the autocast dtype, or None for float32. auto: bf16 on CUDA, off on the CPU (where
    bf16 matmuls are slower than float32 on most processors)."""
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "off"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


def autocast(device: torch.device, dtype: torch.dtype | None):
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def use_fused_adam(setting: str, device: torch.device) -> bool:
    """train.fused_adam: auto is on for CUDA (one kernel for all parameters instead of several per tensor);
    always asks for it on any device that has it (the CPU has, which is how tests run the CUDA path)."""
    return device.type == "cuda" if setting == "auto" else setting == "always"


def adam(params, lr: float, betas: tuple[float, float], fused: bool) -> torch.optim.Adam:
    return torch.optim.Adam(params, lr, betas, fused=True if fused else None)


def compile_in_place(modules, mode: str = "auto") -> None:
    """torch.compile each module in place, so that state_dict keys (and checkpoints) do not change.

    mode (train.compile_mode): auto and default are torch's default mode (kernel fusion), on every device.
    "reduce-overhead" adds CUDA graphs on CUDA, which a DCGAN step at batch 64 (many small, launch-bound
    kernels) may need to get near the GPU's speed; the training step marks its boundaries for them
    (begin_compiled_step) and reads nothing of one step's graph outputs in the next (its logged scalars are
    tensors of their own; gradients are replaced, never accumulated into). auto stays torch's default until
    CUDA graphs are measured correct and faster on a GPU: scripts/gpu_check.sh runs the CUDA tests
    (tests/test_cuda.py trains BN and MN under reduce-overhead against eager) and times the training step
    eager, compiled in the default mode and compiled in reduce-overhead (`cli.py bench train|norm
    --compile`), so this choice can be revisited from its figures. CUDA graphs also hold a memory pool of
    their own, and a tensor a graph returned is overwritten once the next step's graphs run, which code
    that keeps model outputs from one step to the next would trip over.
    """
    mode = None if mode in ("auto", "default") else mode
    try:
        for m in modules:
            m.compile(mode=mode)
    except Exception as e:  # no compiler toolchain, unsupported platform
        print(f"warning: train.compile ignored ({type(e).__name__}: {e})", file=sys.stderr)


def begin_compiled_step() -> None:
    """Marks the start of a training step for the CUDA graphs of compiled modules (reduce-overhead and
    max-autotune modes on CUDA; on other devices and modes it only moves a counter).

    torch's CUDA graph trees give graph outputs (activations, G's output, gradients) memory in one pool
    and free it when a new "generation" starts. Unmarked, a generation starts at a compiled call made
    after a backward: in a GAN step that is D's forward on G's output for the generator's loss, after D's
    own backward, so G's output and G's saved activations were freed while G's backward still needed them
    ("accessing tensor output of CUDAGraphs that has been overwritten by a subsequent run"). Once marked,
    generations change only here, so every graph of one step (G forward, D forwards, their backwards) keeps
    its outputs alive for the rest of the step, and the next step's graphs may reuse that memory.
    """
    torch.compiler.cudagraph_mark_step_begin()


def eager():
    """A context in which compiled modules run their original Python (first steps, sampling, evaluation)."""
    return torch.compiler.set_stance("force_eager")
