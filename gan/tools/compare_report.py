"""compare's report: the markdown table and the curves figure, from the result dict compare_runs builds; and
precision against recall over training, from the groups' records."""
from __future__ import annotations

import math
import os
import statistics
from pathlib import Path
from typing import Optional


def _num(v: Optional[float], fmt: str) -> str:
    return "–" if v is None else format(v, fmt)


def mean_pm(stat: dict, fmt: str) -> str:
    """A table cell for {"mean", "std"} over seeds: "74.0 ± 1.3", "74.0" for one seed, "–" for none."""
    if stat["mean"] is None:
        return "–"
    text = format(stat["mean"], fmt)
    return text if stat["std"] is None else f"{text} ± {format(stat['std'], fmt)}"


def to_target(stat: dict, fmt: str, scale: float = 1.0) -> str:
    """A steps/time-to-target cell: mean ± std over the seeds that reached it, and how many did if not all."""
    if stat["reached"] == 0:
        return "not reached"
    scaled = {"mean": stat["mean"] / scale, "std": None if stat["std"] is None else stat["std"] / scale}
    text = mean_pm(scaled, fmt)
    return text if stat["reached"] == stat["of"] else f"{text} ({stat['reached']}/{stat['of']} reached)"


def _speedup(group: dict, kind: str, with_range: bool = True) -> str:
    """"1.25× (1.00–1.50)": the ratio of means, then the range over seed pairs (left out for the baseline)."""
    value, spread = group[f"speedup_{kind}"], group[f"speedup_{kind}_range"]
    if value is None:
        return "–"
    if not with_range or spread is None:
        return f"{value:.2f}×"
    return f"{value:.2f}× ({spread[0]:.2f}–{spread[1]:.2f})"


def _time_unit(seconds: float) -> tuple[str, float]:
    if seconds >= 3 * 3600:
        return "h", 3600.0
    if seconds >= 180:
        return "min", 60.0
    return "s", 1.0


def markdown(result: dict) -> str:
    fmt = ".2f" if result["metric"] in ("fid", "fd_dinov2") else ".4f"
    name = {"fid": "FID", "kid": "KID (kid_mean)", "fd_dinov2": "FD_DINOv2"}.get(result["metric"], result["metric"])
    reached = "≥" if result.get("higher_is_better") else "≤"
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
            g["label"], seeds, mean_pm(g["best"], fmt), ", ".join(map(str, g["best_step"])),
            mean_pm(g["final"], fmt), to_target(g["steps_to_target"], ".0f"),
            to_target(g["time_to_target"], ".1f", scale) if g["time_to_target"]["reached"]
            or not g["steps_to_target"]["reached"] else "–",  # "–": metrics.jsonl without train_time
            _speedup(g, "steps", with_range=g["label"] != result["baseline"]),
            _speedup(g, "time", with_range=g["label"] != result["baseline"]),
            mean_pm(g["sec_per_step"], ".3f"),
        ]) + " |")
    lines += ["", "Mean ± std over seeds. Steps to target: per seed, the first evaluation step with "
              f"{result['metric_key']} {reached} target. Speed-up: the baseline's mean over the group's mean; in "
              "brackets, the lowest and highest ratio over all pairs of a baseline seed and a group seed "
              "that both reached the target."]
    if any(g["in_progress"] for g in result["groups"]):
        lines.append("`*` still in progress (last logged step < train.steps): numbers so far.")
    if any(0 < g["steps_to_target"]["reached"] < g["steps_to_target"]["of"] for g in result["groups"]):
        lines.append("(k/n reached): the mean is over the seeds that reached the target; the others never did.")
    for note in result["notes"]:
        lines.append(note)
    if result.get("at_targets"):
        lines += ["", _at_targets_table(result, fmt)]
    lines += ["", "Each evaluation:", "", _per_eval_table(result, fmt), "", "Runs:"]
    for g in result["groups"]:
        lines.append(f"- {g['label']}: " + ", ".join(f"`{r['run']}` (step {r['last_step']}/{r['steps']})"
                                                      for r in g["runs"]))
    if result["skipped"]:
        lines.append("- skipped: " + ", ".join(f"`{s['run']}` ({s['reason']})" for s in result["skipped"]))
    return "\n".join(lines) + "\n"


def _times(at_target: dict) -> str:
    factor = at_target.get("times_target")
    return f" ({factor:g}× target)" if factor is not None else ""


