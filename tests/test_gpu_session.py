"""scripts/gpu_session.sh, the GPU session's device calls, run as CI can: check, study and import with
--cpu-dry-run (tiny sizes, one seed per variant of the real study file), and its one-line refusals."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile

import pytest
import yaml

from tests.conftest import ROOT

SCRIPT = ROOT / "scripts" / "gpu_session.sh"


def _session(*argv, env=None, timeout=900):
    return subprocess.run(["bash", str(SCRIPT), *argv], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHON": sys.executable, **(env or {})})


def test_check_study_and_import_dry_run_bring_home_what_docs_keep(tmp_path):
    work, out1, out2, docs = tmp_path / "work", tmp_path / "out1", tmp_path / "out2", tmp_path / "docs"
    # Only the first stage: the others, and what they measure, are tests/test_gpu_check.py's.
    skip = [a for stage in ("cuda_tests", "probe", "fid_timing", "bench") for a in ("--skip", stage)]
    r = _session("check", "--cpu-dry-run", *skip, env={"OUT": str(out1), "GPU_SESSION_DIR": str(work)})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((out1 / "check-summary.json").read_text())
    assert list(summary["stages"]) == ["environment"]
    assert all(s["ok"] for s in summary["stages"].values())
    assert (out1 / "check-log.txt").stat().st_size > 0 and (out1 / "check-summary.md").is_file()

    # A budget the tiny runs finish well within, so that every run reaches its evaluation (one each: on a CPU
    # each costs FID's 2048x2048 matrix square root, 15-25 s).
    r = _session("study", "5", "--cpu-dry-run", env={"OUT": str(out2), "GPU_SESSION_DIR": str(work)})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # A check without the probe's and FID's numbers sizes nothing: the script says so and goes on.
    assert "the check has no probe and no fid_timing numbers" in r.stderr and "the check gave no sizing" in r.stderr
    log = (out2 / "study.log").read_text()
    variants = yaml.safe_load((ROOT / "configs" / "study-gpu-runs.yaml").read_text())["variants"]
    runs = sorted(f"{v}-s0" for v in variants)
    assert f"{len(runs)} runs at once, budget 5 min" in log
    assert f"# FID: {len(runs)} groups, {len(runs)} runs" in log and "budget of 5 min reached" not in log
    assert "Steps to reach other targets" in log  # the study file's also_at: the device's table has them too

    with tarfile.open(out2 / "study-gpu.tar.gz") as tar:
        names = {n.removeprefix("./") for n in tar.getnames()}
    for run in runs:
        for f in ("config.yaml", "metrics.jsonl", "train.log"):
            assert f"runs/{run}/{f}" in names, (run, f, sorted(names))
        assert f"samples/{run}-step_0000010.png" in names, sorted(names)
    assert {"compare.md", "compare.json", "compare.png", "study.yaml", "gpu-check/summary.json"} <= names
    assert not any("checkpoints" in n or n.endswith(".pt") for n in names)

    r = _session("import", str(out2), env={"DEST": str(docs)})
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (docs / "runs").iterdir()) == runs
    assert (docs / "study.log").read_text() == log
    # Compared again here, so the tables name the imported runs, not the device's folders.
    assert all(f"{docs / 'runs' / run}`" in (docs / "compare.md").read_text() for run in runs)
    # ... and with the speed-ups at 2, 1.5 and 1.25 times BN's best too.
    for name in ("compare", "compare-kid"):
        result = json.loads((docs / f"{name}.json").read_text())
        assert [(a["target"], a["times_target"]) for a in result["at_targets"]] == \
            [(result["target"] * m, m) for m in (2, 1.5, 1.25)]
        assert "Steps to reach other targets" in (docs / f"{name}.md").read_text()
    # A study stopped before it compared packs no comparison: import makes it, for BN's best and the looser
    # targets alike, and the looser targets are the archive's study file's (here edited to 3x), not fixed ones.
    out3, docs3 = tmp_path / "out3", tmp_path / "docs3"
    out3.mkdir()
    with tarfile.open(out2 / "study-gpu.tar.gz") as src, tarfile.open(out3 / "study-gpu.tar.gz", "w:gz") as dst:
        for m in src.getmembers():
            name = m.name.removeprefix("./")
            if name == "study.yaml":
                study = yaml.safe_load(src.extractfile(m)) | {"also_at": ["3x"]}
                data = yaml.safe_dump(study).encode()
                m.size = len(data)
                dst.addfile(m, io.BytesIO(data))
            elif not name.startswith("compare"):
                dst.addfile(m, src.extractfile(m) if m.isfile() else None)
    r = _session("import", str(out3), env={"DEST": str(docs3)})
    assert r.returncode == 0, r.stderr
    for name in ("compare", "compare-kid"):
        result, before = (json.loads((d / f"{name}.json").read_text()) for d in (docs3, docs))
        assert result["target"] == before["target"]
        assert [(a["target"], a["times_target"]) for a in result["at_targets"]] == [(result["target"] * 3, 3)]

    for run in runs:
        evals = [json.loads(line) for line in (docs / "runs" / run / "metrics.jsonl").read_text().splitlines()]
        assert [e["step"] for e in evals if "fid" in e] == [10]
        assert all(e["fid"] > 0 and "kid_mean" in e for e in evals if "fid" in e)


def test_bad_input_is_refused_in_one_line(tmp_path):
    cases = [
        (["study", "six"], {"OUT": str(tmp_path / "o")}, "MINUTES must be a number of minutes, not 'six'"),
        (["check"], {"OUT": ""}, "$OUT is not set"),
        (["import", str(tmp_path)], {}, "usage:"),
        (["launch"], {}, "usage:"),
        # No bundle and no check in this work folder: the study on a GPU would have no weights to score with.
        (["study"], {"OUT": str(tmp_path / "o"), "GPU_SESSION_DIR": str(tmp_path / "w"),
                     "GPU_BUNDLE": str(tmp_path / "bundle")}, f"no {tmp_path / 'bundle'}/inception-nohead-fp16.pth"),
    ]
    # An archive whose runs were never evaluated (the study stopped before the first evaluation).
    unevaluated = tmp_path / "unevaluated"
    (unevaluated / "runs" / "bn-s0").mkdir(parents=True)
    (unevaluated / "runs" / "bn-s0" / "config.yaml").write_text("model:\n  norm: bn\n")
    (unevaluated / "runs" / "bn-s0" / "metrics.jsonl").write_text("")
    (tmp_path / "call2").mkdir()
    with tarfile.open(tmp_path / "call2" / "study-gpu.tar.gz", "w:gz") as tar:
        tar.add(unevaluated, arcname=".")
    cases.append((["import", str(tmp_path / "call2")], {"DEST": str(tmp_path / "docs")},
                  "import: the imported runs could not be compared by fid"))
    # An archive whose study file asks for an absolute also_at (the study's rule is multiples only).
    (unevaluated / "study.yaml").write_text("also_at: [250]\n")
    (tmp_path / "call2b").mkdir()
    with tarfile.open(tmp_path / "call2b" / "study-gpu.tar.gz", "w:gz") as tar:
        tar.add(unevaluated, arcname=".")
    cases.append((["import", str(tmp_path / "call2b")], {"DEST": str(tmp_path / "docs2")},
                  "must list multiples of the target such as [2x, 1.5x, 1.25x] (they apply to FID and KID alike), "
                  "got 250"))
    for argv, env, message in cases:
        r = _session(*argv, env=env, timeout=120)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and lines[-1].startswith("error: ") and message in lines[-1], (argv, r.stderr)


def test_a_check_stopped_at_its_time_limit_exits_3_not_the_device_tools_124(tmp_path):
    """The device tool reads rc 124 as its own time-out; the script stopped the check itself and says so."""
    r = _session("check", "--cpu-dry-run", env={"OUT": str(tmp_path / "o"), "GPU_SESSION_DIR": str(tmp_path / "w"),
                                                  "CHECK_SECONDS": "2"}, timeout=120)
    assert r.returncode == 3, r.stdout[-2000:] + r.stderr[-2000:]
    assert "check: exit 124 (stopped by this script after 2 s)" in r.stdout
