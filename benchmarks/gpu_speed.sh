#!/usr/bin/env bash
# One H200: the speed figures of issue 9, each part into its own file under $OUT.
#
#   OUT=/tmp/out BASE=.bench_base PART=teacher bash benchmarks/gpu_speed.sh
#   OUT=/tmp/out BASE=.bench_base PART=student bash benchmarks/gpu_speed.sh
#   OUT=/tmp/out LAYERS=4 PART=loop bash benchmarks/gpu_speed.sh
#
# PART=teacher: `python -m benchmarks --full` teacher_forward (eager and compiled side by side),
#   teacher_sol, teacher_fp8 and sdpa; with BASE (a checkout of an earlier commit) the same forward of
#   that code first, for a before/after in the same session; then the GPU tests of the DiT, FP8, the
#   student's cuDNN attention and the data path.
# PART=student: student_step for every preset (small: scanned and unrolled, with and without remat,
#   remat keeping nothing or the dense layers' outputs, text attention in XLA or cuDNN; base: scanned, remat both ways) and the bridge
#   at 1024x1024; with BASE, the small preset of that code first.
# PART=loop: a full-width synthetic release (`python -m wan.synthetic`, LAYERS blocks per expert) and
#   the real loop's distill_step on it (a14b preset: small student, batch 8, 1024x1024,
#   compiled teacher), once per line of VARIANTS ("NAME FLAGS...", the student flags added to the
#   preset; default: the preset, then remat keeping the dense outputs), each into distill_step_NAME.jsonl.
# PART=open: what issue 9 still lacks, meant for one call (about 8 minutes on a fresh H100,
#   2026-12-06): the loop with the a14b preset as it is (VARIANTS), the GPU tests of its student
#   options, the loop with the low-memory student (BASELINE: remat keeping the dense outputs, blocks
#   scanned), teacher_fp8 at all 40 blocks (FP8_LAYERS; row-wise scales with and without fast
#   accumulation, the kernel time of each by kind). At most 7 files under $OUT (stderr tails in
#   errors.log), the device tool's limit being 8. Every loop run logs the SM clock and power (clocks_NAME.csv): an H100 at
#   its 700 W cap under the teacher slows its clock by up to a third, which moves timings taken
#   seconds apart.
# PART=fp8: the FP8 recipes (RECIPES: row- and tensor-wise scales, each with and without fast
#   accumulation) side by side: fp8_linear at 512^2 and 1024^2 (fp8_linear.jsonl), teacher_fp8 at LAYERS
#   blocks against the same bf16 blocks (teacher_fp8.jsonl; SM clock and power in clocks_fp8.csv), and
#   the FP8 GPU tests (gpu_tests_fp8.log). About 7 minutes on a fresh H100.
set -uo pipefail
OUT=${OUT:-/tmp/speed_out}
WORK=${WORK:-/tmp/speed}
LAYERS=${LAYERS:-4}
PART=${PART:-teacher}
mkdir -p "$OUT" "$WORK" "${ERR:-$OUT}"
export PYTHONUNBUFFERED=1
REPO=$(pwd)

