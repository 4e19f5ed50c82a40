#!/usr/bin/env bash
# The device calls of a GPU session (DEVELOPERS.md, "The GPU, when one is lent"; issue 14), written and
# tested on the CPU, so that the session's few GPU minutes go to measuring and not to mending commands.
#
# Here, first: build .venv (README), then ../shared/tools/gpu-bundle (writes .transfer/gpu1 and gpu2).
#   call 1, carry [".transfer/gpu1"], timeout_s 255:    bash scripts/gpu_session.sh check
#   call 2 at once, carry [".transfer/gpu2"], timeout_s 570:    bash scripts/gpu_session.sh study [MINUTES]
#   give_back; then here, with call 2's files_at:       bash scripts/gpu_session.sh import FILES_AT
#
# check   installs the carried torch-fidelity wheel, runs scripts/gpu_check.sh into runs/gpu-session/check
#         (a warm machine keeps it for call 2) and copies its summary, JSON, bench rows and log to $OUT.
# study   sizes configs/study-gpu-runs.yaml for MINUTES (default 6) from that check (scripts/size_study.py;
#         if the check lacks the numbers, the study file's estimate), runs it, and packs into
#         $OUT/study-gpu.tar.gz what docs/study-gpu/ keeps: each run's config.yaml, metrics.jsonl and
#         train.log, its last sample grid, the comparison, the check's summary; $OUT/study.log is the output.
# import  unpacks that archive into docs/study-gpu/ (or $DEST) with the study's log, and compares the
#         imported runs there again (FID and KID over the steps every run reached, also at the multiples
#         of BN's best that the archive's study.yaml lists as also_at: 2, 1.5 and 1.25 for the GPU file).
#
# --cpu-dry-run, after check or study: the same steps at tiny sizes on the CPU, one seed per variant of the
# real study file (tests/test_gpu_session.py). Python: $PYTHON, else the project's .venv, else python3 (the
# GPU machine's own, which has torch but not torch-fidelity or wandb: wandb is disabled here).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
die() { echo "error: $*" >&2; exit 2; }
py=${PYTHON:-}
if [ -z "$py" ]; then
  if [ -x .venv/bin/python ]; then py=$root/.venv/bin/python; else py=python3; fi
fi
work=${GPU_SESSION_DIR:-runs/gpu-session}
bundle=${GPU_BUNDLE:-.transfer/gpu1}  # what gpu-bundle wrote and call 1 carries
weights=$bundle/inception-nohead-fp16.pth
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled

