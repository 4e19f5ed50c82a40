"""Compare finished (or running) training runs: curves, a table and JSON, grouped by what differs.

Each run folder holds `config.yaml` (the resolved config) and `metrics.jsonl` (one JSON per logged step;
evaluation steps also carry fid / kid_mean / precision / recall / density / coverage, and the optional
precision_vgg16 / recall_vgg16 / fd_dinov2). Runs whose configs differ only in the seed, the folder and
settings that do not change the maths (length, device, logging, checkpoints) form one group; the other
differing keys name the group, e.g. "norm=mn, mn.num_components=2".

    result = compare_runs(["runs/study/bn-s0", "runs/study/mn-s0"], out="runs/study/compare")
    print(result.markdown)
"""
from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from gan.core.config import Config, flatten, keys_where
from gan.core.errors import UserError
from gan.core.run_folder import RunFolder
from gan.tools.compare_report import (fidelity_diversity_curves, finite_number, markdown, plot,
                                      precision_recall_plot)

METRICS = {"fid": "fid", "kid": "kid_mean", "precision": "precision", "recall": "recall", "density": "density",
           "coverage": "coverage", "precision_vgg16": "precision_vgg16", "recall_vgg16": "recall_vgg16",
           "fd_dinov2": "fd_dinov2"}
# For these, more is better: the best evaluation is the highest, and a target is reached from below.
HIGHER_IS_BETTER = {"precision", "recall", "density", "coverage", "precision_vgg16", "recall_vgg16"}

# Each key's role here is on its config field (gan/core/config.py): keys that never separate groups (the seed,
# the folder, settings that leave the maths alone; train.steps too, so that runs of different lengths still
# group together), keys that must agree for numbers to be comparable at all (else refuse unless --force),
# and keys only meaningful when model.norm is mn.
NOT_GROUPING = keys_where("groups", False)
MUST_MATCH = keys_where("must_match")
MN_ONLY = keys_where("mn_only")


class CompareError(UserError):
    pass


_DEFAULTS = flatten(Config().to_dict())


def _grouping(key: str) -> bool:
    return key not in NOT_GROUPING


def _fmt_value(v) -> str:
    if isinstance(v, str):
        return v
    return json.dumps(v)


def _short(key: str) -> str:
    return key[len("model."):] if key.startswith("model.") else key




def _mean_std(values: list[float]) -> tuple[Optional[float], Optional[float]]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


# ---------------------------------------------------------------- reading runs

@dataclass
class Run:
    path: Path
    config: Config
    flat: dict
    records: list[dict]          # one per logged step, sorted, the last line for a step wins
    evals: list[dict]            # {"step", "value", "train_time"} for evaluation steps
    last_step: int
    sec_per_step: Optional[float]

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def seed(self) -> int:
        return self.config.train.seed

    @property
    def in_progress(self) -> bool:
        return self.last_step < self.config.train.steps


def expand_run_dirs(paths) -> list[Path]:
    """Run folders as given; a folder without config.yaml whose subfolders are runs (a study's out) expands."""
    found: list[Path] = []
    for p in map(Path, paths):
        if RunFolder(p).is_run():
            found.append(p)
        elif p.is_dir() and (subs := sorted(q for q in p.iterdir() if RunFolder(q).is_run())):
            found.extend(subs)
        elif not p.exists():
            raise CompareError(f"compare: {p} does not exist")
        else:
            raise CompareError(f"compare: {p} is not a run folder (no config.yaml in it or its subfolders)")
    seen, unique = set(), []
    for p in found:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            unique.append(p)
    return unique


def read_run(path: Path, metric_key: str) -> Run:
    folder = RunFolder(path)
    try:
        config = folder.read_config()
    except UserError as e:
        raise CompareError(f"compare: {e}") from None
    records = folder.read_metrics()
    evals = [{"step": r["step"], "value": float(r[metric_key]),
              "train_time": float(r["train_time"]) if finite_number(r.get("train_time")) else None}
             for r in records if finite_number(r.get(metric_key))]
    sps = [r["sec_per_step"] for r in records if finite_number(r.get("sec_per_step"))]
    flat = flatten(config.to_dict())
    for k in ("data.path", "eval.reference"):
        if flat[k] not in ("train", "test"):
            flat[k] = os.path.normpath(flat[k])
    if config.model.norm != "mn":  # MN options do nothing here; they must not split bn runs apart
        flat = {k: v for k, v in flat.items() if k not in MN_ONLY}
    return Run(path, config, flat, records, evals, records[-1]["step"] if records else 0,
               statistics.fmean(sps) if sps else None)


