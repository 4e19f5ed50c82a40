"""The published numbers are the recorded runs' numbers. Every figure in the README's answer table, in
docs/results.md's tables and in each study folder's tables (README.md, compare*.md) is recomputed from the
committed metrics.jsonl (and diagnose, `evaluate --g-mode train` and bench outputs where a table quotes them)
with the project's own compare and scripts/variants_table.py, and must agree at the precision printed:
"93.9 ± 10.7" is a mean and a standard deviation rounded to one decimal.

A table is found by its file and the heading above it (CHECKS); a table that holds no run's numbers is listed
in SKIPPED with the reason. Every cell of a checked table must have a recomputed value, and every recomputed
value a cell, so a renamed row or a parser that matches nothing fails too."""
from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

import pytest

import gan.tools.compare as compare
from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import variants_table  # noqa: E402

DOCS = ROOT / "docs"
NUM = r"[+-]?\d+(?:\.\d+)?"


def shown(text: str, value) -> bool:
    """Whether `text`, a number as printed, is `value` rounded to text's own number of decimals."""
    places = len(text.partition(".")[2])
    return value is not None and format(value, ("+" if text.startswith("+") else "") + f".{places}f") == text


class Nums:
    """The cell's numbers, in order, each at its printed precision; the words between them are free."""

    def __init__(self, *values):
        self.values = values

    def agrees(self, doc: str) -> bool:
        found = re.findall(NUM, doc)
        return len(found) == len(self.values) and all(map(shown, found, self.values))

    def describe(self, doc: str) -> str:  # each value at the precision of the doc's number in its place
        found = re.findall(NUM, doc) + [""] * len(self.values)
        return ", ".join("none" if v is None else format(v, f".{len(t.partition('.')[2])}f" if t else ".4g")
                         for v, t in zip(self.values, found))


@dataclass
class Text:
    """A cell that a tool writes itself (compare's tables, variants_table's): the same text."""
    text: str

    def agrees(self, doc: str) -> bool:
        return doc == self.text

    def describe(self, doc: str) -> str:
        return repr(self.text)


@dataclass
class Steps:
    """Steps to a target as the docs write them: "2700 ± 424 (2 of 3 seeds)", "1200 ± 0", "3000 (1 of 3)" or
    "not reached", maybe followed by " · 0.86× / 0.56×", the speed-up in steps / in training time. The count of
    seeds may be left out when all reached it, and the spread when it is zero."""
    FORM = re.compile(rf"(?P<mean>{NUM})(?: ± (?P<std>{NUM}))?(?: \((?P<k>\d+) of (?P<n>\d+)(?: seeds)?\))?"
                      rf"(?: · (?P<steps>{NUM})× / (?P<time>{NUM})×)?")
    stat: dict
    speedups: tuple = (None, None)

    def agrees(self, doc: str) -> bool:
        st, m = self.stat, self.FORM.fullmatch(doc)
        if doc == "not reached" or st["reached"] == 0:
            return doc == "not reached" and st["reached"] == 0
        return bool(m) and shown(m["mean"], st["mean"]) \
            and (shown(m["std"], st["std"]) if m["std"] else not st["std"]) \
            and ((int(m["k"]), int(m["n"])) == (st["reached"], st["of"]) if m["k"] else st["reached"] == st["of"]) \
            and (not m["steps"] or (shown(m["steps"], self.speedups[0]) and shown(m["time"], self.speedups[1])))

    def describe(self, doc: str) -> str:
        st, speed = self.stat, "" if self.speedups[0] is None else " · {:.2f}× / {:.2f}×".format(*self.speedups)
        std = "" if st["std"] is None else f" ± {st['std']:.0f}"
        return f"{st['mean']:.0f}{std} ({st['reached']} of {st['of']}){speed}" if st["reached"] else "not reached"


@dataclass
class Speedup:
    """"2.00× (2.00–2.00)": the ratio and its range over seed pairs, which may be left out where both ends
    print as the ratio does; "–" where there is no ratio."""
    value: float | None
    spread: list | None

    def agrees(self, doc: str) -> bool:
        if self.value is None:
            return doc == "–"
        m = re.fullmatch(rf"({NUM})×(?: \(({NUM})–({NUM})\))?", doc)
        if not m or not shown(m[1], self.value):
            return False
        if m[2]:
            return self.spread is not None and shown(m[2], self.spread[0]) and shown(m[3], self.spread[1])
        return self.spread is None or (shown(m[1], self.spread[0]) and shown(m[1], self.spread[1]))

    def describe(self, doc: str) -> str:
        spread = "" if self.spread is None else " ({:.2f}–{:.2f})".format(*self.spread)
        return "–" if self.value is None else f"{self.value:.2f}×{spread}"