cmd=${1:-}
[ $# -gt 0 ] && shift
dry=false
args=()
for a in "$@"; do
  if [ "$a" = --cpu-dry-run ]; then dry=true; else args+=("$a"); fi
done

# timeout's 124 would read as the device call's own time-out (the device tool reports rc 124 as timed_out),
# though this script stopped the step itself and still returns its files: say so, and exit 3 instead.
stopped() { if [ "$1" = 124 ]; then echo " (stopped by this script after $2)"; fi; }
code() { if [ "$1" = 124 ]; then echo 3; else echo "$1"; fi; }

need_out() { [ -n "${OUT:-}" ] || die "\$OUT is not set (the device tool sets it; set it to a folder to run this elsewhere)"; mkdir -p "$OUT"; }

# torch-fidelity: the carried wheel, installed beside the tree (the GPU machine's python has none of its own);
# .transfer/site is on the path of every python this script starts, installed in or not.
export PYTHONPATH=$root/.transfer/site${PYTHONPATH:+:$PYTHONPATH}
fidelity() {
  "$py" -c 'import torch_fidelity' 2>/dev/null && return 0
  local whl
  whl=$(ls $bundle/torch_fidelity-*.whl 2>/dev/null | head -n 1) || true
  [ -n "$whl" ] || die "torch-fidelity is not installed and no wheel is in $bundle (a fresh machine: run call 1 again)"
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .transfer/site "$whl"
}

check() {
  need_out
  fidelity
  local opts
  if $dry; then opts=(--cpu-dry-run); else
    [ -f "$weights" ] || die "no $weights: carry .transfer/gpu1 (made by ../shared/tools/gpu-bundle)"
    opts=(--test-data $bundle/cifar10-jpeg75-test.zip --weights "$weights")
  fi
  rm -rf "$work/check"
  mkdir -p "$work"
  # The check writes summary.json after every stage, so what a timeout leaves is still reported. 225 s keeps
  # call 1 under DEVELOPERS.md's 4 minutes and leaves the study its 6: the stages the study is sized from
  # (probe, fid_timing) come first, so the cap cuts the CUDA tests or the bench, which a later session reruns.
  local rc=0 seconds=${CHECK_SECONDS:-225}
  PYTHON=$py timeout "$seconds" bash scripts/gpu_check.sh "$work/check" "${opts[@]}" "${args[@]}" || rc=$?
  for f in summary.md summary.json bench.json log.txt; do
    if [ -f "$work/check/$f" ]; then cp "$work/check/$f" "$OUT/check-$f"; fi
  done
  echo "check: exit $rc$(stopped "$rc" "$seconds s"); $OUT/check-summary.md"
  return "$(code "$rc")"
}

# A study file for the dry run: the real one's variants, one seed, its output under $work.
dry_study() {
  "$py" - "$1" "$2" "$3" <<'PY'
import sys, yaml
with open(sys.argv[1]) as f:
    study = yaml.safe_load(f)
study.update(out=sys.argv[3], seeds=[0])
with open(sys.argv[2], "w") as f:
    yaml.safe_dump(study, f, sort_keys=False)
PY
}

study() {
  need_out
  fidelity
  local minutes=${args[0]:-6} file=configs/study-gpu-runs.yaml out=runs/study-gpu sets=() sizing
  [[ $minutes =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "MINUTES must be a number of minutes, not '$minutes'"
  # Sized from call 1's check. A dry run's check sizes nothing (its stages were skipped, or its CPU numbers
  # leave no training time): the warning is what it shows, and its tiny sizes below stand.
  if [ -f "$work/check/summary.json" ] &&
     sizing=$("$py" scripts/size_study.py "$work/check/summary.json" --budget-minutes "$minutes"); then
    read -ra sets <<< "$sizing"
  else
    echo "warning: the check gave no sizing; the study file's train.steps and eval.every (measured on an H200) stand" >&2
  fi
  mkdir -p "$work"
  if $dry; then
    out=$work/study-gpu
    file=$work/study-dry.yaml
    dry_study configs/study-gpu-runs.yaml "$file" "$out"
    local data=$work/tiny-train.zip
    "$py" -c "import sys; sys.path.insert(0, 'scripts'); from pathlib import Path; from gpu_check import tiny_zip; tiny_zip(Path(sys.argv[1]))" "$data"
    sets+=(--set data.path="$data" --set model.ngf=8 --set model.ndf=8 --set train.batch_size=16
          --set train.threads=1 --set train.steps=10 --set eval.every=10 --set ckpt.every=10 --set log.every=5
          --set log.sample_every=10 --set eval.num_samples=32 --set metrics.allow_download=false)
    # With the bundle here, score with its fp16 weights as the GPU will (else: converted offline, cached).
    if [ -f "$weights" ]; then sets+=(--set metrics.inception_weights="$weights"); fi
  else
    [ -f "$weights" ] || die "no $weights: the machine is fresh (call 1 carries it): run call 1 again first"
    sets+=(--set data.path=.transfer/gpu2/cifar10-jpeg75-train.zip --set metrics.inception_weights="$weights")
  fi
  local jobs
  jobs=$("$py" -c "import sys; sys.path.insert(0, '.'); from gan.tools.study import load_study; print(len(load_study(sys.argv[1], {}).runs))" "$file")
  echo "study: $file, $jobs runs at once, budget $minutes min, ${sets[*]}" | tee "$OUT/study.log"
  local rc=0
  # The study stops its runs at the budget itself; the timeout only guards the packing below.
  timeout "$("$py" -c "print(int(float('$minutes') * 60 + 90))")" \
    "$py" cli.py study "$file" --jobs "$jobs" --budget-minutes "$minutes" "${sets[@]}" 2>&1 | tee -a "$OUT/study.log" || rc=$?
  pack "$out" "$OUT/study-gpu.tar.gz"
  echo "study: exit $rc$(stopped "$rc" "its budget and 90 s"); $OUT/study-gpu.tar.gz, $OUT/study.log"
  return "$(code "$rc")"
}

# docs/study-gpu's layout, from the study's output folder: runs/<run>/{config.yaml,metrics.jsonl,train.log},
# samples/<run>-<last grid>.png, the comparison's files, gpu-check/ (the check's summary and bench rows).
pack() {
  local src=$1 archive=$2 stage=$work/pack
  rm -rf "$stage"; mkdir -p "$stage/runs" "$stage/samples" "$stage/gpu-check"
  local run name grid f
  for run in "$src"/*/; do
    run=${run%/}; name=$(basename "$run")
    [ -f "$run/config.yaml" ] || continue
    mkdir -p "$stage/runs/$name"
    for f in config.yaml metrics.jsonl train.log; do
      if [ -f "$run/$f" ]; then cp "$run/$f" "$stage/runs/$name/"; fi
    done
    grid=$(ls "$run"/samples/step_*.png 2>/dev/null | tail -n 1) || true
    if [ -n "$grid" ]; then cp "$grid" "$stage/samples/$name-$(basename "$grid")"; fi
  done
  for f in "$src"/compare/* "$src/study.yaml"; do
    if [ -f "$f" ]; then cp "$f" "$stage/"; fi
  done
  for f in summary.md summary.json bench.json; do
    if [ -f "$work/check/$f" ]; then cp "$work/check/$f" "$stage/gpu-check/"; fi
  done
  tar -czf "$archive" -C "$stage" .
}

import_() {
  local from=${args[0]:-} dest=${DEST:-docs/study-gpu}
  [ -f "$from/study-gpu.tar.gz" ] || die "usage: $0 import FOLDER (the folder holding call 2's study-gpu.tar.gz)"
  mkdir -p "$dest"
  tar -xzf "$from/study-gpu.tar.gz" -C "$dest"
  if [ -f "$from/study.log" ]; then cp "$from/study.log" "$dest/"; fi
  echo "import: $(ls "$dest/runs" | wc -l) runs into $dest"
  # The comparison again from the imported runs, so that its tables name the docs' run folders, with the
  # speed-ups also at the looser targets that the study file carried in the archive asks for (its also_at).
  # An archive without a comparison (the study was stopped before it compared) gets its first one here.
  local metric also=""
  if [ -f "$dest/study.yaml" ]; then
    also=$("$py" - "$dest/study.yaml" 2>&1 <<'PY'
import sys, yaml
sys.path.insert(0, ".")
from gan.tools.study import StudyError, check_also_at  # the study file's own rule: multiples of the target
try:
    print(",".join(check_also_at(yaml.safe_load(open(sys.argv[1])).get("also_at"), sys.argv[1] + ": also_at")))
except (StudyError, OSError, yaml.YAMLError, AttributeError) as e:
    sys.exit(" ".join(str(e).split()))  # one line for die
PY
    ) || die "import: the archive's study file: $also"
  fi
  for metric in fid kid; do
    "$py" cli.py compare "$dest/runs" --out "$dest" --common-steps --metric "$metric" --also-at "$also" \
      || die "import: the imported runs could not be compared by $metric (compare's reason above); the runs are in $dest/runs"
  done
}

case "$cmd" in
  check) check ;;
  study) study ;;
  import) import_ ;;
  *) die "usage: $0 check|study [MINUTES]|import FOLDER [--cpu-dry-run]" ;;
esac
