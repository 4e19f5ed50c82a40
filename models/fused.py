"""MN's small-tensor maths as compiled regions: a few kernels instead of dozens of launches.

A training step of an MN layer does a few large operations over the samples (GEMMs, a softmax) and
dozens of tiny ones on K x C tensors: the M-step, the mixture's natural parameters, the transform's
coefficients, the running averages, dead components, the backward's coefficients. On a GPU each tiny
operation costs a kernel launch (several microseconds of host time) whatever its size, so they, not
the arithmetic, set MN's step time. A `Region` wraps one pure function of such tensors; with `fuse`
on, it runs as one torch.compile'd (Inductor) graph: its pointwise ops and reductions fuse into one or
a few kernels. The eager function stays the reference: tests check the two agree in float64.

A region's function must be pure: no random draws (Inductor's RNG differs from eager's), no in-place
writes to its inputs, no host reads. It runs eagerly (the plain function) when
- fuse is off (the default on a CPU: there launches are cheap and compiling costs seconds per shape);
- it is being traced by an enclosing torch.compile (train.compile), which then fuses it with the rest;
- autograd needs its graph (an input requires grad under grad mode);
- a TorchDispatchMode is active (gan/tools/op_count.py counts ops that way; it sets `Region.observer`
  to count a region's generated kernels instead of its eager ops);
- its compilation failed once (e.g. no C++ compiler on a CPU): it warns once and stays eager.
"""
from __future__ import annotations

import functools
import warnings
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode


class Region:
    """A pure function of tensors, run eagerly or as one compiled graph: `region(fuse, *args)`."""

    # gan/tools/op_count.py: called as observer(region, args) instead of the eager function while a
    # dispatch mode counts ops; returns what the function returns.
    observer: Optional[Callable[["Region", tuple], object]] = None

    def __init__(self, fn: Callable):
        functools.update_wrapper(self, fn)
        self.fn = fn
        self.name = fn.__name__
        # Compiled lazily, at the first fused call. fullgraph: a graph break would silently split the
        # region back into many launches.
        self._compiled = torch.compile(fn, fullgraph=True)
        self.failed = False

    def __call__(self, fuse: bool, *args):
        if not fuse or self.failed or torch.compiler.is_compiling():
            return self.fn(*args)
        if torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in _flat(args)):
            return self.fn(*args)
        if _get_current_dispatch_mode() is not None:
            return Region.observer(self, args) if Region.observer is not None else self.fn(*args)
        try:
            return self._compiled(*args)
        except Exception as e:  # noqa: BLE001 - a failed compile falls back; a real error re-raises below
            self.failed = True
            warnings.warn(f"MN: compiling {self.name} failed, it runs eagerly from now on "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})", stacklevel=2)
            return self.fn(*args)


def region(fn: Callable) -> Region:
    """Decorator: fn becomes a Region (call it as fn(fuse, *args))."""
    return Region(fn)


def _flat(args) -> list:
    out = []
    for a in args:
        if isinstance(a, (tuple, list)):
            out.extend(_flat(a))
        else:
            out.append(a)
    return out


def resolve(fuse: str, x: Tensor) -> bool:
    """Whether MN fuses its small maths for input x: "auto" fuses on a GPU only."""
    if fuse == "auto":
        return x.device.type == "cuda"
    return fuse == "always"
