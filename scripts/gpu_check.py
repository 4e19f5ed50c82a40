"""Everything we want to know about a GPU machine, in one command of a few minutes (see gpu_check.sh).

Stages in this order, most needed first, so that a time cap on the whole check cuts the least needed;
each is timed and written to OUTDIR/summary.json as soon as it ends (a stage that fails is recorded and
the next one still runs):
  environment      torch, CUDA, the GPU's name and memory
  warm_up          one MN run of a few steps, alone: it compiles the fused MN layers (model.mn.fuse auto, on a
                   GPU) into Inductor's on-disk cache, so that the probe's runs time steps rather than ten
                   compilations at once, and times what a run's first steps cost beyond steady ones
  probe            step time of BN and MN runs trained J at a time on one device, through
                   `cli.py study --budget-minutes`: with fid_timing, what a GPU study is sized from
                   (scripts/size_study.py reads both from summary.json)
  fid_timing       wall time of FID/KID for N generated images against the test images' statistics
                   (generation, Inception, statistics; the reference statistics are computed first, once,
                   and timed apart)
  bench            `cli.py bench train|norm|eval` (ours vs the classic loop, MN/BN, eval vs torch-fidelity)
  bench_compiled   `cli.py bench train|norm --compile MODE` for torch's default mode and reduce-overhead
                   (CUDA graphs): each compiled step against eager, compilation not timed
  cuda_tests       `pytest -m cuda tests` (MN = BN at K=1, GPU-default runs, no host sync in a step,
                   resume, FID/KID on CUDA = CPU, NCCL)
  concurrent       the GPU study's nine runs at once (3 BN, 3 MN, 3 MN in layer 0 only,
                   configs/study-gpu-runs.yaml): their aggregate steps/s
OUTDIR/summary.md is the readable report, OUTDIR/log.txt the full output.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
import traceback
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Full-size numbers on a GPU; tiny ones for --cpu-dry-run, which CI runs to test this script. The GPU probe
# trains 10 runs at once (5 BN, 5 MN), one more than the 9 of configs/study-gpu-runs.yaml, so that MN's
# measured step time errs slow and the study sized from it errs on the safe side. `concurrent` then trains
# the study's own nine runs (its variants, seeds 0-2) to measure what they achieve together.
SIZES = {
    "gpu": {"fid_samples": [10_000, 50_000], "probe_minutes": 0.75, "jobs": 10, "bench": ["--repeats", "3"],
            "probe_set": [], "concurrent_minutes": 0.75, "concurrent_seeds": 3, "log_every": 50},
    "dry": {"fid_samples": [64], "probe_minutes": 0.4, "jobs": 2,
            "bench": ["--steps", "2", "--repeats", "1", "--ngf", "16", "--eval-images", "16"],
            "probe_set": ["model.ngf=8", "model.ndf=8", "train.batch_size=16", "train.threads=1"],
            "concurrent_minutes": 0.3, "concurrent_seeds": 1, "log_every": 10},
}
BENCHES = ("train", "norm", "eval")
COMPILED_BENCHES = ("train", "norm")  # eval's networks are not compiled
COMPILE_MODES = ("default", "reduce-overhead")  # kernel fusion; and CUDA graphs on top


class Check:
    def __init__(self, out: Path):
        self.out = out
        self.summary: dict = {"stages": {}}
        self.log = open(out / "log.txt", "a", buffering=1)

    def say(self, text: str) -> None:
        print(text, flush=True)
        self.log.write(text + "\n")

    def run(self, argv: list[str], env: dict | None = None, timeout: float | None = None) -> tuple[int, str]:
        """A subprocess whose output goes to the console and the log; (exit code, output)."""
        self.say("$ " + shlex.join(argv))
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                                env=env, bufsize=1)
        lines = []
        t0 = time.monotonic()
        for line in proc.stdout:
            lines.append(line)
            self.say(line.rstrip("\n"))
            if timeout and time.monotonic() - t0 > timeout:
                proc.kill()
                self.say(f"(killed after {timeout:.0f} s)")
                break
        return proc.wait(), "".join(lines)

    def stage(self, name: str, fn) -> None:
        self.say(f"\n===== {name}")
        t0 = time.monotonic()
        try:
            result = fn()
            result = {"ok": True, **(result or {})}
        except Exception as e:  # one stage failing must not hide the others' numbers
            self.say(traceback.format_exc())
            result = {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        result["seconds"] = round(time.monotonic() - t0, 1)
        self.summary["stages"][name] = result
        self.say(f"----- {name}: {'ok' if result['ok'] else 'FAILED'} in {result['seconds']} s")
        self.write()

    def write(self) -> None:
        (self.out / "summary.json").write_text(json.dumps(self.summary, indent=2) + "\n")
        (self.out / "summary.md").write_text(summary_markdown(self.summary))


# ---------------------------------------------------------------- stages

def environment(device: str) -> dict:
    import torch
    info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
            "device": device, "cpu_count": os.cpu_count()}
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), gpus=torch.cuda.device_count(),
                    capability=f"{p.major}.{p.minor}")
    try:
        import torch_fidelity
        info["torch_fidelity"] = torch_fidelity.__version__
    except ImportError:
        info["torch_fidelity"] = None
    return info


def cuda_tests(check: Check, env: dict) -> dict:
    code, out = check.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests"],
                          env=env)
    counts = dict((k, int(v)) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error)", out))
    if code not in (0, 5) or counts.get("failed") or counts.get("error"):
        raise RuntimeError(f"cuda tests: exit {code}, {counts}")
    return {"counts": counts}


def fid_timing(device: str, test_data: str, weights: str | None, sizes: list[int], download: bool) -> dict:
    import torch
    from gan.core.config import load_config
    from gan.eval.metrics import Evaluator
    from gan.core.sampling import generate, to_uint8
    from models.dcgan import build_models
    cfg = load_config(ROOT / "configs" / "study-gpu.yaml",
                      {"eval.reference": test_data, "metrics.inception_weights": weights,
                       "metrics.allow_download": download})
    dev = torch.device(device)
    G, _ = build_models(cfg)  # untrained: the timing does not depend on what the images show
    G.to(dev).eval()
    ev = Evaluator.from_config(cfg, dev, progress=False)
    ev.verbose = False
    _sync(dev)
    t0 = time.perf_counter()
    ev.prepare_reference()
    out = {"reference_images": ev.prepare_reference()["num_samples"],
           "reference_seconds": round(time.perf_counter() - t0, 2), "runs": []}
    for n in sizes:
        _sync(dev)
        t0 = time.perf_counter()
        images = to_uint8(generate(G, n, cfg.model.z_dim, cfg.eval.seed, dev, cfg.eval.batch_size))
        _sync(dev)
        t_gen = time.perf_counter()
        outputs = ev.inception_outputs(images, on_device=True)  # what ev.score(images) does, in two timed parts
        _sync(dev)
        t_inception = time.perf_counter()
        scores = ev.score_features(*outputs)  # FID and KID: the scores are read, so nothing is left in flight
        total = time.perf_counter() - t0
        out["runs"].append({"samples": n, "seconds": round(total, 2), "generate_seconds": round(t_gen - t0, 3),
                            "inception_seconds": round(t_inception - t_gen, 3),
                            "scores_seconds": round(time.perf_counter() - t_inception, 3),
                            "fid": scores["fid"], "kid_mean": scores["kid_mean"]})
    return out


WARM_UP_STEPS = 8  # MN seeds its mixture at step 1 (eagerly) and compiles at step 2; the last 3 are steady


def warm_up(check: Check, env: dict, outdir: Path, data: str, extra_sets: list[str]) -> dict:
    """One MN run of WARM_UP_STEPS steps, timed step by step (log.every=1 synchronises each): the seconds its
    first steps took beyond steady ones (compilation, first-call set-up) and the command's wall time (imports,
    data, steps). scripts/size_study.py adds the first to a study's start-up, as if the cache were cold."""
    run = outdir / "warm-up"
    argv = [sys.executable, str(ROOT / "cli.py"), "train", "--config", str(ROOT / "configs" / "study-gpu.yaml"),
            "--norm", "mn", "--steps", str(WARM_UP_STEPS), "--out", str(run), "--overwrite", "--quiet"]
    for s in ["data.source=folder", f"data.path={data}", "eval.every=0", "log.every=1", "log.sample_every=0",
              "ckpt.every=0"] + extra_sets:
        argv += ["--set", s]
    t0 = time.monotonic()
    code, _ = check.run(argv, env=env)
    wall = time.monotonic() - t0
    if code:
        raise RuntimeError(f"warm-up run exit {code}")
    from gan.core.run_folder import RunFolder
    step_s = [r["sec_per_step"] for r in RunFolder(run).read_metrics() if "sec_per_step" in r]
    if len(step_s) != WARM_UP_STEPS:
        raise RuntimeError(f"warm-up run logged {len(step_s)} step times, not {WARM_UP_STEPS}")
    steady = statistics.median(step_s[-3:])
    return {"wall_seconds": round(wall, 1), "step_seconds": [round(t, 4) for t in step_s],
            "first_steps_extra_seconds": round(sum(step_s) - steady * len(step_s), 2)}


