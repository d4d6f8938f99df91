#!/usr/bin/env bash
# One prepared GPU run (device machine): throughput / memory / MFU + a real CUDA engine run.
# Usage there: bash benchmarks/gpu_check.sh   (writes $OUT/gpu_check.json when $OUT is set)
# Carry .gpu_data (Fashion-MNIST files: mkdir -p .gpu_data && cp /usr/share/datasets/fashion-mnist/* .gpu_data/)
# and .whl (webdataset + braceexpand wheels) when the device image lacks them.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-benchmarks/results}/gpu_check.json"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
python3 benchmarks/gpu_check.py --out "$out" --budget_s 360 ${GPU_DATA:+--data_path "$GPU_DATA"} \
  $( [ -d .gpu_data ] && echo --data_path .gpu_data )