# ---------------------------------------------------------------- groups

@dataclass
class Group:
    label: str
    key: tuple
    runs: list[Run] = field(default_factory=list)

    @property
    def norm(self) -> str:
        return self.runs[0].config.model.norm


def check_comparable(runs: list[Run], force: bool, warn: Callable[[str], None]) -> None:
    for key in MUST_MATCH:
        values = {}
        for r in runs:
            values.setdefault(_fmt_value(r.flat[key]), r)
        if len(values) > 1:
            (va, ra), (vb, rb) = list(values.items())[:2]
            text = (f"runs are not comparable: {key} differs ({ra.path}: {va}, {rb.path}: {vb})")
            if not force:
                raise CompareError(f"compare: {text}; pass --force to compare them anyway")
            warn(f"warning: {text}; compared anyway (--force)")


def group_runs(runs: list[Run]) -> tuple[list[Group], list[str]]:
    keys = [k for k in runs[0].flat if _grouping(k)]
    for r in runs[1:]:
        keys += [k for k in r.flat if _grouping(k) and k not in keys]
    differing = [k for k in keys if len({_fmt_value(r.flat[k]) for r in runs if k in r.flat}) > 1]
    groups: dict[tuple, Group] = {}
    for r in runs:
        key = tuple((k, _fmt_value(r.flat[k]) if k in r.flat else None) for k in differing)
        if key not in groups:
            parts = [f"norm={r.config.model.norm}"]
            parts += [f"{_short(k)}={v}" for k, v in key
                      if k != "model.norm" and v is not None and v != _fmt_value(_DEFAULTS.get(k))]
            groups[key] = Group(", ".join(parts), key)
        groups[key].runs.append(r)
    out = list(groups.values())
    for g in out:
        g.runs.sort(key=lambda r: (r.seed, str(r.path)))
    # Identical labels can only come from a differing key that sits at its default in one group and is
    # absent in another; spell every differing key out then.
    labels = [g.label for g in out]
    for g in out:
        if labels.count(g.label) > 1:
            g.label = ", ".join([f"norm={g.norm}"] + [f"{_short(k)}={v}" for k, v in g.key
                                                      if k != "model.norm" and v is not None])
    return out, differing


def pick_baseline(groups: list[Group], wanted: Optional[str]) -> Group:
    if wanted:
        for g in groups:
            if wanted == g.label or any(wanted in (r.name, str(r.path)) or Path(wanted).resolve() == r.path.resolve()
                                        for r in g.runs):
                return g
        raise CompareError(f"compare: --baseline {wanted!r} is neither a group label nor one of the runs "
                           f"(groups: {'; '.join(g.label for g in groups)})")
    bn = [g for g in groups if g.norm == "bn"]
    pool = bn or groups
    return min(pool, key=lambda g: (g.label.count(","), -len(g.runs), groups.index(g)))


# ---------------------------------------------------------------- numbers

def run_numbers(run: Run, target: Optional[float], higher: bool = False) -> dict:
    """higher: the metric is better when higher (HIGHER_IS_BETTER), so the best is the maximum and the target
    is reached at or above it."""
    sign = -1.0 if higher else 1.0
    best = min(run.evals, key=lambda e: (sign * e["value"], e["step"]))
    hit = next((e for e in run.evals if target is not None and sign * e["value"] <= sign * target), None)
    return {
        "run": str(run.path), "seed": run.seed, "in_progress": run.in_progress,
        "last_step": run.last_step, "steps": run.config.train.steps,
        "best": best["value"], "best_step": best["step"],
        "final": run.evals[-1]["value"], "final_step": run.evals[-1]["step"],
        "steps_to_target": hit["step"] if hit else None,
        "time_to_target": hit["train_time"] if hit else None,
        "sec_per_step": run.sec_per_step,
        "evals": [[e["step"], e["value"]] for e in run.evals],
    }