def concurrent_runs(check: Check, env: dict, outdir: Path, name: str, data: str, test_data: str,
                    weights: str | None, minutes: float, jobs: int, variants: dict, seeds: int,
                    extra_sets: list[str], log_every: int) -> dict:
    """`seeds` runs of each variant trained `jobs` at a time for `minutes`, through the study command itself;
    the step time of each variant (mean over its runs) and of all runs together (steps/s summed), from step
    times logged every `log_every` steps (the dry run's few steps need a short window to log two)."""
    study = outdir / f"{name}-study.yaml"
    runs = outdir / name
    study.write_text(json.dumps({"base": str(ROOT / "configs" / "study-gpu.yaml"), "out": str(runs),
                                 "seeds": list(range(seeds)), "variants": variants}))
    sets = ["data.source=folder", f"data.path={data}", f"eval.reference={test_data}", "eval.every=0",
            f"log.every={log_every}", "log.sample_every=0", "ckpt.every=0", "train.steps=1000000"] + extra_sets
    if weights:
        sets.append(f"metrics.inception_weights={weights}")
    argv = [sys.executable, str(ROOT / "cli.py"), "study", str(study), "--jobs", str(jobs),
            "--budget-minutes", str(minutes)]
    for s in sets:
        argv += ["--set", s]
    t0 = time.monotonic()
    code, out = check.run(argv, env=env)
    wall = time.monotonic() - t0
    # With no evaluations there is nothing to compare: the study says so and exits 1 after the runs stopped.
    from gan.core.run_folder import RunFolder
    result: dict = {"jobs": jobs, "budget_minutes": minutes, "wall_seconds": round(wall, 1), "study_exit": code}
    steps_per_s = 0.0
    for variant in variants:
        sps, steps = [], []
        for run in sorted(runs.glob(f"{variant}-s*")):
            recs = [r for r in RunFolder(run).read_metrics() if "sec_per_step" in r]
            if len(recs) > 1:
                sps.append(statistics.median(r["sec_per_step"] for r in recs[1:]))  # first window: warm-up
            steps.append(recs[-1]["step"] if recs else 0)
        if not sps:
            raise RuntimeError(f"{name}: {variant} runs logged no step times (study exit {code})")
        result[variant] = {"sec_per_step": statistics.fmean(sps), "steps": steps}
        steps_per_s += sum(1 / t for t in sps)
    result["steps_per_second"] = steps_per_s
    return result


