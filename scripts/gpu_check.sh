#!/usr/bin/env bash
# One command that checks a GPU machine, most needed first (a time cap cuts the least needed): the step
# times and FID wall time a GPU study is sized from, `cli.py bench train|norm|eval` (eager, and compiled
# where bench can), the CUDA tests, and the GPU study's nine runs at once. Writes OUTDIR/summary.md,
# OUTDIR/summary.json (which scripts/size_study.py reads) and OUTDIR/log.txt.
#
#   scripts/gpu_check.sh OUTDIR --test-data cifar10-test.zip [--data train.zip] [--weights inception.pth]
#   scripts/gpu_check.sh OUTDIR --cpu-dry-run      # tiny sizes on a CPU, to test the script (CI runs this)
#
# Python: $PYTHON, else the project's .venv, else python3 (a GPU box's own torch is fine).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
py=${PYTHON:-}
if [ -z "$py" ]; then
  if [ -x "$here/../.venv/bin/python" ]; then py="$here/../.venv/bin/python"; else py=python3; fi
fi
exec "$py" "$here/gpu_check.py" "$@"
