#!/usr/bin/env bash
# One GPU session of `python -m dsinf.bench` (see bench/README.md). Run from the repository root:
#
#   bash bench/run_gpu_session.sh                 # full run (~3-5 min): build times + CUDA ops
#   bash bench/run_gpu_session.sh --quick         # smoke test (~1 min); extra args go to dsinf.bench
#
# Writes under $OUT (default /tmp/dsinf-bench): bench.json (every number), bench.log (stdout),
# bench.stderr (warnings, tracebacks), env.txt (GPU state, versions). stdout ends with the goals table,
# so the last lines of the output are the summary.
set -u
OUT=${OUT:-/tmp/dsinf-bench}
mkdir -p "$OUT"
LIMIT=${BENCH_TIMEOUT:-540}   # seconds; the lent machine allows 600 per command

{
  date -u +%FT%TZ
  git rev-parse --short HEAD 2>/dev/null || echo "no git"
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw,power.limit,utilization.gpu,memory.used --format=csv 2>&1
  python -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)" 2>&1
  python -c "import triton; print('triton', triton.__version__)" 2>&1
  command -v nvcc && nvcc --version | tail -2
  nproc; free -g | head -2
} > "$OUT/env.txt" 2>&1

# --budget: stop starting new cases after 450 s so the summary and JSON are written before the timeout
# (a --budget in "$@" comes later on the command line and wins).
timeout -k 10 "$LIMIT" python -m dsinf.bench --device cuda --budget 450 --json "$OUT/bench.json" "$@" \
  2> "$OUT/bench.stderr" | tee "$OUT/bench.log"
rc=${PIPESTATUS[0]}
if [ "$rc" -ne 0 ]; then
  echo "dsinf.bench exited with $rc (124 = timed out after ${LIMIT}s); last stderr lines:"
  tail -n 25 "$OUT/bench.stderr"
fi
exit "$rc"
