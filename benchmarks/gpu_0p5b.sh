#!/usr/bin/env bash
# The GPU figures for one NVIDIA H100/H200, in one run (about 10 minutes, mostly
# compilation), every figure a `python -m vosr_jax.bench` JSON record under $OUT:
#   1. the 0.5B multi-step train step (degradation, DINOv2 ViT-B, SD-2.1 VAE, denoiser, AdamW),
#      bf16, 512x512, per-device batch 8, cuDNN flash attention: step time, images/s, TFLOP/s, MFU;
#   2. the denoiser step alone (same shapes), so that 1 - denoiser / train is the share of the
#      degradation + encoders + VAE inside the step (target <= 10 %);
#   3. sampling latency, 128x128 -> 512x512, one-step and 25-step, end to end;
#   4. compile time and compiled memory of the train step (`--what=compile` / `--what=memory`).
# A command that fails (e.g. cuDNN attention not applicable) is retried with XLA attention.
#
#   OUT=bench_gpu benchmarks/gpu_0p5b.sh
# (VARIANT=tiny BIG=tiny runs the same commands on the tiny configs: a CPU check of the script.)
set -uo pipefail
OUT=${OUT:-bench_gpu}
PY=${PYTHON:-python}
VARIANT=${VARIANT:-0.5b}
BIG=${BIG:-1.4b}
mkdir -p "$OUT"
MS="--config=configs/multistep.py:$VARIANT --config.batch_size=8 --config.dtype=bfloat16"
OS="--config=configs/onestep.py:$VARIANT --config.batch_size=8 --config.dtype=bfloat16"
CUDNN="--config.model.attention=cudnn --config.encoder.attention=cudnn"
XLA="--config.model.attention=xla --config.encoder.attention=xla"

bench() {  # NAME ARGS...: one record, cuDNN attention first, XLA attention if that fails.
  local name=$1; shift
  $PY -m vosr_jax.bench "$@" $CUDNN --output="$OUT/$name.json" > "$OUT/$name.log" 2>&1 \
    || $PY -m vosr_jax.bench "$@" $XLA --output="$OUT/$name.xla.json" > "$OUT/$name.xla.log" 2>&1 \
    || echo "FAILED: $name (see $OUT/$name*.log)"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
bench train $MS --what=train --steps=10 --warmup=3
bench denoiser $MS --what=denoiser --steps=10 --warmup=3
bench train_remat $MS --what=train --steps=10 --warmup=3 --config.model.remat_policy=dots_saveable
bench sampling $MS --what=sampling --sizes=128:512 --sampling_steps=25 --steps=10 --warmup=2
bench compile $MS --what=compile --step=train
bench memory $MS --what=memory --step=train --memory_gb=80
bench memory_big --config=configs/multistep.py:$BIG --config.dtype=bfloat16 --what=memory \
  --step=train --memory_gb=80
bench distill $OS --what=distill --steps=10 --warmup=3
