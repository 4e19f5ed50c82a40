"""The one-table summary of the MN variants study (docs/study-mn-variants/), from files the study's tools wrote.

    python cli.py compare docs/study-cpu/runs docs/study-mn-variants/runs --out OUT --metric fid --also-at 250,150
    python cli.py compare docs/study-cpu/runs docs/study-mn-variants/runs --out OUT --metric kid
    python scripts/variants_table.py OUT \
        --bench docs/study-mn-variants/bench-norm-ngf32-a.json docs/study-mn-variants/bench-norm-ngf32-b.json \
        --diagnose docs/study-mn-variants/diagnose

Reads compare.json and compare-kid.json (`cli.py compare ... --also-at ...`) in the folder, the
`cli.py bench norm --json` files (their MN/BN step-time ratio per variant, one column entry per file),
and `cli.py diagnose` outputs saved as <run>.txt (the overlap column per layer). Prints a markdown
table sorted by best KID. The one number it computes itself is the gap to BN's best KID in Welch
standard errors, sqrt(s1^2/n1 + s2^2/n2) from compare's mean, sample std and seed count.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gan.tools.bench import mn_ratio_name  # noqa: E402  (bench's row names)
from gan.tools.compare_report import mean_pm, to_target  # noqa: E402  (compare's own cell formats)

# compare's group label -> (name in the table, bench norm's variant name or None, run-folder prefix)
VARIANTS = {
    "norm=bn": ("BN", None, "bn"),
    "norm=mn": ("full MN (the spec's defaults)", "joint/warm", "mn"),
    "norm=mn, mn_layers=[0, 1]": ("MN in layers 0, 1 only", "layers 0,1", "mn-layer01"),
    "norm=mn, mn_layers=[0]": ("MN in layer 0 only", "layer 0", "mn-layer0"),
    "norm=mn, mn.posteriors=per_channel": ("per-channel posteriors", "per_channel", "mn-pc"),
    "norm=mn, mn.num_components=2": ("K = 2", "K=2", "mn-k2"),
    "norm=mn, mn.prior_scaling=false": ("no 1/sqrt(lambda) gain", None, "mn-noprior"),
    "norm=mn, mn.detach_posteriors=false": ("gradients through the posteriors", "grad through posteriors",
                                            "mn-gradpost"),
    "norm=mn, mn.lambda_min=0.1": ("lambda floor 0.1", None, "mn-lmin"),
    "norm=mn, mn.em_steps=5, mn.fit=fresh": ("fresh fit every step (5 EM iterations)", "fresh", "mn-fresh"),
    "norm=mn, mn.em_steps=5, mn.posteriors=per_channel, mn.fit=fresh": ("per-channel + fresh fit",
                                                                         "per_channel+fresh", "mn-pc-fresh"),
    "norm=mn, mn_layers=[0], mn.posteriors=per_channel": ("per-channel posteriors, layer 0 only",
                                                          "per_channel in layer 0", "mn-pc-layer0"),
    "norm=mn, mn_layers=[0], mn.prior_scaling=false": ("MN in layer 0 only, no 1/sqrt(lambda) gain", None,
                                                         "mn-layer0-noprior"),
}


def step_time(benches: list[list[dict]], variant: str | None) -> str:
    if variant is None:
        return "–"
    name = mn_ratio_name("step time", variant)
    ratios = [r["ratio"] for rows in benches for r in rows if r["ratio_name"] == name]
    return " / ".join(f"{v:.2f}×" for v in ratios) or "–"


def overlaps(diagnose: Path | None, prefix: str) -> str:
    """Per seed: layer 0/1/2 overlap, from diagnose's printed table (column 7 of the layer rows)."""
    if diagnose is None:
        return "–"
    out = []
    for f in sorted(diagnose.glob(f"{prefix}-s*.txt")):
        if re.fullmatch(re.escape(prefix) + r"-s\d+", f.stem):
            rows = [line.split() for line in f.read_text().splitlines() if re.match(r"\s*\d+\s+net\.", line)]
            out.append("/".join(r[6] for r in rows))
    return "; ".join(out) or "–"


def gap_cell(group: dict, baseline: dict) -> str:
    """"+0.0027 (2.9 SE)": the group's mean best minus the baseline's, in Welch standard errors where
    both have 2 or more seeds (one seed has no spread to estimate)."""
    if group is baseline:
        return "–"
    gap = group["best"]["mean"] - baseline["best"]["mean"]
    n1, n2 = len(group["runs"]), len(baseline["runs"])
    if n1 < 2 or n2 < 2:
        return f"{gap:+.4f}"
    se = math.sqrt(group["best"]["std"] ** 2 / n1 + baseline["best"]["std"] ** 2 / n2)
    return f"{gap:+.4f} ({gap / se:.1f} SE)" if se > 0 else f"{gap:+.4f}"


def target_cell(n: dict, is_baseline: bool) -> str:
    cell = to_target(n["steps_to_target"], ".0f")
    if n["steps_to_target"]["reached"] and not is_baseline and n["speedup_steps"] is not None:
        cell += f" ({n['speedup_steps']:.2f}×)"
    return cell


def table(folder: Path, benches: list[list[dict]], diagnose: Path | None) -> str:
    fid = json.loads((folder / "compare.json").read_text())
    kid = {g["label"]: g for g in json.loads((folder / "compare-kid.json").read_text())["groups"]}
    ats = fid.get("at_targets", [])
    head = (["variant", "seeds", "best KID", "best KID − BN's", "best FID", "step of best KID"]
            + [f"steps to FID {a['target']:g} (speed-up)" for a in ats]
            + [f"steps to BN's best FID, {fid['target']:.1f} (speed-up)", "MN/BN step time", "overlap, layers 0/1/2"])
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for g in sorted(fid["groups"], key=lambda g: kid[g["label"]]["best"]["mean"]):
        name, bench_name, prefix = VARIANTS.get(g["label"], (g["label"], None, None))
        k, base = kid[g["label"]], g["label"] == fid["baseline"]
        seeds = ", ".join(f"{r['seed']}*" if r["in_progress"] else str(r["seed"]) for r in g["runs"])
        at = [next(n for n in a["groups"] if n["label"] == g["label"]) for a in ats] + [g]
        cells = [name, seeds, mean_pm(k["best"], ".4f"), gap_cell(k, kid[fid["baseline"]]), mean_pm(g["best"], ".1f"),
                 ", ".join(map(str, k["best_step"]))] + [target_cell(n, base) for n in at]
        cells += [step_time(benches, bench_name), overlaps(diagnose, prefix) if prefix else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path, help="holds compare.json and compare-kid.json")
    ap.add_argument("--bench", nargs="*", type=Path, default=[], help="`bench norm --json` files")
    ap.add_argument("--diagnose", type=Path, help="folder of `diagnose` outputs saved as <run>.txt")
    args = ap.parse_args()
    try:
        print(table(args.folder, [json.loads(p.read_text()) for p in args.bench], args.diagnose))
    except (OSError, ValueError, KeyError) as e:  # a missing or foreign file: one line, no traceback
        sys.exit(f"error: variants_table: {type(e).__name__}: {e}")


if __name__ == "__main__":
    main()
