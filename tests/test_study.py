"""`study` running runs: a time budget that stops them cleanly, continuing later, comparing runs of unequal
length, GPU placement, and commands for other schedulers."""
from __future__ import annotations

import json
import os
import shlex
import signal
import sys
import threading
import time

import pytest
import torch
import yaml
from click.testing import CliRunner

from cli import cli
from gan.tools import launcher, study as study_mod
from gan.core.checkpoint import list_checkpoints
from gan.core.run_folder import RunFolder
from gan.tools.compare import compare_runs
from gan.core.config import load_config
from tests.conftest import tiny_overrides
from tests.test_compare import make_run


def tiny_study(tmp_path, image_zip, **study) -> str:
    """Two tiny CPU runs (bn, mn) that would train for a long time: only a budget or a signal ends them."""
    base = tiny_overrides(image_zip, tmp_path / "unused", **{"train.steps": 1_000_000, "ckpt.every": 10,
                                                             "log.every": 5, "log.sample_every": 0,
                                                             "train.threads": 1})
    base.pop("run_dir")
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(load_config(None, base).to_dict()))
    spec = {"base": "base.yaml", "out": "out", "seeds": [0],
            "variants": {"bn": {"model.norm": "bn"}, "mn": {"model.norm": "mn"}}, **study}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return "study.yaml"


def _stopped_cleanly(run_dir) -> int:
    """The run's newest checkpoint is at its last logged step or later: nothing trained was lost."""
    ckpts = list_checkpoints(run_dir / "checkpoints")
    assert ckpts, f"{run_dir}: no checkpoint"
    saved = torch.load(ckpts[0], map_location="cpu", weights_only=True)["step"]
    logged = RunFolder(run_dir).read_metrics()
    assert logged and logged[-1]["step"] <= saved
    return saved


