#!/usr/bin/env bash
# Set everything up (idempotent), then run the whole RLT pipeline on tiny
# random Qwen2 models and embedded Countdown data, on CPU:
#   teacher SFT warm-up -> teacher RL with a vLLM server -> distillation (best-of-k)
#   -> student SFT on distilled vs original traces -> evaluation -> report.
#   scripts/demo.sh [DEMO_DIR]   (default results/demo)
# The models are tiny and random: the numbers show the pipeline runs, not RLT's gains.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh
export PATH="$ROOT/.venv/bin:$PATH" TOKENIZERS_PARALLELISM=false
D="${1:-results/demo}"
mkdir -p "$D"
TRAIN=rlt-countdown:64:0      # embedded Countdown questions with traces (training)
TEST=rlt-countdown:32:99      # held-out Countdown questions (evaluation)
T0=$(date +%s)
stage() { echo; echo "[demo] $(( $(date +%s) - T0 ))s | $*"; }

stage "1/6 teacher SFT warm-up (2 CPU processes, DeepSpeed ZeRO-3)"
./launch.sh 2 cfgs/run_cfg/tiny_teacher_sft.yaml "output_dir=$D/pre_rl_model" "dataset_id_or_path=$TRAIN" \
  max_steps=150 > "$D/1_teacher_sft.log" 2>&1

stage "2/6 teacher RL: 1 vLLM server + 2 training processes"
./launch_with_server.sh 1 2 cfgs/run_cfg/tiny_teacher_rlt.yaml "model_name_or_path=$D/pre_rl_model" \
  "output_dir=$D/rlt_teacher" "dataset_id_or_path=$TRAIN" max_steps=8 max_completion_length=160 save_strategy=no > "$D/2_teacher_rl.log" 2>&1
python -m rlt.plot "$D/rlt_teacher" --out "$D/plots" >> "$D/2_teacher_rl.log" 2>&1

stage "3/6 distillation: 4 explanations per question, best of 4 by the teacher reward"
python -m rlt.distill "teacher=$D/rlt_teacher" student=rlt-tiny:1 "dataset=$TRAIN" "output=$D/distilled.jsonl" \
  num_explanations=4 select=best_of_k missing_end_tag=penalise max_tokens=160 max_prompt_length=1024 \
  dtype=float32 > "$D/3_distill.log" 2>&1

stage "4/6 student SFT on the distilled traces and, as the baseline, on the original traces"
./launch.sh 2 cfgs/run_cfg/tiny_student_sft.yaml "output_dir=$D/student_rlt" "dataset_id_or_path=$D/distilled.jsonl" max_steps=60 \
  > "$D/4_student_rlt.log" 2>&1
./launch.sh 2 cfgs/run_cfg/tiny_student_sft.yaml "output_dir=$D/student_base" "dataset_id_or_path=$TRAIN" max_steps=60 \
  > "$D/4_student_base.log" 2>&1

stage "5/6 evaluation on held-out Countdown questions"
for s in student_rlt student_base; do
  python -m rlt.eval "model=$D/$s" "dataset=$TEST" "output_dir=$D/eval_$s" max_tokens=160 dtype=float32 \
    > "$D/5_eval_$s.log" 2>&1
done

stage "6/6 report"
python -m rlt.report "$D" --seconds $(( $(date +%s) - T0 ))
