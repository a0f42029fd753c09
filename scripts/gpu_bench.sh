#!/usr/bin/env bash
# The whole command for a GPU machine that has PyTorch and Triton but not diffusers (this workplace's device
# machines): install the carried wheels, lay this checkout out as installed, run the quick GPU benchmark into
# $OUT (or ./gpu-out), the report written after every section. Here, once (see accel/bench/gpu.py's docstring):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1
# then run `bash scripts/gpu_bench.sh [accel bench arguments]` there, carrying .whl (default: --gpu --quick).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-$PWD/gpu-out}"
mkdir -p "$out"
if ! python3 -c "import diffusers" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
rm -rf /tmp/pkg && mkdir -p /tmp/pkg/accel
cp -r accel/. /tmp/pkg/accel/ && cp -r kernels /tmp/pkg/accel/kernels && cp -r eval /tmp/pkg/accel/eval \
    && cp -r recipes /tmp/pkg/accel/recipes
export PYTHONPATH="/tmp/pkg${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv 2>/dev/null || true
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(--gpu --quick)
(cd /tmp && python3 -m accel bench "${args[@]}" --out "$out/GPU_BENCHMARKS.md") 2>&1 | tee "$out/log.txt"
