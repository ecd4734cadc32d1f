#!/usr/bin/env bash
# Time the full end-to-end demo (README Quick start) from empty run directories, and the re-run
# that only rebuilds the report. Usage: bash benchmarks/demo.sh [--executor slurm]
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf runs/demo runs/demo_transfer
start=$(date +%s)
.venv/bin/nepa-scale demo "$@" | tee /tmp/nepa_demo.log
middle=$(date +%s)
.venv/bin/nepa-scale demo "$@" > /tmp/nepa_demo_rerun.log
end=$(date +%s)
echo "demo: $((middle - start)) s from an empty runs/demo; re-run (report only): $((end - middle)) s"
echo "machine: $(nproc) cores, $(python3 -c 'import platform; print(platform.processor() or platform.machine())')"
