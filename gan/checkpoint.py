"""Checkpoints: atomic writes, safe loads, and finding the newest one that is whole.

A checkpoint is a dict of tensors and plain Python values only, so `torch.load(weights_only=True)`
can read it and nothing in a file is ever executed.
"""
from __future__ import annotations

import os
import pickle
import re
import sys
import zipfile
from pathlib import Path

import torch

from gan.errors import UserError

FORMAT_VERSION = 1
_STEP_FILE = re.compile(r"^step_(\d+)\.pt$")


class CheckpointError(UserError):
    pass


def step_path(ckpt_dir: Path, step: int) -> Path:
    return ckpt_dir / f"step_{step:07d}.pt"


def atomic_save(obj, path: Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`.

    A kill or a full disk at any moment leaves the old file or the new one, never half of one;
    the temporary name does not match `step_*.pt`, so resume never picks it up.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            _test_hook_slow_write()
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _test_hook_slow_write() -> None:
    # Lets the fault tests kill the process in the middle of a checkpoint write.
    delay = os.environ.get("MNGAN_TEST_SLOW_CKPT_WRITE")
    if delay:
        import time
        time.sleep(float(delay))


def save_checkpoint(state: dict, ckpt_dir: Path, keep: int) -> Path:
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = step_path(ckpt_dir, state["step"])
    atomic_save({"format_version": FORMAT_VERSION, **state}, path)
    for old in list_checkpoints(ckpt_dir)[keep:]:
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """`step_*.pt` files, newest step first."""
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _STEP_FILE.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def load_checkpoint(path: str | Path) -> dict:
    """Load and sanity-check a checkpoint; every failure is one CheckpointError line."""
    path = Path(path)
    if path.is_dir():
        path = _resolve_dir(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unpickling refused"
        raise CheckpointError(f"{path} was refused: it is not a plain checkpoint "
                              f"(weights_only load: {first[:200]})") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or not a torch file): "
                              f"{str(e).splitlines()[0][:200] if str(e) else type(e).__name__}") from None
    if not isinstance(state, dict) or "format_version" not in state or "G" not in state:
        raise CheckpointError(f"{path} is not a checkpoint of this project (no format_version / generator)")
    if state["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {state['format_version']}, newer than this "
                              f"program's {FORMAT_VERSION}: update the program")
    return state


def _resolve_dir(path: Path) -> Path:
    """A run folder or its checkpoints/ folder stands for its newest valid checkpoint."""
    ckpt_dir = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    found = latest_valid(ckpt_dir)
    if found is None:
        raise CheckpointError(f"no valid checkpoint in {ckpt_dir}")
    return found[0]


def latest_valid(ckpt_dir: Path) -> tuple[Path, dict] | None:
    """Newest checkpoint that loads; broken ones are reported and skipped, never deleted."""
    for path in list_checkpoints(ckpt_dir):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as e:
            print(f"warning: skipping {e}", file=sys.stderr)
    return None
