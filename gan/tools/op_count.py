"""Counts the aten operations a piece of code dispatches: a figure that does not depend on the machine.

On a GPU nearly every aten compute op is a kernel launch, and a DCGAN step at the default sizes is
launch-bound: its time follows the op count far more than the FLOPs. So a CPU run can watch what a GPU
step will cost. Views and metadata-only ops (view, expand, t, detach, as_strided, squeeze_, ...) and allocations
(empty, empty_strided) launch nothing and are not counted; host syncs (`item`, `nonzero`, ...) are
counted apart, since each stalls a GPU pipeline.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from models.fused import Region

aten = torch.ops.aten

# Ops that launch no kernel but are not marked as views in their schema.
_NO_KERNEL = {
    aten._unsafe_view, aten.lift_fresh, aten.empty, aten.empty_strided, aten.empty_like, aten.new_empty,
    aten.new_empty_strided, aten.detach, aten.alias, aten.sym_size, aten.sym_stride, aten.sym_numel,
    aten.sym_storage_offset, aten.is_same_size, aten.is_nonzero, aten.resize_, aten.set_,
}
# Ops that copy a device value to the host (a GPU sync), or whose output size depends on the data.
_HOST_SYNC = {aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten.unique_consecutive,
              aten._unique2, aten.item}


def is_kernel(func) -> bool:
    """Whether an op does work on tensor data (a kernel launch on a GPU); the profiler's markers
    (record_function, which optimizers call) do not."""
    return (not func.is_view and torch.Tag.inplace_view not in func.tags and func.overloadpacket not in _NO_KERNEL
            and func.namespace != "profiler")


@dataclass
class OpCount:
    """What one piece of code dispatched: `ops` compute ops (by name in `by_op`), `syncs` host syncs."""
    ops: int = 0
    syncs: int = 0
    by_op: Counter = field(default_factory=Counter)


class _Counting(TorchDispatchMode):
    def __init__(self, count: OpCount):
        super().__init__()
        self.count = count

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = func.overloadpacket
        if packet in _HOST_SYNC:
            self.count.syncs += 1
        elif is_kernel(func):
            self.count.ops += 1
            self.count.by_op[str(packet).removeprefix("aten.")] += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn: Callable[[], object]) -> OpCount:
    """Runs fn() once and counts the aten ops it dispatches (autograd's backward included). MN's fused regions
    (models/fused.py) count as the kernels Inductor generates for them (`region_kernels`), listed in `by_op` as
    "region:<name>"; their eager ops are not counted."""
    count = OpCount()

    def observe(region: Region, args: tuple):
        with _disable_current_modes():
            kernels = region_kernels(region, args)
            out = region.fn(*args)
        count.ops += kernels
        count.by_op[f"region:{region.name}"] += kernels
        return out

    previous, Region.observer = Region.observer, observe
    try:
        with _Counting(count):
            fn()
    finally:
        Region.observer = previous
    return count


_REGION_KERNELS: dict = {}


def region_kernels(region: Region, args: tuple) -> int:
    """The kernels Inductor generates for one region called with args (cached by the arguments' shapes, dtypes and
    devices and the other arguments' values): each is one launch per call on a GPU. Compiles the region afresh,
    which resets torch._dynamo (compiled code elsewhere is recompiled when next called)."""
    import torch._inductor.metrics as metrics

    def signature(a):
        if isinstance(a, torch.Tensor):
            return ("T", tuple(a.shape), a.dtype, a.device.type)
        if isinstance(a, (tuple, list)):
            return tuple(signature(x) for x in a)
        return a

    key = (region.name, signature(args))
    if key not in _REGION_KERNELS:
        torch._dynamo.reset()
        metrics.reset()
        torch.compile(region.fn, fullgraph=True, dynamic=False)(*args)
        _REGION_KERNELS[key] = metrics.generated_kernel_count
        torch._dynamo.reset()
    return _REGION_KERNELS[key]


def generator_ops(G: torch.nn.Module, batch_size: int = 8, seed: int = 0) -> OpCount:
    """The ops of one steady-state training-mode forward and backward of a generator (a module taking
    (batch, z_dim) noise, `G.z_dim`), channels-last as the trainer runs it (G is switched to train mode and
    channels-last in place). One step runs before the counted one: the first fits MN's first mixtures
    (k-means++), which later steps do not."""
    device = next(G.parameters()).device
    z = torch.randn(batch_size, G.z_dim, generator=torch.Generator().manual_seed(seed)).to(device)
    G.to(memory_format=torch.channels_last).train()
    grad = torch.ones_like(G(z).detach())
    return count_ops(lambda: G(z).backward(grad))


def compiled_generator_kernels(G: torch.nn.Module, batch_size: int = 8, seed: int = 0) -> int:
    """The kernels Inductor generates for one compiled training-mode forward and backward of a generator
    (as generator_ops: channels-last, one eager step first, so that MN's mixtures exist and its
    initialization is not compiled). Each is one launch per step on a GPU; the GEMMs and convolutions that
    Inductor hands to library calls come in addition (about as many for BN as for MN). Counts the kernels of
    Inductor's code for G's device: its CPU code fuses somewhat differently from its GPU code. Resets
    torch._dynamo (compiled code elsewhere in the process is recompiled when next called) and takes tens of
    seconds on a few cores."""
    import torch._inductor.metrics as metrics

    device = next(G.parameters()).device
    z = torch.randn(batch_size, G.z_dim, generator=torch.Generator().manual_seed(seed)).to(device)
    G.to(memory_format=torch.channels_last).train()
    G(z)
    torch._dynamo.reset()
    metrics.reset()
    y = torch.compile(G)(z)
    y.backward(torch.ones_like(y))
    count = metrics.generated_kernel_count
    torch._dynamo.reset()
    return count
