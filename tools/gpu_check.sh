#!/usr/bin/env bash
# The GPU check in one call, from any directory: tools/gpu_check.sh OUT_DIR [--dry-run] [--budget-s N].
# Runs tools/gpu_check.py with $MRL_PYTHON (default: python3, the interpreter that has torch).
set -euo pipefail
out="${1:?usage: tools/gpu_check.sh OUT_DIR [--dry-run] [--budget-s SECONDS] [--wheels DIR]}"
shift
out="$(mkdir -p "$out" && cd "$out" && pwd)"
cd "$(dirname "$0")/.."
exec "${MRL_PYTHON:-python3}" tools/gpu_check.py --out "$out" "$@"
