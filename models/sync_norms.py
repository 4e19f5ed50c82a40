"""Synchronized norms: under torchrun, BatchNorm and MixtureNorm normalize with the statistics of the
global batch, so that N processes compute what one process with the whole batch would.

`sync_norms(model)` switches a model's norms over (BatchNorm2d -> SyncBatchNorm2d; MixtureNorm sums
over ranks); `local_norms(model)` switches them back to this process's batch for a block (sampling
on one rank). With one process, outside training, or with `sync` off, each layer is the plain one,
and the state_dicts do not change, so checkpoints load either way.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from models.mixture_core import Sums, identity


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def sum_over_ranks(t: Tensor, group) -> Tensor:
    """All-reduce (sum) that autograd differentiates: its backward all-reduces the gradient."""
    import torch.distributed._functional_collectives as funcol
    return funcol.wait_tensor(funcol.all_reduce(t, "sum", group))


# ---------------------------------------------------------------- MixtureNorm

class SyncedStatistics:
    """The cross-sample sums of a layer over the process group when `sync` is on: MixtureNorm's base.

    Every sum that feeds MN's tauhat, E_k, V_k or EM goes through `_all_reduce`, so that N ranks with
    batch B compute what one process with batch N*B would.
    """

    sync = False  # set by sync_norms
    process_group = None  # None: the default group

    def _world(self) -> tuple[int, int]:
        if self.sync and dist.is_available() and dist.is_initialized():
            size = dist.get_world_size(self.process_group)
            if size > 1:
                return size, dist.get_rank(self.process_group)
        return 1, 0

    def _all_reduce(self, t: Tensor, differentiable: bool = False) -> Tensor:
        """Sums t over the process group (identity when not synced). Non-differentiable calls
        reduce t in place (callers pass fresh tensors)."""
        if self._world()[0] == 1:
            return t
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        if differentiable:
            return sum_over_ranks(t, group)
        dist.all_reduce(t, group=group)
        return t

    def _reducer(self) -> Sums:
        """The layer's sums over samples: its own (the identity), or all-reduced differentiably over the group."""
        if self._world()[0] == 1:
            return identity
        return lambda t: self._all_reduce(t, differentiable=True)

    def _first_rank_only(self, t: Tensor) -> Tensor:
        """Makes rank 0's t (k-means++ seeds, drawn locally) everybody's t."""
        size, rank = self._world()
        if size == 1:
            return t
        return self._all_reduce(t * float(rank == 0))


# ---------------------------------------------------------------- BatchNorm

class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d with the statistics of the global batch under torchrun, on CUDA and on CPU.

    On CUDA the maths is torch's SyncBatchNorm function (fused kernels, all_gather of per-rank
    statistics). torch's refuses CPU tensors (and DDP refuses its module on CPU), so on CPU the
    global mean and variance come from two differentiable all-reduces of per-channel sums; their
    backward all-reduces the gradient of those sums, which makes the input gradient that of the
    global batch. Outside training, with one process, or with `sync` off (see `local_norms`) it is
    plain BatchNorm2d; the state_dict is BatchNorm2d's, so checkpoints load in either.
    """

    process_group = None
    sync = True

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.sync and self.training and _distributed()):
            return super().forward(input)
        if input.device.type == "cpu":
            return _cpu_sync_batch_norm(self, input)
        return _cuda_sync_batch_norm(self, input)


def _momentum(bn: nn.BatchNorm2d) -> float:
    if not bn.track_running_stats:
        return 0.0
    bn.num_batches_tracked.add_(1)
    return bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)


def _cuda_sync_batch_norm(bn: SyncBatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    from torch.nn.modules._functions import SyncBatchNorm as sync_batch_norm
    group = bn.process_group or dist.group.WORLD
    f = _momentum(bn)
    running = (bn.running_mean, bn.running_var) if bn.track_running_stats else (None, None)
    return sync_batch_norm.apply(x, bn.weight, bn.bias, *running, bn.eps, f, group, dist.get_world_size(group))


def _cpu_sync_batch_norm(bn: SyncBatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    group = bn.process_group or dist.group.WORLD
    c = x.shape[1]
    dims = (0, 2, 3)
    total = sum_over_ranks(torch.cat([x.sum(dims), x.new_full((1,), x.numel() // c)]), group)
    n = total[c]
    mean = total[:c] / n
    xc = x - mean.view(1, c, 1, 1)
    var = sum_over_ranks(xc.square().sum(dims), group) / n
    y = xc * torch.rsqrt(var + bn.eps).view(1, c, 1, 1)
    if bn.affine:
        y = y * bn.weight.view(1, c, 1, 1) + bn.bias.view(1, c, 1, 1)
    if bn.track_running_stats:
        with torch.no_grad():
            f = _momentum(bn)
            unbiased = var * (n / (n - 1).clamp_min(1.0))
            bn.running_mean.lerp_(mean.detach().to(bn.running_mean.dtype), f)
            bn.running_var.lerp_(unbiased.detach().to(bn.running_var.dtype), f)
    return y


# ---------------------------------------------------------------- switching a model over

def sync_norms(module: nn.Module) -> nn.Module:
    """BatchNorm2d -> SyncBatchNorm2d and synchronized MixtureNorm, in place (like
    nn.SyncBatchNorm.convert_sync_batchnorm); statistics are then those of the global batch.
    Call before moving to the device and building optimizers."""
    for m in module.modules():
        if isinstance(m, SyncedStatistics):
            m.sync = True
            m.process_group = None
    _convert_batchnorms(module)
    return module


def _convert_batchnorms(module: nn.Module) -> None:
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            like = next(iter([*child.parameters(), *child.buffers()]), None)
            new = SyncBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                  child.track_running_stats, device=getattr(like, "device", None),
                                  dtype=getattr(like, "dtype", None))
            new.load_state_dict(child.state_dict())
            new.train(child.training)
            setattr(module, name, new)
        else:
            _convert_batchnorms(child)


@contextlib.contextmanager
def local_norms(module: nn.Module) -> Iterator[nn.Module]:
    """Within the block, module's norms use this process's batch only (no collectives): for
    sampling on one rank, or on every rank with results that must not depend on the others."""
    switched = [m for m in module.modules() if isinstance(m, (SyncBatchNorm2d, SyncedStatistics)) and m.sync]
    for m in switched:
        m.sync = False
    try:
        yield module
    finally:
        for m in switched:
            m.sync = True
