#!/usr/bin/env bash
# A 7-B-shape OpenVLA-OFT with random bf16 weights on one GPU, no download: peak memory after
# load, action-chunk latency at batch 1/2/4/8 (full pass and RIPT's prefix+suffix split) and,
# with --ppo, one RIPT PPO micro-step with LoRA (see benchmarks/gpu_check_vla.py). Run from
# anywhere in a checkout; creates .venv with the VLA extra if it is missing:
#   bash benchmarks/gpu_check_vla.sh [--ppo] [--batches 1 2 4 8] [--tiny]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
if [ ! -x "$PY" ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q -e '.[vla]'
  PY=.venv/bin/python
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
  || echo "nvidia-smi not found: no NVIDIA GPU visible, the check runs on the CPU (use --tiny)"
exec "$PY" benchmarks/gpu_check_vla.py "$@"
