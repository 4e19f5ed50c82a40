"""Checkpoint files: atomic writes, rotation, and safe loads (gan/core/run_folder.py finds a run's newest whole one).

A checkpoint is a dict of tensors and plain Python values only, so `torch.load(weights_only=True)`
can read it and nothing in a file is ever executed.
"""
from __future__ import annotations

import os
import pickle
import re
import traceback
import warnings
from pathlib import Path

import torch

from gan.core.errors import UserError

FORMAT_VERSION = 1
_STEP_FILE = re.compile(r"^step_(\d+)\.pt$")
_TEMP_FILE = re.compile(r"^\.(step_\d+|best)\.pt\.tmp\d+$")


class CheckpointError(UserError):
    pass


class CheckpointWriteError(UserError):
    """Saving failed (disk full, folder gone): the run stops, the previous checkpoint is untouched."""
    exit_code = 1


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
            try:
                torch.save(obj, f)
            except BaseException as e:
                _free_zip_writer(e)  # while `f` is still open
                raise
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e.__context__, KeyboardInterrupt):
            # A Ctrl-C inside torch.save's zip writer resurfaces as the writer's RuntimeError on close;
            # the user asked to quit, so quit like any other interrupt.
            raise e.__context__ from None
        raise
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _free_zip_writer(e: BaseException) -> None:
    """Free torch.save's zip writer now, through the frames that the exception's tracebacks keep alive.

    A Ctrl-C that lands as the writer's `with` block exits leaves the zip unfinished, and the writer finishes
    it whenever it is freed. Freed at interpreter exit, after `f` is closed, its C++ destructor writes to a
    closed file and aborts the process (exit 134 instead of 130; seen once in CI). Freed here, it finishes
    into the temporary file, which is deleted anyway.
    """
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        traceback.clear_frames(e.__traceback__)  # skips the frames still running, such as atomic_save's
        e = e.__context__


def atomic_write_text(path: Path, text: str) -> None:
    """Small text files (config.yaml, a rewritten metrics.jsonl): all or nothing, like checkpoints."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(state: dict, ckpt_dir: Path, keep: int, kept_for_good=lambda step: False) -> Path:
    """Write `state` as its step's checkpoint and delete all but the newest `keep`, except those whose step
    `kept_for_good` (e.g. an evaluation step, under ckpt.keep_evaluated) neither deletes nor counts."""
    path = step_path(ckpt_dir, state["step"])
    write_checkpoint(state, path)
    # Rotation only looks at older steps: files past this one (left by a run that resume repeats,
    # or broken ones resume skipped) are replaced when the run reaches them, never deleted first.
    older = [p for p in list_checkpoints(ckpt_dir)
             if _step_of(p) < state["step"] and not kept_for_good(_step_of(p))]
    for old in older[keep - 1:]:
        try:
            old.unlink(missing_ok=True)
        except OSError:
            pass
    return path


def write_checkpoint(state: dict, path: Path) -> None:
    """Atomically save `state` (stamped with the format version); a failed write is one clear error."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save({"format_version": FORMAT_VERSION, **state}, path)
    except OSError as e:
        previous = [p for p in list_checkpoints(path.parent) if p != path]
        kept = f"the previous checkpoint {previous[0]} is untouched" if previous else "no earlier checkpoint exists"
        raise CheckpointWriteError(f"could not write checkpoint {path}: {e.strerror or e}; {kept}") from None


def remove_stale_temps(ckpt_dir: Path) -> None:
    """Temporary files of writes that a killed process never finished (they are never valid checkpoints)."""
    if ckpt_dir.is_dir():
        for p in ckpt_dir.iterdir():
            if _TEMP_FILE.match(p.name):
                p.unlink(missing_ok=True)


def _step_of(path: Path) -> int:
    return int(_STEP_FILE.match(path.name).group(1))


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """`step_*.pt` files, newest step first."""
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _STEP_FILE.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def read_checkpoint(path: str | Path) -> dict:
    """Load and sanity-check a checkpoint; every failure is one CheckpointError line."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says enough
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path} was refused: it holds more than tensors and plain values, and "
                              f"nothing in it was run ({_refusal_reason(e)})") from None
    except Exception as e:  # truncated zip, a text file, random bytes: torch raises many types
        first = str(e).strip().split(". ")[0].splitlines()[0][:160] if str(e).strip() else ""
        detail = f"{type(e).__name__}: {first}" if first else type(e).__name__
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or not a torch file: "
                              f"{detail})") from None
    if not isinstance(state, dict) or not isinstance(state.get("format_version"), int) or "G" not in state:
        raise CheckpointError(f"{path} is not a checkpoint of this project (no format_version / generator)")
    if state["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {state['format_version']}, newer than this "
                              f"program's {FORMAT_VERSION}: update the program")
    return state


def _refusal_reason(e: Exception) -> str:
    """The one informative line of torch's weights_only refusal (e.g. the blocked GLOBAL)."""
    # torch wraps it in advice that varies between versions; the line naming what is unsupported is the news.
    lines = [line.strip().removeprefix("WeightsUnpickler error:").strip() for line in str(e).splitlines()]
    for line in lines:
        if "nsupported" in line:
            return line.split(". ")[0].rstrip(".")[:200]
    return "unsupported content"
