#!/usr/bin/env bash
# Everything the lent GPU machine has to prove, in one call (run from the repo root):
#   bash bench/gpu_session.sh [tests|bench|all]
# 1. environment + toolchain facts, 2. cold/warm build of the CUDA module, 3. the GPU test suite,
# 4. compute-sanitizer memcheck sweep, 5. the benchmark. Logs go to $OUT (default /tmp/dsinf-gpu).
# The GPU suite (about 2,500 tests) does not fit one 10-minute call on an H200 when run serially:
# test_cuda_kernels_extra (250-285 s; it builds ten tuning variants, four at a time), test_triton_kernels
# (285-320 s) and test_mlp_gemm (185-265 s) are the long files. TEST_JOBS=4 runs the suite as four pytest
# processes at once (the groups below, each with its own fresh build cache; logs gpu_tests.<i>.log), then
# the files whose tests time kernels against torch (test_routes) alone, so no neighbour skews them: about
# 330 + 60 s on an H200 (docs/PERFORMANCE.md, twenty-first round). TEST_FILES (default: tests) instead runs
# the given files serially, e.g. TEST_FILES=tests/test_cuda_kernels_extra.py.
set -u
OUT=${OUT:-/tmp/dsinf-gpu}; mkdir -p "$OUT"
WHAT=${1:-all}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
{
  date -u +%FT%TZ; git rev-parse --short HEAD 2>/dev/null
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv
  python -c "import torch,sys;print('python',sys.version.split()[0],'torch',torch.__version__,'cuda',torch.version.cuda,'abi',torch._C._GLIBCXX_USE_CXX11_ABI)"
  python -c "import triton;print('triton',triton.__version__)"; nvcc --version | tail -1; c++ --version | head -1
  python -c "import ctypes,torch;print(open('/proc/self/maps').read().count('libstdc++'))"; grep -m3 libstdc /proc/self/maps
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if [ "$WHAT" != bench ]; then
  echo "== cold + warm build of the CUDA module"
  export TORCH_EXTENSIONS_DIR=/tmp/dsinf-cold-$$
  for run in cold warm; do
    /usr/bin/time -f "$run load wall %e s" python -c "
import time,logging; logging.basicConfig(level=logging.INFO); t=time.time(); import torch; t1=time.time()
from op_builder import InferenceBuilder; InferenceBuilder().load('cuda')
from op_builder.builder import loaded_variants as lv; v=lv()[('transformer_inference','cuda')]
print('$run', v.how, 'import torch %.2f s, load %.2f s'%(t1-t, time.time()-t1), v.manifest.get('archs'))" 2>&1 | tail -4
  done
  unset TORCH_EXTENSIONS_DIR
  echo "== GPU tests"
  if [ "${TEST_JOBS:-1}" -gt 1 ] && [ -z "${TEST_FILES:-}" ]; then
    bash bench/gpu_test_shards.sh "$OUT" "${TEST_LIMIT:-480}"
  else
    timeout -k 5 ${TEST_LIMIT:-300} python -m pytest -q -m gpu -p no:cacheprovider -o timeout=120 -rfE \
      ${TEST_FILES:-tests} \
      > "$OUT/gpu_tests.log" 2>&1; echo "pytest rc=$?"; tail -n 25 "$OUT/gpu_tests.log"
  fi
  echo "== compute-sanitizer memcheck"
  # Build (or load) outside the sanitizer: instrumenting ninja/nvcc/the build worker is slow and crashed once.
  python -c "from op_builder import InferenceBuilder; InferenceBuilder().load('cuda')" || echo "build failed"
  timeout -k 5 ${SAN_LIMIT:-120} compute-sanitizer --tool memcheck --target-processes application-only \
    --error-exitcode 3 python bench/cuda_sanitize.py \
    > "$OUT/sanitize.log" 2>&1; echo "sanitize rc=$?"; tail -n 4 "$OUT/sanitize.log"
fi
if [ "$WHAT" != tests ]; then
  echo "== benchmark"
  timeout -k 5 ${BENCH_LIMIT:-420} python -m bench --device cuda --json "$OUT/bench.json" ${BENCH_ARGS:-} \
    > "$OUT/bench.log" 2> "$OUT/bench.stderr"; echo "bench rc=$?"; tail -n 60 "$OUT/bench.log"
fi
