"""Everything we want to know about a GPU machine, in one command of a few minutes (see gpu_check.sh).

Stages in this order, each timed, each written to OUTDIR/summary.json as soon as it ends (a stage that
fails is recorded and the next one still runs):
  environment   torch, CUDA, the GPU's name and memory
  probe         step time of BN and MN runs trained J at a time on one device (the study's setting),
                through `cli.py study --budget-minutes`: with fid_timing, what a GPU study is sized from
  fid_timing    wall time of FID/KID for N generated images against the test images' statistics
                (the statistics are computed first, once, and timed apart)
  cuda_tests    `pytest -m cuda tests` (MN = BN at K=1, GPU-default runs, resume, FID on CUDA = CPU, NCCL)
  bench         `cli.py bench all` (ours vs the classic loop, MN/BN, eval vs torch-fidelity)
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
# measured step time errs slow and the study sized from it errs on the safe side.
SIZES = {
    "gpu": {"fid_samples": [10_000, 50_000], "probe_minutes": 0.75, "jobs": 10, "bench": ["--repeats", "3"],
            "probe_set": []},
    "dry": {"fid_samples": [64], "probe_minutes": 0.4, "jobs": 2,
            "bench": ["--steps", "2", "--repeats", "1", "--ngf", "16", "--eval-images", "16"],
            "probe_set": ["model.ngf=8", "model.ndf=8", "train.batch_size=16", "train.threads=1"]},
}


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
    code, out = check.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                           "tests/test_cuda.py"], env=env)
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
        images = generate(G, n, cfg.model.z_dim, cfg.eval.seed, dev, cfg.eval.batch_size)
        t_gen = time.perf_counter() - t0
        scores = ev.score(to_uint8(images))
        _sync(dev)
        total = time.perf_counter() - t0
        out["runs"].append({"samples": n, "seconds": round(total, 2), "generate_seconds": round(t_gen, 3),
                            "fid": scores["fid"], "kid_mean": scores["kid_mean"]})
    return out


def probe(check: Check, env: dict, outdir: Path, data: str, test_data: str, weights: str | None,
          minutes: float, jobs: int, extra_sets: list[str]) -> dict:
    """BN and MN runs trained `jobs` at a time for `minutes`, through the study command itself."""
    study = outdir / "probe-study.yaml"
    runs = outdir / "probe"
    per = max(1, jobs // 2)
    study.write_text(json.dumps({
        "base": str(ROOT / "configs" / "study-gpu.yaml"), "out": str(runs), "seeds": list(range(per)),
        "variants": {"bn": {"model.norm": "bn"}, "mn": {"model.norm": "mn"}},
    }))
    sets = ["data.source=folder", f"data.path={data}", f"eval.reference={test_data}", "eval.every=0", "log.every=50",
            "log.sample_every=0", "ckpt.every=0", "train.steps=1000000"] + extra_sets
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
    for norm in ("bn", "mn"):
        sps, steps = [], []
        for run in sorted(runs.glob(f"{norm}-s*")):
            recs = [r for r in RunFolder(run).read_metrics() if "sec_per_step" in r]
            if len(recs) > 1:
                sps.append(statistics.median(r["sec_per_step"] for r in recs[1:]))  # first window: warm-up
            steps.append(recs[-1]["step"] if recs else 0)
        result[norm] = {"sec_per_step": statistics.fmean(sps) if sps else None, "steps": steps}
    if not (result["bn"]["sec_per_step"] and result["mn"]["sec_per_step"]):
        raise RuntimeError(f"probe: runs logged no step times (study exit {code})")
    result["mn_over_bn"] = result["mn"]["sec_per_step"] / result["bn"]["sec_per_step"]
    return result


def bench(check: Check, env: dict, outdir: Path, device: str, weights: str | None, extra: list[str]) -> dict:
    argv = [sys.executable, str(ROOT / "cli.py"), "bench", "all", "--device", device,
            "--json", str(outdir / "bench.json")] + extra
    if weights:
        argv += ["--weights", weights]
    code, out = check.run(argv, env=env)
    if code:
        raise RuntimeError(f"bench exit {code}")
    return {"rows": json.loads((outdir / "bench.json").read_text()),
            "headline": next((l for l in out.splitlines() if l.startswith("headline:")), "")}


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
        lines.append(f"- **{name}**: {'ok' if r['ok'] else 'FAILED: ' + r.get('error', '')} ({r['seconds']} s)")
    env = st.get("environment", {})
    if env.get("ok"):
        lines += ["", "## Environment", ""] + [f"- {k}: {v}" for k, v in env.items() if k not in ("ok", "seconds")]
    t = st.get("cuda_tests", {})
    if t.get("ok"):
        lines += ["", "## CUDA tests", "", f"`pytest -m cuda`: {t['counts']}"]
    f = st.get("fid_timing", {})
    if f.get("ok"):
        lines += ["", "## FID/KID wall time (generation + Inception + statistics)", "",
                  f"Reference statistics of {f['reference_images']} test images: {f['reference_seconds']} s "
                  "(once; cached after).", "", "| generated images | seconds | of which generation |", "|---|---|---|"]
        lines += [f"| {r['samples']} | {r['seconds']} | {r['generate_seconds']} |" for r in f["runs"]]
    p = st.get("probe", {})
    if p.get("ok"):
        lines += ["", f"## Step time with {p['jobs']} runs at once on one device ({p['budget_minutes']} min)", "",
                  "| norm | s/step (mean over runs) | steps reached |", "|---|---|---|"]
        for norm in ("bn", "mn"):
            lines.append(f"| {norm} | {p[norm]['sec_per_step']:.4f} | {p[norm]['steps']} |")
        lines.append(f"\nMN/BN step time: {p['mn_over_bn']:.2f}x")
    b = st.get("bench", {})
    if b.get("ok"):
        lines += ["", "## bench all", "", "| bench | what | ours | baseline | unit | ratio |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['bench']} | {r['what']} | {r['ours']:.2f} | {r['baseline']:.2f} | {r['unit']} | "
                  f"{r['ratio']:.2f}x {r['ratio_name']} |" for r in b["rows"]]
        lines += ["", b["headline"]]
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
    # The numbers a GPU study is sized from (probe, fid_timing) come first: when a GPU session's call runs
    # out of time, what it cuts is the correctness tests and the bench, which a later session can rerun.
    stages = [
        ("environment", lambda: environment(device)),
        ("probe", lambda: probe(check, env, out, data, test_data, weights, size["probe_minutes"], size["jobs"],
                                size["probe_set"])),
        # The dry run (CI) never touches the network; a GPU box may try torch-fidelity's download once.
        ("fid_timing", lambda: fid_timing(device, test_data, weights, size["fid_samples"], not args.cpu_dry_run)),
        ("cuda_tests", lambda: cuda_tests(check, env)),
        ("bench", lambda: bench(check, env, out, device, weights, size["bench"])),
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
