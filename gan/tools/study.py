"""A study: every (variant, seed) training run of one comparison, then `compare` over them all.

A study file (YAML; paths in it are relative to the current folder, like the paths in a config):

    base: configs/study-cpu.yaml   # the config every run starts from
    out: runs/study-cpu            # run i goes to OUT/<variant>-s<seed>; the comparison to OUT/compare
    seeds: [0, 1]                  # seeds for every variant that does not list its own
    set: {train.device: cpu}       # optional: dotted overrides for every variant
    budget_minutes: 7              # optional: stop every run cleanly this long after the study starts
    also_at: [2x, 1.5x]            # optional: steps to and speed-ups at these multiples of the target too
    variants:                      # name: dotted config overrides (and optionally its own seeds)
      bn: {model.norm: bn}
      mn: {model.norm: mn}
      mn-layer0: {model.norm: mn, model.mn_layers: [0], seeds: [0]}

Each run is `python cli.py train --config BASE --set K=V ... --seed S --out OUT/<variant>-s<seed>
--resume auto --quiet` in a subprocess, its output appended to OUT/<run>/train.log, in seed order (seed 0
of every variant first). Runs that already
reached train.steps are skipped and the others resume from their newest checkpoint, so a stopped study
continues where it stopped when the same command is run again.

Before any run starts, the reference statistics every run will score against are computed once here
(and cached), so that concurrent runs do not each compute them. With a budget, every run still running
at the deadline gets SIGTERM, saves a checkpoint and exits; the comparison then covers the evaluation
steps that every run reached, and the same command continues the runs later.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from gan.core.config import KEY_ROLES, load_config, load_yaml, parse_assignment
from gan.core.errors import UserError
from gan.core.run_folder import RunFolder
from gan.tools.launcher import PlannedRun, duration, train_all

CLI = Path(__file__).resolve().parents[2] / "cli.py"
KEYS = ("base", "out", "seeds", "set", "budget_minutes", "also_at", "variants")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+=-]*$")
# Config keys the study sets itself (their `study` role in gan/core/config.py says why a file may not).
STUDY_OWNED = {k: roles["study"] for k, roles in KEY_ROLES.items() if roles["study"]}


class StudyError(UserError):
    pass


class StudyInterrupted(UserError):
    exit_code = 130


@dataclass
class Study:
    path: Path
    base: str
    out: Path
    runs: list[PlannedRun]
    budget_minutes: float | None = None
    also_at: tuple[str, ...] = ()


# ---------------------------------------------------------------- the study file

def _seeds(value, where: str, path: Path) -> list[int]:
    if (not isinstance(value, list) or not value
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in value)):
        raise StudyError(f"study: {path}: {where} must be a non-empty list of seeds (integers >= 0), got {value!r}")
    if len(set(value)) != len(value):
        raise StudyError(f"study: {path}: {where} lists a seed twice: {value!r}")
    return value


def _overrides(value, where: str, path: Path) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise StudyError(f"study: {path}: {where} must be a mapping of dotted config keys to values, "
                         f"e.g. {{model.norm: mn}}, got {value!r}")
    for key in value:
        if key in STUDY_OWNED:
            raise StudyError(f"study: {path}: {where} sets {key}; {STUDY_OWNED[key]}")
    return dict(value)


def _set_arg(key: str, value) -> str:
    """KEY=VALUE text that `--set` reads back as exactly `value`."""
    text = value if isinstance(value, str) else None
    if text is None or parse_assignment(f"{key}={text}")[1] != value:
        text = json.dumps(value)
    if parse_assignment(f"{key}={text}")[1] != value:
        raise StudyError(f"study: the value of {key} ({value!r}) cannot be passed on the command line")
    return f"{key}={text}"


def _budget(value, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise StudyError(f"study: {where} must be a number of minutes > 0, got {value!r}")
    return float(value)


def check_also_at(value, where: str) -> tuple[str, ...]:
    """Multiples of the target only (2x, 1.5x): the study compares by FID and by KID, and an absolute value
    would mean something for one of them only."""
    from gan.tools.compare import CompareError, extra_target

    def multiple(t) -> bool:
        try:
            return isinstance(t, str) and extra_target(t)[1]
        except CompareError:
            return False
    items = [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]
    bad = [t for t in items if not multiple(t)]
    if bad:
        raise StudyError(f"study: {where} must list multiples of the target such as [2x, 1.5x, 1.25x] (they "
                         f"apply to FID and KID alike), got {bad[0]!r}")
    return tuple(t.strip() for t in items)


def load_study(path: str | Path, sets: dict | None = None) -> Study:
    """Read and check a study file; every run's config is resolved and validated before anything runs.

    `sets`: dotted overrides for every run (the command line's --set), applied over the file's."""
    path = Path(path)
    if not path.is_file():
        raise StudyError(f"study: no such file: {path}")
    try:
        data = load_yaml(path.read_text())
    except yaml.YAMLError as e:
        raise StudyError(f"study: {path} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise StudyError(f"study: {path} must hold a mapping with keys {', '.join(KEYS)}")
    unknown = [k for k in data if k not in KEYS]
    if unknown:
        raise StudyError(f"study: {path}: unknown key '{unknown[0]}' (known: {', '.join(KEYS)}; "
                         f"config overrides go under set: or a variant)")
    for key in ("base", "out", "variants"):
        if key not in data:
            raise StudyError(f"study: {path}: missing key '{key}'")
    base, out = data["base"], data["out"]
    if not isinstance(base, str) or not base:
        raise StudyError(f"study: {path}: base must be the path of a config file, got {base!r}")
    if not Path(base).is_file():
        raise StudyError(f"study: {path}: base config {base} not found (paths are relative to the current "
                         f"folder, {Path.cwd()})")
    if not isinstance(out, str) or not out:
        raise StudyError(f"study: {path}: out must be a folder path, got {out!r}")
    seeds = _seeds(data.get("seeds", [0]), "seeds", path)
    common = {**_overrides(data.get("set"), "set", path), **_overrides(sets, "--set", path)}
    budget = _budget(data.get("budget_minutes"), f"{path}: budget_minutes")
    also_at = check_also_at(data.get("also_at"), f"{path}: also_at")
    variants = data["variants"]
    if not isinstance(variants, dict) or not variants:
        raise StudyError(f"study: {path}: variants must be a non-empty mapping of name: {{dotted.key: value}}")

    runs: list[PlannedRun] = []
    cli = os.path.relpath(CLI) if not os.path.relpath(CLI).startswith("..") else str(CLI)
    for name, spec in variants.items():
        where = f"variant '{name}'"
        if not isinstance(name, str) or not NAME.match(name):
            raise StudyError(f"study: {path}: variant name {name!r} must be letters, digits and _ . + = - "
                             f"(it names the run folders)")
        spec = _overrides(spec, where, path)
        own_seeds = _seeds(spec.pop("seeds"), f"{where} seeds", path) if "seeds" in spec else seeds
        overrides = {**common, **spec}
        sets = [_set_arg(k, v) for k, v in overrides.items()]
        for seed in own_seeds:
            run_name = f"{name}-s{seed}"
            run_dir = Path(out) / run_name
            try:
                cfg = load_config(base, {**overrides, "train.seed": seed, "run_dir": str(run_dir)})
            except UserError as e:
                raise StudyError(f"study: {path}: {where}: {e}") from None
            argv = [sys.executable, cli, "train", "--config", base]
            for s in sets:
                argv += ["--set", s]
            argv += ["--seed", str(seed), "--out", str(run_dir), "--resume", "auto", "--quiet"]
            runs.append(PlannedRun(run_name, name, seed, run_dir, cfg, sets, argv))
    # Seed order (the first seed of every variant, then the second ...), stably: a study that runs one at a
    # time, or is stopped part-way, has a comparison of every variant over one seed first.
    runs.sort(key=lambda r: r.seed)
    return Study(path, base, Path(out), runs, budget, also_at)


# ---------------------------------------------------------------- running it

def prepare_references(runs: list[PlannedRun], echo: Callable[[str], None]) -> None:
    """Compute (and cache) the reference statistics of every run that evaluates, once, before the runs start.

    Concurrent runs would otherwise each decode the reference images and run Inception over them at
    their first evaluation, all at once; each run then just loads the cache file."""
    import torch
    from gan.eval.metrics import Evaluator
    from gan.core.device import resolve_device
    done = set()
    for r in runs:
        cfg = r.config
        if not cfg.eval.every:
            continue
        ev = Evaluator.from_config(cfg, resolve_device(cfg.train.device), progress=True)  # a bar: it can take long
        if ev.reference_cache_path in done or os.path.isfile(ev.reference_cache_path):
            done.add(ev.reference_cache_path)
            continue
        t0 = time.monotonic()
        echo(f"reference statistics of {cfg.eval.reference} ({ev.reference_id}), once for every run ...")
        ev.prepare_reference()
        echo(f"  cached in {duration(time.monotonic() - t0)}: {ev.reference_cache_path}")
        done.add(ev.reference_cache_path)
        del ev
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def emit_commands(study: Study) -> list[str]:
    """One self-contained shell command per run that is not finished (for SLURM arrays or any scheduler)."""
    cwd = shlex.quote(os.getcwd())
    lines = []
    for r in study.runs:
        state, why = RunFolder(r.run_dir).state(r.config)
        if state in ("new", "resume"):
            lines.append(f"cd {cwd} && {r.command}")
        elif state == "conflict":
            raise StudyError(f"study: {r.name}: {why}")
    return lines


def run_study(study: Study, jobs: int = 1, dry_run: bool = False,
              echo: Callable[[str], None] = print, warn: Callable[[str], None] = print,
              budget_minutes: float | None = None):
    """Train every planned run that is not finished, `jobs` at a time, then compare them all.

    budget_minutes (else the study file's): at that time after the start, every run still training is
    stopped with a checkpoint; the comparison covers the steps that every run reached.
    The comparison also reports steps to target and speed-ups at the multiples of the target in study.also_at.
    Returns the fid CompareResult (None for a dry run)."""
    started = time.monotonic()
    budget = budget_minutes if budget_minutes is not None else study.budget_minutes
    states = {r.name: RunFolder(r.run_dir).state(r.config) for r in study.runs}
    todo = [r for r in study.runs if states[r.name][0] in ("new", "resume")]
    conflicts = [r for r in study.runs if states[r.name][0] == "conflict"]
    finished = len(study.runs) - len(todo) - len(conflicts)
    echo(f"study {study.path}: {len(study.runs)} runs ({finished} finished, {len(todo)} to train"
         + (f", {len(conflicts)} in conflict" if conflicts else "") + f"), {jobs} at a time, into {study.out}"
         + (f", budget {budget:g} min" if budget else ""))
    for r in study.runs:
        echo(f"  {r.name}: {states[r.name][1]}")
        if states[r.name][0] != "finished":
            echo(f"    {r.command}")
    if dry_run:
        echo(f"then: compare {len(study.runs)} runs into {study.out / 'compare'}")
        return None

    study.out.mkdir(parents=True, exist_ok=True)
    (study.out / "study.yaml").write_text(study.path.read_text())
    failed = [(r, states[r.name][1]) for r in conflicts]
    if todo:
        prepare_references(todo, echo)
    deadline = started + budget * 60 if budget else None
    outcome = train_all(todo, jobs, echo, failed, deadline)
    if outcome == "signal":
        raise StudyInterrupted("study stopped; run the same command again to continue "
                               "(finished runs are skipped, stopped ones resume from their checkpoint)")

    from gan.tools.compare import CompareError, compare_runs
    dirs = [r.run_dir for r in study.runs if RunFolder(r.run_dir).is_run()]
    result = None
    if dirs:
        for metric in ("fid", "kid"):
            try:
                res = compare_runs(dirs, study.out / "compare", metric, warn=warn, common_steps=True,
                                   also_at=study.also_at)
            except CompareError as e:
                warn(f"{'error' if metric == 'fid' else 'warning'}: {e}")
                continue
            if metric == "fid":
                result = res
                echo("")
                echo(res.markdown)
            echo(f"wrote {', '.join(str(f) for f in res.files)}")
    if outcome == "budget":
        echo(f"budget of {budget:g} min reached after {duration(time.monotonic() - started)}: the runs stopped "
             f"with a checkpoint; run the same command again to continue them")
    if failed:
        order = [r.name for r in study.runs]
        failed.sort(key=lambda f: order.index(f[0].name))  # the study file's order, not the order they ended in
        raise StudyError(f"study: {len(failed)} of {len(study.runs)} runs did not finish: "
                         + "; ".join(f"{r.name} ({why})" for r, why in failed)
                         + ". Run the study again to retry or continue them")
    if result is None:
        raise StudyError("study: the runs finished but could not be compared (see above)")
    return result
