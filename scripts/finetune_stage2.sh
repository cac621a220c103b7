#!/usr/bin/env bash
# Stage 2 of the shipped XLSRs: a second one-cycle run (16000 steps, max-lr 1e-3) for all four, started from the
# stage-1 weights, twins again with identical recipes. Stage 1 is scripts/train_shipped.py, which leaves the
# teacher and the four stage-1 XLSRs in OUT:
#   python scripts/train_shipped.py --data ../shared/data --out weights
#   bash scripts/finetune_stage2.sh ../shared/data weights
# This script moves the stage-1 results into OUT/stage1/ (where the shipped stage-2 runs read them: their metadata
# names weights/stage1/<name>.safetensors as init and weights/stage1/teacher.safetensors as teacher), trains the
# four stage-2 XLSRs into OUT, and copies the teacher back to OUT/teacher.safetensors (stage 2 trains no teacher).
# OUT/stage1/ and OUT/logs/ are working files, not shipped (.gitignore). The shipped files were made on one H200
# with DATA=.data, a copy of ../shared/data inside the checkout; weights/README.md has the exact commands.
set -euo pipefail
data=$1 out=$2
python=${PYTHON:-python3}
if [ ! -d "$out/stage1" ]; then
  mkdir -p "$out/stage1"
  for name in teacher xlsr-relu xlsr-clip xlsr-relu-kd xlsr-clip-kd; do
    mv "$out/$name.safetensors" "$out/stage1/"
  done
  mv "$out/commands.json" "$out/stage1/"
  if [ -d "$out/logs" ]; then mv "$out/logs" "$out/stage1/logs"; fi
fi
mkdir -p "$out/logs"
common=(--arch xlsr --batch-size 32 --lr-patch 32 --max-lr 1e-3 --val-every 2000 --checkpoint-every 4000
        --train-dirs "$data/T91" "$data/BSD200" --val-dir "$data/Set5" --scale 3 --steps "${STEPS:-16000}")
teacher=(--teacher "$out/stage1/teacher.safetensors")
export OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
pids=()
"$python" -m sr train "${common[@]}" --final-activation relu --init "$out/stage1/xlsr-relu.safetensors" --out "$out/xlsr-relu.safetensors" > "$out/logs/xlsr-relu.log" 2>&1 & pids+=($!)
"$python" -m sr train "${common[@]}" --final-activation clipped_relu --init "$out/stage1/xlsr-clip.safetensors" --out "$out/xlsr-clip.safetensors" > "$out/logs/xlsr-clip.log" 2>&1 & pids+=($!)
"$python" -m sr distill "${common[@]}" --final-activation relu "${teacher[@]}" --init "$out/stage1/xlsr-relu-kd.safetensors" --out "$out/xlsr-relu-kd.safetensors" > "$out/logs/xlsr-relu-kd.log" 2>&1 & pids+=($!)
"$python" -m sr distill "${common[@]}" --final-activation clipped_relu "${teacher[@]}" --init "$out/stage1/xlsr-clip-kd.safetensors" --out "$out/xlsr-clip-kd.safetensors" > "$out/logs/xlsr-clip-kd.log" 2>&1 & pids+=($!)
for pid in "${pids[@]}"; do
  wait "$pid"  # a failed job stops the script (set -e) instead of being ignored by a bare `wait`
done
cp "$out/stage1/teacher.safetensors" "$out/teacher.safetensors"
