#!/usr/bin/env bash
# The GPU figures of issue 20, as one script for a lent GPU machine (run from the repo root; nothing in the
# project needs a GPU). It expects the agent's missing wheels in .whl/ and a copy of the ELPV cells in
# .elpv/ (labels.csv + images/, JPEG q90: the transfer limit of that machine is 64 MiB), and writes under $OUT.
set -u
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 EDGELOOP_ELPV_ROOT=$PWD/.elpv
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
nvidia-smi -L; nproc
quiet() { grep -v -i "warn"; }
# 1. the recipe, chosen on val: many runs at once (the GPU is idle for one small net; the CPU augments)
[ "${SKIP_RECIPE:-}" ] || timeout 330 python3 bench/elpv_recipe.py --jobs 28 --seeds 2 --out "$OUT/elpv_recipe.json" 2>&1 | quiet | tee "$OUT/recipe.log"
recipe=()
grep -q '"chosen"' "$OUT/elpv_recipe.json" 2>/dev/null && recipe=(--recipe "$OUT/elpv_recipe.json")
# 2. bench/train_elpv.py at full resolution (300 px) on the GPU (its test-time views are scored on the CPU)
OMP_NUM_THREADS=16 timeout 200 python3 bench/train_elpv.py "${recipe[@]}" --size 300 --device cuda --out "$OUT/train_elpv_gpu.json" 2>&1 \
  | quiet | tail -25 | tee "$OUT/train_elpv_gpu.log"
# 3. bench/scale.py's training part: 1 vs 2 processes (NCCL on a GPU, bf16)
OMP_NUM_THREADS=8 timeout 120 python3 bench/scale.py --only training --epochs 5 --out "$OUT/scale" 2>&1 | quiet | tail -30
