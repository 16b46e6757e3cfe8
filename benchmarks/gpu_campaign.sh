#!/usr/bin/env bash
# The measurements behind the README's "Measured" table, as run on a lent NVIDIA H100/H200 through MLX's CUDA
# backend (see ../shared/gpu/README.md for staging MLX there). One section per call, each under 10 minutes:
#   bash benchmarks/gpu_campaign.sh transformer   # every switch, compiled, int8/int4, CFG step, diffusers + mflux
#   bash benchmarks/gpu_campaign.sh pipeline      # a whole 20-step 1024x1024 CFG generation vs diffusers; VAE; text
#   bash benchmarks/gpu_campaign.sh both          # the first two in one call, quantized variants left out
#   bash benchmarks/gpu_campaign.sh memory        # the generation with eval every 10 / 5 blocks, or a memory limit
#   bash benchmarks/gpu_campaign.sh training      # the embedded demo model trained from scratch on the GPU
#   bash benchmarks/gpu_campaign.sh training_wide # the same, 6 heads wide (resumable across calls)
#   bash benchmarks/gpu_campaign.sh restructure   # before/after a change: the transformer forward (with mflux) and the
#                                                 # whole generation (with diffusers), the older tree in .before/
#   bash benchmarks/gpu_campaign.sh fast          # 8 and 4 Lightning steps, CFG off, a rank-64 LoRA fused, vs diffusers
#   bash benchmarks/gpu_campaign.sh fast_variants # the same without the LoRA, and quantized (merged or adapters)
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
  training)  # each stage stops after 3.3 minutes (the transformer did, at step 3341 of 3500), so all fits one call
    start=$(date +%s)
    timeout 465 "$py" training/train_demo.py --fresh --run /tmp/demo_run --out /tmp/demo_gpu \
      --curves "$out/demo_training_curves.png" --steps 3500 --max-minutes 3.3 2>&1 | tr '\r' '\n' \
      | grep -v "step/s\]$" > "$out/training.log"
    tail -12 "$out/training.log"
    echo "training wall time $(( $(date +%s) - start )) s"
    tar -cf "$out/demo.tar" -C /tmp demo_gpu  # the checkpoint folder (bfloat16, ~9 MB): untar it into assets/
    cp /tmp/demo_run/held_out_grid.png "$out/"
    ;;
  training_wide)  # the demo model with a 1.5x wider transformer (6 heads of 32: 18 MB in bfloat16), the shapes' next try;
    # resumable: each call trains until its limit (checkpoints every 100 steps in /tmp/demo_wide, kept while the
    # machine stays warm); repeat the call until it prints "wrote", then untar demo.tar into assets/
    timeout 570 "$py" training/train_demo.py --run /tmp/demo_wide --out /tmp/demo_wide_out --heads 6 --steps 3500 \
      --curves "$out/demo_training_curves.png" --samples "$out/demo_samples.png" --max-minutes 8.5 2>&1 \
      | tr '\r' '\n' | grep -v "step/s\]$" > "$out/training_wide.log"
    tail -8 "$out/training_wide.log"
    [ -d /tmp/demo_wide_out ] && tar -cf "$out/demo.tar" -C /tmp demo_wide_out
    ;;
  restructure)  # .before/qwen_nb_before (the old package, renamed) and .before/tree (the old tree, as it was)
    timeout 200 "$py" benchmarks/bench_vs_mflux.py --layers 60 --side 1024 --txt 128 --repeats 7 --before .before \
      --name transformer_before_after_h200 2>&1 | tee "$out/before_after.log" | tail -8
    mkdir -p "$out/after" "$out/before"
    QWEN_NB_BENCH_OUT="$out/after" timeout 240 "$py" benchmarks/bench_pipeline.py --peer-python "$py" --timeout 220 \
      2>&1 | tail -4
    bash "$0" before_pipeline
    bash "$0" kernels
    rm -rf "$out"/*/pipeline_images
    ;;
  before_pipeline)  # the whole generation as the older tree ran it
    mkdir -p "$out/before"
    (cd .before/tree && PYTHONPATH="$PWD:$PYTHONPATH" QWEN_NB_BENCH_OUT="$out/before" timeout 150 "$py" \
      benchmarks/bench_pipeline.py --no-peer --timeout 140 2>&1 | tail -3)
    rm -rf "$out"/before/pipeline_images
    ;;
  kernels)  # the GPU-only tests (the QK-norm + RoPE kernel); the image has pytest but not nbval
    timeout 60 "$py" -m pytest -q -p no:cacheprovider -o addopts="" tests/test_kernels.py 2>&1 | tail -4
    ;;
  fast)
    for n in 8 4; do
      timeout 270 "$py" benchmarks/bench_pipeline.py --fast $n --lora-rank 64 --peer-python "$py" --timeout 250 \
        --name pipeline_fast${n}_lora64_h200 2>&1 | tail -3
    done
    rm -rf "$out"/*_images
    ;;
  fast_variants)
    timeout 100 "$py" benchmarks/bench_pipeline.py --fast 8 --no-peer --timeout 90 --name pipeline_fast8_h200 2>&1 | tail -2
    for q in "--quantize 8" "--quantize 8 --lora-adapters" "--quantize 4" "--quantize 4 --lora-adapters"; do
      name=pipeline_fast8_lora64_q${q//[^0-9a-z]/}_h200
      timeout 110 "$py" benchmarks/bench_pipeline.py --fast 8 --lora-rank 64 $q --timeout 100 --name $name 2>&1 | tail -2
    done
    rm -rf "$out"/*_images "$out"/*.png  # the JSON reports only: at most 8 files come back
    ;;
  quantized_lora)  # 8 steps + a rank-64 LoRA on an 8- and a 4-bit transformer: merged before quantizing, or adapters
    for q in "--quantize 8" "--quantize 8 --lora-adapters" "--quantize 4" "--quantize 4 --lora-adapters"; do
      name=pipeline_fast8_lora64_q${q//[^0-9a-z]/}_h200
      timeout 145 "$py" benchmarks/bench_pipeline.py --fast 8 --lora-rank 64 $q --no-peer --timeout 140 --name $name \
        2>&1 | tail -2
    done
    rm -rf "$out"/*_images "$out"/*.png
    ;;
  quantized_merged)  # the same with the LoRA merged before quantizing (BITS=8 or 4, default both): building and
    # quantizing the random 20B model with the LoRA merged twice a run took longer than 140 s
    for b in ${BITS:-8 4}; do
      timeout 285 "$py" benchmarks/bench_pipeline.py --fast 8 --lora-rank 64 --quantize $b --no-peer --timeout 280 \
        --name pipeline_fast8_lora64_qquantize${b}_h200 2>&1 | tail -3
    done
    rm -rf "$out"/*_images "$out"/*.png
    ;;
  roofline)  # an edit step's floor: the block's matmuls and attention alone vs a whole block, three sequence lengths
    timeout 300 "$py" benchmarks/bench_roofline.py 2>&1 | tee "$out/roofline.log" | tail -8
    ;;
  qwen21)  # Qwen-Image 2.1 end to end (t2i and a condition picture, KV cache on/off) against diffusers
    timeout 560 "$py" benchmarks/bench_qwen21.py --peer-python "$py" --timeout 270 --name qwen21_h200 2>&1 \
      | tee "$out/qwen21.log" | tail -22
    rm -rf "$out"/*_images
    ;;
  edit_pipeline)  # a whole Edit-2509 edit of one and of two pictures against diffusers' QwenImageEditPlusPipeline
    timeout 580 "$py" benchmarks/bench_edit_pipeline.py --peer-python "$py" --timeout 330 --name edit_pipeline_h200 \
      --modes "sequenced,sequenced without overlap,sequenced without memory limit" \
      2>&1 | tee "$out/edit_pipeline.log" | tail -16
    rm -rf "$out"/*_images
    ;;
  *) echo "usage: gpu_campaign.sh transformer|pipeline|memory|vae|training|restructure|fast|fast_variants|quantized_lora|quantized_merged|roofline|qwen21|edit_pipeline|training_wide" >&2; exit 2 ;;
esac
