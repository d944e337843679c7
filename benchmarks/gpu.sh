#!/usr/bin/env bash
# On a machine with a CUDA GPU: the GPU benchmark table, then the CUDA tests.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 benchmarks/gpu.py
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_satellite_encoder.py -k "cuda" -x
