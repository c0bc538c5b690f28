#!/usr/bin/env bash
# Train with accelerate + DeepSpeed on one node.
#   ./launch.sh NUM_PROCESSES RECIPE [hydra overrides...] [offload|zero1]
# RECIPE: a name in cfgs/run_cfg (X) or any .yaml file. Default ZeRO-3; `zero1` for ZeRO-1;
# `offload` for ZeRO-3 with CPU offload. Without CUDA the same DeepSpeed path
# runs on CPU processes (gloo) with mixed precision off. The settings and the
# data are checked in one process before any rank starts (a bad key or row is
# one line on stderr, exit code 2). Exit code = trainer's.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [ $# -lt 2 ]; then
  echo "usage: $0 NUM_PROCESSES RECIPE [key=value ...] [offload|zero1]" >&2
  exit 2
fi
NPROC="$1"; RUN="$2"; shift 2
case "$NPROC" in ''|*[!0-9]*|0) echo "launch.sh: NUM_PROCESSES must be a positive integer, got '$NPROC'" >&2; exit 2 ;; esac

DS=zero3; FLAG=; OVERRIDES=()
for a in "$@"; do
  case "$a" in
    offload|zero1)
      if [ -n "$FLAG" ] && [ "$FLAG" != "$a" ]; then
        echo "launch.sh: error: $FLAG and $a exclude each other: give at most one of offload|zero1" >&2; exit 2
      fi
      FLAG="$a"; if [ "$a" = offload ]; then DS=zero3_offload; else DS=zero1; fi ;;
    *=*|~*) OVERRIDES+=("$a") ;;
    *) echo "launch.sh: error: unexpected argument '$a': give key=value overrides and at most one of offload|zero1" >&2
       exit 2 ;;
  esac
done

if [ -z "${VIRTUAL_ENV:-}" ] && [ -x "$ROOT/.venv/bin/python" ]; then PATH="$ROOT/.venv/bin:$PATH"; fi
PY=python
# A cluster launcher's variables (a pod's RANK, torchrun's PET_*) would reach this single-node run: the check
# would run as a non-main rank (its errors unprinted) and torchrun would wait for nodes that never come.
DROPPED=()
for v in $(compgen -e); do
  case "$v" in RANK|LOCAL_RANK|WORLD_SIZE|LOCAL_WORLD_SIZE|GROUP_RANK|ROLE_RANK|NODE_RANK|MASTER_ADDR|MASTER_PORT|PET_*|TORCHELASTIC_*)
    DROPPED+=("$v"); unset "$v" ;;
  esac
done
[ ${#DROPPED[@]} -eq 0 ] || echo "[launch] a single-node run: ignoring the environment's ${DROPPED[*]}"
PORT="$($PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
# Precision is the run config's bf16/fp16 (the trainer fills the DeepSpeed json's "auto"); accelerate's
# own setting stays "no" and on the command line: from its config file it is refused next to a DeepSpeed json.
EXTRA=(--mixed_precision no)
if [ "$($PY -c 'import torch; print(int(torch.cuda.is_available()))')" = 0 ]; then
  export RLT_CPU=1
fi
# DeepSpeed compiles its ops once per environment, not in a cache shared by every checkout.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$($PY -c 'import sys; print(sys.prefix)')/torch_extensions}"
if [ -n "${RLT_CPU:-}" ] && ! compgen -G "$TORCH_EXTENSIONS_DIR/deepspeed_shm_comm/*.so" >/dev/null; then
  echo "[launch] first run in this environment: DeepSpeed compiles its CPU communication op into $TORCH_EXTENSIONS_DIR (once, about 2 minutes on 2 cores)"
fi
$PY -m rlt.train "$RUN" "${OVERRIDES[@]}" --check --processes "$NPROC" || exit $?
echo "[launch] $NPROC process(es), recipe=$RUN, deepspeed=$DS, port=$PORT"
# The rendezvous of a single-node run listens on loopback only. accelerate runs under rlt's process guard, in
# place of this shell (same pid): any kill of launch.sh, SIGKILL included, stops torchrun and every rank
# (each in a session of its own), and the exit code is the trainer's.
exec $PY -m rlt.procs run -- $PY -m accelerate.commands.launch --config_file "$ROOT/cfgs/accelerate/deepspeed.yaml" \
  --deepspeed_config_file "$ROOT/cfgs/deepspeed/$DS.json" \
  --num_processes "$NPROC" --main_process_ip 127.0.0.1 --main_process_port "$PORT" "${EXTRA[@]}" \
  -m rlt.train "$RUN" "${OVERRIDES[@]}"