if [ "$PART" = open ]; then
  # the device tool brings back at most 8 files: stderr goes to $ERR and its tails into one errors.log
  ERR=$WORK/err
  mkdir -p "$ERR"
  collect() { for f in "$ERR"/*; do [ -f "$f" ] && { echo "== $(basename "$f")"; tail -n 15 "$f"; rm -f "$f"; }; done \
    >> "$OUT/errors.log"; }
  OUT=$OUT ERR=$ERR LAYERS=$LAYERS PART=loop VARIANTS="${VARIANTS:-preset}" bash "$0"
  collect
  timeout 120 python -m pytest -q -s -m gpu -p no:cacheprovider tests/test_student.py tests/test_fp8.py \
    > "$OUT/gpu_tests.log" 2>&1
  OUT=$OUT ERR=$ERR LAYERS=$LAYERS PART=loop VARIANTS="${BASELINE:-"dots --student.remat \
--student.scan_blocks --student.remat_policy dots"}" bash "$0"
  collect
  # FP8 against bf16 at all 40 blocks (FP8_LAYERS), the default recipe and exact accumulation
  timeout 300 python -m benchmarks --full --device cuda --compile on --layers "${FP8_LAYERS:-0}" --sizes 512 1024 \
    --figures teacher_fp8 --fp8-recipes row+fast row > "$OUT/fp8.jsonl" 2> "$ERR/fp8.err"
  collect
fi

if [ "$PART" = fp8 ]; then
  RECIPES=${RECIPES:-"row row+fast tensor tensor+fast"}
  # shellcheck disable=SC2086  # $RECIPES is a list
  timeout 150 python -m benchmarks --full --device cuda --compile on --sizes 512 1024 --figures fp8_linear \
    --fp8-recipes $RECIPES > "$OUT/fp8_linear.jsonl" 2> "$WORK/fp8_linear.err"
  nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv,noheader \
    -lms 500 > "$OUT/clocks_fp8.csv" 2>&1 &
  clocks=$!
  # shellcheck disable=SC2086
  timeout 330 python -m benchmarks --full --device cuda --compile on --layers "$LAYERS" --sizes 512 1024 \
    --figures teacher_fp8 --fp8-recipes $RECIPES > "$OUT/teacher_fp8.jsonl" 2> "$WORK/teacher_fp8.err"
  kill "$clocks" 2> /dev/null
  timeout 120 python -m pytest -q -s -m gpu -p no:cacheprovider tests/test_fp8.py > "$OUT/gpu_tests_fp8.log" 2>&1
  { for f in "$WORK"/fp8_linear.err "$WORK"/teacher_fp8.err; do echo "== $f"; tail -n 15 "$f"; done; } \
    > "$OUT/fp8_errors.log" 2>&1
fi

if [ "$PART" = teacher ]; then
  nvidia-smi > "$OUT/nvidia_smi.txt" 2>&1
  if [ -n "${BASE:-}" ]; then
    (cd "$BASE" && python -m benchmarks --full --device cuda --peak-tflops 790 --figures teacher_forward) \
      > "$OUT/teacher_base.jsonl" 2> "$OUT/teacher_base.err"
  fi
  python -m benchmarks --full --device cuda --peak-tflops 790 --figures teacher_forward teacher_sol sdpa \
    > "$OUT/teacher.jsonl" 2> "$OUT/teacher.err"
  python -m benchmarks --full --device cuda --compile on --figures teacher_fp8 fp8_linear > "$OUT/fp8.jsonl" 2> "$OUT/fp8.err"
  python -m pytest -q -s -m gpu -p no:cacheprovider tests/test_dit.py tests/test_fp8.py tests/test_student.py \
    tests/test_data_path.py > "$OUT/gpu_tests.log" 2>&1
fi

if [ "$PART" = student ]; then
  if [ -n "${BASE:-}" ]; then
    (cd "$BASE" && python -m benchmarks --full --device cuda --figures student_step --presets small --remat both) \
      > "$OUT/student_base.jsonl" 2> "$OUT/student_base.err"
  fi
  python -m benchmarks --full --device cuda --figures student_step bridge --presets tiny \
    > "$OUT/student.jsonl" 2> "$OUT/student.err"
  python -m benchmarks --full --device cuda --figures student_step --presets small --scan both --remat both \
    --remat-policy full dots --text-attention xla cudnn >> "$OUT/student.jsonl" 2>> "$OUT/student.err"
  python -m benchmarks --full --device cuda --figures student_step --presets base --remat on --remat-policy full dots \
    >> "$OUT/student.jsonl" 2>> "$OUT/student.err"
fi

if [ "$PART" = loop ]; then
  RELEASE=$WORK/release_$LAYERS  # made once per machine and layer count (a second PART=loop reuses it)
  [ -d "$RELEASE" ] || python -m wan.synthetic "$RELEASE" --layers "$LAYERS" --t5-layers 2 \
    > "${ERR:-$OUT}/synthetic.json" 2> "${ERR:-$OUT}/synthetic.err"
  printf '%s\n' "a red circle on a blue background" "two green squares on white" "a yellow triangle above a grey line" \
    "a cat walks on the grass" "a small white star in the corner" "three purple dots in a row" \
    "an orange square under a black circle" "a blue line across a red field" > "$WORK/prompts.txt"
  printf '%s\n' "a green circle on a yellow background" "two red triangles" > "$WORK/eval_prompts.txt"
  # one variant per line: a name, then the student flags it adds to the a14b preset
  VARIANTS=${VARIANTS:-"preset
dots --student.remat --student.scan_blocks --student.remat_policy dots"}
  while read -r name flags; do
    [ -n "$name" ] || continue
    # the SM clock and power while it runs (does the chip slow down under the loop's sustained load?)
    nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv,noheader \
      -lms 500 > "${ERR:-$OUT}/clocks_$name.csv" 2>&1 &
    clocks=$!
    # the bridge figure in a process of its own: after it in the same process, the loop's student step ran
    # out of JAX memory on an H100 (40% of 80 GB; allocating 20.7 GiB, 2026-12-06)
    python -m benchmarks --device cuda --full --figures bridge < /dev/null > "$OUT/distill_step_$name.jsonl" \
      2> "${ERR:-$OUT}/bridge_$name.err"
    # shellcheck disable=SC2086  # $flags is a list of flags
    python -m benchmarks --device cuda --full --figures distill_step --iters 6 --warmup 2 -- \
      --preset a14b --teacher_path "$RELEASE" --teacher_on_cpu --data.prompts "$WORK/prompts.txt" \
      --data.eval_prompts "$WORK/eval_prompts.txt" --data.gen_steps 2 --data.samples_per_prompt 1 \
      --train.sample_every 0 --train.steps 100 --data.cache_dir "$WORK/cache" $flags \
      < /dev/null >> "$OUT/distill_step_$name.jsonl" 2> "${ERR:-$OUT}/distill_step_$name.err"  # stdin: the variants
    kill "$clocks" 2> /dev/null
  done <<< "$VARIANTS"
fi
exit 0
