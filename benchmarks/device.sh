#!/usr/bin/env bash
# Every GPU measurement in one call (under 8 minutes: 150 + 230 + 2 x 50 s at worst) on a lent, bare GPU
# machine with no network,
# whose image holds torch, timm, scikit-learn and onnxruntime but not this package:
#   1. what the numbers depend on (GPU, driver, versions);
#   2. benchmarks/gpu.py (results saved after each section, so a run cut short keeps what it measured), then
#      benchmarks/trainer.py (our trainer against timm's train.py, carried as benchmarks/timm_train.py);
#   3. the trainer's CUDA paths, which the CPU tests cannot reach (nfnet_hub_nano on digits): fp16 AMP
#      with its grad scaler and AGC after unscaling, then DDP over NCCL under torchrun with bf16 and
#      gradient accumulation (FSDP needs two ranks, and NCCL two GPUs).
# Results and the log go to $OUT (the folder a device call brings back), else to benchmarks/results.
# Back here: copy gpu.json and trainer.json into benchmarks/results/ and run `python benchmarks/report.py`.
# ONNX Runtime's CUDA provider needs onnxruntime-gpu: where the image lacks it, gpu.py records the
# ONNX part as skipped and measures the rest.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results}
python=${PYTHON:-python3}
runs=$(mktemp -d)
trap 'rm -rf "$runs"' EXIT
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

train() {  # name, launcher, trainer options: prints the run's last log lines and its summary
    local name=$1 launcher=$2 options=$3
    echo "== trainer on CUDA: $name"
    # shellcheck disable=SC2086  # launcher and options are word lists
    timeout 50 $launcher -m nfnet_hub.cli train --model nfnet_hub_nano --dataset digits --epochs 4 \
        --batch-size 64 --lr 0.2 --warmup-epochs 1 --clip-grad 0.02 --clip-mode agc --no-progress \
        --log-interval 0 --output "$runs" --experiment "$name" $options 2>&1 | tail -n 6
    echo "exit ${PIPESTATUS[0]}"
    cat "$runs/$name/summary.csv" 2>/dev/null
}

torchrun="$python -m torch.distributed.run --standalone --nproc_per_node 1"
{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
    "$python" -c 'import sys, torch, timm, onnxruntime as ort
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "timm", timm.__version__, "onnxruntime", ort.__version__, ort.get_available_providers())'
    timeout 150 "$python" benchmarks/gpu.py --results "$out" --budget-s 120 "$@"
    echo "gpu.py exit $?"
    # our trainer against timm's train.py (carried as benchmarks/timm_train.py: run(carry=[...]))
    timeout 230 "$python" benchmarks/trainer.py --results "$out" --timeout-s 65 --repeats 2
    echo "trainer.py exit $?"
    train amp-fp16 "$python" "--amp --amp-dtype float16 --channels-last --model-ema --model-ema-decay 0.9"
    train ddp-nccl-bf16 "$torchrun" "--amp --amp-dtype bfloat16 --grad-accum-steps 2"
} 2>&1 | tee "$out/gpu.log"
