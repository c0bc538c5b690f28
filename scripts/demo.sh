#!/usr/bin/env bash
# Set everything up (idempotent) and run the demo pipeline on a tiny model and
# embedded Countdown data, on CPU.
#   scripts/demo.sh [DEMO_DIR]   (default results/demo)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh
export PATH="$ROOT/.venv/bin:$PATH" TOKENIZERS_PARALLELISM=false
DEMO="${1:-results/demo}"
mkdir -p "$DEMO"
echo "[demo] 1/1 teacher SFT warm-up (tiny Qwen2, Countdown, 2 CPU processes, ZeRO-3)"
./launch.sh 2 cfgs/run_cfg/tiny_teacher_sft.yaml "output_dir=$DEMO/pre_rl_model" max_steps=20 2>&1 | tee "$DEMO/teacher_sft.log"
echo "[demo] done: teacher checkpoint in $DEMO/pre_rl_model, log in $DEMO/teacher_sft.log"
