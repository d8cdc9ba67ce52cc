#!/usr/bin/env bash
# One GPU standing for an 80 GB card: the real train.py loop on a full-width synthetic A14B release.
#
#   OUT=/tmp/out LAYERS=20 STEPS=24 bash benchmarks/gpu_80gb.sh
#
# Builds the release (both experts at A14B width with LAYERS blocks each, umT5 at full width with 2
# blocks, the real-size VAE) with `python -m wan.synthetic`, then runs the README's 1-GPU command
# (one expert resident, umT5 on the CPU, remat student, expert-phased batches) capped at 80 GB with
# --train.gpu_memory_gb 80 (torch and JAX together), 1024x1024, the `small` student. Each part
# writes its own file under $OUT: synthetic.json, train.log, summary.json, metrics.jsonl, the grid.
set -uo pipefail
OUT=${OUT:-/tmp/wan_80gb_out}
LAYERS=${LAYERS:-20}
STEPS=${STEPS:-24}
WORK=${WORK:-/tmp/wan_80gb}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1

if [ ! -f "$WORK/release/config_synthetic_t2v.json" ]; then
  python -m wan.synthetic "$WORK/release" --layers "$LAYERS" --t5-layers 2 \
    > "$OUT/synthetic.json" 2> "$OUT/synthetic.err"
fi
printf '%s\n' "a red circle on a blue background" "two green squares on white" "a yellow triangle above a grey line" \
  "a cat walks on the grass" "a small white star in the corner" "three purple dots in a row" \
  "an orange square under a black circle" "a blue line across a red field" > "$WORK/prompts.txt"
printf '%s\n' "a green circle on a yellow background" "two red triangles" "a white square in the corner" \
  "a grey star above a blue line" > "$WORK/eval_prompts.txt"

python train.py --preset a14b --teacher_path "$WORK/release" --teacher.offload --teacher_on_cpu \
  --train.gpu_memory_gb 80 --data.prompts "$WORK/prompts.txt" --data.eval_prompts "$WORK/eval_prompts.txt" \
  --data.gen_steps 4 --train.steps "$STEPS" --train.log_every 4 --train.eval_every "$STEPS" \
  --train.sample_every "$STEPS" --ckpt.every "$STEPS" --workdir "$WORK/run" --data.cache_dir "$WORK/cache" \
  > "$OUT/train.log" 2>&1
echo "train.py exit $?" >> "$OUT/train.log"
cp "$WORK/run/summary.json" "$WORK/run/metrics.jsonl" "$OUT/" 2>/dev/null
cp "$WORK/run/samples/"*.png "$OUT/" 2>/dev/null
exit 0
