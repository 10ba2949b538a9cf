#!/usr/bin/env bash
# Everything a GPU session measures, in one run of under 8 minutes, tables written to $OUT:
#   1. the whole test suite on the GPU: the GPU-specific files (tests/test_gpu.py, the kernel and the triton
#      backend; 4 workers) beside the rest (10 workers), each with its own log and limit;
#   2. the kernel benchmark (eager call time and device time per shape, SDPA, FlexAttention);
#   3. the default experiment on CUDA (README's first command, logger=none);
#   4. the side-by-side benchmark on the embedded pair and on a synthetic Llama-3.1-8B-shaped target,
#      with the verify forward's T(w)/T(1) for sdpa and triton;
#   5. last (the stage to lose if time runs short): the batched table on the embedded pair (B = 4, 8:
#      our batched AR loop, chain and n-gram against HF's batched generate, per-rep ratios).
# Use: scripts/gpu_wheels.sh here once, then the device tool with carry [".whl"] and the command
#   bash scripts/gpu_check.sh
# Each stage has its own time limit and writes its log, so a slow stage costs only itself.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 SPECDEC_CACHE=/tmp/specdec-cache
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 - <<'PY' | tee "$OUT/versions.txt"
import torch, triton, transformers
print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__,
      "transformers", transformers.__version__)
PY
stage() {  # stage NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "$name: exit $? in $((SECONDS - t0)) s" | tee -a "$OUT/stages.txt"
}
# The GPU-specific tests beside the rest of the suite, each under its own limit, so a suite cut short by the
# limit still leaves the GPU tests' results (tests_gpu.log); both end before any timing starts.
GPU_TESTS=(tests/test_gpu.py tests/test_kernel_tree_attention.py tests/test_triton_backend.py)
( t0=$SECONDS; timeout 210 python3 -m pytest -q -n 4 -p no:cacheprovider -rs "${GPU_TESTS[@]}" > "$OUT/tests_gpu.log" 2>&1
  echo "tests_gpu: exit $? in $((SECONDS - t0)) s" | tee -a "$OUT/stages.txt" ) &
stage tests 210 python3 -m pytest -q -n 10 --dist loadfile -p no:cacheprovider -rs --durations=15 \
  "${GPU_TESTS[@]/#/--ignore=}"
wait
stage kernel_bench 90 python3 -m specdec_kernels.bench --dtypes bfloat16 --hkv 8 32 --prefixes 1024 4096 16384 \
  --ns 1 8 16 64 --json "$OUT/kernel_bench.json"
stage decode_default 90 python3 -m experiments.decode logger=none model.device=cuda num_prompts=5 max_new_tokens=64 \
  hydra.run.dir=/tmp/decode_default
stage bench_zoo 60 python3 -m experiments.bench --device cuda --prompts 4 --max-new-tokens 64 --ks 2,4 --reps 2 \
  --trees binary --compile graph --verify-curve --context 512 --markdown "$OUT/bench_zoo.md"
stage bench_8b 120 python3 -m experiments.bench --device cuda --synthetic llama-8b --dtype bfloat16 \
  --draft-dtype bfloat16 --prompts 2 --prompt-len 512 --max-new-tokens 32 --ks 4 --reps 1 --no-hf-dynamic \
  --trees binary --compile graph --verify-curve --context 4096 --markdown "$OUT/bench_8b.md"
stage bench_batch 75 python3 -m experiments.bench --device cuda --batch-sizes 4,8 --prompts 8 --max-new-tokens 64 \
  --ks 2,4 --reps 2 --markdown "$OUT/bench_batch.md"
cp /tmp/decode_default/summary.json "$OUT/decode_default_summary.json" 2>/dev/null
tail -n 3 "$OUT"/*.log
