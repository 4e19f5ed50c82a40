"""`compare` on synthetic run folders with known numbers, and `study` planning (no training here)."""
from __future__ import annotations

import json
import math
import shlex
import sys

import pytest
import yaml
from click.testing import CliRunner

from cli import cli
from gan.tools.compare import compare_runs, group_runs, read_run
from gan.tools.compare_report import fidelity_diversity_curves
from gan.core.config import load_config
from tests.conftest import ROOT


def make_run(root, name, fids: dict, *, norm="bn", seed=0, sec=0.1, steps=None, log_every=500, **cfg):
    """A run folder as training leaves it: config.yaml and metrics.jsonl (fid at the steps in `fids`).

    Logged every `log_every` steps up to the last fid step; train_time = step * sec, kid_mean = fid / 1000."""
    run = root / name
    last = max(fids) if fids else log_every * 2
    config = load_config(None, {"model.norm": norm, "train.seed": seed, "run_dir": str(run),
                                "train.steps": steps or last, "eval.every": 1000, **cfg})
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(config.to_yaml())
    lines = []
    for step in range(log_every, last + 1, log_every):
        rec = {"step": step, "loss_d": 1.2, "loss_g": 0.8, "d_real": 0.6, "d_fake": 0.4,
               "sec_per_step": sec, "train_time": step * sec}
        if step in fids:
            rec.update(fid=fids[step], kid_mean=fids[step] / 1000, kid_std=0.001, num_samples=1000, ema=False)
        lines.append(json.dumps(rec))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run


@pytest.fixture
def study_runs(tmp_path):
    """bn: bests 40 @3000 and 44 @3000 -> target 42, reached by seed 0 only (step 3000, 300 s).
    mn: bests 30 @4000 and 36 @4000; reaches 42 at 2000 (400 s) and 3000 (600 s): 1.2x in steps, 0.6x in time."""
    root = tmp_path / "runs"
    return [
        make_run(root, "bn-s0", {1000: 100, 2000: 60, 3000: 40, 4000: 42}, norm="bn", seed=0, sec=0.1),
        make_run(root, "bn-s1", {1000: 110, 2000: 70, 3000: 44, 4000: 45}, norm="bn", seed=1, sec=0.1),
        make_run(root, "mn-s0", {1000: 80, 2000: 41, 3000: 35, 4000: 30}, norm="mn", seed=0, sec=0.2),
        make_run(root, "mn-s1", {1000: 90, 2000: 50, 3000: 38, 4000: 36}, norm="mn", seed=1, sec=0.2),
    ]


def by_label(result):
    return {g["label"]: g for g in result.data["groups"]}


