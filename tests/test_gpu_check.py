"""scripts/gpu_check.sh, tested the way CI can: its --cpu-dry-run runs every stage on tiny sizes on the CPU."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import size_study  # noqa: E402


@pytest.mark.slow
def test_gpu_check_cpu_dry_run_runs_every_stage(tmp_path):
    out = tmp_path / "check"
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(out), "--cpu-dry-run"],
                       capture_output=True, text=True, timeout=900,
                       env={**__import__("os").environ, "PYTHON": sys.executable})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    stages = summary["stages"]
    # Most needed first: the study's sizing, the speed ratios, the CUDA tests, the study's runs together.
    assert list(stages) == ["environment", "warm_up", "probe", "fid_timing", "bench", "bench_compiled", "cuda_tests",
                            "concurrent"]
    assert all(s["ok"] for s in stages.values()), {k: s.get("error") for k, s in stages.items()}
    # On a CPU every CUDA test is collected and reported as skipped, never hidden.
    counts = stages["cuda_tests"]["counts"]
    assert counts.get("skipped", 0) >= 5 and not counts.get("passed") and not counts.get("failed")
    warm = stages["warm_up"]  # one MN run alone, timed step by step
    assert len(warm["step_seconds"]) == 8 and all(t > 0 for t in warm["step_seconds"])
    assert warm["wall_seconds"] > sum(warm["step_seconds"]) - 0.1
    probe = stages["probe"]
    assert probe["bn"]["sec_per_step"] > 0 and probe["mn"]["sec_per_step"] > 0
    assert all(s > 0 for s in probe["bn"]["steps"] + probe["mn"]["steps"])
    fid = stages["fid_timing"]["runs"][0]
    assert fid["samples"] == 64 and fid["fid"] > 0 and fid["seconds"] > 0
    assert fid["seconds"] >= fid["generate_seconds"] + fid["inception_seconds"] + fid["scores_seconds"] - 0.01
    assert {row["bench"] for row in stages["bench"]["rows"]} == {"train", "norm", "eval"}
    assert any(row["ratio_name"] == "Fréchet distance speed-up vs torch-fidelity" for row in stages["bench"]["rows"])
    compiled = stages["bench_compiled"]
    assert {row["bench"] for row in compiled["rows"]} == {"train", "norm"}
    assert {row["ratio_name"] for row in compiled["rows"] if row["bench"] == "train"} == {
        "compiled (default) speed-up vs eager", "compiled (reduce-overhead) speed-up vs eager"}
    # The GPU study's variants (configs/study-gpu-runs.yaml), one seed each here, trained at once.
    concurrent = stages["concurrent"]
    assert concurrent["jobs"] == 3
    assert all(concurrent[v]["sec_per_step"] > 0 for v in ("bn", "mn", "mn-layer0"))
    expected = sum(1 / concurrent[v]["sec_per_step"] for v in ("bn", "mn", "mn-layer0"))
    assert concurrent["steps_per_second"] == pytest.approx(expected)
    md = (out / "summary.md").read_text()
    for heading in ("## Environment", "## One MN run's first steps", "## CUDA tests", "## FID/KID wall time", "## Step time with 2 runs",
                    "## bench (eager)", "## bench --compile", "## The study's runs, 3 at once"):
        assert md.count(heading) == 1
    assert (out / "log.txt").stat().st_size > 0
    # What the study is sized from reads this check's summary.json.
    sets, why = size_study.size(summary, budget_minutes=1000, evals=1)
    assert sets["train.steps"] > 0 and why["mn_sec_per_step"] == probe["mn"]["sec_per_step"]
    assert why["first_steps_s"] == warm["first_steps_extra_seconds"]


def test_gpu_check_refuses_a_machine_without_cuda_unless_dry_run(tmp_path):
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(tmp_path / "c"), "--test-data", "x.zip"],
                       capture_output=True, text=True, timeout=120,
                       env={**__import__("os").environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 2 and "no CUDA device" in r.stdout


def _summary(mn_sps: float, fid10k_s: float, fid50k_s: float) -> dict:
    return {"stages": {"probe": {"ok": True, "mn": {"sec_per_step": mn_sps}},
                       "fid_timing": {"ok": True, "runs": [{"samples": 10_000, "seconds": fid10k_s},
                                                           {"samples": 50_000, "seconds": fid50k_s}]}}}


def test_size_study_fits_the_slowest_variant_into_the_budget():
    sets, why = size_study.size(_summary(mn_sps=0.02, fid10k_s=8.0, fid50k_s=30.0), budget_minutes=6, evals=6)
    # train time = 360 - 30 (reference) - 30 (start) - 25 (reserve) - 6 * 8 * 2.5 = 155 s -> 7750 MN steps,
    # 1291 per evaluation, rounded down to 1200.
    assert why["train_s"] == 155.0
    assert sets == {"train.steps": 7200, "eval.every": 1200, "ckpt.every": 1200, "log.sample_every": 1200}
    assert sets["train.steps"] * 0.02 + 6 * why["eval_s"] + why["reference_s"] <= 6 * 60


def test_size_study_takes_the_warm_up_runs_first_steps_out_of_the_training_time():
    """What an MN run's first steps cost beyond steady ones (compiling its fused layers) comes off the training
    time; a check without those numbers sizes as before."""
    summary = _summary(mn_sps=0.02, fid10k_s=8.0, fid50k_s=30.0)
    summary["stages"]["warm_up"] = {"ok": True, "first_steps_extra_seconds": 40.0}
    sets, why = size_study.size(summary, budget_minutes=6, evals=6)
    assert why["train_s"] == 155.0 - 40.0 and why["first_steps_s"] == 40.0
    assert sets["train.steps"] == 5400  # 115 s / 0.02 = 5750 steps, 958 per evaluation -> 900
    summary["stages"]["warm_up"] = {"ok": False, "error": "RuntimeError: warm-up run exit 1"}
    assert size_study.size(summary, budget_minutes=6, evals=6)[1]["train_s"] == 155.0


def test_size_study_refuses_a_budget_with_no_training_time():
    with pytest.raises(SystemExit, match="leaves no training time"):
        size_study.size(_summary(mn_sps=0.02, fid10k_s=60.0, fid50k_s=300.0), budget_minutes=6, evals=6)


def test_size_study_refuses_a_check_without_the_stages_it_needs():
    """A check cut short (or whose probe failed) gives a one-line refusal, not a KeyError."""
    failed_probe = _summary(mn_sps=0.02, fid10k_s=8.0, fid50k_s=30.0)
    failed_probe["stages"]["probe"] = {"ok": False, "error": "RuntimeError: probe: runs logged no step times"}
    with pytest.raises(SystemExit, match="no probe numbers"):
        size_study.size(failed_probe, budget_minutes=6, evals=6)
    with pytest.raises(SystemExit, match="no probe and no fid_timing numbers"):
        size_study.size({"stages": {"environment": {"ok": True}}}, budget_minutes=6, evals=6)
