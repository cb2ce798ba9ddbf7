"""Timers: CPU wall time in interleaved rounds, CUDA events around CUDA-graph batches, paired A/B host
cost, and what makes a measurement noisy (machine load, spread of samples).

The ops timers return a `Timing`: the median per call, and `lo`/`hi`, the spread of its samples
(CPU: the fastest and slowest round's median; CUDA: the quartiles of the batches). A goal whose
margin is smaller than that spread is judged "noisy", not PASS or MISS. The host-cost timer returns
its paired samples (bench.host_cost reduces them the same way).
"""
from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

#: A timed function: fn(i) runs one call on buffer copy i % copies.
Fns = dict[str, tuple[Callable[[int], Any], int]]

#: Load average per core above which CPU times are noisy (other processes compete for the cores).
LOADED_PER_CORE = 0.5


@dataclass
class Timing:
    us: float  # median per call
    lo: float  # spread of the samples (see module docstring)
    hi: float
    samples: int
    calls: int  # calls per sample
    method: str = ""  # how: "wall", "graph", "eager-parked"


def spread(samples: list[float]) -> tuple[float, float]:
    """(lo, hi) of samples: quartiles from 4 samples on (one outlier batch does not widen it), else
    min and max."""
    if len(samples) >= 4:
        q = statistics.quantiles(samples, n=4)
        return q[0], q[2]
    return min(samples), max(samples)


