#!/usr/bin/env bash
# Every GPU measurement in one call on a lent, bare GPU machine (no network; its image holds torch,
# timm and onnxruntime, not this package): prints what the numbers depend on, then runs gpu.py
# under a hard limit. Results and the log go to $OUT (the folder a device call brings back), else
# to benchmarks/results. Back here: copy gpu.json into benchmarks/results/, run benchmarks/report.py.
#
# ONNX Runtime's CUDA provider needs onnxruntime-gpu; where the image lacks it, gpu.py records the
# ONNX part as skipped and measures the rest.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results}
python=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || true
    "$python" -c 'import sys, torch, timm, onnxruntime as ort
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "timm", timm.__version__, "onnxruntime", ort.__version__, ort.get_available_providers())'
    timeout "${LIMIT_S:-450}" "$python" benchmarks/gpu.py --results "$out" "$@"
} 2>&1 | tee "$out/gpu.log"