def test_compare_numbers(study_runs, tmp_path):
    out = tmp_path / "cmp"
    result = compare_runs(study_runs, out)
    groups = by_label(result)
    assert set(groups) == {"norm=bn", "norm=mn"}
    assert result.data["baseline"] == "norm=bn"
    assert result.data["target"] == pytest.approx(42.0)
    bn, mn = groups["norm=bn"], groups["norm=mn"]
    assert bn["seeds"] == [0, 1] and mn["seeds"] == [0, 1]

    assert bn["best"]["mean"] == pytest.approx(42.0)
    assert bn["best"]["std"] == pytest.approx(math.sqrt(8))  # sample std of 40, 44
    assert bn["best_step"] == [3000, 3000]
    assert bn["final"]["mean"] == pytest.approx(43.5)
    assert bn["steps_to_target"] == {"mean": 3000, "std": None, "reached": 1, "of": 2}
    assert bn["time_to_target"]["mean"] == pytest.approx(300.0)

    assert mn["best"]["mean"] == pytest.approx(33.0)
    assert mn["best_step"] == [4000, 4000]
    assert mn["final"]["mean"] == pytest.approx(33.0)
    assert mn["steps_to_target"]["mean"] == pytest.approx(2500)
    assert mn["steps_to_target"]["std"] == pytest.approx(math.sqrt(500_000))
    assert (mn["steps_to_target"]["reached"], mn["steps_to_target"]["of"]) == (2, 2)
    assert mn["time_to_target"]["mean"] == pytest.approx(500.0)
    assert mn["speedup_steps"] == pytest.approx(1.2)
    assert mn["speedup_time"] == pytest.approx(0.6)
    # Pairs that reached: bn seed 0 (3000 steps, 300 s) with mn 2000/400 s and 3000/600 s.
    assert mn["speedup_steps_range"] == pytest.approx([1.0, 1.5])
    assert mn["speedup_time_range"] == pytest.approx([0.5, 0.75])
    assert bn["speedup_steps"] == pytest.approx(1.0)
    assert mn["sec_per_step"]["mean"] == pytest.approx(0.2)
    assert bn["sec_per_step"]["mean"] == pytest.approx(0.1)
    # The curve: mean and min..max band over seeds at each evaluation step, x in steps and in train_time.
    assert mn["curve"]["step"] == [1000, 2000, 3000, 4000]
    assert mn["curve"]["mean"] == pytest.approx([85, 45.5, 36.5, 33])
    assert mn["curve"]["min"] == [80, 41, 35, 30] and mn["curve"]["max"] == [90, 50, 38, 36]
    assert mn["curve"]["train_time"] == pytest.approx([200, 400, 600, 800])

    # The same numbers in the files.
    assert json.loads((out / "compare.json").read_text()) == json.loads(json.dumps(result.data))
    png = (out / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    table = (out / "compare.md").read_text()
    assert table == result.markdown
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in table.splitlines()
            if line.startswith("| norm=")}
    assert rows["norm=bn"][1:6] == ["0, 1", "42.00 ± 2.83", "3000, 3000", "43.50 ± 2.12", "3000 (1/2 reached)"]
    assert rows["norm=mn"][1:6] == ["0, 1", "33.00 ± 4.24", "4000, 4000", "33.00 ± 4.24", "2500 ± 707"]
    assert rows["norm=mn"][7:9] == ["1.20× (1.00–1.50)", "0.60× (0.50–0.75)"]
    assert rows["norm=bn"][7:9] == ["1.00×", "1.00×"]


def test_compare_cli_kid_target_and_labels(study_runs, tmp_path):
    """--metric kid reads kid_mean; --target overrides; extra differing keys name the groups."""
    root = study_runs[0].parent
    make_run(root, "mn-k2-s0", {1000: 70, 2000: 39}, norm="mn", seed=0, sec=0.25,
             **{"model.mn.num_components": 2})
    out = tmp_path / "cmp"
    r = CliRunner().invoke(cli, ["compare", str(root), "--out", str(out), "--metric", "kid", "--target", "0.045"])
    assert r.exit_code == 0, r.output
    data = json.loads((out / "compare-kid.json").read_text())
    assert (out / "compare-kid.png").is_file() and (out / "compare-kid.md").is_file()
    assert data["metric_key"] == "kid_mean" and data["target"] == 0.045 and data["target_source"] == "--target"
    groups = by_label(type("R", (), {"data": data}))
    assert set(groups) == {"norm=bn", "norm=mn", "norm=mn, mn.num_components=2"}
    assert groups["norm=bn"]["best"]["mean"] == pytest.approx(0.042)
    assert groups["norm=bn"]["steps_to_target"]["mean"] == 3000  # 0.040 and 0.044 both <= 0.045 at 3000
    assert groups["norm=mn, mn.num_components=2"]["steps_to_target"]["mean"] == 2000
    assert groups["norm=mn, mn.num_components=2"]["speedup_steps"] == pytest.approx(1.5)
    assert "| norm=mn, mn.num_components=2 | 0 | 0.0390 |" in r.output


