#!/usr/bin/env bash
# Stage 2 of the shipped XLSRs: a second one-cycle run of the same length for all four, started from the
# stage-1 weights (weights/stage1/), twins again with identical recipes. Run on the GPU machine:
#   bash scripts/finetune_stage2.sh .data weights
set -euo pipefail
data=$1 out=$2
common=(--arch xlsr --batch-size 32 --lr-patch 32 --max-lr 1e-3 --val-every 2000 --checkpoint-every 4000
        --train-dirs "$data/T91" "$data/BSD200" --val-dir "$data/Set5" --scale 3 --steps "${STEPS:-16000}")
export OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
python3 -m sr train "${common[@]}" --final-activation relu --init "$out/stage1/xlsr-relu.safetensors" --out "$out/xlsr-relu.safetensors" > "$out/xlsr-relu.log" 2>&1 &
python3 -m sr train "${common[@]}" --final-activation clipped_relu --init "$out/stage1/xlsr-clip.safetensors" --out "$out/xlsr-clip.safetensors" > "$out/xlsr-clip.log" 2>&1 &
python3 -m sr distill "${common[@]}" --final-activation relu --teacher "$out/teacher.safetensors" --init "$out/stage1/xlsr-relu-kd.safetensors" --out "$out/xlsr-relu-kd.safetensors" > "$out/xlsr-relu-kd.log" 2>&1 &
python3 -m sr distill "${common[@]}" --final-activation clipped_relu --teacher "$out/teacher.safetensors" --init "$out/stage1/xlsr-clip-kd.safetensors" --out "$out/xlsr-clip-kd.safetensors" > "$out/xlsr-clip-kd.log" 2>&1 &
wait
