#!/usr/bin/env bash
# "Does it teach?": the micro-scale RLT experiment on tiny Qwen2 models built locally and the embedded
# running-sum task (rlt/data/arithmetic.py). Sets up .venv (idempotent, pip output in a log), then runs
# `python -m rlt.experiment run`: students on raw traces (seed 0's is the frozen reward student), teacher
# SFT warm-up, teacher RL, best-of-k distillation with the RL and the warm-up teacher, fresh students on each,
# evaluation on the held-out test split. Writes OUT/report.md and OUT/summary.json.
#   scripts/experiment.sh [--quick] [--device cpu|cuda] [--out DIR] [--restart] [--rerun-other-code]
#                         [--workers N] [--threads N]
#   scripts/experiment.sh --curves [--out DIR]    # the learning-curve study (validation split) into DIR/curves
# Default: about 30-60 minutes on 2 CPU cores (results/experiment); --quick: a few minutes, checks the
# pipeline only (results/experiment_quick). A rerun resumes the finished jobs of the same settings.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
STAGE_TAG=experiment
STAGE_T0=$(date +%s)
source scripts/stage_lib.sh

CMD=run; ARGS=(); OUT=
no_out_dir() { echo "experiment.sh: error: --out needs a directory" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --curves) CMD=curves ;;
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1' "$ROOT/scripts/experiment.sh" | sed 's/^# \{0,1\}//'; exit 0 ;;  # the header
    --out) [ $# -ge 2 ] || no_out_dir; OUT="$2"; shift ;;
    --out=*) OUT="${1#--out=}"; [ -n "$OUT" ] || no_out_dir ;;
    *) ARGS+=("$1") ;;
  esac
  shift
done
# --out DIR names the experiment's directory; the learning-curve study goes into DIR/curves
if [ -n "$OUT" ] && [ "$CMD" = curves ]; then OUT="$OUT/curves"; fi
if [ -n "$OUT" ]; then ARGS+=(--out "$OUT"); fi

mkdir -p results
run_stage "set up .venv (pip output in the log; nothing to do when it is up to date)" results/setup_env.log \
  bash scripts/setup_env.sh
export PATH="$ROOT/.venv/bin:$PATH" TOKENIZERS_PARALLELISM=false
echo "[experiment] $(stage_elapsed) | python -m rlt.experiment $CMD ${ARGS[*]:-} (one line per stage below; each names its log)"
exec python -m rlt.experiment "$CMD" "${ARGS[@]}"  # in place of this shell: a kill reaches it at once
