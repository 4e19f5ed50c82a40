"""Data parallelism under torchrun: process-group setup, a few collectives, and DDP.

`torchrun --nproc_per_node N cli.py train ...` starts N processes; `setup()` joins them (NCCL on
CUDA, one GPU per process at cuda:LOCAL_RANK; gloo on CPU). Every helper here is a no-op returning
its input when the job is a single process, so the Trainer calls them unconditionally and a plain
`python cli.py train` pays for no collective.

Control traffic (stop flags, config check, metrics, checkpoint state) goes through a gloo group on
CPU tensors, so it never waits on the GPU; model synchronization (DDP, SyncBatchNorm, synchronized
MN, models/sync_norms.py) uses the default group on the training device.
"""
from __future__ import annotations

import datetime
import os
import hashlib
import json

import torch
import torch.distributed as dist
import torch.nn as nn

from gan.core.config import flatten
from gan.core.errors import UserError

_control_group = None  # gloo group for host-side messages (the default group when it is gloo already)


class DistributedError(UserError):
    """A problem the whole job agrees on (same message on every rank; only rank 0 prints it)."""
    shared = True


# ---------------------------------------------------------------- setup and teardown

def launched() -> bool:
    """True when started by torchrun (or its env:// variables) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device_type: str, timeout: float) -> None:
    """Joins the job's process group (env:// rendezvous from torchrun). No-op for one process.

    `timeout` (seconds) bounds every collective: a rank that never arrives (crashed, stuck) makes the others
    fail with an error after that long instead of hanging forever.
    """
    if not launched() or dist.is_initialized():
        return
    try:
        _init(device_type, datetime.timedelta(seconds=timeout))
    except dist.DistError as e:  # a process that never came, an unreachable MASTER_ADDR/rendezvous endpoint
        raise UserError(f"could not start the {os.environ.get('WORLD_SIZE')}-process job "
                        f"(train.dist_timeout {timeout:g} s): {str(e).strip().splitlines()[0]}") from None


def _init(device_type: str, timeout: datetime.timedelta) -> None:
    global _control_group
    if device_type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices here; "
                            f"use --nproc_per_node <= the number of GPUs per node")
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", timeout=timeout, device_id=torch.device("cuda", local_rank))
        _control_group = dist.new_group(backend="gloo", timeout=timeout)
    else:
        dist.init_process_group("gloo", timeout=timeout)
        _control_group = dist.group.WORLD


def teardown() -> None:
    """Leaves the process group (also after an error: an exit without it can abort the process)."""
    global _control_group
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # the others may be gone already; this process is leaving anyway
            pass
    _control_group = None


def local_device(device: torch.device) -> torch.device:
    """This process's device: cuda:LOCAL_RANK under torchrun."""
    if device.type == "cuda" and is_distributed():
        return torch.device("cuda", torch.cuda.current_device())
    return device


# ---------------------------------------------------------------- who am I

def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def _group():
    return _control_group if _control_group is not None else dist.group.WORLD


# ---------------------------------------------------------------- collectives (identity for one process)

def barrier() -> None:
    if is_distributed():
        dist.barrier(group=_group())


def max_int(value: int) -> int:
    """The largest `value` over the ranks."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, dist.ReduceOp.MAX, group=_group())
    return int(t)


def all_true(flag: bool) -> bool:
    if not is_distributed():
        return flag
    return max_int(0 if flag else 1) == 0


def first_step(step: int) -> int:
    """The smallest non-negative `step` over the ranks (-1 = none): e.g. the first bad step anywhere."""
    if not is_distributed():
        return step
    never = 1 << 62
    t = torch.tensor([step if step >= 0 else never], dtype=torch.int64)
    dist.all_reduce(t, dist.ReduceOp.MIN, group=_group())
    return int(t) if int(t) != never else -1


def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The mean over ranks of a tensor on the training device (loss logging; equal local batches)."""
    if not is_distributed():
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()


def broadcast_object(obj=None, src: int = 0):
    """rank `src`'s obj on every rank (anything picklable: checkpoint state, metrics, an exception)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=_group())
    return box[0]


def gather_to_main(obj) -> list | None:
    """[obj of rank 0, obj of rank 1, ...] on rank 0; None elsewhere."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0, group=_group())
    return out


def on_main(fn):
    """fn() on rank 0; its result, or the UserError it raised, on every rank (raised there too)."""
    if not is_distributed():
        return fn()
    result = None
    if is_main():
        try:
            result = (True, fn())
        except UserError as e:
            result = (False, e)
    ok, value = broadcast_object(result)
    if not ok:
        value.shared = True  # everyone raises it; rank 0 prints it
        raise value
    return value


def share(n_chunks: int) -> tuple[int, int]:
    """This rank's contiguous block [first, last) of n_chunks work items."""
    w, r = world_size(), rank()
    return r * n_chunks // w, (r + 1) * n_chunks // w


# ---------------------------------------------------------------- config check

def check_same_config(config: dict) -> None:
    """Refuses a job whose processes resolved different configs (e.g. nodes launched with different
    --set options): every rank raises the same one-line DistributedError."""
    if not is_distributed():
        return
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest, group=_group())
    if len(set(digests)) == 1:
        return
    configs = [None] * dist.get_world_size()
    dist.all_gather_object(configs, config, group=_group())
    bad = next(r for r, d in enumerate(digests) if d != digests[0])
    diffs = [k for k, v in flatten(configs[bad]).items() if flatten(configs[0]).get(k, object()) != v]
    shown = ", ".join(f"{k}: {flatten(configs[0]).get(k)!r} on rank 0, {flatten(configs[bad])[k]!r} on rank {bad}"
                      for k in diffs[:3])
    more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
    raise DistributedError(f"the {len(digests)} processes were started with different configs ({shown}{more}); "
                           f"launch every node with the same config file and --set options")


# ---------------------------------------------------------------- models

def wrap(module: nn.Module, device: torch.device, broadcast_buffers: bool) -> nn.Module:
    """DistributedDataParallel around module (gradients averaged over ranks); module itself alone."""
    if not is_distributed():
        return module
    import inspect
    from torch.nn.parallel import DistributedDataParallel as DDP
    ids = [device.index] if device.type == "cuda" else None
    # Newer torch renamed broadcast_buffers (per-forward buffer sync; buffers are synced at start either way).
    name = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters else "broadcast_buffers"
    return DDP(module, device_ids=ids, **{name: broadcast_buffers})