def _at_targets_table(result: dict, fmt: str) -> str:
    """Per group and extra target: steps to target, then the speed-up in steps and in training time."""
    metric, base = result["metric"], result["baseline"]
    reached = "≥" if result.get("higher_is_better") else "≤"
    rows = [f"Steps to reach other targets, and speed-up vs **{base}** in steps / in training time:", "",
            "| group | " + " | ".join(f"{metric} {reached} {_num(a['target'], fmt)}" + _times(a)
                                     for a in result["at_targets"])
            + " |",
            "|---" * (len(result["at_targets"]) + 1) + "|"]
    for i, g in enumerate(result["groups"]):
        cells = []
        for a in result["at_targets"]:
            n = a["groups"][i]
            cell = to_target(n["steps_to_target"], ".0f")
            if n["steps_to_target"]["reached"] and g["label"] != base:
                cell += f" · {_speedup(n, 'steps')} / {_speedup(n, 'time', with_range=False)}"
            cells.append(cell)
        rows.append(f"| {g['label']} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


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

    groups = result["groups"]
    # Past a handful of groups the legend would cover the curves: it goes below both panels instead.
    legend_rows = math.ceil((len(groups) + 1) / 2) if len(groups) > 5 else 0
    fig, (ax_s, ax_t) = plt.subplots(1, 2, figsize=(13, 5 + 0.22 * legend_rows))
    all_vals = [v for g in result["groups"] for v in g["curve"]["min"] + g["curve"]["max"]]
    log_y = min(all_vals) > 0 and max(all_vals) / min(all_vals) > 4
    max_t = max((t for g in result["groups"] for t in g["curve"]["train_time"] if t is not None), default=0.0)
    unit, scale = _time_unit(max_t)
    for i, g in enumerate(groups):
        c = g["curve"]
        # Matplotlib's cycle has ten colours: past ten groups, twenty colours and a second marker, so that
        # no two curves look alike.
        colour = f"C{i}" if len(groups) <= 10 else plt.get_cmap("tab20")(i % 20)
        style = "o-" if i < 10 or len(groups) <= 10 else "s--"
        label = f"{g['label']} ({len(g['runs'])} seed{'s' if len(g['runs']) != 1 else ''}" + \
                (", in progress)" if g["in_progress"] else ")")
        ax_s.plot(c["step"], c["mean"], style, ms=3, color=colour, label=label)
        ax_s.fill_between(c["step"], c["min"], c["max"], color=colour, alpha=0.2, lw=0)
        pts = [(t / scale, m, lo, hi) for t, m, lo, hi in zip(c["train_time"], c["mean"], c["min"], c["max"])
               if t is not None]
        if pts:
            t, m, lo, hi = map(list, zip(*pts))
            ax_t.plot(t, m, style, ms=3, color=colour, label=label)
            ax_t.fill_between(t, lo, hi, color=colour, alpha=0.2, lw=0)
    ylabel = result["metric_key"] + (" (log scale)" if log_y else "") + \
        (", higher is better" if result.get("higher_is_better") else ", lower is better")
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
    if legend_rows:
        fig.legend(*ax_s.get_legend_handles_labels(), loc="lower center", ncol=2, fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, 0.22 * legend_rows / (5 + 0.22 * legend_rows), 1, 1))
    else:
        ax_s.legend(fontsize=8)
        fig.tight_layout()
    _save(fig, path)




def fidelity_diversity_curves(groups) -> list[dict]:
    """Per group (compare's Group: .label, .runs with their .records), mean precision and recall at each
    evaluation step that all its seeds have both at: how fidelity and diversity move together over training.
    Empty when the runs have no such evaluations."""
    out = []
    for g in groups:
        by_step: dict[int, list[tuple[float, float]]] = {}
        for r in g.runs:
            for rec in r.records:
                if finite_number(rec.get("precision")) and finite_number(rec.get("recall")):
                    by_step.setdefault(rec["step"], []).append((rec["precision"], rec["recall"]))
        steps = [s for s in sorted(by_step) if len(by_step[s]) == len(g.runs)]
        if steps:
            out.append({"label": g.label, "seeds": len(g.runs), "step": steps,
                        "precision": [statistics.fmean(p for p, _ in by_step[s]) for s in steps],
                        "recall": [statistics.fmean(r for _, r in by_step[s]) for s in steps]})
    return out


def finite_number(v) -> bool:
    """A metrics.jsonl value that is a finite number (not a bool, None or NaN)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def precision_recall_plot(curves: list[dict], path: Path) -> None:
    """Fidelity (precision) against diversity (recall) over training: one line per group through its
    evaluations in step order, the first and last step labelled."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 6))
    for i, c in enumerate(curves):
        colour = f"C{i}" if len(curves) <= 10 else plt.get_cmap("tab20")(i % 20)
        ax.plot(c["recall"], c["precision"], "o-", ms=3, color=colour,
                label=f"{c['label']} ({c['seeds']} seed{'s' if c['seeds'] != 1 else ''})")
        for j in (0, len(c["step"]) - 1):
            ax.annotate(f"{c['step'][j]}", (c["recall"][j], c["precision"][j]), fontsize=7, color=colour,
                        xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("recall (diversity: real images near some generated one)")
    ax.set_ylabel("precision (fidelity: generated images near some real one)")
    # Zoomed to the data (both start at 0): early in training recall is near 0 and precision well below 1,
    # and on the full unit square the lines would be a smudge in a corner.
    ax.set_xlim(0, _upper(v for c in curves for v in c["recall"]))
    ax.set_ylim(0, _upper(v for c in curves for v in c["precision"]))
    ax.grid(alpha=0.3)
    ax.set_title("precision vs recall over training (mean over seeds; labels: steps)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def _upper(values) -> float:
    """An axis limit for values in [0, 1]: 15 % above the largest, at least 0.02, at most 1."""
    return min(1.0, max(0.02, 1.15 * max(values, default=1.0)))


def _save(fig, path: Path) -> None:
    """Write the figure all at once (a temporary file renamed over `path`) and free it."""
    import matplotlib.pyplot as plt
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
