#!/usr/bin/env bash
# Everything a GPU session measures, in calls of the device tool that fit its limits (15 minutes of device
# time per session, the machine's start included; at most 8 files come back from $OUT):
#
#   bash scripts/gpu_check.sh            # "measure", about 8 minutes:
#     1. the GPU-specific tests (tests/test_gpu.py, the kernel, the triton backend; -v: one line per test)
#        while the embedded default pair builds on the GPU;
#     2. the kernel benchmark: every shape without FlexAttention, then eager and compiled FlexAttention at
#        fewer shapes (it compiles once per shape); both write their JSON after every shape;
#     3. the default experiment on CUDA (README's first command, logger=none);
#     4. the side-by-side benchmark on the embedded pair and on a synthetic Llama-3.1-8B-shaped target
#        (eager and captured step, verify forward's T(w)/T(1) for sdpa and triton);
#     5. last (the stages to lose if time runs short): the batched table on the embedded pair, and the
#        default experiment through the captured step (compile=graph), as a user would run it.
#   bash scripts/gpu_check.sh suite      # the rest of the test suite with CUDA present (SUITE_S, default 400 s;
#                                        # on 2026-12-04 it reached 95% of 902 tests in 180 s)
#   bash scripts/gpu_check.sh final      # the kernel benchmark, then the rest of the suite
#   bash scripts/gpu_check.sh step       # the step's tests (TESTS_S), experiments.step_profile on the 8B shape
#                                        # (PROFILE_S: fused projections against not), and the 8B bench compiled
#                                        # by inductor with the kernel and fused projections (BENCH_S); about 9 min
#   bash scripts/gpu_check.sh pair       # the embedded pair's bench and default experiment compiled and
#                                        # captured with the kernel (compile=inductor attn_backend=triton),
#                                        # next to HF's static cache + torch.compile (--hf-compile)
#   bash scripts/gpu_check.sh kernel     # issue 10's open kernel figures, about 6 minutes: the kernel's tests (the
#                                        # direct launches, the fused merge), the bench with both L2 flushes
#                                        # (host column included), a sweep of the merge and split rounding
#   bash scripts/gpu_check.sh tune [TEST_ID...]  # the kernel's tests, its launch-choice sweep and bench
#                                        # (TESTS_S, 0 skips the tests; TUNE_S: the sweep of 24 shapes needs
#                                        # more than 130 s)
#
# tests/test_gpu_script.py checks on any machine that every command below parses (options, Hydra keys, test files).
# Use: scripts/gpu_wheels.sh here once, then the device tool with carry [".whl"], timeout_s 570 and one of the
# commands above (the measure stages' limits add up to 535 s, plus the wheels' install). A session's 15 minutes
# then leave about 4 for a second call (each start costs about 30 s): "suite" with SUITE_S=230.
# Each stage has its own limit and log; after every stage all logs and tables are packed into
# $OUT/gpu_check.tgz (one file: a run cut short still returns what it finished) and $OUT/stages.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-measure}
OUT=${OUT:-/tmp/gpu_check_out}
W=/tmp/gpu_check  # logs and tables, packed into $OUT after every stage (a rerun starts afresh)
rm -rf "$W" && mkdir -p "$OUT" "$W"
# The repository is not pip-installed there: it goes first on PYTHONPATH (subprocesses run from other folders).
export PYTHONUNBUFFERED=1 SPECDEC_CACHE=/tmp/specdec-cache PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
pack() {  # a whole archive replaces the last one (a log still growing in a background stage is fine)
  tar czf "$OUT/.gpu_check.tgz" -C "$W" . 2>/dev/null; mv -f "$OUT/.gpu_check.tgz" "$OUT/gpu_check.tgz"
  cp "$W/stages.txt" "$OUT/stages.txt" 2>/dev/null; true
}
run_stage() {  # run_stage NAME SECONDS COMMAND...: its output to NAME.log, its exit status and time to stages.txt
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@" > "$W/$name.log" 2>&1
  echo "$name: exit $? in $((SECONDS - t0)) s (limit $limit)" | tee -a "$W/stages.txt"
}
stage() { run_stage "$@"; pack; }  # in the foreground: packed after it
python3 - <<'PY' | tee "$W/versions.txt"
import torch, triton, transformers
print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__,
      "transformers", transformers.__version__)
PY
GPU_TESTS=(tests/test_gpu.py tests/test_kernel_tree_attention.py tests/test_kernel_edges.py tests/test_triton_backend.py)
if [ "$MODE" = tune ]; then  # the kernel's tests (plus any test ids given after "tune"), its sweep, its bench
  shift
  [ "${TESTS_S:-70}" != 0 ] && stage tests_kernel "${TESTS_S:-70}" python3 -m pytest -v -n 4 -p no:cacheprovider \
    -rs "${GPU_TESTS[@]:1}" "$@"
  stage tune "${TUNE_S:-95}" python3 -m specdec_kernels.tune --json "$W/tune.json"
  stage kernel_bench 70 python3 -m specdec_kernels.bench --dtypes bfloat16 --hkv 8 32 --prefixes 1024 4096 16384 \
    --ns 1 8 16 64 --no-flex --json "$W/kernel_bench.json"
  exit 0
