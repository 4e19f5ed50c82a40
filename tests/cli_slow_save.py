"""`python tests/cli_slow_save.py SECONDS ARGS` is `python cli.py ARGS` whose every torch.save (checkpoint
writes) pauses SECONDS after writing its temporary file, before the fsync and the rename.

The fault tests run training under it to kill the process, or interrupt it, in the middle of a checkpoint
write: the one window that the atomic write exists for, too short to hit by chance.
"""
from __future__ import annotations

import runpy
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def slow_save(seconds: float):
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        time.sleep(seconds)
    return save


if __name__ == "__main__":
    torch.save = slow_save(float(sys.argv.pop(1)))
    sys.path.insert(0, str(ROOT))
    sys.argv[0] = str(ROOT / "cli.py")
    runpy.run_path(sys.argv[0], run_name="__main__")
