#!/usr/bin/env bash
# Set everything up (idempotent), then run the whole RLT pipeline with the real launchers on tiny Qwen2 models
# built locally and the embedded running-sum task (rlt/data/arithmetic.py), on CPU:
#   student SFT on the raw traces (the frozen reward student, and the baseline)
#   -> teacher SFT warm-up -> teacher RL with a vLLM server, rewarded by that trained student
#   -> distillation (best-of-2 by the teacher reward) -> student SFT on the distilled explanations
#   -> evaluation of both students -> report.
#   scripts/demo.sh [DEMO_DIR]   (default results/demo)
# A shortened pipeline (minutes of training): it shows every stage running with a reward student that carries
# signal, not RLT's gains; scripts/experiment.sh is the experiment.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
D="${1:-results/demo}"
mkdir -p "$D"
STAGE_TAG=demo
STAGE_T0=$(date +%s)
source scripts/stage_lib.sh

run_stage "0/7 set up .venv (pip output in the log; nothing to do when it is up to date)" "$D/0_setup.log" \
  bash scripts/setup_env.sh
export PATH="$ROOT/.venv/bin:$PATH" TOKENIZERS_PARALLELISM=false

TRAIN=rlt-arith:train:256:0     # embedded running-sum questions with raw traces (training)
TEST=rlt-arith:test:64:0        # held-out questions (the split is fixed by a hash of the question)
SFT=(max_length=512 learning_rate=2e-3 train_batch_size=8 per_device_train_batch_size=4 max_steps=160)

run_stage "1/7 student SFT on the raw traces: the frozen reward student and the baseline (2 CPU processes, DeepSpeed ZeRO-3)" \
  "$D/1_student_raw.log" \
  ./launch.sh 2 cfgs/run_cfg/tiny_student_sft.yaml "output_dir=$D/student_raw" "dataset_id_or_path=$TRAIN" "${SFT[@]}"

run_stage "2/7 teacher SFT warm-up on the same traces (2 CPU processes, DeepSpeed ZeRO-3)" "$D/2_teacher_sft.log" \
  ./launch.sh 2 cfgs/run_cfg/tiny_teacher_sft.yaml "output_dir=$D/pre_rl_model" "dataset_id_or_path=$TRAIN" "${SFT[@]}"

run_stage "3/7 teacher RL: 1 vLLM server + 2 training processes, reward scored by the trained student" \
  "$D/3_teacher_rl.log" \
  ./launch_with_server.sh 1 2 cfgs/run_cfg/tiny_teacher_rlt.yaml "model_name_or_path=$D/pre_rl_model" \
  "student_model=$D/student_raw" "output_dir=$D/rlt_teacher" "dataset_id_or_path=$TRAIN" max_steps=20 \
  max_completion_length=96 learning_rate=5e-5 save_strategy=no vllm_enforce_eager=true
run_stage "3/7 plots of the teacher's RL run" "$D/3_teacher_rl_plots.log" \
  python -m rlt.plot "$D/rlt_teacher" --out "$D/plots"

# stage 3 trained the teacher again: explanations an earlier demo left here are another teacher's
rm -f "$D/distilled.jsonl" "$D/distilled.jsonl.settings.json" "$D/distilled.summary.json"
run_stage "4/7 distillation: 2 explanations per training question, best of 2 by the teacher reward" \
  "$D/4_distill.log" \
  python -m rlt.distill "teacher=$D/rlt_teacher" "student=$D/student_raw" "dataset=$TRAIN" "output=$D/distilled.jsonl" \
  num_explanations=2 select=best_of_k missing_end_tag=penalise max_tokens=96 max_prompt_length=512 dtype=float32 \
  vllm_enforce_eager=true

run_stage "5/7 student SFT on the distilled explanations (same steps as stage 1)" "$D/5_student_rlt.log" \
  ./launch.sh 2 cfgs/run_cfg/tiny_student_sft.yaml "output_dir=$D/student_rlt" "dataset_id_or_path=$D/distilled.jsonl" \
  "${SFT[@]}"

run_stage "6/7 evaluation of both students on held-out questions" "$D/6_eval.log" \
  bash -c 'set -e; for s in student_rlt student_raw; do python -m rlt.eval "model=$1/$s" "dataset=$2" \
    "output_dir=$1/eval_$s" max_tokens=96 max_prompt_length=512 dtype=float32 vllm_enforce_eager=true; done' \
  eval_students "$D" "$TEST"

echo "[demo] $(stage_elapsed) | 7/7 report"
exec python -m rlt.report "$D" --seconds $(( $(date +%s) - STAGE_T0 ))
