#!/usr/bin/env bash
# Every stage of a LIBERO preset, a few iterations each on a small slice, on one GPU; prints
# per-stage time and GPU memory (see benchmarks/gpu_check.py). Run from the repository root of
# an installed checkout (.venv from the README):
#   bash benchmarks/gpu_check.sh [preset (libero_goal)] [workdir] [more gpu_check.py flags]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
  || echo "nvidia-smi not found: no NVIDIA GPU visible, the check runs on the CPU"
PRESET=${1:-libero_goal}
WORK=${2:-}
shift $(( $# > 2 ? 2 : $# ))
exec "$PY" benchmarks/gpu_check.py --preset "$PRESET" ${WORK:+--work "$WORK"} "$@"
