"""Errors that are the user's to fix: the CLI prints them as one line and exits non-zero."""
from __future__ import annotations

import signal
from pathlib import Path


class UserError(Exception):
    exit_code = 2
    label = "error"  # the CLI prints "<label>: <message>"; None prints the message alone


class Diverged(UserError):
    """A loss or gradient was not finite (train.on_nan: stop); the message names the last good checkpoint."""
    exit_code = 3


class Interrupted(UserError):
    """SIGINT / SIGTERM: the checkpoint is saved; exit with the shell's code for that signal."""
    label = None  # a stop the user (or a study's budget) asked for is not an error

    def __init__(self, signum: int, step: int, path: Path):
        self.exit_code = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint saved at {path} "
                         f"(continue with --resume auto)")
