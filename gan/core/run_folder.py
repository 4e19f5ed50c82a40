"""The run folder: its layout, and the rules for starting, resuming and reading a run.

    runs/<name>/
        config.yaml          the resolved config, written when the run starts
        metrics.jsonl        one JSON object per logged step (losses, timing, FID/KID ...)
        checkpoints/         step_0001000.pt ... (newest `ckpt.keep`, and every evaluation step's
                             under ckpt.keep_evaluated), best.pt (lowest FID)
        samples/             step_0001000.png ...
        train.log, wandb/    written by `cli.py train` and wandb

Everything that reads or decides about a run folder (the trainer, study, compare, diagnose) goes
through this module, so that the layout and the resume rules live in one place.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from gan.core import checkpoint as ckpt
from gan.core.config import RESUMABLE_CHANGES, Config, config_diff, config_from_dict, flatten
from gan.core.errors import UserError


class RunFolder:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    @classmethod
    def holding(cls, path: str | Path) -> "RunFolder":
        """The run folder that `path` is, or whose checkpoints/ folder or checkpoint file it is."""
        path = Path(path)
        if path.is_dir():
            return cls(path.parent if path.name == "checkpoints" and not (path / "config.yaml").is_file() else path)
        return cls(path.parent.parent)

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def ckpt_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def best_path(self) -> Path:
        return self.ckpt_dir / "best.pt"

    @property
    def samples_dir(self) -> Path:
        return self.path / "samples"

    def is_run(self) -> bool:
        return self.config_path.is_file()

    # ------------------------------------------------------------------ reading

    def read_config(self) -> Config:
        """config.yaml as a Config; every way it can be wrong is one UserError naming the file."""
        try:
            raw = yaml.safe_load(self.config_path.read_text())
        except OSError as e:
            raise UserError(f"{self.config_path} is unreadable: {e.strerror or e}") from None
        except yaml.YAMLError:
            raise UserError(f"{self.config_path} is not valid YAML") from None
        if not isinstance(raw, dict):
            raise UserError(f"{self.config_path} holds no config (not a YAML mapping)")
        try:
            return config_from_dict(raw)
        except UserError as e:
            raise UserError(f"{self.config_path} does not load here: {e}") from None

    def read_metrics(self) -> list[dict]:
        """metrics.jsonl's records by step (the last line of a step wins); lines cut by a crash are skipped."""
        by_step = {rec["step"]: rec for _, rec in self._records()}
        return [by_step[s] for s in sorted(by_step)]

    def last_logged_step(self) -> int:
        records = self.read_metrics()
        return records[-1]["step"] if records else 0

    def _records(self):
        """(line, record) of every whole line with an integer step."""
        if not self.metrics_path.is_file():
            return
        for line in self.metrics_path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("step"), int):
                yield line, rec

    def truncate_metrics(self, step: int) -> None:
        """Drop the lines past `step`: the part of the run that a resume from that step repeats."""
        if self.metrics_path.exists():
            keep = [line for line, rec in self._records() if rec["step"] <= step]
            # Via a temporary file: a kill during this rewrite must not lose the lines before the checkpoint.
            ckpt.atomic_write_text(self.metrics_path, "".join(line + "\n" for line in keep))

    def checkpoints(self) -> list[Path]:
        """step_*.pt, newest first."""
        return ckpt.list_checkpoints(self.ckpt_dir)

    def newest_checkpoint(self) -> tuple[Path, dict] | None:
        """The newest checkpoint that loads; broken ones are reported and skipped, never deleted."""
        return _newest_valid(self.ckpt_dir)

    # ------------------------------------------------------------------ deciding

    def resume_conflicts(self, cfg: Config) -> list[str]:
        """The keys a resume may not change in which config.yaml differs from `cfg` (["config.yaml"]
        when it cannot be read); [] when there is no config.yaml or nothing differs."""
        if not self.is_run():
            return []
        try:
            return config_diff(self.read_config(), cfg, RESUMABLE_CHANGES)
        except UserError:
            return ["config.yaml"]

    def state(self, cfg: Config) -> tuple[str, str]:
        """Where a planned run with config `cfg` stands here: ("new" | "resume" | "finished" | "conflict",
        words for the user). `study` asks this before it starts or resumes a run."""
        if not self.is_run():
            return "new", "new"
        diff, has_ckpt = self.resume_conflicts(cfg), bool(self.checkpoints())
        if diff and has_ckpt:
            return "conflict", (f"{self.path} holds a run with a different config ({', '.join(diff[:3])}); "
                                f"move it away or change out:")
        last = self.last_logged_step()
        if not diff and last >= cfg.train.steps:
            return "finished", f"finished (step {last})"
        if has_ckpt:
            return "resume", f"resume (logged up to step {last})"
        return "new", "new"

    def prepare(self, cfg: Config, resume: str | None, overwrite: bool) -> dict | None:
        """Make the folder ready for a run of `cfg` and return the checkpoint state to resume from (or None).

        resume "auto": the newest valid checkpoint here, if any; a path: that checkpoint. Without resume, a
        folder that already holds a run is refused unless `overwrite` (which deletes its checkpoints)."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".write_test"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise UserError(f"run folder {self.path} is not writable: {e.strerror or e}") from None
        state = None
        ckpt.remove_stale_temps(self.ckpt_dir)
        if resume:
            source = resume
            if resume == "auto":
                found = self.newest_checkpoint()
                if found is not None:
                    source, state = found
                elif self.checkpoints():
                    print(f"warning: no valid checkpoint in {self.ckpt_dir}; starting from step 0", file=sys.stderr)
            else:
                state = load_run_or_checkpoint(resume)
            if state is not None:
                check_resumable(state, cfg, source)
                print(f"resuming from {source} at step {state['step']}", file=sys.stderr)
        elif overwrite:
            for p in self.checkpoints() + [self.best_path]:
                p.unlink(missing_ok=True)
        elif self.is_run():
            differs = self._describe_saved_diff(cfg)
            if differs is not None:
                raise UserError(f"run folder {self.path} already holds a different run ({differs}); "
                                f"use --out for a new folder, or --overwrite to replace it")
            if self.checkpoints():
                raise UserError(f"run folder {self.path} already holds a run; pass --resume auto to continue it, "
                                f"--overwrite to start it again, or --out for a new folder")
        ckpt.atomic_write_text(self.config_path, cfg.to_yaml())
        return state

    def _describe_saved_diff(self, cfg: Config) -> str | None:
        try:
            old = self.read_config()
        except UserError:
            return "its config.yaml is unreadable"
        return describe_diff(old, cfg)


def load_run_or_checkpoint(path: str | Path) -> dict:
    """A checkpoint file; or a run folder, or its checkpoints/ folder, standing for its newest valid checkpoint."""
    path = Path(path)
    if not path.is_dir():
        return ckpt.read_checkpoint(path)
    ckpt_dir = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    found = _newest_valid(ckpt_dir)
    if found is None:
        raise ckpt.CheckpointError(f"no valid checkpoint in {ckpt_dir}")
    return found[1]


def _newest_valid(ckpt_dir: Path) -> tuple[Path, dict] | None:
    for path in ckpt.list_checkpoints(ckpt_dir):
        try:
            return path, ckpt.read_checkpoint(path)
        except ckpt.CheckpointError as e:
            print(f"warning: skipping {e}", file=sys.stderr)
    return None


def check_resumable(state: dict, cfg: Config, source) -> None:
    """A checkpoint may continue as a run of `cfg` only if no key outside RESUMABLE_CHANGES differs."""
    try:
        old = config_from_dict(state["config"])
    except (UserError, KeyError, TypeError) as e:
        raise ckpt.CheckpointError(f"{source}: its config is not valid here: {e}") from None
    shown = describe_diff(old, cfg)
    if shown:
        raise ckpt.CheckpointError(f"{source} is from a different run configuration ({shown}); "
                                   f"use --out for a new run")


def describe_diff(old: Config, new: Config) -> str | None:
    """The first few config keys a resume may not change, as 'key: old -> new', or None."""
    diff = config_diff(old, new, RESUMABLE_CHANGES)
    if not diff:
        return None
    fo, fn = flatten(old.to_dict()), flatten(new.to_dict())
    return ", ".join(f"{k}: {fo[k]!r} -> {fn.get(k)!r}" for k in diff[:4])