def md_tables(text: str) -> list[dict]:
    """Every table of a markdown text: the heading above it, its header, and its rows with their line numbers."""
    def split(line: str) -> list[str]:  # "\|" is a pipe inside a cell; bold is not part of a number
        return [c.replace("**", "").strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]

    tables, heading, fenced, lines, i = [], None, False, text.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        fenced ^= line.lstrip().startswith("```")
        if not fenced and line.startswith("#"):
            heading = line.lstrip("#").strip()
        if (not fenced and line.startswith("|") and i + 1 < len(lines)
                and re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", lines[i + 1].strip())):
            rows, j = [], i + 2
            while j < len(lines) and lines[j].startswith("|"):
                rows.append((j + 1, split(lines[j])))
                j += 1
            tables.append({"heading": heading, "header": split(line), "rows": rows})
            i = j
            continue
        i += 1
    return tables


def as_text(markdown: str) -> dict:
    """{(row, column): Text} for every cell of a tool's markdown output."""
    out = {}
    for t in md_tables(markdown):
        for _, cells in t["rows"]:
            for col, cell in zip(t["header"][1:], cells[1:]):
                assert (cells[0], col) not in out, f"two cells at row {cells[0]!r}, column {col!r}"
                out[(cells[0], col)] = Text(cell)
    return out


RUNS = {"gpu": ["study-gpu/runs"], "cpu": ["study-cpu/runs"],
        "variants": ["study-cpu/runs", "study-mn-variants/runs"],
        "cpu-bn-mn": [f"study-cpu/runs/{v}-s{s}" for v in ("bn", "mn") for s in (0, 1)],
        "cpu-quick": ["study-cpu-quick/runs"], "cpu-whole": ["study-cpu-whole/runs"]}
# The extra targets (--also-at) of the compare commands in each study folder's README.
ALSO_AT = {("gpu", "fid"): ("2x", "1.5x", "1.25x"), ("gpu", "kid"): ("2x", "1.5x", "1.25x"),
           ("variants", "fid"): (250, 150, 120, 100), ("variants", "kid"): (0.2, 0.1, 0.06, 0.05)}


class Studies:
    """compare's result for a study, a metric and a target, computed once."""

    def __init__(self, tmp: Path):
        self.tmp, self.cache = tmp, {}

    def __call__(self, study: str, metric: str = "fid", target=None) -> compare.CompareResult:
        key = (study, metric, target)
        if key not in self.cache:
            self.cache[key] = compare.compare_runs([DOCS / p for p in RUNS[study]], self.folder(study, target),
                                                   metric, target=target, also_at=ALSO_AT.get((study, metric), ()))
        return self.cache[key]

    def folder(self, study: str, target=None) -> Path:
        return self.tmp / f"{study}-{target}"


def group(result: compare.CompareResult, label: str) -> dict:
    found = [g for g in result.data["groups"] if g["label"] == label]
    assert found, f"compare has no group {label!r}: {[g['label'] for g in result.data['groups']]}"
    return found[0]


def mean_std(stat: dict) -> Nums:
    return Nums(stat["mean"], *([] if stat["std"] is None else [stat["std"]]))


def sec_per_step(result, label: str) -> float:
    return group(result, label)["sec_per_step"]["mean"]


def final_at(result, label: str, step: int):
    """The final value's mean ± std, where every seed's last evaluation is at `step` (the column says so)."""
    g = group(result, label)
    last = {r["final_step"] for r in g["runs"]}
    return mean_std(g["final"]) if last == {step} else Text(f"(the seeds' last evaluations are at {last})")


def evals(result) -> dict:
    """{run name: {step: value}} over every group."""
    return {Path(r["run"]).name: dict(r["evals"]) for g in result.data["groups"] for r in g["runs"]}


def grid(rows: dict, columns: dict) -> dict:
    """{(row, column): expected} for a table whose rows are compare's groups: rows maps the doc's row label to
    compare's group label, columns a column to a function of that label."""
    return {(row, col): f(label) for row, label in rows.items() for col, f in columns.items()}


GPU_ROWS = {"BN": "norm=bn", "MN (all three layers)": "norm=mn", "MN in layer 0 only": "norm=mn, mn_layers=[0]"}


def readme_answer(s):
    fid = s("gpu")
    return grid({"BN": "norm=bn", "MN (all three layers, the paper's setup)": "norm=mn",
                 "MN in layer 0 only": "norm=mn, mn_layers=[0]"}, {
        "best FID": lambda g: mean_std(group(fid, g)["best"]),
        "steps to BN's best FID": lambda g: Steps(group(fid, g)["steps_to_target"]),
        "MN/BN step time": lambda g: Nums(sec_per_step(fid, g) / sec_per_step(fid, "norm=bn"))})


def results_gpu(s):
    fid, kid = s("gpu"), s("gpu", "kid")
    base = sec_per_step(fid, "norm=bn")
    return grid(GPU_ROWS, {
        "best FID": lambda g: mean_std(group(fid, g)["best"]),
        "best KID": lambda g: mean_std(group(kid, g)["best"]),
        "FID at 3000": lambda g: final_at(fid, g, 3000),
        "steps to BN's best FID": lambda g: Steps(group(fid, g)["steps_to_target"]),
        "s/step (9 runs at once)": lambda g: Nums(sec_per_step(fid, g), *(
            [] if g == "norm=bn" else [sec_per_step(fid, g) / base]))})


def results_variants(s):
    fid, kid = s("variants"), s("variants", "kid")
    return grid({"BN": "norm=bn",
                 "per-channel posteriors, layer 0 only": "norm=mn, mn_layers=[0], mn.posteriors=per_channel",
                 "MN in layer 0 only, no 1/sqrt(lambda) gain": "norm=mn, mn_layers=[0], mn.prior_scaling=false",
                 "MN in layer 0 only": "norm=mn, mn_layers=[0]", "MN in layers 0, 1": "norm=mn, mn_layers=[0, 1]",
                 "full MN (2 seeds)": "norm=mn"}, {
        "best KID": lambda g: mean_std(group(kid, g)["best"]),
        "best FID": lambda g: mean_std(group(fid, g)["best"]),
        "best KID − BN's": lambda g: Text(variants_table.gap_cell(group(kid, g), group(kid, "norm=bn")))})


def results_cpu(s):
    fid, kid = s("cpu"), s("cpu", "kid")
    return grid({"BN": "norm=bn", "MN in the first layer only": "norm=mn, mn_layers=[0]",
                 "MN, K = 2": "norm=mn, mn.num_components=2",
                 "MN, no 1/sqrt(lambda) gain": "norm=mn, mn.prior_scaling=false", "MN": "norm=mn"}, {
        "seeds": lambda g: Text(", ".join(map(str, group(fid, g)["seeds"]))),
        "best FID": lambda g: mean_std(group(fid, g)["best"]),
        "best KID": lambda g: mean_std(group(kid, g)["best"]),
        "FID at 8000": lambda g: final_at(fid, g, 8000)})


def results_diagnose(s):
    """The table quotes `diagnose` on the CPU study's bn-s0 and mn-s0 (docs/diagnose/<norm>.txt)."""
    layers = {norm: [line.split() for line in (DOCS / "diagnose" / f"{norm}.txt").read_text().splitlines()
                     if re.match(r"\s*\d+\s+net\.", line)] for norm in ("bn", "mn")}
    out = {}
    for i, (bn, mn) in enumerate(zip(layers["bn"], layers["mn"])):
        row = f"{4 << i}x{4 << i} ({mn[3]} ch)"
        out[(row, "BN run: skew / excess kurtosis")] = Nums(*map(float, bn[4:6]))
        out[(row, "MN run: skew / excess kurtosis")] = Nums(*map(float, mn[4:6]))
        out[(row, "MN mixture weights")] = Nums(*map(float, mn[6:]))
    return out


# A column's heading -> compare's --metric, for the tables of fidelity and diversity.
FIDELITY = {"FID": "fid", "precision": "precision", "recall": "recall", "density": "density", "coverage": "coverage"}


def results_fidelity_diversity(s):
    """The cpu-quick pair's last evaluation, each metric from compare --metric."""
    return grid({"BN": "norm=bn", "MN": "norm=mn"},
                {f"{name} at 1500": (lambda g, m=m: final_at(s("cpu-quick", m), g, 1500)) for name, m in FIDELITY.items()})


# The steps of the whole runs' first-seed table: fixed, so that the study's later progress leaves it true.
WHOLE_FIRST_SEED_STEPS = (2000, 4000, 6000, 8000)


def results_whole_first_seed(s):
    """The whole-run CPU study's BN and MN seed 0 at fixed steps, each metric from compare --metric."""
    by_metric = {col: evals(s("cpu-whole", m)) for col, m in FIDELITY.items()}
    return {(f"{row} at {step}", col): Nums(by_metric[col][run][step]) for step in WHOLE_FIRST_SEED_STEPS
            for row, run in (("BN", "bn-s0"), ("MN", "mn-s0")) for col in FIDELITY}


def gpu_looser(s):
    fid = s("gpu")
    out = {}
    for row, label in {"BN": "norm=bn", "MN in layer 0 only": "norm=mn, mn_layers=[0]", "MN": "norm=mn"}.items():
        for at in fid.data["at_targets"]:
            n = next(n for n in at["groups"] if n["label"] == label)
            col = f"FID ≤ {at['target']:.1f} ({at['times_target']:g}×)"
            out[(row, col)] = Steps(n["steps_to_target"], (n["speedup_steps"], n["speedup_time"]))
    return out


def per_eval(s):
    return {(str(step), run): Nums(v) for run, by_step in evals(s("gpu")).items() for step, v in by_step.items()}


def cpu_looser(s):
    """`compare --target T` on BN's and MN's two seeds, T one row's FID."""
    out = {}
    for t in (250, 150, 120, 100):
        bn, mn = (group(s("cpu-bn-mn", target=t), g) for g in ("norm=bn", "norm=mn"))
        out.update({(str(t), col): want for col, want in (
            ("BN steps", Steps(bn["steps_to_target"])), ("MN steps", Steps(mn["steps_to_target"])),
            ("MN speed-up in steps (range over seed pairs)", Speedup(mn["speedup_steps"], mn["speedup_steps_range"])),
            ("in training time", Speedup(mn["speedup_time"], mn["speedup_time_range"])))})
    return out


def cpu_g_mode(s):
    """Eval mode from the runs' metrics.jsonl, train mode from `evaluate --g-mode train` (g-mode-train/)."""
    fid, kid = evals(s("cpu")), evals(s("cpu", "kid"))
    out = {}
    for run in ("bn-s0", "mn-s0"):
        for step in fid[run]:
            train = json.loads((DOCS / "study-cpu" / "g-mode-train" / f"{run}-{step}.json").read_text())
            out[(str(step), run)] = Nums(fid[run][step], train["fid"], kid[run][step], train["kid_mean"])
    return out


def variants_whole(s):
    s("variants"), s("variants", "kid")  # compare.json and compare-kid.json, which variants_table reads
    folder = DOCS / "study-mn-variants"
    benches = [json.loads(p.read_text()) for p in sorted(folder.glob("bench-norm-ngf32-*.json"))]
    return as_text(variants_table.table(s.folder("variants"), benches, folder / "diagnose"))


def regenerated(study: str, metric: str):
    return lambda s: as_text(s(study, metric).markdown)


# (file, heading above the table) -> its cells recomputed; heading None: every table of the file.
CHECKS = {
    ("README.md", "The answer so far"): readme_answer,
    ("docs/results.md", "BN vs MN on one GPU"): results_gpu,
    ("docs/results.md", "Which MN? The variants the paper leaves open"): results_variants,
    ("docs/results.md", "BN vs MN on a CPU"): results_cpu,
    ("docs/results.md", "Why MN might not help: `diagnose`"): results_diagnose,
    ("docs/results.md", "Fidelity or diversity? Precision and recall"): results_fidelity_diversity,
    ("docs/results.md", "The whole runs' first seed"): results_whole_first_seed,
    ("docs/study-gpu/README.md", "Looser targets"): gpu_looser,
    ("docs/study-gpu/README.md", "FID at each evaluation"): per_eval,
    ("docs/study-cpu/README.md", "Looser targets (BN and MN, 2 seeds each)"): cpu_looser,
    ("docs/study-cpu/README.md", "Sampling with batch statistics (`eval.g_mode: train`)"): cpu_g_mode,
    ("docs/study-mn-variants/README.md", "The whole table"): variants_whole,
    **{(f"docs/study-{study}/compare{'' if metric == 'fid' else '-kid'}.md", None): regenerated(runs, metric)
       for study, runs in (("gpu", "gpu"), ("cpu", "cpu"), ("mn-variants", "variants")) for metric in ("fid", "kid")},
    ("docs/study-cpu-quick/compare.md", None): regenerated("cpu-quick", "fid"),
}
SKIPPED = {
    ("README.md", "Commands"): "the commands and their options, no measurements",
    ("docs/results.md", "Evaluation cost and benchmarks"): "`bench` timings and op counts (bench-cpu.txt and "
                                                           "one-off runs), not any run's metrics.jsonl",
}
DOC_FILES = ["README.md", "docs/results.md", *sorted(str(p.relative_to(ROOT)) for p in DOCS.glob("*/README.md")),
             *sorted(str(p.relative_to(ROOT)) for p in DOCS.glob("*/compare*.md"))]


def rule(file: str, heading):
    return CHECKS.get((file, heading)) or CHECKS.get((file, None))


def check(file: str, text: str, s: Studies) -> tuple[int, list[str]]:
    """(cells checked, one line per mismatch naming the file, line, row, column and both values)."""
    checked, problems = 0, []
    for heading, tables in groupby(md_tables(text), key=lambda t: t["heading"]):
        if (build := rule(file, heading)) is None:
            continue
        want, seen = build(s), set()
        for t in tables:
            for line, cells in t["rows"]:
                for col, doc in zip(t["header"][1:], cells[1:]):
                    key, where = (cells[0], col), f"{file}:{line} ({heading}), row {cells[0]!r}, column {col!r}"
                    if key not in want:
                        problems.append(f"{where}: {doc!r} has no recomputed value (a row or column not in the runs)")
                    elif not want[key].agrees(doc):
                        problems.append(f"{where}: the doc says {doc!r}, the runs give {want[key].describe(doc)}")
                    seen.add(key)
        checked += len(want.keys() & seen)
        problems += [f"{file} ({heading}): row {r!r}, column {c!r} is in the runs but not in the doc"
                     for r, c in sorted(want.keys() - seen)]
    return checked, problems


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        # The figures are not what this checks, and drawing them would take most of the test's time.
        mp.setattr(compare, "plot", lambda *a: None)
        mp.setattr(compare, "precision_recall_plot", lambda *a: None)
        yield Studies(tmp_path_factory.mktemp("compare"))


def test_every_table_is_checked_or_skipped_for_a_reason():
    present = {(f, t["heading"]) for f in DOC_FILES for t in md_tables((ROOT / f).read_text())}
    unknown = sorted(k for k in present if rule(*k) is None and k not in SKIPPED)
    assert not unknown, f"tables with neither a rule in CHECKS nor a reason in SKIPPED: {unknown}"
    gone = [k for k in [*CHECKS, *SKIPPED] if not any(f == k[0] and k[1] in (h, None) for f, h in present)]
    assert not gone, f"CHECKS or SKIPPED name tables that the docs no longer have: {gone}"


def test_published_numbers_are_the_runs_numbers(studies):
    counts, problems = {}, []
    for f in DOC_FILES:
        counts[f], found = check(f, (ROOT / f).read_text(), studies)
        problems += found
    assert not problems, f"{len(problems)} published numbers differ from the runs':\n" + "\n".join(problems)
    # Floors well below today's counts, so that a parser that silently matches nothing fails.
    assert counts["README.md"] >= 9 and counts["docs/results.md"] >= 60, counts
    assert sum(counts.values()) >= 1200, counts


def test_a_changed_number_is_named(studies):
    text = (ROOT / "README.md").read_text()
    assert text.count("| 93.9 ± 10.7 |") == 1
    _, problems = check("README.md", text.replace("| 93.9 ± 10.7 |", "| 93.9 ± 10.8 |"), studies)
    assert len(problems) == 1, problems
    assert "README.md:" in problems[0] and "row 'BN', column 'best FID'" in problems[0]
    assert "'93.9 ± 10.8'" in problems[0] and "the runs give 93.9, 10.7" in problems[0]
