"""The dsinf benchmark, `python -m bench` from the repository root (bench/README.md: how to run and read it).

One run prints our ops against torch (ratio = torch time / our time, > 1 means we are faster), the
achieved bandwidth and FLOP rate, build times, per-call host cost and, last, every goal with its
measured value and verdict (PASS / MISS / noisy / not measured).

How it measures, in short:
- every implementation's output is checked once against `dsinf.reference` (or a float32 chain for ops
  the reference does not have) before it is timed; a mismatch marks it FAIL and it gets no time;
- random inputs (never zeros); weights rotate among copies several times the last-level cache, so decode
  numbers are memory numbers;
- CPU: per-call wall time in interleaved rounds; CUDA: CUDA events around CUDA-graph batches;
- a verdict is "noisy" when the machine is loaded or the samples spread wider than the margin.

Modules: cli (arguments, the run), sections (the registry), context (a run's state), cases (shapes,
bytes, FLOPs), timing, env (buffers and backends), impls (the implementations of a case), ops,
host_cost, build_times (the sections), goals, tables, report, results, adapter (dsinf internals). Commands of
their own: e2e (the Hugging Face end-to-end benchmark), kn_gemm (the CPU's [K, N] GEMM against the library's).
"""
