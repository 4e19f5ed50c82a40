"""Compare finished (or running) training runs: curves, a table and JSON, grouped by what differs.

Each run folder holds `config.yaml` (the resolved config) and `metrics.jsonl` (one JSON per logged step;
evaluation steps also carry fid / kid_mean). Runs whose configs differ only in the seed, the folder and
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
from typing import Callable, Optional

import yaml

from gan.core.config import Config, config_from_dict, flatten, keys_where
from gan.core.errors import UserError

METRICS = {"fid": "fid", "kid": "kid_mean"}

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


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


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
        if (p / "config.yaml").is_file():
            found.append(p)
        elif p.is_dir() and (subs := sorted(q for q in p.iterdir() if (q / "config.yaml").is_file())):
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


def read_metrics(path: Path) -> list[dict]:
    """A run's metrics.jsonl records by step (the last line of a step wins); lines cut by a crash are skipped."""
    by_step: dict[int, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
                step = rec["step"]
            except (ValueError, KeyError, TypeError):
                continue
            if isinstance(step, int):
                by_step[step] = rec
    return [by_step[s] for s in sorted(by_step)]


def read_run(path: Path, metric_key: str) -> Run:
    try:
        raw = yaml.safe_load((path / "config.yaml").read_text())
        config = config_from_dict(raw if isinstance(raw, dict) else {})
    except yaml.YAMLError:
        raise CompareError(f"compare: {path}/config.yaml is not valid YAML") from None
    except UserError as e:
        raise CompareError(f"compare: {path}/config.yaml does not load here: {e}") from None
    records = read_metrics(path / "metrics.jsonl")
    evals = [{"step": r["step"], "value": float(r[metric_key]),
              "train_time": float(r["train_time"]) if _finite(r.get("train_time")) else None}
             for r in records if _finite(r.get(metric_key))]
    sps = [r["sec_per_step"] for r in records if _finite(r.get("sec_per_step"))]
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

def run_numbers(run: Run, target: Optional[float]) -> dict:
    best = min(run.evals, key=lambda e: (e["value"], e["step"]))
    hit = next((e for e in run.evals if target is not None and e["value"] <= target), None)
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


def group_numbers(group: Group, target: Optional[float]) -> dict:
    per_run = [run_numbers(r, target) for r in group.runs]
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


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def _ratio_range(base_runs: list[dict], runs: list[dict], key: str) -> Optional[list[float]]:
    """[min, max] of the speed-up over every (baseline seed, this group's seed) pair that reached the target:
    the spread that the mean ratio hides when there are only a few seeds."""
    ratios = [b[key] / r[key] for b in base_runs for r in runs if b[key] is not None and r[key]]
    return [min(ratios), max(ratios)] if ratios else None


# ---------------------------------------------------------------- output

def _num(v: Optional[float], fmt: str) -> str:
    return "–" if v is None else format(v, fmt)


def _mean_pm(stat: dict, fmt: str) -> str:
    if stat["mean"] is None:
        return "–"
    text = format(stat["mean"], fmt)
    return text if stat["std"] is None else f"{text} ± {format(stat['std'], fmt)}"


def _to_target(stat: dict, fmt: str, scale: float = 1.0) -> str:
    if stat["reached"] == 0:
        return "not reached"
    scaled = {"mean": stat["mean"] / scale, "std": None if stat["std"] is None else stat["std"] / scale}
    text = _mean_pm(scaled, fmt)
    return text if stat["reached"] == stat["of"] else f"{text} ({stat['reached']}/{stat['of']} reached)"


def _speedup(group: dict, kind: str, is_baseline: bool) -> str:
    value, spread = group[f"speedup_{kind}"], group[f"speedup_{kind}_range"]
    if value is None:
        return "–"
    if is_baseline or spread is None:
        return f"{value:.2f}×"
    return f"{value:.2f}× ({spread[0]:.2f}–{spread[1]:.2f})"


def _time_unit(seconds: float) -> tuple[str, float]:
    if seconds >= 3 * 3600:
        return "h", 3600.0
    if seconds >= 180:
        return "min", 60.0
    return "s", 1.0


def markdown(result: dict) -> str:
    fmt = ".2f" if result["metric"] == "fid" else ".4f"
    name = result["metric"].upper() + ("" if result["metric"] == "fid" else " (kid_mean)")
    times = [g["time_to_target"]["mean"] for g in result["groups"] if g["time_to_target"]["mean"] is not None]
    unit, scale = _time_unit(max(times, default=0.0))
    lines = [
        f"# {name}: {len(result['groups'])} groups, {sum(len(g['runs']) for g in result['groups'])} runs",
        "",
        f"Target {name} {_num(result['target'], fmt)} ({result['target_source']}); "
        f"speed-ups are relative to **{result['baseline']}** (its steps / time to target divided by the group's).",
        "",
        f"| group | seeds | best {result['metric']} | step of best | final {result['metric']} | steps to target "
        f"| time to target ({unit}) | speed-up (steps) | speed-up (time) | s/step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for g in result["groups"]:
        seeds = ", ".join(f"{r['seed']}*" if r["in_progress"] else str(r["seed"]) for r in g["runs"])
        lines.append("| " + " | ".join([
            g["label"], seeds, _mean_pm(g["best"], fmt), ", ".join(map(str, g["best_step"])),
            _mean_pm(g["final"], fmt), _to_target(g["steps_to_target"], ".0f"),
            _to_target(g["time_to_target"], ".1f", scale) if g["time_to_target"]["reached"]
            or not g["steps_to_target"]["reached"] else "–",  # "–": metrics.jsonl without train_time
            _speedup(g, "steps", g["label"] == result["baseline"]),
            _speedup(g, "time", g["label"] == result["baseline"]),
            _mean_pm(g["sec_per_step"], ".3f"),
        ]) + " |")
    lines += ["", "Mean ± std over seeds. Steps to target: per seed, the first evaluation step with "
              f"{result['metric_key']} <= target. Speed-up: the baseline's mean over the group's mean; in "
              "brackets, the lowest and highest ratio over all pairs of a baseline seed and a group seed "
              "that both reached the target."]
    if any(g["in_progress"] for g in result["groups"]):
        lines.append("`*` still in progress (last logged step < train.steps): numbers so far.")
    if any(0 < g["steps_to_target"]["reached"] < g["steps_to_target"]["of"] for g in result["groups"]):
        lines.append("(k/n reached): the mean is over the seeds that reached the target; the others never did.")
    for note in result["notes"]:
        lines.append(note)
    lines += ["", "Each evaluation:", "", _per_eval_table(result, fmt), "", "Runs:"]
    for g in result["groups"]:
        lines.append(f"- {g['label']}: " + ", ".join(f"`{r['run']}` (step {r['last_step']}/{r['steps']})"
                                                      for r in g["runs"]))
    if result["skipped"]:
        lines.append("- skipped: " + ", ".join(f"`{s['run']}` ({s['reason']})" for s in result["skipped"]))
    return "\n".join(lines) + "\n"


def _per_eval_table(result: dict, fmt: str) -> str:
    runs = [r for g in result["groups"] for r in g["runs"]]
    values = [dict(r["evals"]) for r in runs]
    steps = sorted({s for v in values for s in v})
    rows = ["| step | " + " | ".join(Path(r["run"]).name for r in runs) + " |", "|---" * (len(runs) + 1) + "|"]
    for s in steps:
        rows.append(f"| {s} | " + " | ".join(_num(v.get(s), fmt) for v in values) + " |")
    return "\n".join(rows)


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_s, ax_t) = plt.subplots(1, 2, figsize=(13, 5))
    all_vals = [v for g in result["groups"] for v in g["curve"]["min"] + g["curve"]["max"]]
    log_y = min(all_vals) > 0 and max(all_vals) / min(all_vals) > 4
    max_t = max((t for g in result["groups"] for t in g["curve"]["train_time"] if t is not None), default=0.0)
    unit, scale = _time_unit(max_t)
    for i, g in enumerate(result["groups"]):
        c = g["curve"]
        colour = f"C{i % 10}"
        label = f"{g['label']} ({len(g['runs'])} seed{'s' if len(g['runs']) != 1 else ''}" + \
                (", in progress)" if g["in_progress"] else ")")
        ax_s.plot(c["step"], c["mean"], "o-", ms=3, color=colour, label=label)
        ax_s.fill_between(c["step"], c["min"], c["max"], color=colour, alpha=0.2, lw=0)
        pts = [(t / scale, m, lo, hi) for t, m, lo, hi in zip(c["train_time"], c["mean"], c["min"], c["max"])
               if t is not None]
        if pts:
            t, m, lo, hi = map(list, zip(*pts))
            ax_t.plot(t, m, "o-", ms=3, color=colour, label=label)
            ax_t.fill_between(t, lo, hi, color=colour, alpha=0.2, lw=0)
    ylabel = result["metric_key"] + (" (log scale)" if log_y else "")
    for ax, xlabel in ((ax_s, "training step"), (ax_t, f"training time ({unit}, evaluation excluded)")):
        if result["target"] is not None:
            ax.axhline(result["target"], color="grey", ls="--", lw=1, label=f"target {result['target']:.4g}")
        if log_y:
            ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    ax_s.set_title(f"{result['metric_key']} vs step (mean, band = min..max over seeds)")
    ax_t.set_title(f"{result['metric_key']} vs wall-clock training time")
    ax_s.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


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
                 warn: Callable[[str], None] = lambda m: None, common_steps: bool = False) -> CompareResult:
    """Read the runs, group them, write compare[-kid].{md,json,png} to `out`; see the module docstring.

    common_steps: only the evaluations up to the last step that every run reached, so that runs stopped
    at different steps (a time budget) are judged over the same training."""
    if metric not in METRICS:
        raise CompareError(f"compare: metric must be one of {', '.join(METRICS)}, got {metric!r}")
    metric_key = METRICS[metric]
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
        why = "no metrics.jsonl" if not r.records else f"no {metric_key} evaluations yet (last step {r.last_step})"
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
    base_numbers = group_numbers(base, None)
    target_source = "--target"
    if target is None:
        target = base_numbers["best"]["mean"]
        target_source = f"the best {metric_key} of {base.label}, mean over its seeds"
    numbers = [group_numbers(g, target) for g in groups]
    b = numbers[groups.index(base)]
    for n in numbers:
        n["speedup_steps"] = _ratio(b["steps_to_target"]["mean"], n["steps_to_target"]["mean"])
        n["speedup_time"] = _ratio(b["time_to_target"]["mean"], n["time_to_target"]["mean"])
        n["speedup_steps_range"] = _ratio_range(b["runs"], n["runs"], "steps_to_target")
        n["speedup_time_range"] = _ratio_range(b["runs"], n["runs"], "time_to_target")

    notes = []
    sources = {str(r.flat.get(k)) for r in kept for k in ("data.path", "eval.reference")}
    if any("jpeg" in s.lower() for s in sources):
        notes.append("Data: a JPEG re-encoding of CIFAR-10 (lossy); absolute FID/KID are not comparable with "
                     "published numbers, only between these runs.")
    if upto is not None:
        notes.append(f"Compared over the evaluations up to step {upto}, the last one every run reached.")
    result = {
        "common_steps_upto": upto,
        "metric": metric, "metric_key": metric_key, "target": target, "target_source": target_source,
        "baseline": base.label, "grouping_keys": differing, "notes": notes,
        "skipped": skipped, "groups": numbers,
    }
    text = markdown(result)
    out = Path(out) if out is not None else default_out(paths)
    out.mkdir(parents=True, exist_ok=True)
    stem = "compare" if metric == "fid" else f"compare-{metric}"
    files = [out / f"{stem}.md", out / f"{stem}.json", out / f"{stem}.png"]
    files[0].write_text(text)
    files[1].write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    plot(result, files[2])
    return CompareResult(result, text, files)