def test_speedups_at_extra_targets(study_runs, tmp_path):
    """--also-at: steps to each extra target and the speed-ups there, per group, beside the main table.
    FID <= 100: bn at 1000 and 2000 (100 s, 200 s), mn at 1000 twice (200 s each): 1.5x in steps, 0.75x in time.
    FID <= 60: bn at 2000 and 3000, mn at 2000 twice: 1.25x, pairs 1.0-1.5. FID <= 35: bn never, mn seed 0."""
    out = tmp_path / "cmp"
    r = CliRunner().invoke(cli, ["compare", str(study_runs[0].parent), "--out", str(out), "--also-at", "100, 60,35"])
    assert r.exit_code == 0, r.output
    data = json.loads((out / "compare.json").read_text())
    assert data["target"] == pytest.approx(42)  # the main table keeps BN's best
    assert [a["target"] for a in data["at_targets"]] == [100, 60, 35]
    at100, at60, at35 = ({g["label"]: g for g in a["groups"]} for a in data["at_targets"])
    assert at100["norm=bn"]["steps_to_target"]["mean"] == 1500 and at100["norm=mn"]["steps_to_target"]["mean"] == 1000
    assert at100["norm=mn"]["speedup_steps"] == pytest.approx(1.5)
    assert at100["norm=mn"]["speedup_time"] == pytest.approx(0.75)
    assert at60["norm=mn"]["speedup_steps"] == pytest.approx(1.25)
    assert at60["norm=mn"]["speedup_steps_range"] == pytest.approx([1.0, 1.5])
    assert at35["norm=bn"]["steps_to_target"]["reached"] == 0
    assert at35["norm=mn"]["steps_to_target"]["reached"] == 1 and at35["norm=mn"]["speedup_steps"] is None
    assert "| group | fid ≤ 100.00 | fid ≤ 60.00 | fid ≤ 35.00 |" in r.output
    assert "| norm=mn | 1000 ± 0 · 1.50× (1.00–2.00) / 0.75× | 2000 ± 0 · 1.25× (1.00–1.50) / " in r.output
    assert "| norm=bn | 1500 ± 707 | 2500 ± 707 | not reached |" in r.output


def test_extra_targets_as_multiples_of_the_main_target(study_runs, tmp_path):
    """--also-at 2x,1.5x: BN's best (42) times each, the same numbers as the absolute values 84 and 63, mixed
    with an absolute one; with --target the multiples are of that target."""
    out, ref = tmp_path / "rel", tmp_path / "abs"
    r = CliRunner().invoke(cli, ["compare", str(study_runs[0].parent), "--out", str(out), "--also-at", "2x, 1.5X,35"])
    assert r.exit_code == 0, r.output
    rel = json.loads((out / "compare.json").read_text())["at_targets"]
    assert [(a["target"], a["times_target"]) for a in rel] == [(pytest.approx(84), 2.0), (pytest.approx(63), 1.5),
                                                               (35, None)]
    assert "| group | fid ≤ 84.00 (2× target) | fid ≤ 63.00 (1.5× target) | fid ≤ 35.00 |" in r.output
    absolute = compare_runs(study_runs, ref, also_at=(84, 63, 35)).data["at_targets"]
    assert [a["groups"] for a in rel] == [a["groups"] for a in absolute]
    with_target = compare_runs(study_runs, ref, target=50, also_at=("2x",)).data["at_targets"]
    assert with_target[0]["target"] == 100 and with_target[0]["times_target"] == 2


@pytest.mark.parametrize("value", ["100,abc", "nan", "2x,abcx", "-2x", "0x", "infx"])
def test_bad_extra_targets_are_one_line_errors(study_runs, tmp_path, value):
    r = CliRunner().invoke(cli, ["compare", str(study_runs[0].parent), "--out", str(tmp_path), "--also-at", value])
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert "comma-separated numbers" in r.output or "finite numbers" in r.output


