#!/usr/bin/env bash
# The measurements behind the README's "Measured" table, as run on a lent NVIDIA H100/H200 through MLX's CUDA
# backend (see ../shared/gpu/README.md for staging MLX there). One section per call, each under 10 minutes:
#   bash benchmarks/gpu_campaign.sh transformer   # every switch, compiled, int8/int4, CFG step, diffusers + mflux
#   bash benchmarks/gpu_campaign.sh pipeline      # a whole 20-step 1024x1024 CFG generation vs diffusers; VAE; text
#   bash benchmarks/gpu_campaign.sh both          # the first two in one call, quantized variants left out
#   bash benchmarks/gpu_campaign.sh memory        # the generation with eval every 10 / 5 blocks, or a memory limit
#   bash benchmarks/gpu_campaign.sh training      # the embedded demo model trained from scratch on the GPU
# Reports go to $OUT (or assets/bench), logs next to them.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
out="${OUT:-assets/bench}"
export QWEN_NB_BENCH_OUT="$out"
mkdir -p "$out"
py=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$out/gpu.txt"
"$py" -c "import mlx.core as mx; print('mlx', mx.__version__, mx.default_device())"

case "${1:-}" in
  transformer)
    timeout 400 "$py" benchmarks/bench_transformer.py --peers --peer-python "$py" ${TRANSFORMER_ARGS:-} 2>&1 | tee "$out/transformer.log" | tail -70
    timeout 150 "$py" benchmarks/bench_eval_placement.py 2>&1 | tee "$out/eval_placement.log" | tail -25
    ;;
  both)  # the transformer without the (slow) quantized section, then the pipeline: one call
    TRANSFORMER_ARGS="--only forward,cfg,peers" bash "$0" transformer
    timeout 330 "$py" benchmarks/bench_pipeline.py --peer-python "$py" --timeout 300 2>&1 | tee "$out/pipeline.log" | tail -30
    ;;
  pipelines)  # the whole generation, default (with diffusers beside it) and with the VAE decoded in 64-latent tiles
    mkdir -p "$out/default" "$out/tiled"
    QWEN_NB_BENCH_OUT="$out/default" timeout 300 "$py" benchmarks/bench_pipeline.py --peer-python "$py" --timeout 280 \
      2>&1 | tee "$out/default/pipeline.log" | tail -8
    QWEN_NB_BENCH_OUT="$out/tiled" timeout 200 "$py" benchmarks/bench_pipeline.py --no-peer --vae-tile 64 --timeout 180 \
      2>&1 | tee "$out/tiled/pipeline.log" | tail -8
    rm -rf "$out"/*/pipeline_images
    ;;
  memory)  # the whole generation (qwen_nb alone) with the step's in-flight activations bounded in two ways
    for v in "every10:--eval-every 10" "every5:--eval-every 5" "limit29:--memory-limit-gb 29"; do
      mkdir -p "$out/${v%%:*}"
      QWEN_NB_BENCH_OUT="$out/${v%%:*}" timeout 170 "$py" benchmarks/bench_pipeline.py --no-peer ${v#*:} --timeout 160 \
        2>&1 | tail -3
    done
    rm -rf "$out"/*/pipeline_images
    ;;
  vae)
    timeout 150 "$py" benchmarks/bench_vae.py 2>&1 | tee "$out/vae.log" | tail -20
    ;;
  pipeline)
    timeout 330 "$py" benchmarks/bench_pipeline.py --peer-python "$py" --timeout 300 2>&1 | tee "$out/pipeline.log" | tail -30
    timeout 120 "$py" benchmarks/bench_vae.py 2>&1 | tee "$out/vae.log" | tail -20
    timeout 90 "$py" benchmarks/bench_text_encoder.py --torch-python "$py" 2>&1 | tee "$out/text_encoder.log" | tail -12
    ;;
  training)
    start=$(date +%s)
    timeout 560 "$py" training/train_demo.py --fresh --run /tmp/demo_run --out /tmp/demo_gpu \
      --curves "$out/demo_gpu_curves.png" --samples "$out/demo_gpu_samples.png" 2>&1 | tr '\r' '\n' \
      | grep -v "step/s\]$" | tee "$out/training.log" | tail -30
    echo "training wall time $(( $(date +%s) - start )) s"
    du -sh /tmp/demo_gpu  # the checkpoint stays on the machine; the curves, samples and log come back
    ;;
  *) echo "usage: gpu_campaign.sh transformer|pipeline|training" >&2; exit 2 ;;
esac