@pytest.mark.slow
def test_budget_stops_every_run_with_a_checkpoint_and_a_second_call_continues(tmp_path, image_zip, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tiny_study(tmp_path, image_zip, budget_minutes=0.3)
    study = study_mod.load_study(path)
    assert study.budget_minutes == 0.3
    lines = []
    t0 = time.monotonic()
    # No run evaluates (eval.every 0), so there is nothing to compare: the study says so after stopping.
    with pytest.raises(study_mod.StudyError, match="could not be compared"):
        study_mod.run_study(study, jobs=2, echo=lines.append, warn=lines.append)
    took = time.monotonic() - t0
    assert any(line.startswith("budget reached: stopping 2 running runs") for line in lines), lines
    assert sum("] stopped " in line for line in lines) == 2 and not any("FAILED" in line for line in lines)
    # The budget is 18 s; stopping takes one step and a checkpoint. The bound only catches a study that
    # ignores its budget (the runs would train for 10^6 steps).
    assert took < 18 + 60
    first = {name: _stopped_cleanly(tmp_path / "out" / f"{name}-s0") for name in ("bn", "mn")}
    assert all(step > 0 for step in first.values())

    # The same command again (budget from the command line this time): both runs resume and go further.
    r = CliRunner().invoke(cli, ["study", path, "--jobs", "2", "--budget-minutes", "0.3"])
    assert "budget reached" in r.output and "resume (logged up to step" in r.output
    for name, step in first.items():
        log = (tmp_path / "out" / f"{name}-s0" / "train.log").read_text()
        assert "resuming from" in log and f"at step {step}" in log
        assert _stopped_cleanly(tmp_path / "out" / f"{name}-s0") > step


@pytest.mark.slow
def test_a_run_signalled_from_outside_the_study_is_reported_as_stopped_and_resumable(tmp_path, image_zip,
                                                                                     monkeypatch):
    """kill PID on one run (not on the study): the run saves a checkpoint and exits 143. The study must not
    call that a crash, must say the run did not finish, and must continue it on the next call."""
    monkeypatch.chdir(tmp_path)
    path = tiny_study(tmp_path, image_zip)
    procs = []
    real_popen = launcher.subprocess.Popen
    monkeypatch.setattr(launcher.subprocess, "Popen", lambda *a, **k: procs.append(real_popen(*a, **k)) or procs[-1])
    runs = [tmp_path / "out" / f"{name}-s0" for name in ("bn", "mn")]

    def signal_both_once_they_train():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (len(procs) == 2 and all(RunFolder(r).read_metrics() for r in runs)):
            time.sleep(0.2)
        for p in procs:
            p.send_signal(signal.SIGTERM)

    killer = threading.Thread(target=signal_both_once_they_train, daemon=True)
    killer.start()
    lines = []
    with pytest.raises(study_mod.StudyError, match=r"2 of 2 runs did not finish: bn-s0 \(stopped by a signal from "
                                                   r"outside the study; it resumes from its last checkpoint\)") as e:
        study_mod.run_study(study_mod.load_study(path), jobs=2, echo=lines.append, warn=lines.append)
    killer.join()
    assert "continue them" in str(e.value)
    assert sum("by a signal from outside the study (it resumes from its last checkpoint)" in line for line in lines) == 2, lines
    assert not any("FAILED" in line for line in lines), lines
    first = [_stopped_cleanly(r) for r in runs]
    for r in runs:  # the run's own last words: a stop, not an error
        assert "stopped by SIGTERM at step" in (r / "train.log").read_text()
        assert "error:" not in (r / "train.log").read_text()
    # The next call continues both from their checkpoints (stopped by the budget this time).
    monkeypatch.setattr(launcher.subprocess, "Popen", real_popen)
    r = CliRunner().invoke(cli, ["study", path, "--jobs", "2", "--budget-minutes", "0.2"])
    assert "resume (logged up to step" in r.output, r.output
    assert all(_stopped_cleanly(run) >= step for run, step in zip(runs, first))


def test_compare_common_steps_judges_runs_of_unequal_length_over_the_same_steps(tmp_path):
    root = tmp_path / "runs"
    runs = [make_run(root, "bn-s0", {1000: 100, 2000: 60, 3000: 40}, norm="bn", steps=10_000),
            make_run(root, "mn-s0", {1000: 80, 2000: 50}, norm="mn", steps=10_000)]  # stopped earlier
    full = compare_runs(runs, tmp_path / "c1")
    assert {g["label"]: g["best"]["mean"] for g in full.data["groups"]} == {"norm=bn": 40, "norm=mn": 50}
    common = compare_runs(runs, tmp_path / "c2", common_steps=True)
    assert common.data["common_steps_upto"] == 2000
    groups = {g["label"]: g for g in common.data["groups"]}
    assert groups["norm=bn"]["best"]["mean"] == 60 and groups["norm=mn"]["best"]["mean"] == 50
    assert groups["norm=bn"]["runs"][0]["evals"] == [[1000, 100], [2000, 60]]
    assert "up to step 2000" in common.markdown
    r = CliRunner().invoke(cli, ["compare", str(root), "--common-steps", "--out", str(tmp_path / "c3")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "c3" / "compare.json").read_text())["common_steps_upto"] == 2000


def test_runs_are_placed_on_the_visible_gpus_round_robin(tmp_path, monkeypatch, image_zip):
    """4 runs, 2 (faked) GPUs, 4 jobs: GPUs 0, 1, 0, 1, each run's CUDA_VISIBLE_DEVICES set for it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    study = study_mod.load_study(tiny_study(tmp_path, image_zip), {"train.device": "auto"})
    runs = study.runs + study_mod.load_study("study.yaml", {"train.device": "auto", "model.ngf": 16}).runs
    for i, r in enumerate(runs):  # a stand-in for `train` that reports where it was put
        r.name, r.run_dir = f"run{i}", tmp_path / "out" / f"run{i}"
        r.argv = [sys.executable, "-c", "import os, time; time.sleep(1); print('gpu=' + os.environ['CUDA_VISIBLE_DEVICES'])"]
    lines = []
    assert launcher.train_all(runs, 4, lines.append, []) == "done"
    got = [next(l for l in (r.run_dir / "train.log").read_text().splitlines() if l.startswith("gpu="))
           for r in runs]
    assert got == ["gpu=0", "gpu=1", "gpu=0", "gpu=1"]
    assert [l for l in lines if "start" in l] == [f"[0/4] start  {r.name} on GPU {g}"
                                                   for r, g in zip(runs, "0101")]


@pytest.mark.slow
def test_a_budget_that_cuts_no_run_short_is_not_reported_as_a_stop(tmp_path, monkeypatch, image_zip):
    """The deadline's SIGTERM can reach a run in its last evaluation, which then finishes (exit 0), as five
    runs did on the GPU: if every run finished, the study is "done", not "stopped by the budget, run it
    again". A run that the SIGTERM does stop still makes it "budget"."""
    monkeypatch.chdir(tmp_path)
    study = study_mod.load_study(tiny_study(tmp_path, image_zip))
    finishing = [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, lambda *a: None); "
                                       "time.sleep(3.5)"]  # ignores the SIGTERM 2 s in, exits 0 at 3.5 s
    stopped = [sys.executable, "-c", "import time; time.sleep(30)"]  # SIGTERM ends it (exit -15)
    for argv, expected in (([finishing, finishing], "done"), ([finishing, stopped], "budget")):
        for r, a in zip(study.runs, argv):
            r.argv = a
        lines = []
        assert launcher.train_all(study.runs, 2, lines.append, [], deadline=time.monotonic() + 2) == expected
        assert any(l.startswith("budget reached: stopping 2 running runs") for l in lines), lines
        ends = sorted(l.split()[1] for l in lines if l.startswith("[") and "start" not in l)
        assert ends == (["done", "done"] if expected == "done" else ["done", "stopped"]), lines


