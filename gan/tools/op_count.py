"""Counts the aten operations a piece of code dispatches: a figure that does not depend on the machine.

On a GPU nearly every aten compute op is a kernel launch, and a DCGAN step at the default sizes is
launch-bound: its time follows the op count far more than the FLOPs. So a CPU run can watch what a GPU
step will cost. Views and metadata-only ops (view, expand, t, detach, as_strided, squeeze_, ...) and allocations
(empty, empty_strided) launch nothing and are not counted; host syncs (`item`, `nonzero`, ...) are
counted apart, since each stalls a GPU pipeline.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

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
    """Runs fn() once and counts the aten ops it dispatches (autograd's backward included). Compiled code does not
    run under the counting mode: MN layers with `fuse` on run their eager code here (see compiled_launches)."""
    count = OpCount()
    with _Counting(count):
        fn()
    return count


@dataclass
class Launches:
    """What the code compiled while running a function launches per call: `kernels` Inductor generated (each
    loop nest counted, as a GPU launches each as a kernel) and `library` calls (GEMMs, and ops Inductor leaves
    to aten, such as random draws)."""
    kernels: int
    library: int

    @property
    def total(self) -> int:
        return self.kernels + self.library


_LIBRARY_CALL = re.compile(r"^\s+(?:\w+ = )?(extern_kernels\.\w+|torch\.ops\.\w+\.\w+\.\w+)\(", re.M)


def compiled_launches(fn: Callable[[], object]) -> Launches:
    """Runs fn() once with torch._dynamo reset, so that whatever it runs compiled compiles afresh, and counts what
    that compiled code launches (forward and backward graphs alike). Compiled code elsewhere in the process is
    recompiled when next called."""
    import torch._inductor.metrics as metrics
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    metrics.reset()
    _, codes = run_and_get_code(fn)
    library = sum(len(_LIBRARY_CALL.findall(code[code.index("def call("):])) for code in codes if "def call(" in code)
    launches = Launches(metrics.generated_kernel_count, library)
    torch._dynamo.reset()
    return launches


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
    device = next(G.parameters()).device
    z = torch.randn(batch_size, G.z_dim, generator=torch.Generator().manual_seed(seed)).to(device)
    G.to(memory_format=torch.channels_last).train()
    G(z)

    def step():
        y = torch.compile(G)(z)
        y.backward(torch.ones_like(y))
    return compiled_launches(step).kernels
