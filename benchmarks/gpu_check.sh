#!/usr/bin/env bash
# One short GPU run: install what the GPU image lacks from wheels in .whl/ (built on the CPU
# machine and kept out of git; see docs/performance.md), then run benchmarks/gpu_check.py.
#   .whl/: deepspeed (DS_BUILD_OPS=0 pip wheel --no-deps deepspeed==0.19.8), hjson, pydantic,
#          pydantic-core (cp312), annotated-types, typing-inspection, typing-extensions
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD"
export PYTHONUNBUFFERED=1
python3 benchmarks/gpu_check.py
