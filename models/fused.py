"""MN as one compiled graph: a few kernels and no Python per step, instead of dozens of launches.

A training step of an MN layer does a few large operations over the samples (GEMMs, a softmax) and dozens of
tiny ones on K x C tensors: the M-step, the natural parameters of the next E-step, the transform's
coefficients, the running averages, dead components, the backward's coefficients. On a GPU each tiny
operation costs a kernel launch, and the layer's Python costs more host time than the launches: the step
waits on the host, not on the GPU. With `fuse` on, MixtureNorm runs its forward through a `Region`: one
torch.compile'd (Inductor) graph, whose backward AOT autograd compiles as another. Its pointwise ops and
small reductions fuse into a few kernels, and a call costs one pass through the compiled code's guards.

Random draws (EM's subsample, re-seeding) come from eager's generator (Inductor's `fallback_random`), so the
compiled layer computes what the eager one does: tests/test_fused.py checks the two agree in float64.

A region runs its plain function when
- fuse is off (the default on a CPU: there launches are cheap and compiling costs seconds per layer shape);
- it is being traced by an enclosing torch.compile (train.compile), which then compiles it with the rest;
- a TorchDispatchMode is active (gan/tools/op_count.py counts eager ops that way);
- compiling it failed once (e.g. no C++ compiler on a CPU): it warns once and stays eager.
"""
from __future__ import annotations

import functools
import types
import warnings
from typing import Callable

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode


# What a failed compilation raises (Inductor's own errors come wrapped in BackendCompilerFailed). Other errors are
# the function's own, and propagate.
_COMPILE_ERRORS = tuple(c for c in (getattr(torch._dynamo.exc, name, None) for name in
                                    ("TorchDynamoException", "FailOnRecompileLimitHit")) if c is not None)


class Region:
    """A function run eagerly or as one compiled graph (and its backward): `region(fuse, *args)`."""

    def __init__(self, fn: Callable):
        functools.update_wrapper(self, fn)
        self.fn = fn
        self.name = fn.__name__
        # Dynamo keeps compiled graphs per code object, at most torch._dynamo.config.recompile_limit (8) of them.
        # A copy of the code gives each region its own cache, so that layers of different configurations in one
        # process (bench, tests) do not crowd each other out.
        own = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
        # Compiled lazily, at the first fused call. fullgraph: a graph break would silently split the layer
        # back into many launches.
        self._compiled = torch.compile(own, fullgraph=True, options={"fallback_random": True})
        self.failed = False

    def __call__(self, fuse: bool, *args):
        if not fuse or self.failed or torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
            return self.fn(*args)
        try:
            return self._compiled(*args)
        except _COMPILE_ERRORS as e:
            self.failed = True
            warnings.warn(f"MN: compiling {self.name} failed, it runs eagerly from now on "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})", stacklevel=2)
            return self.fn(*args)


_REGIONS: dict[tuple, Region] = {}


def region_for(key: str, fn: Callable) -> Region:
    """fn's Region for one configuration `key`: MixtureNorm keeps one per layer configuration, width included (the
    buffers' shapes are static to Dynamo), each holding the few graphs of its layers (training, eval mode, another
    batch size)."""
    if (key, fn) not in _REGIONS:
        _REGIONS[key, fn] = Region(fn)
    return _REGIONS[key, fn]


def snapshot(gmm):
    """A mixture read from the buffers, as values torch.compile's partitioner saves for backward instead of
    re-reading the buffers there. For a compiled training step, which overwrites these buffers at its end.

    The partitioner may recompute a cheap function of them (the shift, a posterior) in the backward instead of
    saving it, and then reads the overwritten state: silently wrong gradients (seen with aot_eager and inductor,
    torch 2.14; pytorch/pytorch PR 197039 is the upstream fix). A matmul is never recomputed, so the state goes
    through one: identity @ packed state, in float64 so that no reduced-precision matmul mode (TF32) rounds it.
    Exact: every output is 1 * x + 0 * (others).
    """
    packed = torch.cat(list(gmm), 1)
    eye = torch.eye(packed.shape[0], dtype=torch.float64, device=packed.device)
    sizes = [t.shape[1] for t in gmm]
    return type(gmm)(*(eye @ packed.double()).to(packed.dtype).split(sizes, 1))


def resolve(fuse: str, x: torch.Tensor) -> bool:
    """Whether MN runs compiled for input x: "auto" on a GPU only."""
    if fuse == "auto":
        return x.device.type == "cuda"
    return fuse == "always"