def machine_load() -> tuple[float, int]:
    """(1-minute load average, cores); load 0.0 where the OS has no load average."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return load, os.cpu_count() or 1


def is_loaded(load: float, cores: int) -> bool:
    return load > LOADED_PER_CORE * cores


def cpu_l3_bytes() -> int:
    """Largest CPU cache (the L3 on x86; op_builder.system's cpu_cache); 32 MiB when unknown."""
    from op_builder.system import current_system

    return current_system().cpu_cache or 32 << 20


def time_cpu(fns: Fns, min_time: float, rounds: int = 5, min_calls: int = 3) -> dict[str, Timing]:
    """Median per-call wall time of each fn, in `rounds` interleaved rounds (a noisy neighbour hits
    every implementation alike); the spread is that of the rounds' medians."""
    per_call: dict[str, list[float]] = {n: [] for n in fns}
    round_medians: dict[str, list[float]] = {n: [] for n in fns}
    counters = {n: 0 for n in fns}
    for fn, copies in fns.values():  # warm up: caches, allocator, oneDNN primitive creation
        t_end = time.perf_counter() + min(0.05, min_time / 4)
        for i in range(max(2, copies)):
            fn(i % copies)
        while time.perf_counter() < t_end:
            fn(0)
    per_round = min_time / rounds
    for _ in range(rounds):
        for name, (fn, copies) in fns.items():
            t_end = time.perf_counter() + per_round
            this: list[float] = []
            while len(this) < max(1, min_calls // rounds) or time.perf_counter() < t_end:
                t0 = time.perf_counter()
                fn(counters[name] % copies)
                this.append(time.perf_counter() - t0)
                counters[name] += 1
            per_call[name].extend(this)
            round_medians[name].append(statistics.median(this))
    out = {}
    for name, s in per_call.items():
        lo, hi = min(round_medians[name]), max(round_medians[name])
        out[name] = Timing(statistics.median(s) * 1e6, lo * 1e6, hi * 1e6, len(s), 1, "wall")
    return out


def paired_blocks(fns: dict[str, Callable[[], Any]], pairs: list[tuple[str, str]], calls: int, rounds: int,
                  clock: Callable[[], int], sync: Callable[[], None] = lambda: None
                  ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Host cost per call, A/B: in each of `rounds` rounds, each (ours, baseline) pair of `pairs` times a
    block of `calls` calls of each side back to back, the side that goes first alternating by round (a
    neighbour's burst, a frequency step or the allocator's state hits both sides of a pair alike).

    `clock()` is in ns; `sync()` ends each block inside its time (CUDA: the queued kernels). Returns
    (name -> per-call µs of each block, ours -> per-call µs of ours minus its baseline, paired by round)."""
    for fn in fns.values():  # warm up: allocator, oneDNN primitives, the op classes' first-call binding
        for _ in range(calls):
            fn()
    sync()
    samples: dict[str, list[float]] = {n: [] for n in fns}
    diffs: dict[str, list[float]] = {ours: [] for ours, _ in pairs}
    for r in range(rounds):
        for ours, base in pairs:
            this = {}
            for name in ((ours, base) if r % 2 else (base, ours)):
                fn = fns[name]
                t0 = clock()
                for _ in range(calls):
                    fn()
                sync()
                this[name] = (clock() - t0) / calls / 1e3
                samples[name].append(this[name])
            diffs[ours].append(this[ours] - this[base])
    return samples, diffs


_GRAPH_LAUNCH_MS = 0.05  # host time to enqueue one graph replay, generously (tens of µs)


class CudaTimer:
    """Per-call GPU time of back-to-back calls, from CUDA events around batches, median over batches
    interleaved between implementations.

    A batch of n calls (rotating over buffer copies larger than L2, so decode reads come from memory)
    is captured once as a CUDA graph and replayed: the GPU runs the kernels back to back without
    Python's launch latency between them (for µs-scale decode kernels the two differ 2x). An
    implementation that cannot be captured is run eagerly instead, after parking the GPU in
    `torch.cuda._sleep` long enough for the host to enqueue the whole batch (method "eager-parked").
    """

    def __init__(self, batch_ms: float, reps: int):
        import torch

        self.torch = torch
        self.batch_ms = batch_ms
        self.reps = reps
        self._sleep = getattr(torch.cuda, "_sleep", None)
        self.cycles_per_ms = 0.0
        if self._sleep is not None:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self._sleep(1000)
            s.record()
            self._sleep(2_000_000)
            e.record()
            torch.cuda.synchronize()
            self.cycles_per_ms = 2_000_000 / max(1e-3, s.elapsed_time(e))

    def _park(self, host_ms: float) -> None:
        if self._sleep is not None and self.cycles_per_ms > 0:
            self._sleep(int(self.cycles_per_ms * (1.3 * host_ms + 0.05)))

    def _capture(self, fn: Callable[[int], Any], copies: int, n: int):
        """A CUDA graph of n calls, or None when the calls cannot be captured."""
        torch = self.torch
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up on a side stream, as capture requires
                for i in range(min(3, n)):
                    fn(i % copies)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for i in range(n):
                    fn(i % copies)
            torch.cuda.synchronize()
            return graph
        except Exception:  # noqa: BLE001 - not capturable (host sync, CPU work): eager batches instead
            torch.cuda.synchronize()
            return None

    def measure(self, fns: Fns) -> dict[str, Timing]:
        torch = self.torch
        plan: dict[str, tuple[int, float, Any]] = {}
        for name, (fn, copies) in fns.items():
            for i in range(max(3, copies)):  # warm up (first calls may compile or autotune)
                fn(i % copies)
            torch.cuda.synchronize()
            probe = max(4, copies)
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self._park(5.0)
            t0 = time.perf_counter()
            s.record()
            for i in range(probe):
                fn(i % copies)
            e.record()
            host_ms = (time.perf_counter() - t0) * 1e3 / probe
            torch.cuda.synchronize()
            est_ms = max(1e-4, s.elapsed_time(e) / probe)
            n = max(copies, min(2000, math.ceil(self.batch_ms / est_ms)))
            plan[name] = (n, host_ms * n, self._capture(fn, copies, n))
        samples: dict[str, list[float]] = {n: [] for n in fns}
        order = list(fns)
        enqueue_ms = _GRAPH_LAUNCH_MS * sum(plan[name][2] is not None for name in order)
        for rep in range(self.reps):
            events = []
            # The GPU waits in a sleep kernel while the host enqueues the rep's graph launches, so each batch
            # starts right behind the previous kernel: a graph launched onto an idle GPU counts its launch
            # latency in its batch (H200: cuBLAS against itself read 0.98-0.99x when it always went first).
            # The order alternates so that any effect left of going first or second hits both sides alike.
            names = order if rep % 2 == 0 else order[::-1]
            self._park(enqueue_ms)
            for name in names:
                fn, copies = fns[name]
                n, host_ms, graph = plan[name]
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                if graph is None:
                    self._park(host_ms)
                s.record()
                if graph is not None:
                    graph.replay()
                else:
                    for i in range(n):
                        fn(i % copies)
                e.record()
                events.append((name, n, s, e))
            torch.cuda.synchronize()
            for name, n, s, e in events:
                samples[name].append(s.elapsed_time(e) * 1e3 / n)
        out = {}
        for name, s in samples.items():
            lo, hi = spread(s)
            n, _, graph = plan[name]
            out[name] = Timing(statistics.median(s), lo, hi, len(s), n,
                               "graph" if graph is not None else "eager-parked")
        return out