def probe(check: Check, env: dict, outdir: Path, data: str, test_data: str, weights: str | None,
          minutes: float, jobs: int, extra_sets: list[str], log_every: int) -> dict:
    """BN and MN runs trained `jobs` at a time for `minutes`: the step times a study is sized from."""
    result = concurrent_runs(check, env, outdir, "probe", data, test_data, weights, minutes, jobs,
                             {"bn": {"model.norm": "bn"}, "mn": {"model.norm": "mn"}}, max(1, jobs // 2), extra_sets,
                             log_every)
    result["mn_over_bn"] = result["mn"]["sec_per_step"] / result["bn"]["sec_per_step"]
    return result


def study_variants() -> dict:
    """The variants of the GPU study (configs/study-gpu-runs.yaml)."""
    import yaml
    return yaml.safe_load((ROOT / "configs" / "study-gpu-runs.yaml").read_text())["variants"]


def bench(check: Check, env: dict, outdir: Path, device: str, weights: str | None, extra: list[str],
          which: tuple[str, ...] = BENCHES, compile_mode: str | None = None) -> dict:
    """`cli.py bench NAME` for each of `which` (with --compile `compile_mode` when given): rows and headline."""
    rows, headlines = [], []
    for name in which:
        out_json = outdir / f"bench-{name}{f'-compiled-{compile_mode}' if compile_mode else ''}.json"
        argv = [sys.executable, str(ROOT / "cli.py"), "bench", name, "--device", device, "--json", str(out_json)]
        argv += (["--compile", compile_mode] if compile_mode else []) + extra
        if weights and name == "eval":
            argv += ["--weights", weights]
        code, out = check.run(argv, env=env)
        if code:
            raise RuntimeError(f"bench {name} exit {code}")
        rows += json.loads(out_json.read_text())
        headlines.append(next((l for l in out.splitlines() if l.startswith("headline:")), ""))
    return {"rows": rows, "headline": "; ".join(h.removeprefix("headline: ") for h in headlines if h)}


def bench_compiled(check: Check, env: dict, outdir: Path, device: str, extra: list[str]) -> dict:
    """bench train|norm compiled in each of COMPILE_MODES (on a CPU reduce-overhead has no CUDA graphs: the
    dry run checks the plumbing)."""
    parts = [bench(check, env, outdir, device, None, extra, COMPILED_BENCHES, mode) for mode in COMPILE_MODES]
    return {"rows": [r for p in parts for r in p["rows"]], "headline": "; ".join(p["headline"] for p in parts)}


def _sync(dev) -> None:
    import torch
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


# ---------------------------------------------------------------- report

def summary_markdown(s: dict) -> str:
    st = s["stages"]
    lines = [f"# GPU check: {st.get('environment', {}).get('gpu', 'CPU dry run')}", ""]
    if s.get("command"):
        lines += [f"Command: `{s['command']}`", ""]
    for name, r in st.items():
        state = ("skipped" if r.get("skipped") else "ok") if r["ok"] else "FAILED: " + r.get("error", "")
        lines.append(f"- **{name}**: {state} ({r['seconds']} s)")
    env = st.get("environment", {})
    if env.get("ok"):
        lines += ["", "## Environment", ""] + [f"- {k}: {v}" for k, v in env.items() if k not in ("ok", "seconds")]
    w = st.get("warm_up", {})
    if w.get("ok"):
        lines += ["", "## One MN run's first steps, alone", "",
                  f"Seconds per step: {w['step_seconds']}; beyond steady ones (compilation, set-up): "
                  f"{w['first_steps_extra_seconds']} s; the whole command: {w['wall_seconds']} s."]
    f = st.get("fid_timing", {})
    if f.get("ok"):
        lines += ["", "## FID/KID wall time (generation + Inception + statistics)", "",
                  f"Reference statistics of {f['reference_images']} test images: {f['reference_seconds']} s "
                  "(once; cached after).", "",
                  "| generated images | seconds | generation | Inception | FID and KID |", "|---|---|---|---|---|"]
        lines += [f"| {r['samples']} | {r['seconds']} | {r['generate_seconds']} | {r['inception_seconds']} | "
                  f"{r['scores_seconds']} |" for r in f["runs"]]
    p = st.get("probe", {})
    if p.get("ok"):
        lines += ["", f"## Step time with {p['jobs']} runs at once on one device ({p['budget_minutes']} min)", "",
                  "| norm | s/step (mean over runs) | steps reached |", "|---|---|---|"]
        for norm in ("bn", "mn"):
            lines.append(f"| {norm} | {p[norm]['sec_per_step']:.4f} | {p[norm]['steps']} |")
        lines.append(f"\nMN/BN step time: {p['mn_over_bn']:.2f}x")
    for name, title in (("bench", "bench (eager)"), ("bench_compiled", "bench --compile")):
        b = st.get(name, {})
        if b.get("skipped"):
            lines += ["", f"## {title}", "", f"Not run: {b['skipped']}."]
        elif b.get("ok"):
            lines += ["", f"## {title}", "", "| bench | what | ours | baseline | unit | ratio |",
                      "|---|---|---|---|---|---|"]
            lines += [f"| {r['bench']} | {r['what']} | {r['ours']:.2f} | {r['baseline']:.2f} | {r['unit']} | "
                      f"{r['ratio']:.2f}x {r['ratio_name']} |" for r in b["rows"]]
            lines += ["", b["headline"]]
    t = st.get("cuda_tests", {})
    if t.get("ok"):
        lines += ["", "## CUDA tests", "", f"`pytest -m cuda`: {t['counts']}"]
    c = st.get("concurrent", {})
    if c.get("ok"):
        variants = [k for k, v in c.items() if isinstance(v, dict)]
        lines += ["", f"## The study's runs, {c['jobs']} at once on one device ({c['budget_minutes']} min)", "",
                  "| variant | s/step (mean over runs) | steps reached |", "|---|---|---|"]
        lines += [f"| {v} | {c[v]['sec_per_step']:.4f} | {c[v]['steps']} |" for v in variants]
        lines.append(f"\nAll {c['jobs']} runs together: {c['steps_per_second']:.0f} steps/s")
    if s.get("note"):
        lines += ["", s["note"]]
    return "\n".join(lines) + "\n"


def tiny_zip(path: Path, n: int = 96) -> str:
    """A zip of n 32x32 PNGs in two class folders, for the dry run's data."""
    from PIL import Image
    import torch
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(n, 32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
    with zipfile.ZipFile(path, "w") as zf:
        for i, img in enumerate(x):
            tmp = path.with_suffix(f".{i}.png")
            Image.fromarray(img).save(tmp)
            zf.write(tmp, f"train/c{i % 2}/{i:04d}.png")
            tmp.unlink()
    return str(path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outdir")
    ap.add_argument("--data", help="training images (folder or zip) for the probe [default: --test-data]")
    ap.add_argument("--test-data", help="test images (folder or zip): FID reference and probe data")
    ap.add_argument("--weights", help="Inception weights file (torch-fidelity layout; fp16 is fine)")
    ap.add_argument("--cpu-dry-run", action="store_true", help="tiny sizes on the CPU: tests this script")
    ap.add_argument("--skip", action="append", default=[], help="a stage to skip (repeatable)")
    args = ap.parse_args()
    out = Path(args.outdir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    size = SIZES["dry" if args.cpu_dry_run else "gpu"]
    device = "cpu" if args.cpu_dry_run else "cuda"
    check = Check(out)
    check.summary["command"] = shlex.join(["scripts/gpu_check.sh"] + sys.argv[1:])
    import torch
    if device == "cuda" and not torch.cuda.is_available():
        check.say("error: no CUDA device (use --cpu-dry-run to test this script on a CPU)")
        return 2
    test_data = args.test_data or (tiny_zip(out / "tiny-test.zip") if args.cpu_dry_run else None)
    if not test_data:
        check.say("error: --test-data ZIP is needed on a GPU (the FID reference)")
        return 2
    data = args.data or test_data
    weights = str(Path(args.weights).resolve()) if args.weights else None
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="disabled",
               PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    if weights:
        env["MNGAN_INCEPTION_WEIGHTS"] = weights
    # Most needed first: when a time cap cuts the check short, it cuts the stages a study needs least. The
    # numbers a GPU study is sized from (probe, fid_timing) come first, then the speed ratios, then the
    # correctness tests, which CI's CPU twins partly cover, and last the study's nine runs together.
    stages = [
        ("environment", lambda: environment(device)),
        ("warm_up", lambda: warm_up(check, env, out, data, size["probe_set"])),
        ("probe", lambda: probe(check, env, out, data, test_data, weights, size["probe_minutes"], size["jobs"],
                                size["probe_set"], size["log_every"])),
        # The dry run (CI) never touches the network; a GPU box may try torch-fidelity's download once.
        ("fid_timing", lambda: fid_timing(device, test_data, weights, size["fid_samples"], not args.cpu_dry_run)),
        ("bench", lambda: bench(check, env, out, device, weights, size["bench"])),
        ("bench_compiled", lambda: bench_compiled(check, env, out, device, size["bench"])),
        ("cuda_tests", lambda: cuda_tests(check, env)),
        ("concurrent", lambda: concurrent_runs(
            check, env, out, "concurrent", data, test_data, weights, size["concurrent_minutes"],
            len(study_variants()) * size["concurrent_seeds"], study_variants(), size["concurrent_seeds"],
            size["probe_set"], size["log_every"])),
    ]
    for name, fn in stages:
        if name not in args.skip:
            check.stage(name, fn)
    failed = [n for n, r in check.summary["stages"].items() if not r["ok"]]
    check.say(f"\n{len(check.summary['stages']) - len(failed)} stages ok" + (f", failed: {failed}" if failed else "")
              + f"; {out / 'summary.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