def test_runs_of_different_lengths_and_in_progress(tmp_path):
    root = tmp_path / "runs"
    runs = [
        make_run(root, "bn-s0", {1000: 80, 2000: 55, 3000: 45, 4000: 40}, norm="bn", seed=0),
        # Still running: train.steps is 4000, only 2000 logged.
        make_run(root, "bn-s1", {1000: 90, 2000: 60}, norm="bn", seed=1, steps=4000),
        make_run(root, "mn-s0", {1000: 70, 2000: 44, 3000: 39, 4000: 35, 5000: 33, 6000: 34}, norm="mn"),
    ]
    result = compare_runs(runs, tmp_path / "cmp")
    bn, mn = by_label(result)["norm=bn"], by_label(result)["norm=mn"]
    assert [r["in_progress"] for r in bn["runs"]] == [False, True] and not mn["in_progress"]
    assert bn["best"]["mean"] == pytest.approx(50.0)  # 40 and 60 (seed 1 so far)
    assert bn["best_step"] == [4000, 2000]
    assert bn["final"]["mean"] == pytest.approx(50.0)
    # The band covers the seeds that reached each step; past step 2000 only seed 0 is left.
    assert bn["curve"]["seeds"] == [2, 2, 1, 1]
    assert bn["curve"]["mean"] == pytest.approx([85, 57.5, 45, 40])
    assert mn["best_step"] == [5000] and mn["final"]["mean"] == 34
    # Target 50: bn seed 0 gets there at 3000, seed 1 not (yet); mn at 2000.
    assert mn["steps_to_target"]["mean"] == 2000 and bn["steps_to_target"]["mean"] == 3000
    assert bn["steps_to_target"]["reached"] == 1
    assert mn["speedup_steps"] == pytest.approx(1.5)
    assert "| norm=bn | 0, 1* |" in result.markdown and "still in progress" in result.markdown
    # Every evaluation of every run, "–" where a run has none at that step.
    assert bn["runs"][1]["evals"] == [[1000, 90], [2000, 60]]
    assert "| step | bn-s0 | bn-s1 | mn-s0 |" in result.markdown
    assert "| 2000 | 55.00 | 60.00 | 44.00 |" in result.markdown
    assert "| 6000 | – | – | 34.00 |" in result.markdown
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 10_000


def test_run_without_evaluations_is_skipped_with_a_warning(study_runs, tmp_path):
    empty = make_run(study_runs[0].parent, "bn-s2", {}, norm="bn", seed=2, **{"eval.every": 0})
    r = CliRunner().invoke(cli, ["compare", *map(str, study_runs), str(empty), "--out", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    assert f"warning: skipping {empty}: no fid evaluations (eval.every is 0)" in r.stderr
    data = json.loads((tmp_path / "c" / "compare.json").read_text())
    assert data["skipped"] == [{"run": str(empty), "reason": "no fid evaluations (eval.every is 0)"}]
    assert by_label(type("R", (), {"data": data}))["norm=bn"]["seeds"] == [0, 1]


def test_no_run_has_evaluations_is_one_clear_error(tmp_path):
    a = make_run(tmp_path, "bn-s0", {}, norm="bn")
    b = make_run(tmp_path, "mn-s0", {}, norm="mn")
    r = CliRunner().invoke(cli, ["compare", str(a), str(b), "--out", str(tmp_path / "c")])
    assert r.exit_code == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: compare: none of the 2 runs has fid evaluations")
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("key, a, b", [("eval.num_samples", 1000, 10000),
                                       ("data.path", "data", "other"),
                                       ("eval.reference", "train", "refs.zip")])
def test_unrelated_runs_refused_unless_force(study_runs, tmp_path, key, a, b):
    root = study_runs[0].parent
    other = make_run(root, "mn-other", {1000: 50, 2000: 30}, norm="mn", **{key: b})
    for run in study_runs:  # make the fixture's value explicit, so the test does not lean on defaults
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        section, name = key.split(".")
        cfg[section][name] = a
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    args = ["compare", *map(str, study_runs), str(other), "--out", str(tmp_path / "c")]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 2
    assert r.stderr.count("\n") == 1
    assert f"runs are not comparable: {key} differs" in r.stderr and "--force" in r.stderr
    assert not (tmp_path / "c").exists()

    r = CliRunner().invoke(cli, args + ["--force"])
    assert r.exit_code == 0, r.output
    assert f"warning: runs are not comparable: {key} differs" in r.stderr
    labels = set(by_label(type("R", (), {"data": json.loads((tmp_path / "c" / "compare.json").read_text())})))
    assert len(labels) == 3 and any(key in label for label in labels)


def test_not_a_run_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    r = CliRunner().invoke(cli, ["compare", str(tmp_path / "empty")])
    assert r.exit_code == 2 and "is not a run folder" in r.stderr


# ---------------------------------------------------------------- study

BASE = {"model": {"ngf": 8, "ndf": 8}, "data": {"source": "folder", "path": "imgs"},
        "train": {"steps": 40}, "eval": {"every": 20, "num_samples": 16}}


def write_study(tmp_path, study: dict) -> str:
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE))
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study, sort_keys=False))
    return "study.yaml"