def _stat(values: list) -> dict:
    got = [v for v in values if v is not None]
    mean, std = _mean_std(got)
    return {"mean": mean, "std": std, "reached": len(got), "of": len(values)}


def curve(group: Group) -> dict:
    """Mean and min..max over the seeds that have each evaluation step; wall-clock x is the mean train_time."""
    steps = sorted({e["step"] for r in group.runs for e in r.evals})
    out = {"step": [], "mean": [], "min": [], "max": [], "train_time": [], "seeds": []}
    for s in steps:
        at = [e for r in group.runs for e in r.evals if e["step"] == s]
        vals = [e["value"] for e in at]
        times = [e["train_time"] for e in at if e["train_time"] is not None]
        out["step"].append(s)
        out["mean"].append(statistics.fmean(vals))
        out["min"].append(min(vals))
        out["max"].append(max(vals))
        out["train_time"].append(statistics.fmean(times) if len(times) == len(at) else None)
        out["seeds"].append(len(at))
    return out


def group_numbers(group: Group, target: Optional[float], higher: bool = False) -> dict:
    per_run = [run_numbers(r, target, higher) for r in group.runs]
    return {
        "label": group.label,
        "config": {k: v for k, v in group.key},
        "norm": group.norm,
        "seeds": [p["seed"] for p in per_run],
        "in_progress": any(p["in_progress"] for p in per_run),
        "runs": per_run,
        "best": _stat([p["best"] for p in per_run]),
        "best_step": [p["best_step"] for p in per_run],
        "final": _stat([p["final"] for p in per_run]),
        "steps_to_target": _stat([p["steps_to_target"] for p in per_run]),
        "time_to_target": _stat([p["time_to_target"] for p in per_run]),
        "sec_per_step": _stat([p["sec_per_step"] for p in per_run]),
        "curve": curve(group),
    }


