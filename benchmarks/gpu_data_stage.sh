#!/usr/bin/env bash
# The teacher-data stage on one GPU: full-width synthetic A14B release (LAYERS blocks per expert),
# 1024x1024, 40-step CFG samples of PROMPTS prompts (both experts resident, umT5 on the CPU).
#
#   OUT=/tmp/out LAYERS=8 PROMPTS=16 bash benchmarks/gpu_data_stage.sh
#
# Writes $OUT/synthetic.json, $OUT/data.log and $OUT/summary.json (samples/s of the stage). The time
# of a sample scales with the layer count: at the real 40 layers it is about 40 / LAYERS times longer.
set -uo pipefail
OUT=${OUT:-/tmp/wan_data_out}
LAYERS=${LAYERS:-8}
PROMPTS=${PROMPTS:-16}
WORK=${WORK:-/tmp/wan_data}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1
if [ ! -f "$WORK/release/config_synthetic_t2v.json" ]; then
  python -m wan.synthetic "$WORK/release" --layers "$LAYERS" --t5-layers 2 > "$OUT/synthetic.json" 2> "$OUT/synthetic.err"
fi
python - "$WORK" "$PROMPTS" <<'PY'
import sys
work, n = sys.argv[1], int(sys.argv[2])
shapes = ["circle", "square", "triangle", "star"]
colours = ["red", "green", "blue", "yellow", "purple", "orange"]
lines = [f"a {colours[i % 6]} {shapes[i % 4]} number {i}" for i in range(n)]
open(f"{work}/prompts.txt", "w").write("\n".join(lines) + "\n")
open(f"{work}/eval_prompts.txt", "w").write("a white circle\n")
PY
python train.py --preset a14b --teacher_path "$WORK/release" --teacher_on_cpu --stage data \
  --data.prompts "$WORK/prompts.txt" --data.eval_prompts "$WORK/eval_prompts.txt" --data.shard_size 8 \
  --workdir "$WORK/run" --data.cache_dir "$WORK/cache" > "$OUT/data.log" 2>&1
echo "train.py exit $?" >> "$OUT/data.log"
cp "$WORK/run/summary.json" "$OUT/" 2>/dev/null
exit 0
