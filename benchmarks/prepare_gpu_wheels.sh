#!/usr/bin/env bash
# Fill .whl/ (kept out of git) with what benchmarks/gpu_check.sh installs on the GPU machine, which
# reaches no package registry: a DeepSpeed wheel (PyPI has only its source: built here without
# ops), pydantic and hjson for the GPU image's Python (3.12), torchao (model.float8) and xformers
# (3 MB each; whether xformers' kernels load against the image's torch is one of the checks), and
# two JPEG photographs for benchmarks/loader.py (its check ran on 2026-11-27). Run on this machine just before lending a GPU; about a minute.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
GPU_PYTHON=${GPU_PYTHON:-3.12}
mkdir -p .whl/photos
ds_version=$($PY -c 'from importlib.metadata import version; print(version("deepspeed"))')
DS_BUILD_OPS=0 $PY -m pip wheel -q --no-deps -w .whl "deepspeed==$ds_version"
$PY -m pip download -q --only-binary=:all: --python-version "$GPU_PYTHON" \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
    hjson "pydantic==$($PY -c 'from importlib.metadata import version; print(version("pydantic"))')"
$PY -m pip download -q --no-deps --only-binary=:all: --python-version "$GPU_PYTHON" \
    --platform manylinux_2_28_x86_64 -d .whl torchao==0.18.0 xformers==0.0.35
cp "$($PY -c 'import sklearn.datasets, pathlib; print(pathlib.Path(sklearn.datasets.__file__).parent / "images")')"/*.jpg .whl/photos/
ls -la .whl .whl/photos
