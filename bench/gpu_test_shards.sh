#!/usr/bin/env bash
# The GPU test suite as parallel pytest processes (bench/gpu_session.sh runs it with TEST_JOBS > 1):
#   bash bench/gpu_test_shards.sh OUT_DIR [LIMIT_S]
#   bash bench/gpu_test_shards.sh --list      # the groups, one line each: NAME FILE...
# Groups, by the files' run time on an H200 (docs/PERFORMANCE.md, twenty-first round): each long file alone
# and every other file together, at once (each pytest process builds into its own fresh cache,
# tests/conftest.py); then the files whose tests assert speed against torch, alone, so no neighbour skews
# them. New test files fall into the "every other file" group. Logs: OUT_DIR/gpu_tests.<group>.log.
# Exit status 0 when every group passed (or had no GPU test to run).
set -u
OUT=${1:?usage: bash bench/gpu_test_shards.sh OUT_DIR [LIMIT_S] | --list}
LIMIT=${2:-480}
LONG=(tests/test_cuda_kernels_extra.py tests/test_triton_kernels.py tests/test_mlp_gemm.py)  # 185-320 s each
TIMED=(tests/test_routes.py)  # test_gpu_routed_decode_is_never_slower_than_torch times kernels
REST=()
for f in tests/test_*.py; do
  case " ${LONG[*]} ${TIMED[*]} " in *" $f "*) ;; *) REST+=("$f") ;; esac
done

if [ "$OUT" = --list ]; then
  for f in "${LONG[@]}"; do echo "$(basename "$f" .py) $f"; done
  echo "rest ${REST[*]}"
  echo "timed ${TIMED[*]}"
  exit 0
fi
mkdir -p "$OUT"

run_group() {  # NAME FILE...: one pytest process; prints its result line
  local name=$1 rc
  shift
  timeout -k 5 "$LIMIT" python -m pytest -q -m gpu -p no:cacheprovider -o timeout=300 -rfE "$@" \
    > "$OUT/gpu_tests.$name.log" 2>&1
  rc=$?
  [ $rc -eq 5 ] && rc=0  # pytest: no test selected (a group without GPU tests)
  echo "$name rc=$rc: $(grep -E '(passed|failed|skipped|error)' "$OUT/gpu_tests.$name.log" | tail -n 1)"
  grep -E '^(FAILED|ERROR) ' "$OUT/gpu_tests.$name.log" | head -n 10
  return $rc
}

start=$(date +%s)
pids=()
for f in "${LONG[@]}"; do
  run_group "$(basename "$f" .py)" "$f" & pids+=($!)
done
run_group rest "${REST[@]}" & pids+=($!)
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=1
done
echo "parallel groups done in $(( $(date +%s) - start )) s"
run_group timed "${TIMED[@]}" || status=1
echo "GPU tests done in $(( $(date +%s) - start )) s, status $status"
exit $status