def test_placement_fills_the_least_loaded_gpu_and_respects_cuda_visible_devices(monkeypatch):
    assert launcher.place({"0": 2, "1": 1}, ["0", "1"]) == "1"
    assert launcher.place({}, ["3", "5"]) == "3"
    assert launcher.visible_gpus({"CUDA_VISIBLE_DEVICES": "3,5"}) == ["3", "5"]
    assert launcher.visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []


def test_cpu_runs_are_never_given_a_gpu(tmp_path, monkeypatch, image_zip):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    study = study_mod.load_study(tiny_study(tmp_path, image_zip))  # train.device: cpu
    for r in study.runs:
        r.argv = [sys.executable, "-c", "import os; print('cvd=' + os.environ.get('CUDA_VISIBLE_DEVICES', 'unset'))"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert launcher.train_all(study.runs, 2, lambda m: None, []) == "done"
    assert all("cvd=unset" in (r.run_dir / "train.log").read_text() for r in study.runs)


@pytest.mark.skipif(not hasattr(os, "getpgid"), reason="process groups are POSIX")
def test_runs_keep_the_studys_priority_but_not_its_terminal_signals(tmp_path, monkeypatch, image_zip):
    """A run is in a process group of its own (the terminal's Ctrl-C reaches only the study) but in the
    study's session, hence, on Linux, in its scheduling autogroup: `nice -n 19` and /proc/self/autogroup
    lower the runs as well as the study."""
    monkeypatch.chdir(tmp_path)
    study = study_mod.load_study(tiny_study(tmp_path, image_zip))
    report = ("import os; print('ids', os.getsid(0), os.getpgid(0), os.getpid()); "
              "p = '/proc/self/autogroup'; os.path.exists(p) and print('group', open(p).read().split()[0])")
    for r in study.runs:
        r.argv = [sys.executable, "-c", report]
    assert launcher.train_all(study.runs, 2, lambda m: None, []) == "done"
    for r in study.runs:
        lines = dict(l.split(" ", 1) for l in (r.run_dir / "train.log").read_text().splitlines()
                     if l.startswith(("ids ", "group ")))
        sid, pgid, pid = map(int, lines["ids"].split())
        assert sid == os.getsid(0) and pgid == pid != os.getpgid(0)
        # Some sandboxes show /proc/self/autogroup to one process and not to its children; the
        # session check above is what decides the autogroup, this only confirms it where it can.
        if "group" in lines and os.path.exists("/proc/self/autogroup"):
            assert lines["group"] == open("/proc/self/autogroup").read().split()[0]


def test_emit_commands_prints_one_runnable_command_per_unfinished_run(tmp_path, monkeypatch, image_zip):
    monkeypatch.chdir(tmp_path)
    path = tiny_study(tmp_path, image_zip)
    r = CliRunner().invoke(cli, ["study", path, "--emit-commands", "--set", "train.steps=30"])
    assert r.exit_code == 0, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 2
    for line, name in zip(lines, ("bn-s0", "mn-s0")):
        cd, _, command = line.partition(" && ")
        assert shlex.split(cd) == ["cd", str(tmp_path)]
        argv = shlex.split(command)
        assert argv[0] == sys.executable and argv[2] == "train" and "train.steps=30" in argv
        assert argv[argv.index("--out") + 1] == f"out/{name}" and "--resume" in argv
    # A finished run is not emitted: make bn-s0 look finished at its 30 steps.
    run = tmp_path / "out" / "bn-s0"
    cfg = study_mod.load_study(path, {"train.steps": 30}).runs[0].config
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(cfg.to_yaml())
    (run / "metrics.jsonl").write_text(json.dumps({"step": 30, "loss_d": 1.0}) + "\n")
    r = CliRunner().invoke(cli, ["study", path, "--emit-commands", "--set", "train.steps=30"])
    assert r.exit_code == 0 and len(r.output.strip().splitlines()) == 1 and "mn-s0" in r.output


@pytest.mark.parametrize("value", [0, -1, "soon", True])
def test_bad_budget_is_one_clear_line(tmp_path, monkeypatch, image_zip, value):
    monkeypatch.chdir(tmp_path)
    path = tiny_study(tmp_path, image_zip, budget_minutes=value)
    r = CliRunner().invoke(cli, ["study", path, "--dry-run"])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1
    assert "budget_minutes must be a number of minutes > 0" in r.stderr


def test_runs_go_in_seed_order_so_that_one_seed_of_every_variant_comes_first(tmp_path, monkeypatch, image_zip):
    monkeypatch.chdir(tmp_path)
    variants = {"bn": {"model.norm": "bn"}, "mn": {"model.norm": "mn"},
                "mn-layer0": {"model.norm": "mn", "model.mn_layers": [0], "seeds": [2, 0]}}
    path = tiny_study(tmp_path, image_zip, seeds=[0, 1, 2], variants=variants)
    names = [r.name for r in study_mod.load_study(path).runs]
    assert names == ["bn-s0", "mn-s0", "mn-layer0-s0", "bn-s1", "mn-s1", "bn-s2", "mn-s2", "mn-layer0-s2"]