def extra_target(t) -> tuple[float, bool]:
    """One also_at value: 250 or "250" -> (250.0, False); "1.5x" -> (1.5, True), a multiple of the main target."""
    text = str(t).strip()
    relative = text.lower().endswith("x")
    try:
        value = float(text[:-1] if relative else text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or (relative and value <= 0):  # a bool too: str(True) is no number
        raise CompareError(f"compare: extra targets must be finite numbers or positive multiples of the target "
                           f"such as 2x, got {t!r}")
    return value, relative


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def _ratio_range(base_runs: list[dict], runs: list[dict], key: str) -> Optional[list[float]]:
    """[min, max] of the speed-up over every (baseline seed, this group's seed) pair that reached the target:
    the spread that the mean ratio hides when there are only a few seeds."""
    ratios = [b[key] / r[key] for b in base_runs for r in runs if b[key] is not None and r[key]]
    return [min(ratios), max(ratios)] if ratios else None


def _add_speedups(numbers: list[dict], base_index: int) -> None:
    b = numbers[base_index]
    for n in numbers:
        n["speedup_steps"] = _ratio(b["steps_to_target"]["mean"], n["steps_to_target"]["mean"])
        n["speedup_time"] = _ratio(b["time_to_target"]["mean"], n["time_to_target"]["mean"])
        n["speedup_steps_range"] = _ratio_range(b["runs"], n["runs"], "steps_to_target")
        n["speedup_time_range"] = _ratio_range(b["runs"], n["runs"], "time_to_target")


AT_TARGET_KEYS = ("label", "steps_to_target", "time_to_target", "speedup_steps", "speedup_time",
                  "speedup_steps_range", "speedup_time_range")


# ---------------------------------------------------------------- entry point

@dataclass
class CompareResult:
    data: dict
    markdown: str
    files: list[Path]


def default_out(runs: list[Path]) -> Path:
    parents = {p.resolve().parent for p in runs}
    return (runs[0].parent if len(parents) == 1 else Path(".")) / "compare"


def compare_runs(run_dirs, out: str | Path | None = None, metric: str = "fid", target: Optional[float] = None,
                 force: bool = False, baseline: Optional[str] = None,
                 warn: Callable[[str], None] = lambda m: None, common_steps: bool = False,
                 also_at: Sequence[float | str] = ()) -> CompareResult:
    """Read the runs, group them, write compare[-kid].{md,json,png} to `out`; see the module docstring.

    common_steps: only the evaluations up to the last step that every run reached, so that runs stopped
    at different steps (a time budget) are judged over the same training.
    also_at: more metric values at which to report steps to target and speed-ups (a second table); a
    string "2x" is that multiple of the main target (of the baseline's best unless `target` is given)."""
    if metric not in METRICS:
        raise CompareError(f"compare: metric must be one of {', '.join(METRICS)}, got {metric!r}")
    extra = [extra_target(t) for t in also_at]
    metric_key = METRICS[metric]
    higher = metric in HIGHER_IS_BETTER
    paths = expand_run_dirs(run_dirs)
    if not paths:
        raise CompareError("compare: no run folders given")
    runs = [read_run(p, metric_key) for p in paths]
    check_comparable(runs, force, warn)

    skipped, kept = [], []
    for r in runs:
        if r.evals:
            kept.append(r)
            continue
        why = ("metrics.jsonl missing or empty" if not r.records
               else f"no {metric_key} evaluations yet (last step {r.last_step})")
        if r.config.eval.every == 0 and r.records:
            why = f"no {metric_key} evaluations (eval.every is 0)"
        skipped.append({"run": str(r.path), "reason": why})
    if not kept:
        raise CompareError(f"compare: none of the {len(runs)} runs has {metric_key} evaluations in metrics.jsonl "
                           f"yet ({skipped[0]['run']}: {skipped[0]['reason']}); evaluations happen every "
                           f"eval.every steps")
    for s in skipped:
        warn(f"warning: skipping {s['run']}: {s['reason']}")

    upto = None
    if common_steps:
        upto = min(r.evals[-1]["step"] for r in kept)
        for r in kept:
            r.evals = [e for e in r.evals if e["step"] <= upto]

    groups, differing = group_runs(kept)
    base = pick_baseline(groups, baseline)
    base_numbers = group_numbers(base, None, higher)
    target_source = "--target"
    if target is None:
        target = base_numbers["best"]["mean"]
        target_source = f"the best {metric_key} of {base.label}, mean over its seeds"
    base_index = groups.index(base)
    numbers = [group_numbers(g, target, higher) for g in groups]
    _add_speedups(numbers, base_index)
    # The same steps-to-target and speed-ups at other targets (e.g. looser FIDs that every group reaches).
    at_targets = []
    for value, relative in extra:
        t = target * value if relative else value
        at = [group_numbers(g, t, higher) for g in groups]
        _add_speedups(at, base_index)
        at_targets.append({"target": t, "times_target": value if relative else None,
                           "groups": [{k: n[k] for k in AT_TARGET_KEYS} for n in at]})

    notes = []
    sources = {str(r.flat.get(k)) for r in kept for k in ("data.path", "eval.reference")}
    if any("jpeg" in s.lower() for s in sources):
        notes.append("Data: a JPEG re-encoding of CIFAR-10 (lossy); absolute FID/KID are not comparable with "
                     "published numbers, only between these runs.")
    if upto is not None:
        notes.append(f"Compared over the evaluations up to step {upto}, the last one every run reached.")
    result = {
        "common_steps_upto": upto,
        "metric": metric, "metric_key": metric_key, "higher_is_better": higher, "target": target,
        "target_source": target_source,
        "baseline": base.label, "grouping_keys": differing, "notes": notes,
        "skipped": skipped, "groups": numbers, "at_targets": at_targets,
    }
    text = markdown(result)
    out = Path(out) if out is not None else default_out(paths)
    out.mkdir(parents=True, exist_ok=True)
    stem = "compare" if metric == "fid" else f"compare-{metric}"
    files = [out / f"{stem}.md", out / f"{stem}.json", out / f"{stem}.png"]
    files[0].write_text(text)
    files[1].write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    plot(result, files[2])
    fidelity_diversity = fidelity_diversity_curves(groups)
    if fidelity_diversity:
        files.append(out / "precision-recall.png")
        precision_recall_plot(fidelity_diversity, files[-1])
    return CompareResult(result, text, files)

