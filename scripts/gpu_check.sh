#!/usr/bin/env bash
# GPU acceptance run: the whole training machinery on random-weight models built
# here (no hub), on any CUDA machine. Its stages' EXPECT times (H200 times plus a margin, estimates where a
# stage has not run there) add up to 1225 s without vLLM; it never runs past its budget (default 1500 s):
# a stage that no longer fits is skipped and says so (RLT_GPU_CHECK_RESUME=1 runs it later).
#   scripts/gpu_check.sh               on CUDA
#   scripts/gpu_check.sh --cpu-smoke   the same stages at tiny shapes on CPU (checks the script itself)
# Stages, in this order: install what is missing; the CUDA-only tests
# (pytest -m cuda); the output-layer backends alone (rowchunk vs the fused Triton
# kernel) at 7B shape in bf16; the reward benchmark at 7B shape in bf16 and at 0.5B shape
# in fp32 (max |rlt - oracle| <= 1e-5); build the models and DeepSpeed's CPU Adam
# op; teacher SFT via ./launch.sh 1 with zero3, zero1, offload; teacher RL via ./launch.sh 1
# (in-process generation) at tiny and 0.5B shape, bf16; python -m rlt.score on the
# device; one RL step at 7B width
# with offload and 4k-token completions; ./launch_with_server.sh 1 1 with nccl
# and filesystem weight sync when vllm imports and >= 2 GPUs are visible.
# Writes results/gpu_check/summary.json, summary.md (the table) and logs/.
# Exit code 0 when at least one stage passed and none failed (skipped stages do not fail the run).
#
# Python: $RLT_PYTHON, else .venv/bin/python, else python3: the first with a
# torch (with CUDA, unless --cpu-smoke). Nothing is downloaded for torch: pip is
# pinned to the torch already there, and what else is missing goes into
# results/gpu_check/site (on PYTHONPATH; the image's site-packages are not
# touched), from $RLT_WHEELS (a folder of wheels, no index) when set, else from
# pip's configured index. The project is used in place.
# Other settings: RLT_GPU_CHECK_STAGES (comma-separated stage names to run, default
# all; the others are recorded as skipped; models is added when an RL stage on
# built models is chosen, build_cpu_adam when an offload stage is), RLT_GPU_CHECK_OUT
# (results dir), RLT_GPU_CHECK_BUDGET (seconds, default 1500 on GPU; a stage starts only when the
# budget left covers its usual time, EXPECT below, and is otherwise skipped, saying so),
# RLT_GPU_CHECK_EXPECT (NAME=SECONDS,...: other expected times, e.g. on a slower card; a stage the budget
# cuts off anyway is recorded as "cut", not failed, and runs again in a resumed call),
# RLT_GPU_CHECK_7B_LAYERS (layers of the 7B-wide RL model, default 8: a
# full-depth 7.6B policy with Adam states does not fit one 80 GB
# card plus a 128 GB host), RLT_GPU_CHECK_KEEP=1 keeps the work dir (models, runs),
# RLT_GPU_CHECK_ARCHIVE=FILE writes the results dir (less site/ and torch_extensions/) to FILE as a .tgz
# after every stage (what a call killed from outside still leaves; unpack it into the results dir to resume).
# RLT_GPU_CHECK_RESUME=1 continues the run in the results dir (a check in several
# calls, e.g. under a per-command time limit): the stages that passed there are
# kept with their numbers, the others run when chosen (a failed stage not chosen
# keeps its record); install, models and build_cpu_adam run again when a stage
# that needs them runs. Refused (exit 2) for a run of another card, GPU count or
# mode. RLT_GPU_CHECK_RESUME_FROM=FILE.tgz (an archive an earlier call wrote): unpacked into the
# results dir when that holds no run (a fresh machine), so a resumed call works warm or cold. The table then says which call ran each stage, and each call's commit of the project
# (git; RLT_GPU_CHECK_COMMIT names it for a copy of the tree without .git).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
MODE=gpu
case "${1:-}" in
  "") ;;
  --cpu-smoke) MODE=cpu-smoke ;;
  -h|--help) sed -n '2,/^set -uo/p' "$ROOT/scripts/gpu_check.sh" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  *) echo "gpu_check.sh: unknown argument '$1' (accepted: --cpu-smoke, --help)" >&2; exit 2 ;;
