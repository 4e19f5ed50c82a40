#!/usr/bin/env bash
# One command that checks a GPU machine: CUDA tests, FID wall time, step times of concurrent BN/MN runs,
# and `cli.py bench all`, in about 4 minutes on one H100/H200-class GPU. Writes OUTDIR/summary.md,
# OUTDIR/summary.json and OUTDIR/log.txt.
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
