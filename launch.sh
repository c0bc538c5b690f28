#!/usr/bin/env bash
# Train with accelerate + DeepSpeed on one node.
#   ./launch.sh NUM_PROCESSES RUN_CFG [hydra overrides...] [offload|zero1]
# RUN_CFG: cfgs/run_cfg/X.yaml or X. Default ZeRO-3; `zero1` for ZeRO-1;
# `offload` for ZeRO-3 with CPU offload. Without CUDA the same DeepSpeed path
# runs on CPU processes (gloo) with mixed precision off. Exit code = trainer's.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [ $# -lt 2 ]; then
  echo "usage: $0 NUM_PROCESSES RUN_CFG [key=value ...] [offload|zero1]" >&2
  exit 2
fi
NPROC="$1"; RUN="$2"; shift 2
RUN_NAME="$(basename "$RUN" .yaml)"
[ -f "$ROOT/cfgs/run_cfg/$RUN_NAME.yaml" ] || { echo "launch.sh: no run config $ROOT/cfgs/run_cfg/$RUN_NAME.yaml" >&2; exit 2; }

DS=zero3; OVERRIDES=()
for a in "$@"; do
  case "$a" in
    offload) DS=zero3_offload ;;
    zero1) DS=zero1 ;;
    *) OVERRIDES+=("$a") ;;
  esac
done

if [ -z "${VIRTUAL_ENV:-}" ] && [ -x "$ROOT/.venv/bin/python" ]; then PATH="$ROOT/.venv/bin:$PATH"; fi
PY=python
PORT="$($PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
EXTRA=()
if [ "$($PY -c 'import torch; print(int(torch.cuda.is_available()))')" = 0 ]; then
  EXTRA+=(--mixed_precision no)
  export RLT_CPU=1
fi
echo "[launch] $NPROC process(es), run_cfg=$RUN_NAME, deepspeed=$DS, port=$PORT"
set +e
$PY -m accelerate.commands.launch --config_file "$ROOT/cfgs/accelerate/deepspeed.yaml" \
  --deepspeed_config_file "$ROOT/cfgs/deepspeed/$DS.json" \
  --num_processes "$NPROC" --main_process_port "$PORT" "${EXTRA[@]}" \
  -m rlt.train "run_cfg@_global_=$RUN_NAME" "${OVERRIDES[@]}"
rc=$?
exit $rc