esac
ALL_STAGES=(install cuda_tests bench_output_layer bench_reward_7b_bf16 bench_reward_0.5b_fp32 models build_cpu_adam
            sft_zero3 sft_zero1 sft_offload
            rl_tiny score_tiny rl_0.5b rl_7b_offload_step vllm_server_nccl vllm_server_filesystem)
SELECTED=" ${ALL_STAGES[*]} "
if [ -n "${RLT_GPU_CHECK_STAGES:-}" ]; then
  SELECTED=" "
  for n in ${RLT_GPU_CHECK_STAGES//,/ }; do
    case " ${ALL_STAGES[*]} " in
      *" $n "*) SELECTED+="$n " ;;
      *) echo "gpu_check.sh: RLT_GPU_CHECK_STAGES: unknown stage '$n' (accepted: ${ALL_STAGES[*]})" >&2; exit 2 ;;
    esac
  done
  case "$SELECTED" in *" rl_0.5b "*|*" rl_7b_offload_step "*) SELECTED+="models " ;; esac
  case "$SELECTED" in *" sft_offload "*|*" rl_7b_offload_step "*) SELECTED+="build_cpu_adam " ;; esac
fi
has() { case "$1" in *" $2 "*) return 0 ;; *) return 1 ;; esac; }   # has " a b " b: a word of a list
# about how long each stage takes (s): a stage starts only when that much of the budget is left, so a short
# budget skips it (a later call picks it up) instead of cutting it off. GPU: measured on the H200 where the
# stage ran there, else docs/gpu.md's H100 estimate; cpu-smoke: measured on the 2-core development VM.
# A prerequisite (install, models, build_cpu_adam) never expects more than a stage that needs it, so the budget
# never skips it while letting that stage run (tests/test_install.py checks this).
declare -A EXPECT
if [ "$MODE" = gpu ]; then
  EXPECT=([install]=30 [cuda_tests]=60 [bench_output_layer]=60 [bench_reward_7b_bf16]=150
          [bench_reward_0.5b_fp32]=100 [models]=60 [build_cpu_adam]=70 [sft_zero3]=60 [sft_zero1]=55
          [sft_offload]=70 [rl_tiny]=80 [score_tiny]=40 [rl_0.5b]=150 [rl_7b_offload_step]=240
          [vllm_server_nccl]=120 [vllm_server_filesystem]=120)
else
  EXPECT=([install]=10 [cuda_tests]=30 [bench_output_layer]=10 [bench_reward_7b_bf16]=160
          [bench_reward_0.5b_fp32]=110 [models]=35 [build_cpu_adam]=75 [sft_zero3]=90 [sft_zero1]=30
          [sft_offload]=75 [rl_tiny]=50 [score_tiny]=20 [rl_0.5b]=40 [rl_7b_offload_step]=75
          [vllm_server_nccl]=120 [vllm_server_filesystem]=120)