STUDY = {
    "base": "base.yaml", "out": "out", "seeds": [0, 1],
    "set": {"train.device": "cpu"},
    "variants": {
        "bn": {"model.norm": "bn"},
        "mn": {"model.norm": "mn"},
        "mn-layer0": {"model.norm": "mn", "model.mn_layers": [0], "seeds": [0]},
        "mn-noprior": {"model.norm": "mn", "model.mn.prior_scaling": False, "seeds": [3]},
    },
}


def test_study_dry_run_lists_every_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(cli, ["study", write_study(tmp_path, STUDY), "--dry-run"])
    assert r.exit_code == 0, r.output
    commands = [shlex.split(line.strip()) for line in r.output.splitlines() if " train --config " in line]
    assert all(c[0] == sys.executable and c[1].endswith("cli.py") for c in commands)
    got = [c[2:] for c in commands]

    def expected(variant, seed, *sets):
        args = ["train", "--config", "base.yaml", "--set", "train.device=cpu"]
        for s in sets:
            args += ["--set", s]
        return args + ["--seed", str(seed), "--out", f"out/{variant}-s{seed}", "--resume", "auto", "--quiet"]
    assert got == [  # in seed order: seed 0 of every variant first
        expected("bn", 0, "model.norm=bn"), expected("mn", 0, "model.norm=mn"),
        expected("mn-layer0", 0, "model.norm=mn", "model.mn_layers=[0]"),
        expected("bn", 1, "model.norm=bn"), expected("mn", 1, "model.norm=mn"),
        expected("mn-noprior", 3, "model.norm=mn", "model.mn.prior_scaling=false"),
    ]
    assert "6 runs (0 finished, 6 to train)" in r.output
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_study_commands_rebuild_the_planned_config(tmp_path, monkeypatch):
    """What `train --set ...` will resolve is exactly the config the study planned (values round-trip)."""
    from cli import build_config
    from gan.tools.study import load_study
    monkeypatch.chdir(tmp_path)
    study = load_study(write_study(tmp_path, STUDY))
    for run in study.runs:
        argv = run.argv[2:]
        sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
        cfg = build_config("base.yaml", None, None, None, run.seed, str(run.run_dir), None, None, sets)
        assert cfg == run.config
    layer0 = next(r for r in study.runs if r.variant == "mn-layer0")
    assert layer0.config.model.mn_layers == [0] and layer0.config.train.device == "cpu"


