"""Runs a study's training runs as subprocesses: `jobs` at a time, each on its own GPU where there are
several, stopped cleanly (SIGTERM, then the run's own checkpoint) at a deadline or on the study's signal."""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from gan.core.config import Config

# Each run in its own process group, so that the terminal's Ctrl-C reaches only the study, which stops the runs
# in order. Not in its own session: on Linux a new session is a new scheduling autogroup (sched(7)), which would
# free every run from the priority (`nice`, /proc/self/autogroup) the study was started with.
OWN_GROUP = ({"process_group": 0} if sys.version_info >= (3, 11) else
             {"preexec_fn": os.setpgrp} if os.name == "posix" else {})

# A run's exit codes when SIGTERM/SIGINT stopped it: the first two after saving a checkpoint (gan/core/train.py,
# Interrupted); the last one when SIGTERM came before the handler (a start-up still loading, nothing to save).
STOP_CODES = (128 + signal.SIGTERM, 128 + signal.SIGINT, -signal.SIGTERM)


@dataclass
class PlannedRun:
    """One training run of a study: its folder, its config and the `cli.py train` command that makes it."""
    name: str
    variant: str
    seed: int
    run_dir: Path
    config: Config
    sets: list[str]
    argv: list[str] = field(default_factory=list)

    @property
    def command(self) -> str:
        return shlex.join(self.argv)


def duration(seconds: float) -> str:
    """"3m07s", "1h02m": a wall time for humans."""
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _last_line(log: Path) -> str:
    try:
        lines = [l.strip() for l in log.read_text(errors="replace").splitlines() if l.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


def visible_gpus(env: dict) -> list[str]:
    """The GPUs runs may be placed on: CUDA_VISIBLE_DEVICES when set, else every device torch sees."""
    if "CUDA_VISIBLE_DEVICES" in env:
        return [d.strip() for d in env["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
    import torch
    return [str(i) for i in range(torch.cuda.device_count())]


def place(load: dict[str, int], gpus: list[str]) -> str:
    """The GPU with the fewest runs on it now (the first such): round-robin when runs start together."""
    return min(gpus, key=lambda g: (load.get(g, 0), gpus.index(g)))


def uses_gpu(run: PlannedRun) -> bool:
    return run.config.train.device in ("auto", "cuda")


def train_all(todo: list[PlannedRun], jobs: int, echo, failed: list, deadline: float | None = None) -> str:
    """Run the subprocesses, appending failures to `failed`.

    Returns "done", "signal" (SIGINT/SIGTERM stopped the study) or "budget" (the deadline stopped a run or
    kept one from starting; runs that finish after the deadline's SIGTERM, e.g. in their last evaluation,
    are done, and a budget that cut nothing short returns "done")."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if jobs > 1 and "OMP_NUM_THREADS" not in env:  # share the CPU cores instead of each run taking them all
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    gpus = visible_gpus(env) if any(uses_gpu(r) for r in todo) else []
    gpu_load: dict[str, int] = {}
    queue = list(todo)
    running: dict[str, tuple[subprocess.Popen, PlannedRun, float, object, str | None]] = {}
    signals = []
    stop_reason: list[str] = []
    cut_short = []  # runs the study's own stop ended before they finished, or never started

    def stop_all(reason: str) -> None:
        stop_reason.append(reason)
        cut_short.extend(r.name for r in queue)
        queue.clear()
        for proc, *_ in running.values():  # runs are in their own process group: the terminal's signal skips them
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    def on_signal(signum, frame):
        signals.append(signum)
        if len(signals) == 1:
            print(f"\n{signal.Signals(signum).name}: stopping the study; each running run saves a checkpoint "
                  f"(press Ctrl-C again to stop them at once)", file=sys.stderr)
        stop_all("signal")

    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    done, total = 0, len(todo)
    try:
        while queue or running:
            if deadline is not None and not stop_reason and time.monotonic() >= deadline:
                echo(f"budget reached: stopping {len(running)} running runs (each saves a checkpoint)"
                     + (f"; {len(queue)} not started" if queue else ""))
                stop_all("budget")
            while queue and len(running) < jobs and not stop_reason:
                r = queue.pop(0)
                r.run_dir.mkdir(parents=True, exist_ok=True)
                run_env, gpu = env, None
                if len(gpus) > 1 and uses_gpu(r):  # one GPU per run; several runs share one when jobs > GPUs
                    gpu = place(gpu_load, gpus)
                    gpu_load[gpu] = gpu_load.get(gpu, 0) + 1
                    run_env = dict(env, CUDA_VISIBLE_DEVICES=gpu)
                log = open(r.run_dir / "train.log", "a")
                log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} "
                          + (f"CUDA_VISIBLE_DEVICES={gpu} " if gpu is not None else "") + f"{r.command}\n")
                log.flush()
                proc = subprocess.Popen(r.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        env=run_env, **OWN_GROUP)
                running[r.name] = (proc, r, time.monotonic(), log, gpu)
                echo(f"[{done}/{total}] start  {r.name}" + (f" on GPU {gpu}" if gpu is not None else ""))
            if stop_reason and not running:
                break
            time.sleep(0.2)
            for name, (proc, r, t0, log, gpu) in list(running.items()):
                code = proc.poll()
                if code is None:
                    continue
                log.close()
                del running[name]
                if gpu is not None:
                    gpu_load[gpu] -= 1
                done += 1
                took = duration(time.monotonic() - t0)
                if code == 0:
                    echo(f"[{done}/{total}] done   {name} in {took}")
                elif code in STOP_CODES and stop_reason:
                    cut_short.append(name)
                    echo(f"[{done}/{total}] stopped {name} after {took}")
                elif code in STOP_CODES[:2]:
                    # Someone signalled the run itself. One signal: it saved a checkpoint first; a second Ctrl-C
                    # (also exit 130) quit at once. Either way it resumes from its newest checkpoint.
                    failed.append((r, "stopped by a signal from outside the study; it resumes from its last "
                                      "checkpoint"))
                    echo(f"[{done}/{total}] stopped {name} after {took} by a signal from outside the study "
                         f"(it resumes from its last checkpoint)")
                else:
                    why = f"exit {code}: {_last_line(r.run_dir / 'train.log')}; log: {r.run_dir / 'train.log'}"
                    failed.append((r, f"exit {code}"))
                    echo(f"[{done}/{total}] FAILED {name} after {took} ({why})")
    finally:
        for proc, r, t0, log, gpu in running.values():  # only on an unexpected error in this loop
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait()
            log.close()
        for s, h in handlers.items():
            signal.signal(s, h)
    if stop_reason == ["budget"] and not cut_short:
        return "done"
    return stop_reason[0] if stop_reason else "done"
