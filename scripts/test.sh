#!/usr/bin/env bash
# Set everything up (idempotent) and run the whole test suite on this machine.
#   scripts/test.sh [pytest args...]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh
export PATH="$ROOT/.venv/bin:$PATH" TOKENIZERS_PARALLELISM=false
exec python -m pytest -q -p no:cacheprovider --timeout=1800 tests "$@"