fi
OTHER_EXPECT="${RLT_GPU_CHECK_EXPECT:-}"
for kv in ${OTHER_EXPECT//,/ }; do   # NAME=SECONDS,...: other expected times (a slower or faster card)
  n="${kv%%=*}" s="${kv#*=}"
  if [[ "$kv" == *=* && "$s" =~ ^[0-9]+$ ]] && has " ${ALL_STAGES[*]} " "$n"; then EXPECT[$n]=$s; continue; fi
  echo "gpu_check.sh: RLT_GPU_CHECK_EXPECT: '$kv': accepted NAME=SECONDS,... with NAME one of: ${ALL_STAGES[*]}" >&2
  exit 2
done
for n in "${ALL_STAGES[@]}"; do
  [ -n "${EXPECT[$n]:-}" ] || { echo "gpu_check.sh: stage $n has no expected time in EXPECT ($MODE)" >&2; exit 2; }
done
selected() { has "$SELECTED" "$1"; }
OUT="${RLT_GPU_CHECK_OUT:-$ROOT/results/gpu_check}"
case "$OUT" in /*) ;; *) OUT="$ROOT/$OUT" ;; esac   # a relative path is taken from the checkout's root
SITE="$OUT/site"
HELPER="$ROOT/scripts/gpu_check_helper.py"
STAGES="$OUT/stages.jsonl"
if [ "$MODE" = gpu ]; then BUDGET="${RLT_GPU_CHECK_BUDGET:-1500}"; else BUDGET="${RLT_GPU_CHECK_BUDGET:-5400}"; fi
LAYERS_7B="${RLT_GPU_CHECK_7B_LAYERS:-8}"
for v in "RLT_GPU_CHECK_BUDGET=$BUDGET" "RLT_GPU_CHECK_7B_LAYERS=$LAYERS_7B"; do
  case "${v#*=}" in
    ''|*[!0-9]*|0) echo "gpu_check.sh: $v: accepted a whole number >= 1 (seconds of the budget; layers)" >&2
                   exit 2 ;;
  esac
done
RESUME="${RLT_GPU_CHECK_RESUME:-0}"
case "$RESUME" in
  0|1) ;;
  *) echo "gpu_check.sh: RLT_GPU_CHECK_RESUME=$RESUME: accepted 0 (a new run) or 1 (continue the run in" \
          "the results dir)" >&2
     exit 2 ;;
esac
RESUME_FROM="${RLT_GPU_CHECK_RESUME_FROM:-}"
if [ -n "$RESUME_FROM" ]; then
  case "$RESUME_FROM" in /*) ;; *) RESUME_FROM="$ROOT/$RESUME_FROM" ;; esac
  if [ "$RESUME" != 1 ] || [ ! -f "$RESUME_FROM" ]; then
    echo "gpu_check.sh: RLT_GPU_CHECK_RESUME_FROM=$RESUME_FROM: accepted an archive file of an earlier call, with" \
         "RLT_GPU_CHECK_RESUME=1" >&2
    exit 2
  fi
fi
ARCHIVE="${RLT_GPU_CHECK_ARCHIVE:-}"   # a relative path is taken from the checkout's root, like OUT
if [ -n "$ARCHIVE" ]; then
  case "$ARCHIVE" in /*) ;; *) ARCHIVE="$ROOT/$ARCHIVE" ;; esac
  ARCHIVE="$(realpath -m -- "$ARCHIVE")"
  case "$ARCHIVE/" in
    "$(realpath -m -- "$OUT")/"*)
      echo "gpu_check.sh: RLT_GPU_CHECK_ARCHIVE=$ARCHIVE is inside the results dir $OUT; name a file elsewhere" >&2
      exit 2 ;;
  esac
  if [ -d "$ARCHIVE" ] || [ ! -d "$(dirname "$ARCHIVE")" ]; then
    echo "gpu_check.sh: RLT_GPU_CHECK_ARCHIVE=$ARCHIVE: accepted a file name (not a folder) in an existing folder" >&2
    exit 2
  fi
fi
# the results dir as one file (what a resumed call needs: not site/ or torch_extensions/), replaced whole after
# every stage, so a call killed from outside (a lent machine's time running out) still leaves what it finished
archive() {
  [ -n "$ARCHIVE" ] || return 0
  tar -czf "$ARCHIVE.part" -C "$OUT" --exclude=./site --exclude=./torch_extensions . && mv -fT "$ARCHIVE.part" "$ARCHIVE" \
    || say "could not write the archive $ARCHIVE (see the tar message above); the results dir is unchanged"
}
RUN="$(date -Iseconds)"   # this call's id in the stage records
say() { echo "[gpu_check] $(( $(date +%s) - T0 ))s | $*"; }
T0=$(date +%s)

# ---- interpreter: the first candidate with torch (and CUDA on GPU)
want_cuda=0; [ "$MODE" = gpu ] && want_cuda=1
if [ -n "${RLT_PYTHON:-}" ]; then CANDIDATES=("$RLT_PYTHON"); else CANDIDATES=("$ROOT/.venv/bin/python" python3); fi
PY=""
for cand in "${CANDIDATES[@]}"; do
  ok="$("$cand" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null)" || continue
  if [ "$want_cuda" = 0 ] || [ "$ok" = 1 ]; then PY="$(command -v "$cand")"; break; fi
done
if [ -z "$PY" ]; then
  if [ "$MODE" = gpu ]; then
    echo "gpu_check.sh: no Python with a CUDA torch among ${CANDIDATES[*]}: set RLT_PYTHON to one (on a CPU machine use --cpu-smoke)" >&2
  else
    echo "gpu_check.sh: no Python with torch among ${CANDIDATES[*]}: run scripts/setup_env.sh or set RLT_PYTHON" >&2
  fi
  exit 2
fi

# ---- a new run clears the results dir; a resumed one keeps the stages that passed there (KEPT)
mkdir -p "$OUT/logs" "$SITE"
if [ -n "$RESUME_FROM" ] && [ ! -s "$OUT/runs.jsonl" ]; then   # a fresh machine: the earlier calls' results
  tar -xzf "$RESUME_FROM" -C "$OUT" ||
    { echo "gpu_check.sh: RLT_GPU_CHECK_RESUME_FROM=$RESUME_FROM: not a readable .tgz archive" >&2; exit 2; }
  echo "[gpu_check] unpacked $RESUME_FROM into $OUT (no run was there)"
fi
KEPT=" " FAILED_BEFORE=" " EARLIER=" "
if [ "$RESUME" = 1 ]; then
  earlier="$("$PY" "$HELPER" begin --out "$OUT" --mode "$MODE" --run "$RUN" --resume)" || exit 2
  KEPT=" $(sed -n 1p <<< "$earlier") " FAILED_BEFORE=" $(sed -n 2p <<< "$earlier") "
  EARLIER="$KEPT$FAILED_BEFORE"   # every stage with a record from an earlier call
else
  "$PY" "$HELPER" begin --out "$OUT" --mode "$MODE" --run "$RUN" || exit 2
fi
kept() { has "$KEPT" "$1"; }   # passed in an earlier call
# the earlier record stays: passed, or failed/timed out and not chosen in this call
runs_now() { selected "$1" && ! kept "$1"; }
need() { selected "$1" || SELECTED+="$1 "; KEPT="${KEPT/ $1 / }"; }   # run this prerequisite in this call
if [ "$RESUME" = 1 ]; then   # prerequisites run again for the stages that run in this call (maybe on a new machine)
  for n in "${ALL_STAGES[@]}"; do
    case "$n" in install|models|build_cpu_adam) ;; *) if runs_now "$n"; then need install; break; fi ;; esac
  done
  if runs_now rl_0.5b || runs_now rl_7b_offload_step; then need models; fi
  if runs_now sft_offload || runs_now rl_7b_offload_step; then need build_cpu_adam; fi
fi

# ---- private work dir; `python` for launch.sh is this interpreter
WORK="$(mktemp -d "${TMPDIR:-/tmp}/rlt-gpu-check.XXXXXX")"
mkdir -p "$WORK/bin"
printf '#!/bin/sh\nexec "%s" "$@"\n' "$PY" > "$WORK/bin/python"
chmod +x "$WORK/bin/python"
export PATH="$WORK/bin:$PATH"
VIRTUAL_ENV="$("$PY" -c 'import sys; print(sys.prefix)')"  # launch.sh then keeps this interpreter
export VIRTUAL_ENV
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 RLT_CACHE_DIR="$WORK/cache"
# DeepSpeed's JIT ops (CPU Adam for offload; on CPU also its communication op) go to a folder this script
# owns: writable on any image, and a build cut short by a timeout leaves a lock that would block later builds.
export TORCH_EXTENSIONS_DIR="$OUT/torch_extensions"
mkdir -p "$TORCH_EXTENSIONS_DIR"; rm -f "$TORCH_EXTENSIONS_DIR"/*/lock

SAMPLER="" STAGE_PID=""
cleanup() {
  [ -n "$STAGE_PID" ] && kill -TERM "$STAGE_PID" 2>/dev/null && wait "$STAGE_PID" 2>/dev/null
  [ -n "$SAMPLER" ] && kill "$SAMPLER" 2>/dev/null && wait "$SAMPLER" 2>/dev/null
  reap
  if [ "${RLT_GPU_CHECK_KEEP:-0}" = 1 ]; then echo "[gpu_check] work dir kept: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'echo "[gpu_check] interrupted" >&2; exit 130' INT TERM

if [ "$MODE" = gpu ] && command -v nvidia-smi >/dev/null 2>&1; then
  sampler() { exec nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -lms 500; }
else
  sampler() { exec "$PY" "$HELPER" sample-host-memory; }
fi
# after a timeout or an interrupt: anything still running with this run's work dir in its command line
reap() {
  local p; for p in $(pgrep -f -- "$WORK/" 2>/dev/null); do kill -TERM "$p" 2>/dev/null; done
  rm -f "$TORCH_EXTENSIONS_DIR"/*/lock
}

# stage NAME LIMIT_S WHAT CMD...: run CMD under `timeout` within the budget, sample memory, record the
# result. Extra `record` options for this stage go in the array REC (cleared afterwards).
REC=()
stage() {
  local name="$1" limit="$2" what="$3"; shift 3
  if kept "$name" || ! selected "$name"; then skip "$name" "$what" "not selected (RLT_GPU_CHECK_STAGES)"; return; fi
  local left=$(( BUDGET - ($(date +%s) - T0) )) need="${EXPECT[$name]}"
  if [ "$left" -lt "$need" ]; then   # would be cut short: leave it to a later call, try the next stages
    has "$EARLIER" "$name" &&
      say "$name: not run again (it takes about ${need}s, ${left}s left); its record from an earlier call stays"
    skip "$name" "$what" "not run: it takes about ${need}s, ${left}s of the ${BUDGET}s budget left"; return
  fi
  local clipped=0   # the budget, not the stage's own limit, bounds this run of it
  if [ "$limit" -gt "$left" ]; then limit=$left; clipped=1; fi
  local log="$OUT/logs/$name.log" mem="$OUT/logs/$name.mem" start rc
  say "$name: $what (limit ${limit}s, log $log)"
  sampler > "$mem" 2>/dev/null &
  SAMPLER=$!
  start=$(date +%s.%N)
  timeout --kill-after=30 "$limit" "$@" > "$log" 2>&1 &
  STAGE_PID=$!
  wait "$STAGE_PID"; rc=$?
  STAGE_PID=""
  kill "$SAMPLER" 2>/dev/null; wait "$SAMPLER" 2>/dev/null; SAMPLER=""
  local status=pass reason="" seconds
  seconds="$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN{print b - a}')"
  if { [ "$rc" = 124 ] || [ "$rc" = 137 ]; } && awk -v s="$seconds" -v l="$limit" 'BEGIN{exit !(s >= l - 1)}'; then
    reap
    if [ "$clipped" = 1 ]; then   # not a failure: the budget ran out first; a resumed call runs it again
      status=cut; reason="cut off when the budget ran out, after ${limit}s (it takes longer here than its EXPECT ${need}s); a resumed call with more budget runs it again"
    else status=timeout; reason="stopped at its ${limit}s limit"; fi
  elif [ "$rc" != 0 ]; then
    status=fail; reason="exit code $rc, see logs/$name.log"
    [ "$rc" = 137 ] && reason="killed (exit code 137) after $(printf %.0f "$seconds")s, before its limit: out of memory? see logs/$name.log"
  fi
  if [ "$status" = cut ] && has "$EARLIER" "$name"; then   # an earlier failure is never hidden by a cut
    say "$name: cut off by the budget after ${limit}s; its record from an earlier call stays"
    skip "$name" "$what" ""; archive; return   # skip keeps the earlier record
  fi
  "$PY" "$HELPER" record --stages "$STAGES" --stages-dir "$OUT" --run "$RUN" --name "$name" --what "$what" \
    --status "$status" --seconds "$seconds" --rc "$rc" --log "$log" \
    --mem "$mem" ${reason:+--reason "$reason"} ${REC[@]+"${REC[@]}"} ||
    "$PY" "$HELPER" record --stages "$STAGES" --stages-dir "$OUT" --run "$RUN" --name "$name" --what "$what" \
      --status fail --seconds "$seconds" --rc "$rc" --log "$log" \
      --reason "its record could not be made (the helper failed on its results; see the call's output), exit code $rc"
  REC=()
  archive
}
skip() {  # skip NAME WHAT REASON: a stage not run in this call keeps its record from an earlier call, if any
  REC=()   # (a failure is never hidden by a skip)
  if has "$EARLIER" "$1"; then "$PY" "$HELPER" keep --stages "$STAGES" --kept "$OUT/kept.jsonl" --name "$1"; return; fi
  "$PY" "$HELPER" record --stages "$STAGES" --run "$RUN" --name "$1" --what "$2" --status skip --reason "$3"
}

# ---- shapes, lengths and limits per mode (stage names stay the same in both modes)
SMOKE=""
if [ "$MODE" = gpu ]; then
  PREC=(bf16=true); STEPS=2
  MID_SHAPE=0.5b; MID_RUN=(train_batch_size=32 per_device_train_batch_size=8 num_generations=8 max_completion_length=512
                           gradient_checkpointing=true reward_micro_batch_size=8 offload_untrained_models=true)
  BIG_SHAPE=7b; BIG_LAYERS=$LAYERS_7B; BIG_TOKENS=4096
  # the two 7B-shape models in fp32 and the oracle's copies nearly fill an 80 GB card: no fragmentation headroom lost
  BENCH_ENV=(env "PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}")
  DEV=cuda; BENCH_BIG=(--shape 7b --dtype bfloat16 --also-backend fused); BENCH_MID=(--shape 0.5b --dtype float32 --also-backend fused)
  BENCH_HEAD=(--shape 7b --dtype bfloat16 --rows 4096,32768 --backends rowchunk,fused --fused-tiles sweep)
  L_INSTALL=240 L_TESTS=180 L_MODELS=300 L_SFT=240 L_RL=300 L_RL_MID=420 L_BENCH=420 L_BIG=600 L_VLLM=420
else
  PREC=(bf16=false); STEPS=1
  MID_SHAPE=tiny; MID_RUN=(max_completion_length=32 reward_micro_batch_size=8)
  BIG_SHAPE=tiny; BIG_LAYERS=1; BIG_TOKENS=64
  BENCH_ENV=(env)
  DEV=cpu; BENCH_BIG=(--shape tiny --dtype bfloat16 --quick); BENCH_MID=(--shape tiny --dtype float32 --quick)
  BENCH_HEAD=(--shape bench --dtype float32 --rows 256 --backends online,rowchunk)
  L_INSTALL=300 L_TESTS=300 L_MODELS=600 L_SFT=900 L_RL=900 L_RL_MID=900 L_BENCH=900 L_BIG=900 L_VLLM=900
  SMOKE=" [cpu-smoke: tiny shapes]"
fi
M="$WORK/models"
RL_CFG=cfgs/run_cfg/tiny_teacher_rlt.yaml
SFT_CFG=cfgs/run_cfg/tiny_teacher_sft.yaml
NO_SAVE=(save_strategy=no save_final_model=false logging_prob=0 save_completions_probability=0)

resumed=""; [ "$RESUME" = 1 ] && resumed=", resumed (kept from earlier calls:${KEPT% })"
say "mode $MODE, python $PY, results in $OUT, budget ${BUDGET}s$resumed"
stage install "$L_INSTALL" "missing packages into results/gpu_check/site (never torch)" \
  "$PY" "$HELPER" install --site "$SITE" ${RLT_WHEELS:+--wheels "$RLT_WHEELS"}
"$PY" "$HELPER" environment --runs "$OUT/runs.jsonl" > "$OUT/environment.json" 2>> "$OUT/logs/install.log" || echo "{}" > "$OUT/environment.json"
GPUS="$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1])).get("gpus", 0))' "$OUT/environment.json" 2>/dev/null || echo 0)"

if [ "$MODE" = gpu ] && ! "$PY" -c 'import pytest' >/dev/null 2>&1; then
  skip cuda_tests "the CUDA-only tests: pytest -m cuda" "pytest is not installed in $PY (pip install pytest to run them)"
elif [ "$MODE" = gpu ]; then
  stage cuda_tests "$L_TESTS" "the CUDA-only tests: pytest -m cuda (varlen kernel, float32 logits, packed = per sequence, fused kernel)" \
    "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/test_logprobs.py tests/test_fused_logprobs.py \
      tests/test_teacher_grpo.py
else
  skip cuda_tests "the CUDA-only tests: pytest -m cuda" "no CUDA device (--cpu-smoke)"
fi

REC=(--head-bench "$OUT/bench_output_layer.json")
stage bench_output_layer "$L_TESTS" "output layer alone: rowchunk vs fused kernel (and its other launch configurations) vs bare GEMM, max |diff| <= 1e-3$SMOKE" \
  "${BENCH_ENV[@]}" "$PY" scripts/bench_output_layer.py --device "$DEV" "${BENCH_HEAD[@]}" --out "$OUT/bench_output_layer.json"
REC=(--bench "$OUT/bench_7b_bf16.json")
stage bench_reward_7b_bf16 "$L_BENCH" "reward at 7B shape, bf16: rlt vs per-sample oracle vs floor$SMOKE" \
  "${BENCH_ENV[@]}" "$PY" scripts/bench_reward.py --device "$DEV" "${BENCH_BIG[@]}" --out "$OUT/bench_7b_bf16.json"
REC=(--bench "$OUT/bench_0.5b_fp32.json" --max-abs-diff 1e-5)
stage bench_reward_0.5b_fp32 "$L_BENCH" "reward at 0.5B shape, fp32: max |rlt - oracle| <= 1e-5$SMOKE" \
  "${BENCH_ENV[@]}" "$PY" scripts/bench_reward.py --device "$DEV" "${BENCH_MID[@]}" --out "$OUT/bench_0.5b_fp32.json"

stage models "$L_MODELS" "random models: $MID_SHAPE teacher + student, $BIG_SHAPE widths with $BIG_LAYERS layer(s)" \
  bash -c 'set -e; "$0" -m rlt.testing.tiny_model "$1/mid_teacher" --seed 0 --shape "$2" --dtype bfloat16 --device "$6"
           "$0" -m rlt.testing.tiny_model "$1/mid_student" --seed 1 --shape "$2" --dtype bfloat16 --device "$6"
           "$0" "$3" build-model "$1/big" --seed 2 --shape "$4" --layers "$5" --dtype bfloat16 --device "$6"' \
  "$PY" "$M" "$MID_SHAPE" "$HELPER" "$BIG_SHAPE" "$BIG_LAYERS" "$DEV"

stage build_cpu_adam "$L_TESTS" "DeepSpeed's CPU Adam op (JIT build, once per machine), used by the offload stages" \
  "$PY" "$HELPER" build-cpu-adam

for ds in zero3 zero1 offload; do
  flag=(); [ "$ds" = zero3 ] || flag=("$ds")
  stage "sft_$ds" "$L_SFT" "teacher SFT, tiny, ./launch.sh 1 ($ds), ${PREC[*]}" \
    ./launch.sh 1 "$SFT_CFG" "output_dir=$WORK/sft_$ds" "max_steps=$STEPS" "${PREC[@]}" ${flag[@]+"${flag[@]}"}
done

REC=(--rl)
stage rl_tiny "$L_RL" "teacher RL, tiny, ./launch.sh 1, in-process generation, ${PREC[*]}" \
  ./launch.sh 1 "$RL_CFG" "output_dir=$WORK/rl_tiny" "max_steps=$STEPS" "${PREC[@]}" "${NO_SAVE[@]}"
stage score_tiny "$L_SFT" "python -m rlt.score, tiny teacher + student, 8 rows, device=$DEV (the reward's $DEV path)" \
  bash -c 'set -eo pipefail; "$0" "$1" score-input "$2/score_in.jsonl" 8
           "$0" -m rlt.score teacher=rlt-tiny:0 student=rlt-tiny:1 input="$2/score_in.jsonl" \
             output="$2/score_out.jsonl" device="$3" 2>&1 | tee "$2/score.log"
           grep -q "student rlt-tiny:1 on $3\$" "$2/score.log" && test "$(wc -l < "$2/score_out.jsonl")" -eq 8' \
  "$PY" "$HELPER" "$WORK" "$DEV"

REC=(--rl)
stage rl_0.5b "$L_RL_MID" "teacher RL, 0.5B shape, ZeRO-3, in-process generation, ${PREC[*]}$SMOKE" \
  ./launch.sh 1 "$RL_CFG" "output_dir=$WORK/rl_mid" "model_name_or_path=$M/mid_teacher" \
  "student_model=$M/mid_student" "max_steps=$STEPS" "${PREC[@]}" "${MID_RUN[@]}" "${NO_SAVE[@]}"

REC=(--rl)
stage rl_7b_offload_step "$L_BIG" "one RL step, 7B widths with $BIG_LAYERS layer(s), offload, $BIG_TOKENS-token completions$SMOKE" \
  ./launch.sh 1 "$RL_CFG" "output_dir=$WORK/rl_big" "model_name_or_path=$M/big" "student_model=$M/big" max_steps=1 \
  "${PREC[@]}" gradient_checkpointing=true train_batch_size=2 per_device_train_batch_size=1 num_generations=2 \
  "max_completion_length=$BIG_TOKENS" reward_micro_batch_size=2 offload_untrained_models=true "${NO_SAVE[@]}" offload

why=""
"$PY" -c 'import vllm' >/dev/null 2>&1 || why="vllm is not importable in $PY"
if [ "$GPUS" -lt 2 ]; then why="${why:+$why; }$GPUS GPU(s) visible, the server stages need >= 2 (server + trainer)"; fi
for sync in nccl filesystem; do
  what="./launch_with_server.sh 1 1, tiny, vllm_weight_sync=$sync"
  if selected "vllm_server_$sync" && [ -n "$why" ]; then skip "vllm_server_$sync" "$what" "$why"; continue; fi
  REC=(--rl)
  stage "vllm_server_$sync" "$L_VLLM" "$what" \
    ./launch_with_server.sh 1 1 "$RL_CFG" "output_dir=$WORK/vllm_$sync" "max_steps=$STEPS" "${PREC[@]}" \
    "vllm_weight_sync=$sync" "${NO_SAVE[@]}"
done

"$PY" "$HELPER" summary --stages "$STAGES" --env "$OUT/environment.json" --out "$OUT" --mode "$MODE" \
  --budget "$BUDGET" --total "$(( $(date +%s) - T0 ))"
archive
"$PY" -c 'import json,sys; sys.exit(0 if json.load(open(sys.argv[1]))["passed"] else 1)' "$OUT/summary.json"
