#!/usr/bin/env bash
# One short GPU run: install what the GPU image lacks from .whl/ (made on the CPU machine by
# benchmarks/prepare_gpu_wheels.sh, kept out of git), then run every check in
# benchmarks/gpu_check.py. JSON results land in $OUT (numerics, bench_zoo, bench_plain, lever_*, loss_runs/,
# summary).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD"
export PYTHONUNBUFFERED=1
python3 benchmarks/gpu_check.py "$@"
