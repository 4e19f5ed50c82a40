"""Where a run's numbers and pictures go: metrics.jsonl in the run folder, and wandb.

wandb is optional at run time: if it cannot start or log, training goes on with one warning and
the local files stay complete.
"""
from __future__ import annotations

import json
import os
import sys
import uuid
import warnings
from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image

from gan.core.run_folder import RunFolder

WANDB_MODES = ("auto", "online", "offline", "disabled")


def wandb_credentials() -> str | None:
    """Where wandb would find an API key without asking: WANDB_API_KEY, or a stored `wandb login`
    (the netrc entry for WANDB_BASE_URL's host, default api.wandb.ai). None when it would have to prompt."""
    import netrc
    from urllib.parse import urlsplit
    if os.environ.get("WANDB_API_KEY"):
        return "WANDB_API_KEY is set"
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").netloc
    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        entry = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return None
    return f"a stored wandb login ({path})" if entry and entry[2] else None


def resolve_wandb_mode(flag: str | None, config_mode: str) -> tuple[str, str]:
    """(mode, why): --wandb beats WANDB_MODE, which beats the config's log.wandb (default auto).

    auto is online when wandb has credentials, else offline: never a login prompt."""
    mode, source = ((flag, "--wandb") if flag else
                    (os.environ["WANDB_MODE"], "WANDB_MODE") if os.environ.get("WANDB_MODE") else
                    (config_mode, "log.wandb"))
    if mode == "dryrun":
        mode = "offline"
    if mode not in WANDB_MODES:
        return "offline", f"{source}={mode!r} is not a wandb mode"
    if mode != "auto":
        return mode, f"{source}={mode}"
    found = wandb_credentials()
    if found:
        return "online", f"{source}=auto and {found}"
    return "offline", (f"{source}=auto and no WANDB_API_KEY or stored `wandb login`; "
                       f"`wandb sync` the run folder's wandb/ to upload it later")


def image_grid(images: torch.Tensor, nrow: int = 8) -> torch.Tensor:
    """[-1, 1] images -> one uint8 (3, H, W) grid."""
    grid = make_grid(images.float().clamp(-1, 1), nrow=nrow, normalize=True, value_range=(-1, 1))
    return grid.mul(255).round().to(torch.uint8)


class RunLogger:
    def __init__(self, folder: RunFolder, config: dict, wandb_mode: str, project: str, resume_step: int | None):
        self.folder = folder
        self.run_dir = folder.path
        self.metrics_path = folder.metrics_path
        self.samples_dir = folder.samples_dir
        self.samples_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            folder.truncate_metrics(resume_step)
        elif self.metrics_path.exists():
            self.metrics_path.unlink()
        self._wandb = None
        if wandb_mode != "disabled":
            self._wandb = self._start_wandb(config, wandb_mode, project)

    def _start_wandb(self, config: dict, mode: str, project: str):
        try:
            import wandb
            id_file = self.run_dir / "wandb_id.txt"
            run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
            id_file.write_text(run_id)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return wandb.init(project=project, dir=str(self.run_dir), mode=mode, config=config,
                                  name=self.run_dir.name, id=run_id, resume="allow",
                                  settings=wandb.Settings(console="off", silent=True))
        except Exception as e:  # no network in online mode, unwritable dir, broken install...
            print(f"warning: wandb disabled for this run ({type(e).__name__}: {str(e)[:200]}); "
                  f"metrics still go to {self.metrics_path}", file=sys.stderr)
            return None

    def _wandb_call(self, fn) -> None:
        if self._wandb is None:
            return
        try:
            fn()
        except Exception as e:
            print(f"warning: wandb stopped logging ({type(e).__name__}: {str(e)[:200]}); "
                  f"local logging continues", file=sys.stderr)
            self._wandb = None

    def log(self, step: int, values: dict) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        self._wandb_call(lambda: self._wandb.log(values, step=step))

    def samples(self, step: int, images: torch.Tensor, caption: str) -> Path:
        grid = image_grid(images)
        path = self.samples_dir / f"step_{step:07d}.png"
        save_image(grid.float() / 255, path)

        def send():
            import wandb
            self._wandb.log({"samples": wandb.Image(grid.permute(1, 2, 0).cpu().numpy(), caption=caption)},
                            step=step)
        self._wandb_call(send)
        return path

    def summary(self, values: dict) -> None:
        self._wandb_call(lambda: self._wandb.summary.update(values))

    def close(self) -> None:
        self._wandb_call(lambda: self._wandb.finish())
        self._wandb = None


class NullLogger:
    """What the processes other than rank 0 log to under torchrun: nothing."""

    def log(self, step: int, values: dict) -> None:
        pass

    def samples(self, step: int, images: torch.Tensor, caption: str) -> None:
        return None

    def summary(self, values: dict) -> None:
        pass

    def close(self) -> None:
        pass
