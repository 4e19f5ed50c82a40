"""Size a time-budgeted study from a GPU check's measurements: prints `--set` options for `cli.py study`.

    python scripts/size_study.py OUTDIR/summary.json --budget-minutes 6.5 [--evals 6]
    -> --set train.steps=12000 --set eval.every=2000 --set ckpt.every=2000   (and the sums behind it on stderr)

Every run trains the same number of steps S and is evaluated at the same steps E, 2E, ..., S, so that
the slowest variant (MN) can reach S within the budget:

    S = (budget - reference statistics - start-up - first steps - reserve - evals * eval time) / (MN's s/step)

with MN's step time as measured with the check's concurrent runs (BN finishes first, after which MN
runs faster than measured: S errs on the safe side). The reference statistics of the 50k training
images cost about as much as scoring 50k generated images, which the check timed; one evaluation
under concurrency is taken as 2.5 times its measured time alone (Inception on the shared GPU, FID's
matrix square root and KID's kernels on the CPU cores the runs share), an estimate that the study's
own logs then check. "First steps" is what an MN run's first steps cost beyond steady ones, compiling
its fused layers above all, as the check's warm-up run measured it alone (on a fresh machine, with
Inductor's cache cold; a study's runs on the same machine may find it warm: S errs on the safe side).
"""
from __future__ import annotations

import argparse
import json
import sys

START_UP_S = 30.0   # python + torch import, decoding the training zip (seen in the probe's logs)
RESERVE_S = 25.0    # the last evaluation in flight, the checkpoints and the comparison after the signal
EVAL_CONTENTION = 2.5


def size(summary: dict, budget_minutes: float, evals: int, round_to: int = 100) -> tuple[dict, dict]:
    st = summary.get("stages", {})
    missing = [name for name in ("probe", "fid_timing") if not st.get(name, {}).get("ok")]
    if missing:
        raise SystemExit(f"error: the check has no {' and no '.join(missing)} numbers (the stage failed or did not "
                         "run): nothing to size the study from")
    mn_sps = st["probe"]["mn"]["sec_per_step"]
    fid = {r["samples"]: r["seconds"] for r in st["fid_timing"]["runs"]}
    ref_s = max(fid.values()) * 50_000 / max(fid)  # the 50k reference, from the largest timed run
    eval_s = fid[min(fid)] * 10_000 / min(fid) * EVAL_CONTENTION
    warm = st.get("warm_up", {})
    # No warm-up numbers (a check from before that stage, or a failed warm-up): the probe's start-up only.
    first_s = warm["first_steps_extra_seconds"] if warm.get("ok") else 0.0
    train_s = budget_minutes * 60 - ref_s - START_UP_S - first_s - RESERVE_S - evals * eval_s
    if train_s <= 0:
        raise SystemExit(f"error: {budget_minutes} min leaves no training time "
                         f"(reference {ref_s:.0f} s, {evals} evaluations x {eval_s:.0f} s)")
    every = max(round_to, int(train_s / mn_sps / evals) // round_to * round_to)
    sets = {"train.steps": every * evals, "eval.every": every, "ckpt.every": every, "log.sample_every": every}
    why = {"mn_sec_per_step": mn_sps, "reference_s": round(ref_s, 1), "first_steps_s": first_s,
           "eval_s": round(eval_s, 1), "train_s": round(train_s, 1), "evals": evals, **sets}
    return sets, why


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("summary")
    ap.add_argument("--budget-minutes", type=float, required=True)
    ap.add_argument("--evals", type=int, default=6, help="evaluations per run (the last at train.steps)")
    args = ap.parse_args()
    with open(args.summary) as f:
        sets, why = size(json.load(f), args.budget_minutes, args.evals)
    print("sizing: " + json.dumps(why), file=sys.stderr)
    print(" ".join(f"--set {k}={v}" for k, v in sets.items()))


if __name__ == "__main__":
    main()