fi
if [ "$MODE" = kernel ]; then  # what issue 10 still needs measured (host time, bandwidth, T(64)/T(1))
  stage tests_kernel "${TESTS_S:-80}" python3 -m pytest -v -n 4 -p no:cacheprovider -rs \
    tests/test_kernel_tree_attention.py tests/test_kernel_edges.py tests/test_kernel_launch.py tests/test_triton_backend.py
  for flush in write read; do
    stage "bench_$flush" "${BENCH_S:-75}" python3 -m specdec_kernels.bench --dtypes bfloat16 --hkv 8 32 \
      --prefixes 1024 4096 16384 --ns 1 64 --no-flex --flush "$flush" --json "$W/bench_$flush.json"
  done
  stage tune_merge "${TUNE_S:-130}" python3 -m specdec_kernels.tune --hkv 8 32 --prefixes 4096 16384 --ns 1 64 \
    --grid merge=kernel,fused split_rounding=up,down programs_per_sm=1,2 num_stages=3 num_warps=4,8 block_n=64 \
    --json "$W/tune_merge.json"
  exit 0
fi
if [ "$MODE" = step ]; then  # the captured step's costs: tests, where a forward's time goes, the 8B bench compiled
  stage tests_step "${TESTS_S:-110}" python3 -m pytest -v -n 12 -p no:cacheprovider -rs --durations=10 \
    "${GPU_TESTS[@]}" tests/test_fused_projections.py tests/test_captured_costs.py tests/test_compiled_cache.py
  stage step_profile "${PROFILE_S:-220}" python3 -m experiments.step_profile --synthetic llama-8b --context 4096 \
    --widths 1,64 --variants graph-sdpa,inductor-triton-fused,inductor-triton \
    --profile inductor-triton-fused \
    --markdown "$W/step_profile.md" --json "$W/step_profile.json"
  stage bench_8b_inductor "${BENCH_S:-240}" python3 -m experiments.bench --device cuda --synthetic llama-8b \
    --dtype bfloat16 --draft-dtype bfloat16 --prompts 2 --prompt-len 512 --max-new-tokens 128 --ks 4 --reps 1 \
    --no-hf-dynamic --compile inductor --attn-backend triton --fuse-projections \
    --markdown "$W/bench_8b_inductor.md" --json "$W/bench_8b_inductor.json"
  exit 0
fi
if [ "$MODE" = pair ]; then  # the embedded pair compiled and captured, with the kernel (about 4 minutes)
  stage build_zoo 150 python3 -m experiments.build_zoo size=default logger=none hydra.run.dir="$W/build_zoo"
  stage bench_zoo_inductor "${BENCH_S:-150}" python3 -m experiments.bench --device cuda --prompts 4 \
    --max-new-tokens 64 --ks 2,4 --reps 3 --compile inductor --attn-backend triton --hf-compile \
    --markdown "$W/bench_zoo_inductor.md" --json "$W/bench_zoo_inductor.json"
  stage decode_inductor 60 python3 -m experiments.decode logger=none model.device=cuda num_prompts=5 \
    max_new_tokens=64 compile=inductor attn_backend=triton hydra.run.dir="$W/decode_inductor"
  exit 0
fi
if [ "$MODE" = final ]; then  # the kernel bench, then the rest of the suite
  stage kernel_bench 70 python3 -m specdec_kernels.bench --dtypes bfloat16 --hkv 8 32 --prefixes 1024 4096 16384 \
    --ns 1 8 16 64 --no-flex --json "$W/kernel_bench.json"
  MODE=suite
fi
if [ "$MODE" = suite ]; then
  # SUITE_S: the stage's limit (a second call gets what the first left); -v: a cut run still names each result;
  # arguments after "suite" go to pytest (e.g. --ignore=FILE for files an earlier call already ran)
  [ $# -gt 0 ] && shift
  stage tests_rest "${SUITE_S:-400}" python3 -m pytest -v -n 14 --dist loadfile -p no:cacheprovider -rs --durations=15 \
    "${GPU_TESTS[@]/#/--ignore=}" "$@"
  exit 0
fi
# The tests and the pair's build share the GPU, but nothing is timed while they run.
run_stage build_zoo 150 python3 -m experiments.build_zoo size=default logger=none hydra.run.dir="$W/build_zoo" &
stage tests_gpu 180 python3 -m pytest -v -n 8 -p no:cacheprovider -rs "${GPU_TESTS[@]}"
wait
pack
stage kernel_bench 70 python3 -m specdec_kernels.bench --dtypes bfloat16 --hkv 8 32 --prefixes 1024 4096 16384 \
  --ns 1 8 16 64 --no-flex --json "$W/kernel_bench.json"
stage kernel_flex 50 python3 -m specdec_kernels.bench --dtypes bfloat16 --hkv 8 32 --prefixes 4096 16384 \
  --ns 1 64 --json "$W/kernel_flex.json"
stage decode_default 30 python3 -m experiments.decode logger=none model.device=cuda num_prompts=5 max_new_tokens=64 \
  hydra.run.dir="$W/decode_default"
stage bench_zoo 60 python3 -m experiments.bench --device cuda --prompts 4 --max-new-tokens 64 --ks 2,4 --reps 2 \
  --trees binary --compile graph --verify-curve --context 512 --markdown "$W/bench_zoo.md" --json "$W/bench_zoo.json"
stage bench_8b 70 python3 -m experiments.bench --device cuda --synthetic llama-8b --dtype bfloat16 \
  --draft-dtype bfloat16 --prompts 2 --prompt-len 512 --max-new-tokens 32 --ks 4 --reps 1 --no-hf-dynamic \
  --trees binary --compile graph --verify-curve --context 4096 --markdown "$W/bench_8b.md" --json "$W/bench_8b.json"
stage bench_batch 50 python3 -m experiments.bench --device cuda --batch-sizes 4,8 --prompts 8 --max-new-tokens 64 \
  --ks 2,4 --reps 2 --markdown "$W/bench_batch.md" --json "$W/bench_batch.json"
stage decode_graph 25 python3 -m experiments.decode logger=none model.device=cuda num_prompts=5 max_new_tokens=64 \
  compile=graph hydra.run.dir="$W/decode_graph"
cat "$W/stages.txt"
