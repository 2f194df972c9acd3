#!/usr/bin/env bash
# One prepared GPU check (issue #21, ≤ 8 min on an H100): the CUDA tests of the engine and the Triton kernels, the
# kernel bench, the speed bench at LLaVA-1.5-7B and LLaVA-NeXT-7B dims with random weights in bf16, and the batch-8
# workload at LLaVA-NeXT-7B dims (eval/workload_bench.py).
# Results land in eval/results/ (file names carry the device) and, on the lent machine, are copied to $OUT.
#   bash eval/gpu_check.sh            # needs a CUDA torch in the active Python (the lock's torch is the CPU build)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check.sh: no CUDA device visible to torch')"
GPU=$($PY -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '-'))")
echo "device: $GPU"
$PY -m pytest -q tests_gpu tests/test_kernels.py -p no:cacheprovider 2>&1 | tee "eval/results/gpu_check_tests_$GPU.txt"
$PY eval/kernel_bench.py
METHODS="random pool cls_attn visionzip divprune fastv:layer=2 atp:heads=None h2o"
timeout 150 $PY eval/speed_bench.py --dims llava-1.5-7b --device cuda --dtype bfloat16 --methods $METHODS \
  --budgets 0.2 --repeats 3 --new-tokens 32 --out "speed_llava-1.5-7b_$GPU"
timeout 180 $PY eval/speed_bench.py --dims llava-next-7b --device cuda --dtype bfloat16 \
  --methods random pool cls_attn fastv:layer=2 h2o --budgets 0.2 --repeats 3 --new-tokens 32 --out "speed_llava-next-7b_$GPU"
timeout 150 $PY eval/workload_bench.py --dims llava-next-7b --device cuda --dtype bfloat16 \
  --methods cls_attn fastv:layer=2 mustdrop_llm h2o --out "workload_llava-next-7b_$GPU" || true
if [ -n "${OUT:-}" ]; then cp eval/results/*"$GPU"* "$OUT"/ 2>/dev/null || true; fi