def test_study_skips_finished_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from gan.tools.study import load_study
    path = write_study(tmp_path, STUDY)
    done = load_study(path).runs[0]  # bn-s0, as a finished run leaves its folder
    done.run_dir.mkdir(parents=True)
    (done.run_dir / "config.yaml").write_text(done.config.to_yaml())
    (done.run_dir / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "fid": 50.0, "train_time": s * 0.1}) + "\n" for s in (20, 40)))
    r = CliRunner().invoke(cli, ["study", path, "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "  bn-s0: finished (step 40)" in r.output and "out/bn-s0 --resume" not in r.output
    assert "  bn-s1: new" in r.output
    assert "6 runs (1 finished, 5 to train)" in r.output


@pytest.mark.parametrize("change, message", [
    ({"variant": {}}, "unknown key 'variant' (known: base, out, seeds, set, budget_minutes, also_at, variants"),
    ({"base": "nope.yaml"}, "base config nope.yaml not found"),
    ({"seeds": [0, "one"]}, "seeds must be a non-empty list of seeds"),
    ({"variants": {"mn": {"model.nrom": "mn"}}}, "variant 'mn': config: unknown key 'model.nrom'"),
    ({"variants": {"mn": {"model.norm": "ln"}}}, "variant 'mn': config: model.norm = 'ln' is not valid"),
    ({"variants": {"mn": {"model.mn.num_components": 0}}}, "model.mn.num_components = 0 is out of range"),
    ({"variants": {"mn": {"train.seed": 3}}}, "variant 'mn' sets train.seed; use seeds: [...] instead"),
    ({"variants": {"mn": {"model.norm": "mn", "seeds": []}}}, "variant 'mn' seeds must be a non-empty list"),
    ({"variants": {"m n": {"model.norm": "mn"}}}, "variant name 'm n' must be letters"),
    ({"variants": {"mn": "mn"}}, "variant 'mn' must be a mapping of dotted config keys"),
    ({"variants": {}}, "variants must be a non-empty mapping"),
    ({"set": {"run_dir": "x"}}, "set sets run_dir"),
    # An absolute value would be an FID for the FID table and a KID for the KID table.
    ({"also_at": [250]}, "also_at must list multiples of the target such as [2x, 1.5x, 1.25x]"),
    ({"also_at": ["2x", "-1x"]}, "also_at must list multiples of the target such as [2x, 1.5x, 1.25x] (they "
                                 "apply to FID and KID alike), got '-1x'"),
    ({"also_at": "soon"}, "also_at must list multiples of the target such as [2x, 1.5x, 1.25x] (they apply to "
                          "FID and KID alike), got 'soon'"),
])
def test_bad_study_file_fails_with_one_clear_line(tmp_path, monkeypatch, change, message):
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(cli, ["study", write_study(tmp_path, {**STUDY, **change}), "--dry-run"])
    assert r.exit_code == 2, r.output
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: study: study.yaml")
    assert message in r.stderr
    assert "train --config" not in r.output


def test_study_compares_at_multiples_of_the_target_from_the_file_or_the_command_line(tmp_path, monkeypatch):
    """also_at: [2x, 1.5x] gives the study's FID and KID comparisons those looser targets; --also-at replaces
    them, and a bad --also-at is one line before anything is compared."""
    from gan.tools.study import load_study
    monkeypatch.chdir(tmp_path)
    path = write_study(tmp_path, {**STUDY, "also_at": ["2x", "1.5x"],
                                  "variants": {v: STUDY["variants"][v] for v in ("bn", "mn")}})
    for run in load_study(path).runs:  # every run finished, so the study only compares
        run.run_dir.mkdir(parents=True)
        (run.run_dir / "config.yaml").write_text(run.config.to_yaml())
        (run.run_dir / "metrics.jsonl").write_text("".join(
            json.dumps({"step": s, "fid": f, "kid_mean": f / 1000, "train_time": s * 0.1}) + "\n"
            for s, f in ((20, 80.0 + run.seed), (40, 50.0 + run.seed))))

    def looser_targets(*args):
        r = CliRunner().invoke(cli, ["study", path, *args])
        assert r.exit_code == 0, r.output
        assert "4 runs (4 finished, 0 to train)" in r.output and "Steps to reach other targets" in r.output
        got = []
        for name in ("compare", "compare-kid"):
            result = json.loads((tmp_path / "out" / "compare" / f"{name}.json").read_text())
            # bn's best, the mean of its seeds' 50 and 51 (KID: fid / 1000)
            assert result["target"] == pytest.approx(50.5 if name == "compare" else 0.0505)
            assert [a["target"] for a in result["at_targets"]] == [result["target"] * a["times_target"]
                                                                   for a in result["at_targets"]]
            got.append([a["times_target"] for a in result["at_targets"]])
        return got
    assert looser_targets() == [[2, 1.5], [2, 1.5]]
    assert looser_targets("--also-at", "1.25x") == [[1.25], [1.25]]
    before = (tmp_path / "out" / "compare" / "compare.json").read_text()
    r = CliRunner().invoke(cli, ["study", path, "--also-at", "2x,120"])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1
    assert r.stderr.startswith("error: study: --also-at must list multiples of the target")
    assert r.stderr.rstrip().endswith("got '120'")
    assert (tmp_path / "out" / "compare" / "compare.json").read_text() == before


def test_shipped_study_files_plan_their_runs(monkeypatch):
    """configs/study-*-runs.yaml load, and hold bn/mn with several seeds plus the one-seed ablations."""
    from gan.tools.study import load_study
    monkeypatch.chdir(ROOT)
    cpu = load_study("configs/study-cpu-runs.yaml")
    names = [r.name for r in cpu.runs]
    # g_mode: train is scored from bn-s0's and mn-s0's kept checkpoints on the CPU, not retrained.
    assert names == ["bn-s0", "mn-s0", "mn-layer0-s0", "mn-k2-s0", "mn-noprior-s0", "bn-s1", "mn-s1"]
    c = {r.name: r.config for r in cpu.runs}
    assert c["mn-layer0-s0"].model.mn_layers == [0] and c["mn-k2-s0"].model.mn.num_components == 2
    assert c["mn-noprior-s0"].model.mn.prior_scaling is False
    assert c["mn-s0"].ckpt.keep >= c["mn-s0"].train.steps // c["mn-s0"].ckpt.every
    base = c["bn-s0"]
    assert (base.model.ngf, base.model.ndf, base.train.batch_size, base.train.steps) == (32, 32, 64, 8000)
    assert (base.eval.every, base.eval.num_samples, base.ckpt.every) == (1000, 1000, 1000)
    assert base.eval.reference == "test" and (base.data.source, base.data.path) == ("cifar10", "data")
    gpu = load_study("configs/study-gpu-runs.yaml")
    assert [r.name for r in gpu.runs] == ["bn-s0", "mn-s0", "mn-layer0-s0", "bn-s1", "mn-s1", "mn-layer0-s1",
                                          "bn-s2", "mn-s2", "mn-layer0-s2"]
    assert gpu.runs[2].config.model.mn_layers == [0] and gpu.runs[1].config.model.mn_layers == [0, 1, 2]
    g = gpu.runs[0].config
    assert (g.model.ngf, g.model.ndf, g.train.batch_size) == (64, 64, 64)
    assert g.eval.num_samples == 10_000 and g.eval.reference == "train" and g.eval.reference_samples == 0
    assert g.train.steps % g.eval.every == 0 and g.ckpt.every == g.eval.every  # every run: the same eval steps
    assert gpu.budget_minutes is not None and gpu.budget_minutes <= 7
    # The whole runs on a CPU: the GPU study's variants, seeds and widths for 20,000 steps, a checkpoint at
    # least every 500 steps, and every evaluation's checkpoint kept.
    whole = load_study("configs/study-cpu-whole-runs.yaml")
    assert [r.name for r in whole.runs] == [r.name for r in gpu.runs]
    w = whole.runs[0].config
    assert (w.model.ngf, w.model.ndf, w.train.batch_size, w.train.steps) == (64, 64, 64, 20_000)
    assert (w.eval.every, w.eval.at, w.eval.num_samples, w.eval.reference) == (2000, [1000], 1000, "test")
    assert w.ckpt.every <= 500 and w.ckpt.keep_evaluated
    assert gpu.also_at == ("2x", "1.5x", "1.25x")  # the looser targets the results report


def _with_precision_recall(run, values: dict) -> None:
    """Add precision and recall to the run's evaluation records: values {step: (precision, recall)}."""
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    for rec in lines:
        if rec["step"] in values:
            rec["precision"], rec["recall"] = values[rec["step"]]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_higher_is_better_metrics_take_the_maximum_and_reach_targets_from_below(tmp_path):
    root = tmp_path / "runs"
    fids = {1000: 60.0, 2000: 50.0, 3000: 45.0}
    bn = make_run(root, "bn-s0", fids)
    mn = make_run(root, "mn-s0", fids, norm="mn")
    _with_precision_recall(bn, {1000: (0.2, 0.1), 2000: (0.5, 0.3), 3000: (0.4, 0.35)})
    _with_precision_recall(mn, {1000: (0.3, 0.1), 2000: (0.6, 0.2), 3000: (0.55, 0.25)})
    result = compare_runs([root], tmp_path / "out", metric="precision")
    bn_g, mn_g = sorted(result.data["groups"], key=lambda g: g["norm"])
    assert result.data["higher_is_better"] and result.data["target"] == 0.5  # bn's best, its maximum
    assert bn_g["best"]["mean"] == 0.5 and bn_g["best_step"] == [2000]
    assert mn_g["best"]["mean"] == 0.6 and mn_g["runs"][0]["steps_to_target"] == 2000  # 0.6 >= 0.5 there
    assert "precision ≥ target" in result.markdown
    assert (tmp_path / "out" / "compare-precision.png").is_file()
    pr = tmp_path / "out" / "precision-recall.png"
    assert pr in result.files and pr.stat().st_size > 0
    curves = {c["label"]: c for c in fidelity_diversity_curves(group_runs([read_run(p, "fid") for p in (bn, mn)])[0])}
    assert curves["norm=bn"]["precision"] == [0.2, 0.5, 0.4] and curves["norm=bn"]["recall"] == [0.1, 0.3, 0.35]


def test_a_run_without_precision_has_no_precision_recall_plot(tmp_path):
    root = tmp_path / "runs"
    make_run(root, "bn-s0", {1000: 60.0})
    result = compare_runs([root], tmp_path / "out")
    assert not (tmp_path / "out" / "precision-recall.png").exists()
    assert all(f.exists() for f in result.files)


@pytest.mark.parametrize("recall, precision, limits", [
    ([0.0, 0.002, 0.003], [0.07, 0.2, 0.32], (0.02, 1.15 * 0.32)),  # early training: zoomed in on the data
    ([0.3, 0.95], [0.5, 0.99], (1.0, 1.0)),                          # never past the unit square
])
def test_the_precision_recall_plot_zooms_to_its_data(tmp_path, monkeypatch, recall, precision, limits):
    import gan.tools.compare_report as report
    figures = []
    monkeypatch.setattr(report, "_save", lambda fig, path: figures.append(fig))
    report.precision_recall_plot([{"label": "norm=bn", "seeds": 1, "step": [1, 2, 3][:len(recall)],
                                   "recall": recall, "precision": precision}], tmp_path / "pr.png")
    import matplotlib.pyplot as plt
    ax = figures[0].axes[0]
    xlim, ylim = ax.get_xlim(), ax.get_ylim()
    plt.close(figures[0])
    assert xlim == pytest.approx((0, limits[0])) and ylim == pytest.approx((0, limits[1]))
