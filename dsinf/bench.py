"""`python -m dsinf.bench`: the one benchmark command (DESIGN §7).

One run prints our ops against torch (ratio = torch time / our time, > 1 means we are faster), the
achieved bandwidth and FLOP rate, cold/warm build times, and, last, a compact table of every goal
with its measured value and PASS/MISS.

    python -m dsinf.bench                         # --device auto: cuda if available, else cpu
    python -m dsinf.bench --device cpu --quick    # smoke test: few shapes, short timing, no cold build
    python -m dsinf.bench --device cuda --json $OUT/bench.json
    python -m dsinf.bench --only int8,qkv         # sections: build, cpu, cuda; ops parts: int8, decode, prefill, qkv
    python -m dsinf.bench --device cuda --plan    # print the cases with their bytes/FLOPs; run nothing

Sections
- build: cold JIT build of the module (a child process on a fresh temp TORCH_EXTENSIONS_DIR), warm load
  from that cache (a child; reported beyond a child that only imports torch), `import dsinf` overhead.
- cpu: decode GEMVs (int8 weight-only vs fp32 torch and aten's `_weight_int8pack_mm`, bf16, fp32), the
  fused QKV + RoPE linear vs the eager torch chain, a prefill linear vs `torch.addmm`.
- cuda: device-to-device copy bandwidth (the ceiling), decode GEMVs in both layouts on Llama-sized
  weights, int8 weight-only, an M=2048 linear + bias vs `torch.addmm`, fused QKV + RoPE; a Triton column
  wherever `dsinf.triton` serves the case.

How it measures (/work/.library/device/METHOD.md)
- Every kernel's output is checked once against `dsinf.reference` (relative L2 error, per-dtype bound)
  before it is timed; a mismatch marks it FAIL and it gets no time.
- Random inputs (never zeros). Weights are rotated among enough copies that the working set is several
  times the last-level cache (CUDA L2, CPU L3): decode numbers are memory numbers, not cache numbers.
- CPU: median of per-call wall times, at least ~0.5 s per measurement, in interleaved rounds so that a
  noisy neighbour hits every implementation alike.
- CUDA: CUDA events around a batch of back-to-back calls, median over batches. Before each batch the
  GPU is parked in `torch.cuda._sleep` long enough for the host to enqueue the whole batch, so the time
  is the kernels' and not Python's launch latency (for µs-scale decode kernels the two differ 2x).
- Bytes counted are the fewest the op must move: weight + activations + bias + output (+ int8 scales).

Nothing here touches CUDA unless a CUDA section runs; a missing backend (no compiled module, no
triton, no GPU) turns its column into "n/a (why)", never a crash.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

# ---------------------------------------------------------------------------------------------------
# Goals (data): (key, description, comparison, target, unit)

GOALS: dict[str, tuple[str, str, float, str]] = {
    "build.cpu.cold": ("CPU module cold JIT build (beyond import torch)", "<=", 20.0, "s"),
    "build.cpu.warm": ("CPU module warm load (beyond import torch)", "<=", 0.3, "s"),
    "build.cuda.cold": ("CUDA module cold JIT build (beyond import torch)", "<=", 15.0, "s"),
    "build.cuda.warm": ("CUDA module warm load (beyond import torch)", "<=", 0.3, "s"),
    "build.import": ("import dsinf beyond import torch", "<=", 50.0, "ms"),
    "cpu.int8_vs_fp32": ("CPU int8 M=1 vs torch fp32 matmul", ">=", 1.5, "x"),
    "cpu.int8_vs_aten": ("CPU int8 M=1 vs aten _weight_int8pack_mm", ">=", 1.0, "x"),
    "cpu.qkv": ("CPU fused QKV+RoPE vs eager torch chain", ">=", 1.2, "x"),
    "cpu.prefill": ("CPU prefill fp32 linear+bias M=512 vs torch.addmm", ">=", 0.95, "x"),
    "cuda.decode_4096": ("CUDA M=1 4096x4096 vs torch", ">=", 1.3, "x"),
    "cuda.decode_bw": ("CUDA decode M<=8, worst % of copy bandwidth", ">=", 85.0, "%"),
    "cuda.int8": ("CUDA int8 M=1 vs torch fp16 (worst shape)", ">=", 2.0, "x"),
    "cuda.prefill": ("CUDA M=2048 linear+bias vs torch.addmm", ">=", 0.97, "x"),
    "cuda.qkv": ("CUDA fused QKV+RoPE vs eager torch chain (worst M)", ">=", 1.3, "x"),
    "triton.decode": ("Triton decode time / CUDA module time (worst)", "<=", 1.10, "x"),
    "triton.prefill": ("Triton M=2048 vs cuBLAS addmm", ">=", 0.9, "x"),
}

#: Relative L2 error bound per activation dtype (outputs are rounded once to the dtype; bf16 keeps 8
#: mantissa bits, so its bound is the loosest; the eager torch chains round several times).
TOLERANCE = {"fp32": 1e-4, "fp16": 5e-3, "bf16": 2e-2}

#: DESIGN §7 reference points on the GPU box (H100, torch 2.11): printed beside our measurements so that
#: a broken timer or a throttled card shows at once.
CUDA_REFERENCE_POINTS = {
    "copy_GBs": 3000.0,
    "torch fp16 M=1 4096x4096 us": 21.0,
    "torch fp16 M=1 8192x8192 us": 58.0,
    "torch fp16 M=2048 K=4096 N=12288 us": 270.0,
}

DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}
OPS_PARTS = ("decode", "int8", "prefill", "qkv")
SECTIONS = ("build", "cpu", "cuda") + OPS_PARTS


def _torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.int8}[name]


# ---------------------------------------------------------------------------------------------------
# Cases and their accounting (pure: no torch, testable anywhere)


@dataclass(frozen=True)
class Case:
    """One measured problem. `dtype` is the activation dtype; `layout` is the weight's:
    "kn" ([K, N], transposed_mode=False), "nk" ([N, K], nn.Linear) or "int8" (int8 [N, K] + fp32 scale[N])."""

    section: str  # "cpu" | "cuda"
    part: str  # "decode" | "int8" | "prefill" | "qkv"
    op: str  # "vector_matmul" | "linear" (matmul + bias) | "qkv" (linear, do_flash_attn, RoPE)
    dtype: str
    layout: str
    B: int
    S: int
    K: int
    N: int
    heads: int = 0
    rotary_dim: int = 0
    seq_offset: int = 0

    @property
    def M(self) -> int:
        return self.B * self.S

    @property
    def weight_bytes(self) -> int:
        return self.K * self.N * (1 if self.layout == "int8" else DTYPE_BYTES[self.dtype])

    @property
    def bytes(self) -> int:
        """Fewest bytes the op moves: weight, activations and output once each, bias, int8 scales."""
        act = DTYPE_BYTES[self.dtype]
        total = self.weight_bytes + self.M * self.K * act + self.M * self.N * act
        if self.op in ("linear", "qkv"):
            total += self.N * act
        if self.layout == "int8":
            total += self.N * 4
        return total

    @property
    def flops(self) -> int:
        return 2 * self.M * self.N * self.K

    @property
    def label(self) -> str:
        lay = {"kn": "[K,N]", "nk": "[N,K]", "int8": "int8"}[self.layout]
        what = {"vector_matmul": "vm", "linear": "linear+bias", "qkv": "qkv+rope"}[self.op]
        extra = f" H={self.heads}" if self.op == "qkv" else ""
        return f"{what} {self.dtype} M={self.M} {self.K}x{self.N} {lay}{extra}"


def copies_for(nbytes: int, cache_bytes: int, factor: float, lo: int, hi: int) -> int:
    """How many copies of an `nbytes` buffer to rotate so that the set is >= factor x the cache."""
    return max(lo, min(hi, math.ceil(factor * cache_bytes / max(1, nbytes))))


def cpu_cases(quick: bool) -> list[Case]:
    """The CPU plan. K=N=4096 and K=4096, N=11008 are Llama-7B's attention and MLP projections."""
    c: list[Case] = []
    shapes = [(4096, 4096)] if quick else [(4096, 4096), (4096, 11008)]
    for K, N in shapes:  # int8 weight-only, fp32 activations (the goal) and bf16 activations
        c.append(Case("cpu", "int8", "vector_matmul", "fp32", "int8", 1, 1, K, N))
    if not quick:
        for K, N in shapes:
            c.append(Case("cpu", "int8", "vector_matmul", "bf16", "int8", 1, 1, K, N))
    for dtype in ("bf16", "fp32"):
        for layout in (("kn",) if quick else ("kn", "nk")):
            c.append(Case("cpu", "decode", "vector_matmul", dtype, layout, 1, 1, 4096, 4096))
    hidden = 2048 if quick else 4096
    heads = hidden // 128
    for M in ((1, 16) if quick else (1, 16, 128)):
        B, S, off = (1, 1, 37) if M == 1 else (1, M, 0)
        c.append(Case("cpu", "qkv", "qkv", "fp32", "kn", B, S, hidden, 3 * hidden, heads, 128, off))
    c.append(Case("cpu", "prefill", "linear", "fp32", "kn", 1, 512, 4096, 4096))
    return c


CUDA_DECODE_SHAPES = [(4096, 4096), (4096, 12288), (8192, 8192), (4096, 14336), (14336, 4096)]


def cuda_cases(quick: bool) -> list[Case]:
    """The CUDA plan: Llama-7B/8B/70B-sized decode weights (K x N), the M=2048 prefill, fused QKV."""
    c: list[Case] = []
    shapes = [(4096, 4096), (8192, 8192)] if quick else CUDA_DECODE_SHAPES
    dtypes = ("fp16",) if quick else ("fp16", "bf16")
    for dtype in dtypes:
        for K, N in shapes:
            for M in ((1, 16) if quick else (1, 4, 8, 16)):
                for layout in ("kn", "nk"):
                    c.append(Case("cuda", "decode", "vector_matmul", dtype, layout, M, 1, K, N))
    for K, N in shapes:
        for M in ((1,) if quick else (1, 4, 16)):
            c.append(Case("cuda", "int8", "vector_matmul", "fp16", "int8", M, 1, K, N))
    for dtype in dtypes:
        for layout in ("kn", "nk"):
            c.append(Case("cuda", "prefill", "linear", dtype, layout, 1, 2048, 4096, 12288))
    for M in ((1, 2048) if quick else (1, 4, 8, 16, 2048)):
        B, S, off = (M, 1, 100) if M <= 16 else (1, M, 0)
        c.append(Case("cuda", "qkv", "qkv", "fp16", "kn", B, S, 4096, 3 * 4096, 32, 128, off))
    if not quick:
        c.append(Case("cuda", "qkv", "qkv", "bf16", "kn", 1, 2048, 4096, 3 * 4096, 32, 128, 0))
    return c


# ---------------------------------------------------------------------------------------------------
# Results


@dataclass
class Timing:
    us: float  # median per call
    us_min: float
    us_max: float
    samples: int
    calls: int  # calls per sample (CUDA batches)


@dataclass
class ImplResult:
    name: str
    status: str  # "ok" | "FAIL" | "n/a"
    reason: str = ""
    err: float | None = None
    copies: int = 0
    timing: Timing | None = None

    @property
    def us(self) -> float | None:
        return self.timing.us if (self.status == "ok" and self.timing) else None


@dataclass
class Row:
    case: Case
    impls: dict[str, ImplResult] = field(default_factory=dict)
    note: str = ""

    def us(self, name: str) -> float | None:
        r = self.impls.get(name)
        return r.us if r else None

    def ratio(self, other: str, ours: str = "ours") -> float | None:
        """other's time / ours (> 1: ours is faster)."""
        a, b = self.us(other), self.us(ours)
        return a / b if (a and b) else None

    def gbs(self, name: str = "ours") -> float | None:
        us = self.us(name)
        return self.case.bytes / us / 1e3 if us else None

    def tflops(self, name: str = "ours") -> float | None:
        us = self.us(name)
        return self.case.flops / us / 1e6 if us else None

    def gflops(self, name: str = "ours") -> float | None:
        t = self.tflops(name)
        return t * 1e3 if t is not None else None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self.case)
        d.update(label=self.case.label, M=self.case.M, bytes=self.case.bytes, flops=self.case.flops, note=self.note)
        d["impls"] = {}
        for name, r in self.impls.items():
            e = {"status": r.status, "reason": r.reason, "err": r.err, "copies": r.copies}
            if r.timing:
                e.update(asdict(r.timing))
            if r.us:
                e.update(GBs=self.gbs(name), TFLOPs=self.tflops(name))
            d["impls"][name] = e
        return d


@dataclass
class Report:
    args: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)
    build: dict[str, Any] = field(default_factory=dict)
    ceilings: dict[str, Any] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # section skips / failures, with why
    goals: list[dict[str, Any]] = field(default_factory=list)

    def note(self, text: str) -> None:
        self.notes.append(text)
        out(f"  ! {text}")

    def to_json(self) -> dict[str, Any]:
        return {"meta": self.meta, "args": self.args, "build": self.build, "ceilings": self.ceilings,
                "rows": [r.to_json() for r in self.rows], "notes": self.notes, "goals": self.goals}


def out(text: str = "") -> None:
    print(text, flush=True)


def fmt_us(v: float | None) -> str:
    if v is None:
        return "n/a"
    return f"{v:.1f}" if v < 1000 else f"{v:.0f}"


def fmt_x(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def fmt_num(v: float | None, digits: int = 0) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def impl_cell(r: ImplResult | None) -> str:
    """A time, or why there is none."""
    if r is None:
        return "-"
    if r.status == "ok":
        return fmt_us(r.us)
    return "FAIL" if r.status == "FAIL" else "n/a"


# ---------------------------------------------------------------------------------------------------
# Timers


def time_cpu(fns: dict[str, tuple[Callable[[int], Any], int]], min_time: float, rounds: int = 3,
             min_calls: int = 3) -> dict[str, Timing]:
    """Median per-call wall time of each fn(i) (i rotates over its copies), in interleaved rounds."""
    samples: dict[str, list[float]] = {n: [] for n in fns}
    counters = {n: 0 for n in fns}
    for name, (fn, copies) in fns.items():  # warm up: caches, allocator, MKL/oneDNN primitive creation
        t_end = time.perf_counter() + min(0.05, min_time / 4)
        for i in range(max(2, copies)):
            fn(i % copies)
        while time.perf_counter() < t_end:
            fn(0)
    per_round = min_time / rounds
    for _ in range(rounds):
        for name, (fn, copies) in fns.items():
            t_end = time.perf_counter() + per_round
            calls = 0
            while calls < max(1, min_calls // rounds) or time.perf_counter() < t_end:
                t0 = time.perf_counter()
                fn(counters[name] % copies)
                samples[name].append(time.perf_counter() - t0)
                counters[name] += 1
                calls += 1
    return {n: Timing(statistics.median(s) * 1e6, min(s) * 1e6, max(s) * 1e6, len(s), 1) for n, s in samples.items()}


class CudaTimer:
    """Per-call GPU time of back-to-back calls, from CUDA events around batches.

    Each batch of `n` calls (rotating over the buffers' copies) is preceded by `torch.cuda._sleep` long
    enough for the host to enqueue the whole batch, so the GPU runs the calls back to back and the events
    measure the kernels, not Python's launch rate. Per call = batch time / n; median over `reps` batches,
    interleaved between implementations.
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

    def measure(self, fns: dict[str, tuple[Callable[[int], Any], int]]) -> dict[str, Timing]:
        torch = self.torch
        plan: dict[str, tuple[int, float]] = {}
        for name, (fn, copies) in fns.items():
            for i in range(max(3, copies)):  # warm up
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
            plan[name] = (n, host_ms * n)
        samples: dict[str, list[float]] = {n: [] for n in fns}
        for _ in range(self.reps):
            events = []
            for name, (fn, copies) in fns.items():
                n, host_ms = plan[name]
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                self._park(host_ms)
                s.record()
                for i in range(n):
                    fn(i % copies)
                e.record()
                events.append((name, n, s, e))
            torch.cuda.synchronize()
            for name, n, s, e in events:
                samples[name].append(s.elapsed_time(e) * 1e3 / n)
        return {name: Timing(statistics.median(s), min(s), max(s), len(s), plan[name][0])
                for name, s in samples.items()}


# ---------------------------------------------------------------------------------------------------
# Correctness


def rel_err(got, want) -> float:
    import torch

    if isinstance(got, (list, tuple)):
        got = got[0]
    if isinstance(want, (list, tuple)):
        want = want[0]
    if got.numel() != want.numel():
        return float("inf")
    g = got.reshape(want.shape).to(torch.float64)
    w = want.to(torch.float64)
    return float((g - w).norm() / w.norm().clamp_min(1e-30))


# ---------------------------------------------------------------------------------------------------
# Building the implementations of one case


class Impl:
    """fn(i) runs one call on copy i % copies; `check` is its output on copy 0 (compared to the reference)."""

    def __init__(self, fn: Callable[[int], Any], copies: int):
        self.fn, self.copies = fn, copies


class Unavailable:
    def __init__(self, reason: str):
        self.reason = reason


class Env:
    """What the ops sections share: device, the compiled module, dsinf.triton, the cache size, a weight pool.

    `kind` ("cpu"/"cuda") picks the module variant, cache model and Triton policy; `device` is where tensors
    live (the same, except in a dry run of the CUDA section's logic on CPU tensors).
    """

    def __init__(self, kind: str, quick: bool, device: str | None = None):
        import torch

        self.torch = torch
        self.kind = kind
        self.device = device or kind
        self.quick = quick
        self.module = None
        self.module_why = "not loaded"
        self.triton = None
        self.triton_why = "not tried"
        self.capability: tuple[int, int] | None = None
        self.pool: dict[Any, Any] = {}
        if kind == "cuda":
            props = torch.cuda.get_device_properties(0)
            self.capability = (props.major, props.minor)
            self.cache_bytes = int(getattr(props, "L2_cache_size", 0) or 50 << 20)
            self.cache_factor, self.max_copies = 4.0, 16
        else:
            self.cache_bytes = cpu_l3_bytes()
            self.cache_factor, self.max_copies = 2.0, 8

    # --- backends ---
    def load_module(self) -> None:
        try:
            from op_builder import InferenceBuilder
            from op_builder.builder import loaded_variants

            if self.kind in _cold_build_failed and InferenceBuilder().cached_entry(self.kind)[0] is None:
                # the same build would fail again here (and cost the time once more)
                self.module_why = f"cold build failed in this run ({_cold_build_failed[self.kind]})"
                return

            t0 = time.perf_counter()
            self.module = InferenceBuilder().load(self.kind)
            lv = loaded_variants().get((InferenceBuilder.NAME, self.kind))
            self.module_why = f"{lv.how} in {time.perf_counter() - t0:.2f} s" if lv else "loaded"
        except Exception as exc:  # noqa: BLE001 - any failure makes the column n/a, with the reason
            self.module = None
            self.module_why = f"{type(exc).__name__}: {first_line(exc)}"

    def load_triton(self, enabled: bool) -> None:
        if not enabled:
            self.triton_why = "disabled (--no-triton)"
            return
        if self.kind != "cuda":
            self.triton_why = "Triton kernels serve CUDA tensors"
            return
        try:
            from dsinf import triton as dt

            ok, why = dt.available()
            if not ok:
                self.triton_why = why
                return
            dt.vector_matmul  # noqa: B018 - imports triton and the kernels now, so a failure shows here
            self.triton = dt
            self.triton_why = "ok"
        except Exception as exc:  # noqa: BLE001
            self.triton_why = f"{type(exc).__name__}: {first_line(exc)}"

    def ours(self, fname: str):
        """The compiled function, or Unavailable."""
        if self.module is None:
            return Unavailable(f"compiled module: {self.module_why}")
        try:
            if not self.module.has(fname, self.device):
                return Unavailable(f"{fname} is not compiled for {self.device}")
            return getattr(self.module, fname)
        except Exception as exc:  # noqa: BLE001
            return Unavailable(f"{type(exc).__name__}: {first_line(exc)}")

    def triton_for(self, case: Case):
        if self.triton is None:
            return Unavailable(f"triton: {self.triton_why}")
        torch = self.torch
        wdtype = torch.int8 if case.layout == "int8" else _torch_dtype(case.dtype)
        ok, why = self.triton.supports(wdtype, self.device, self.capability)
        return self.triton if ok else Unavailable(f"triton: {why}")

    def copies(self, nbytes: int) -> int:
        return copies_for(nbytes, self.cache_bytes, self.cache_factor, 1 if self.kind == "cpu" else 2,
                          self.max_copies)

    # --- data ---
    def cached(self, key, make: Callable[[], Any]):
        if key not in self.pool:
            self.pool[key] = make()
        return self.pool[key]

    def clear(self) -> None:
        self.pool.clear()
        if self.kind == "cuda":
            self.torch.cuda.empty_cache()

    def base_weight(self, K: int, N: int):
        """fp32 [K, N] weight, N(0, 1/K) so outputs are O(1)."""
        torch = self.torch
        return self.cached(("w32", K, N), lambda: torch.randn(K, N, device=self.device) / math.sqrt(K))

    def weights(self, K: int, N: int, dtype: str, layout: str) -> list:
        """Rotating copies of the float weight in `layout` ("kn"/"nk") and `dtype`."""
        def make():
            w = self.base_weight(K, N).to(_torch_dtype(dtype))
            w = w if layout == "kn" else w.t()
            w = w.contiguous()
            return [w] + [w.clone() for _ in range(self.copies(w.numel() * w.element_size()) - 1)]
        return self.cached(("w", K, N, dtype, layout), make)

    def int8_weights(self, K: int, N: int) -> list:
        """Rotating copies of the int8 [N, K] per-channel quantized weight; each has `.scale`."""
        def make():
            q = quantize(self.base_weight(K, N))
            copies = [q]
            for _ in range(self.copies(q.numel()) - 1):
                c = q.clone()
                c.scale = q.scale.clone()
                copies.append(c)
            return copies
        return self.cached(("i8", K, N), make)

    def dequantized(self, K: int, N: int, dtype: str, layout: str) -> list:
        """Float copies of what the int8 weight stands for (torch's side of the int8 comparison)."""
        def make():
            q = self.int8_weights(K, N)[0]
            w = (q.to(self.torch.float32) * q.scale[:, None]).to(_torch_dtype(dtype))  # [N, K]
            w = (w.t() if layout == "kn" else w).contiguous()
            return [w] + [w.clone() for _ in range(self.copies(w.numel() * w.element_size()) - 1)]
        return self.cached(("deq", K, N, dtype, layout), make)

    def inputs(self, case: Case, copies: int) -> list:
        torch = self.torch
        return [torch.randn(case.B, case.S, case.K, device=self.device).to(_torch_dtype(case.dtype))
                for _ in range(copies)]

    def bias(self, N: int, dtype: str):
        return self.cached(("b", N, dtype), lambda: self.torch.randn(N, device=self.device).to(_torch_dtype(dtype)))


def quantize(w_kn):
    """Per-channel int8 [N, K] with `.scale`: dsinf.quantize_int8 when it works, else the same math here."""
    import torch

    try:
        from dsinf.quantize import quantize_int8

        return quantize_int8(w_kn, None, transposed_mode=False)
    except Exception:  # noqa: BLE001 - the bench must run while quantize is being written
        w = w_kn.t().to(torch.float32)
        scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
        q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8).contiguous()
        q.scale = scale.contiguous()
        return q


def cpu_l3_bytes() -> int:
    """Largest CPU cache from sysfs (the L3 on x86); 32 MiB when unknown."""
    best = 0
    for d in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            size = (d / "size").read_text().strip().upper()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1:], 1)
            best = max(best, int(size.rstrip("KMG")) * mult)
        except (OSError, ValueError):
            continue
    return best or 32 << 20


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def rope_tables(case: Case, env: Env):
    """cos/sin [S, D] in the activation dtype, in the rotate-half layout (HF's precomputed cache)."""
    torch = env.torch
    from dsinf import reference

    pos = torch.arange(case.seq_offset, case.seq_offset + case.S, device=env.device)
    cos, sin = reference.rope_cos_sin(pos, case.rotary_dim, 10000.0)
    dt = _torch_dtype(case.dtype)
    return torch.cat([cos, cos], dim=-1).to(dt), torch.cat([sin, sin], dim=-1).to(dt)


def torch_qkv_chain(x, w_kn, b, heads: int, cos, sin):
    """The eager path a model runs without fusion: addmm + bias, split, per-head view/transpose,
    rotate-half RoPE on q and k in torch ops, stacked contiguous to [3, B, H, S, D]."""
    import torch

    B, S, K = x.shape
    D = K // heads
    y = torch.addmm(b, x.reshape(B * S, K), w_kn).view(B, S, 3, heads, D)
    q, k, v = (y[:, :, i].transpose(1, 2) for i in range(3))

    def rope(t):
        t1, t2 = t[..., : D // 2], t[..., D // 2:]
        return t * cos + torch.cat((-t2, t1), dim=-1) * sin

    return torch.stack((rope(q), rope(k), v)).contiguous()


def build_impls(case: Case, env: Env) -> tuple[Any, dict[str, Impl | Unavailable]]:
    """(reference output on copy 0, {name: Impl | Unavailable}) for one case."""
    import torch
    import torch.nn.functional as F

    from dsinf import reference

    impls: dict[str, Impl | Unavailable] = {}
    K, N = case.K, case.N
    fname = f"{'vector_matmul' if case.op == 'vector_matmul' else 'linear_layer'}_{case.dtype}"
    ours = env.ours(fname)
    tri = env.triton_for(case)

    if case.op == "vector_matmul" and case.layout == "int8":
        ws = env.int8_weights(K, N)
        xs = env.inputs(case, max(len(ws), 2))
        ref = reference.vector_matmul(xs[0], ws[0], False, ws[0].scale, True, False)

        def vm_int8(f):
            return Impl(lambda i: f(xs[i % len(xs)], ws[i], False, ws[i].scale, True, False), len(ws))

        impls["ours"] = vm_int8(ours) if callable(ours) else ours
        deq_kn = env.dequantized(K, N, case.dtype, "kn")
        impls["torch"] = Impl(lambda i: torch.matmul(xs[i % len(xs)], deq_kn[i]), len(deq_kn))
        if case.section == "cuda":
            deq_nk = env.dequantized(K, N, case.dtype, "nk")
            impls["torch_nk"] = Impl(lambda i: F.linear(xs[i % len(xs)], deq_nk[i]), len(deq_nk))
            impls["triton"] = vm_int8(tri.vector_matmul) if not isinstance(tri, Unavailable) else tri
        else:
            aten = getattr(torch.ops.aten, "_weight_int8pack_mm", None)
            if aten is None:
                impls["aten_int8"] = Unavailable("torch has no aten._weight_int8pack_mm")
            else:
                sc = [w.scale.to(_torch_dtype(case.dtype)) for w in ws]  # per-channel [N], x's dtype
                impls["aten_int8"] = Impl(lambda i: aten(xs[i % len(xs)].view(case.M, K), ws[i], sc[i]), len(ws))
        return ref, impls

    ws = env.weights(K, N, case.dtype, case.layout)
    xs = env.inputs(case, max(len(ws), 2))
    nk = case.layout == "nk"
    if case.op == "vector_matmul":
        ref = reference.vector_matmul(xs[0], ws[0], False, None, False, nk)

        def vm(f):
            return Impl(lambda i: f(xs[i % len(xs)], ws[i], False, None, False, nk), len(ws))

        impls["ours"] = vm(ours) if callable(ours) else ours
        if nk:
            impls["torch"] = Impl(lambda i: F.linear(xs[i % len(xs)], ws[i]), len(ws))
        else:
            impls["torch"] = Impl(lambda i: torch.matmul(xs[i % len(xs)], ws[i]), len(ws))
        if case.section == "cuda":
            impls["triton"] = vm(tri.vector_matmul) if not isinstance(tri, Unavailable) else tri
        return ref, impls

    b = env.bias(N, case.dtype)
    if case.op == "linear":
        ref = reference.linear_layer(xs[0], ws[0], b, True, False, 1, nk)[0]

        def lin(f):
            return Impl(lambda i: f(xs[i % len(xs)], ws[i], b, True, False, 1, nk), len(ws))

        impls["ours"] = lin(ours) if callable(ours) else ours
        if nk:
            impls["torch"] = Impl(lambda i: torch.addmm(b, xs[i % len(xs)].view(case.M, K), ws[i].t()), len(ws))
        else:
            impls["torch"] = Impl(lambda i: torch.addmm(b, xs[i % len(xs)].view(case.M, K), ws[i]), len(ws))
        if case.section == "cuda":
            impls["triton"] = lin(tri.linear_layer) if not isinstance(tri, Unavailable) else tri
        return ref, impls

    # qkv: fused QKV + RoPE (rotate_half, full rotary dim), [K, N] weight
    assert case.op == "qkv" and case.layout == "kn" and case.rotary_dim == K // case.heads
    H, rd, off = case.heads, case.rotary_dim, case.seq_offset
    args = (True, True, H, False, 10000.0, rd, True, -1, off)
    ref = reference.linear_layer(xs[0], ws[0], b, *args)[0]
    cos, sin = rope_tables(case, env)

    def qkv(f):
        return Impl(lambda i: f(xs[i % len(xs)], ws[i], b, *args), len(ws))

    impls["ours"] = qkv(ours) if callable(ours) else ours
    impls["torch"] = Impl(lambda i: torch_qkv_chain(xs[i % len(xs)], ws[i], b, H, cos, sin), len(ws))
    if case.section == "cuda":
        impls["triton"] = qkv(tri.linear_layer) if not isinstance(tri, Unavailable) else tri
    return ref, impls


#: perf_counter() after which cases are skipped (set from --budget); None = no limit.
_deadline: float | None = None
#: variant -> error of its cold build in this run: the ops section then does not build it again.
_cold_build_failed: dict[str, str] = {}


def budget_exhausted() -> bool:
    return _deadline is not None and time.perf_counter() > _deadline


def skip_rest(report: Report, cases: list[Case]) -> None:
    """Record `cases` as skipped (their goals then read n/a) with one note instead of a line each."""
    report.note(f"--budget exhausted: {len(cases)} remaining cases skipped")
    report.rows.extend(Row(c, note="skipped: --budget exhausted") for c in cases)


def run_case(case: Case, env: Env, timer: Callable[[dict], dict[str, Timing]]) -> Row:
    """Check every implementation against the reference once, then time those that pass."""
    row = Row(case)
    try:
        ref, impls = build_impls(case, env)
    except Exception as exc:  # noqa: BLE001 - e.g. out of memory, a torch op missing
        row.note = f"setup failed: {type(exc).__name__}: {first_line(exc)}"
        return row
    tol = TOLERANCE[case.dtype]
    runnable: dict[str, tuple[Callable[[int], Any], int]] = {}
    for name, impl in impls.items():
        if isinstance(impl, Unavailable):
            row.impls[name] = ImplResult(name, "n/a", impl.reason)
            continue
        try:
            err = rel_err(impl.fn(0), ref)
        except Exception as exc:  # noqa: BLE001
            row.impls[name] = ImplResult(name, "n/a", f"{type(exc).__name__}: {first_line(exc)}", copies=impl.copies)
            continue
        if not err <= tol:  # NaN fails too
            row.impls[name] = ImplResult(name, "FAIL", f"rel err {err:.2e} > {tol:.0e}", err, impl.copies)
            continue
        row.impls[name] = ImplResult(name, "ok", "", err, impl.copies)
        runnable[name] = (impl.fn, impl.copies)
    del ref
    if runnable:
        try:
            for name, t in timer(runnable).items():
                row.impls[name].timing = t
        except Exception as exc:  # noqa: BLE001
            row.note = f"timing failed: {type(exc).__name__}: {first_line(exc)}"
            for name in runnable:
                row.impls[name].status, row.impls[name].reason = "n/a", row.note
    return row


# ---------------------------------------------------------------------------------------------------
# Printing the ops tables


def row_problems(row: Row) -> str:
    """FAIL / n/a reasons of a row, once each (n/a of the same reason repeated on every row is printed
    once per section by the caller)."""
    bits = [f"{n}: {r.reason}" for n, r in row.impls.items() if r.status == "FAIL"]
    if row.note:
        bits.append(row.note)
    return "; ".join(bits)


def print_cpu_row(row: Row) -> None:
    c = row.case
    extra = ""
    if "aten_int8" in row.impls:
        extra = f"  aten-i8 {impl_cell(row.impls['aten_int8']):>7} {fmt_x(row.ratio('aten_int8')):>6}"
    out(f"  {c.label:<36} {impl_cell(row.impls.get('ours')):>8} {impl_cell(row.impls.get('torch')):>8} "
        f"{fmt_x(row.ratio('torch')):>7} {fmt_num(row.gbs(), 1):>7} {fmt_num(row.gflops(), 1):>8}"
        f"{extra}")
    probs = row_problems(row)
    if probs:
        out(f"      {probs}")


def print_decode_pair(kn: Row, nk: Row, copy_gbs: float | None) -> None:
    c = kn.case

    def cells(r: Row) -> str:
        pct = r.gbs() / copy_gbs * 100 if (r.gbs() and copy_gbs) else None
        return (f"{impl_cell(r.impls.get('ours')):>7} {impl_cell(r.impls.get('torch')):>7} "
                f"{fmt_x(r.ratio('torch')):>6} {fmt_num(pct):>4}% {fmt_x(r.ratio('triton')):>6}")

    out(f"  {c.dtype} {c.K:>5}x{c.N:<5} {c.M:>3} | {cells(kn)} | {cells(nk)}")
    for r in (kn, nk):
        probs = row_problems(r)
        if probs:
            out(f"      {r.case.layout}: {probs}")


def print_cuda_row(row: Row, copy_gbs: float | None) -> None:
    c = row.case
    torch_us = best_torch_us(row)
    ratio = torch_us / row.us("ours") if (torch_us and row.us("ours")) else None
    pct = row.gbs() / copy_gbs * 100 if (row.gbs() and copy_gbs) else None
    out(f"  {c.label:<38} {impl_cell(row.impls.get('ours')):>7} {fmt_us(torch_us):>7} {fmt_x(ratio):>6} "
        f"{fmt_num(row.gbs()):>5} {fmt_num(pct):>4}% {fmt_num(row.tflops(), 1):>6} "
        f"{impl_cell(row.impls.get('triton')):>7} {fmt_x(row.ratio('triton')):>8}")
    probs = row_problems(row)
    if probs:
        out(f"      {probs}")


def best_torch_us(row: Row) -> float | None:
    """torch's best time (for int8 rows: the faster of the [K,N] matmul and the [N,K] F.linear)."""
    ts = [t for t in (row.us("torch"), row.us("torch_nk")) if t]
    return min(ts) if ts else None


def print_unavailable_once(rows: list[Row], seen: set[str]) -> None:
    for row in rows:
        for name, r in row.impls.items():
            if r.status == "n/a" and r.reason not in seen:
                seen.add(r.reason)
                out(f"  ({name} n/a: {r.reason})")


# ---------------------------------------------------------------------------------------------------
# Section: build


def _pythonpath() -> str:
    """PYTHONPATH for children: where this dsinf and op_builder live, then the caller's."""
    import importlib.util

    paths = [str(Path(__file__).resolve().parent.parent)]
    spec = importlib.util.find_spec("op_builder")
    if spec and spec.origin:
        paths.append(str(Path(spec.origin).resolve().parent.parent))
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    return os.pathsep.join(dict.fromkeys(paths))


MARK = "@@DSINF_BENCH@@"

_LOAD_CHILD = f"""
import json, sys, time
import torch
t0 = time.perf_counter()
from op_builder import InferenceBuilder
InferenceBuilder().load(sys.argv[1])
dt = time.perf_counter() - t0
from op_builder.builder import loaded_variants
lv = loaded_variants()[(InferenceBuilder.NAME, sys.argv[1])]
print({MARK!r} + json.dumps({{"in_process": dt, "how": lv.how, "load_seconds": lv.seconds,
      "build_seconds": lv.manifest.get("build_seconds"), "describe": lv.manifest.get("describe"),
      "archs": lv.manifest.get("archs"), "isa": lv.manifest.get("isa"), "path": str(lv.path)}}))
"""

_IMPORT_CHILD = f"""
import json, sys, time
import torch
t0 = time.perf_counter()
import dsinf
dt = time.perf_counter() - t0
print({MARK!r} + json.dumps({{"in_process": dt, "triton_imported": "triton" in sys.modules,
      "op_builder_imported": "op_builder" in sys.modules,
      "cuda_initialized": bool(torch.cuda.is_initialized())}}))
"""


def run_child(code: str, args: list[str], env: dict[str, str], timeout: float) -> dict[str, Any]:
    """Run `python -c code args...`; {"wall": s, "ok": bool, "data": parsed marker JSON, "error": tail}."""
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"wall": time.perf_counter() - t0, "ok": False, "error": f"timed out after {timeout:.0f} s"}
    wall = time.perf_counter() - t0
    data = None
    for line in p.stdout.splitlines():
        if line.startswith(MARK):
            data = json.loads(line[len(MARK):])
    if p.returncode != 0 or data is None:
        tail = "\n".join((p.stderr or p.stdout).strip().splitlines()[-8:])
        return {"wall": wall, "ok": False, "error": f"exit {p.returncode}: {tail}"}
    return {"wall": wall, "ok": True, "data": data}


def child_env(**overrides: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = _pythonpath()
    for k, v in overrides.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def save_build_log(root: str, variant: str, report: Report) -> dict[str, Any]:
    """Keep a failed build's log (its temp cache is deleted): its tail goes into the JSON and the whole
    log next to the --json file as <json>.<variant>-build.log."""
    logs = sorted(Path(root).rglob("build.log"), key=lambda q: q.stat().st_mtime)
    if not logs:
        return {}
    text = logs[-1].read_text(errors="replace")
    saved = None
    if report.args.get("json"):
        try:
            saved = f"{report.args['json']}.{variant}-build.log"
            Path(saved).parent.mkdir(parents=True, exist_ok=True)
            Path(saved).write_text(text)
            out(f"  [{variant}] build log saved to {saved}")
        except OSError:
            saved = None
    return {"log_tail": text.splitlines()[-80:], "log_saved": saved}


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def section_build(report: Report, variants: list[str], cold: bool, reps: int, timeout: float) -> str | None:
    """Cold build + warm load of each variant, import overhead. Returns the fresh cache root of the cold
    build of the first variant (the ops section loads from it instead of building again), or None."""
    out("\n== build: JIT build and load times (child processes) ==")
    b = report.build
    env0 = child_env()
    torch_walls: list[float] = []

    def torch_child() -> float | None:
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-c", "import torch"], env=env0, capture_output=True, timeout=300)
        if p.returncode != 0:
            return None
        torch_walls.append(time.perf_counter() - t0)
        return torch_walls[-1]

    for _ in range(reps):
        torch_child()
    t_torch = median(torch_walls)
    b["import_torch_s"] = {"median": t_torch, "runs": torch_walls}
    out(f"  import torch (child wall, median of {len(torch_walls)}): {fmt_num(t_torch, 2)} s")

    # import dsinf overhead: in-child timer around `import dsinf` after torch; wall difference as a check
    imp = [run_child(_IMPORT_CHILD, [], env0, 300) for _ in range(max(reps, 3))]
    good = [r for r in imp if r["ok"]]
    if good:
        ms = median([r["data"]["in_process"] * 1e3 for r in good])
        # JSON only: the wall-clock difference of two children is ~100x the effect and mostly noise
        wall_ms = (median([r["wall"] for r in good]) - t_torch) * 1e3 if t_torch else None
        flags = good[0]["data"]
        b["import_dsinf_ms"] = {"median": ms, "runs": [r["data"]["in_process"] * 1e3 for r in good],
                                "wall_minus_torch_ms": wall_ms, **{k: v for k, v in flags.items() if k != "in_process"}}
        side = [k for k in ("triton_imported", "op_builder_imported", "cuda_initialized") if flags.get(k)]
        out(f"  import dsinf beyond import torch: {ms:.1f} ms (timer in a child around `import dsinf` after "
            f"`import torch`, median of {len(good)})  goal <= 50 ms"
            + (f"  WARNING: import did {', '.join(side)}" if side else ""))
    else:
        b["import_dsinf_ms"] = {"error": imp[0]["error"]}
        report.note(f"import dsinf child failed: {imp[0]['error']}")

    reuse_root = None
    scratch: list[str] = []
    for variant in variants:
        entry: dict[str, Any] = {}
        b[variant] = entry
        goal_cold, goal_warm = GOALS[f"build.{variant}.cold"][2], GOALS[f"build.{variant}.warm"][2]
        if cold:
            root = tempfile.mkdtemp(prefix=f"dsinf-bench-{variant}-")
            env = child_env(TORCH_EXTENSIONS_DIR=root, DSINF_NO_PREBUILT="1")
            out(f"  [{variant}] cold build in a fresh cache {root} ...")
            r = run_child(_LOAD_CHILD, [variant], env, timeout)
            if not r["ok"]:
                _cold_build_failed[variant] = r["error"].splitlines()[-1][:200] if r["error"] else "failed"
                entry["cold"] = {"error": r["error"], "wall": r["wall"], **save_build_log(root, variant, report)}
                report.note(f"[{variant}] cold build failed after {r['wall']:.1f} s: {r['error']}")
                shutil.rmtree(root, ignore_errors=True)
                continue
            d = r["data"]
            beyond = r["wall"] - t_torch if t_torch else None
            entry["cold"] = {"wall": r["wall"], "beyond_torch": beyond, **d}
            out(f"  [{variant}] cold: {fmt_num(beyond, 1)} s beyond import torch (child {r['wall']:.1f} s; "
                f"build {fmt_num(d.get('build_seconds'), 1)} s in the manifest; how={d['how']}; "
                f"{'archs ' + ' '.join(d['archs']) if d.get('archs') else 'isa ' + str(d.get('isa'))})  "
                f"goal <= {goal_cold:g} s")
            warm_env = env
            if variant == variants[0]:
                reuse_root = root
            else:
                scratch.append(root)
        else:
            warm_env = env0
            try:
                from op_builder import InferenceBuilder

                _, why = InferenceBuilder().cached_entry(variant)
            except Exception as exc:  # noqa: BLE001
                why = f"{type(exc).__name__}: {first_line(exc)}"
            if why is not None:
                entry["warm"] = {"skipped": why}
                report.note(f"[{variant}] warm load skipped: no usable cache entry ({why}); cold build off (--quick)")
                continue
        # Paired: an import-torch child next to each load child (alternating which goes first), so both see
        # the same machine load; the value is the median of the paired differences.
        runs, diffs = [], []
        for k in range(reps):
            base = torch_child() if k % 2 == 0 else None
            r = run_child(_LOAD_CHILD, [variant], warm_env, timeout)
            if k % 2 == 1:
                base = torch_child()
            runs.append(r)
            if r["ok"] and base is not None and r["data"]["how"] in ("cached", "prebuilt"):
                diffs.append(r["wall"] - base)  # a child that had to build is not a warm load
        ok = [r for r in runs if r["ok"]]
        if not ok:
            entry["warm"] = {"error": runs[0]["error"]}
            report.note(f"[{variant}] warm load failed: {runs[0]['error']}")
            continue
        hows = sorted({r["data"]["how"] for r in ok})
        wall = median([r["wall"] for r in ok])
        inproc = median([r["data"]["in_process"] for r in ok])
        beyond = median(diffs)
        # When the children's wall clocks scatter by more than the goal itself (a busy machine), their
        # difference says nothing; the timer inside the child (import op_builder + load) is then the value.
        noisy = len(diffs) < 2 or max(diffs) - min(diffs) > goal_warm or (beyond is not None and beyond < 0)
        entry["warm"] = {"wall": wall, "beyond_torch": beyond, "paired_diffs": diffs, "in_process": inproc,
                         "how": ",".join(hows), "runs": [r["wall"] for r in ok], "wall_noisy": noisy,
                         "value": inproc if noisy else beyond}
        why_noisy = ("one pair cannot show the noise" if len(diffs) < 2
                     else "wall-clock differences scatter more than the goal")
        out(f"  [{variant}] warm: {fmt_num(beyond, 3)} s beyond import torch (median of {len(diffs)} paired child "
            f"differences: {', '.join(f'{d:+.2f}' for d in diffs)}); in-process load {inproc:.3f} s; "
            f"how={','.join(hows)}  goal <= {goal_warm:g} s"
            + (f"\n    {why_noisy}: judged on the in-process time" if noisy else ""))
        if hows != ["cached"] and hows != ["prebuilt"]:
            report.note(f"[{variant}] warm children did not all load from the cache (how={hows}): sources changed "
                        "during the run? children that built are left out of the warm number")
    for root in scratch:
        shutil.rmtree(root, ignore_errors=True)
    return reuse_root


# ---------------------------------------------------------------------------------------------------
# Section: CPU ops


def section_cpu(report: Report, parts: set[str], quick: bool) -> None:
    import torch

    out(f"\n== cpu: ops on {cpu_name()} ("
        f"{torch.get_num_threads()} threads, L3 {cpu_l3_bytes() >> 20} MiB) ==")
    load = report.meta.get("loadavg_at_start", 0.0)  # taken before our own build children ran
    if load > 0.5 * (os.cpu_count() or 1):
        out(f"  WARNING: load average {load:.1f} on {os.cpu_count()} cores before the run: other processes compete "
            "for the cores; CPU times are noisy (compare ratios, rerun on a quiet machine)")
    env = Env("cpu", quick)
    env.load_module()
    out(f"  compiled module: {env.module_why}")
    report.meta["cpu_module"] = env.module_why

    # the ceiling: a large copy (read + write)
    a = torch.randn(64 << 20)  # 256 MiB
    bb = torch.empty_like(a)
    t = time_cpu({"copy": (lambda i: bb.copy_(a), 1)}, 0.3 if quick else 1.0)["copy"]
    copy_gbs = 2 * a.numel() * 4 / t.us / 1e3
    report.ceilings["cpu_copy_GBs"] = copy_gbs
    out(f"  copy bandwidth (256 MiB .copy_, read+write): {copy_gbs:.1f} GB/s")
    del a, bb

    min_time = 0.15 if quick else 0.5
    out("  ratio = torch time / ours (> 1: ours faster); GB/s and GFLOP/s are ours")
    out(f"  {'case':<36} {'ours us':>8} {'torch us':>8} {'ratio':>7} {'GB/s':>7} {'GFLOP/s':>8}")
    seen: set[str] = set()
    last_shape = None
    cases = [c for c in cpu_cases(quick) if c.part in parts]
    for k, case in enumerate(cases):
        if budget_exhausted():
            skip_rest(report, cases[k:])
            break
        if last_shape is not None and (case.K, case.N) != last_shape:
            env.clear()
        last_shape = (case.K, case.N)
        row = run_case(case, env, lambda fns: time_cpu(fns, min_time))
        report.rows.append(row)
        print_cpu_row(row)
        print_unavailable_once([row], seen)
    env.clear()


# ---------------------------------------------------------------------------------------------------
# Section: CUDA ops


#: Ceiling measurements: a 1 GiB fp16 copy (read + write) and an fp16 GEMM of this size.
CUDA_COPY_ELEMS = 1 << 29
CUDA_MM_SIZE = 8192


def section_cuda(report: Report, parts: set[str], quick: bool, use_triton: bool, device: str = "cuda") -> None:
    """`device` is "cuda"; a test may pass "cpu" with torch.cuda's timing calls faked to dry-run the logic."""
    import torch

    if not torch.cuda.is_available():
        report.note("cuda section skipped: torch.cuda.is_available() is False "
                    f"(torch {torch.__version__}, CUDA {torch.version.cuda})")
        return
    torch.set_float32_matmul_precision("highest")  # the fp32 reference must not run on TF32
    props = torch.cuda.get_device_properties(0)
    out(f"\n== cuda: ops on {props.name} ({props.multi_processor_count} SMs, "
        f"L2 {int(getattr(props, 'L2_cache_size', 0)) >> 20} MiB, cc {props.major}.{props.minor}) ==")
    report.meta["gpu"] = props.name
    env = Env("cuda", quick, device)
    env.load_module()
    env.load_triton(use_triton)
    out(f"  compiled module: {env.module_why}; triton: {env.triton_why}")
    report.meta.update(cuda_module=env.module_why, triton=env.triton_why)
    timer = CudaTimer(batch_ms=0.5 if quick else 2.0, reps=5 if quick else 15)
    if timer._sleep is None:
        report.note("torch.cuda._sleep missing: batches are not pre-queued; decode times may include launch gaps")

    # ceilings: device-to-device copy (read + write), one large fp16 GEMM
    a = torch.randn(CUDA_COPY_ELEMS, device=device, dtype=torch.float16)
    bb = torch.empty_like(a)
    t = timer.measure({"copy": (lambda i: bb.copy_(a), 1)})["copy"]
    copy_gbs = 2 * a.numel() * 2 / t.us / 1e3
    del a, bb
    n = CUDA_MM_SIZE
    x = torch.randn(n, n, device=device, dtype=torch.float16)
    y = torch.randn(n, n, device=device, dtype=torch.float16)
    t = timer.measure({"mm": (lambda i: torch.mm(x, y), 1)})["mm"]
    mm_tflops = 2 * n ** 3 / t.us / 1e6
    del x, y
    torch.cuda.empty_cache()
    report.ceilings.update(cuda_copy_GBs=copy_gbs, cuda_fp16_mm_8192_TFLOPs=mm_tflops,
                           reference_points=CUDA_REFERENCE_POINTS)
    out(f"  copy bandwidth ({CUDA_COPY_ELEMS * 2 >> 20} MiB .copy_, read+write): {copy_gbs:.0f} GB/s   "
        f"(DESIGN ref {CUDA_REFERENCE_POINTS['copy_GBs']:.0f})")
    out(f"  torch fp16 mm {n}^3: {mm_tflops:.0f} TFLOP/s")

    cases = [c for c in cuda_cases(quick) if c.part in parts]
    seen: set[str] = set()

    def shape_change(prev, c):
        if prev is not None and prev != (c.K, c.N):
            env.clear()
        return (c.K, c.N)

    decode = [c for c in cases if c.part == "decode"]
    if decode:
        out("\n  decode GEMV (vector_matmul): ours/torch us, ratio = torch/ours, % of copy bandwidth (ours), "
            "tri = triton/ours time")
        out(f"  {'dtype K x N':<16} {'M':>3} | {'[K,N]: ours':>11} {'torch':>7} {'ratio':>6} {'%bw':>5} {'tri':>6} | "
            f"{'[N,K]: ours':>11} {'torch':>7} {'ratio':>6} {'%bw':>5} {'tri':>6}")
        prev = None
        pairs: dict[tuple, dict[str, Case]] = {}
        for c in decode:
            pairs.setdefault((c.dtype, c.K, c.N, c.M), {})[c.layout] = c
        for k, ((dtype, K, N, M), d) in enumerate(pairs.items()):
            if budget_exhausted():
                skip_rest(report, [c for dd in list(pairs.values())[k:] for c in dd.values()])
                break
            prev = shape_change(prev, d["kn"])
            rows = [run_case(d[lay], env, timer.measure) for lay in ("kn", "nk")]
            report.rows.extend(rows)
            print_decode_pair(rows[0], rows[1], copy_gbs)
            print_unavailable_once(rows, seen)
        env.clear()
        # DESIGN §7 reference points: torch's own times, to validate the timer on this card
        for r in report.rows:
            c = r.case
            if c.section == "cuda" and c.part == "decode" and c.dtype == "fp16" and c.M == 1 and c.layout == "nk":
                key = f"torch fp16 M=1 {c.K}x{c.N} us"
                if key in CUDA_REFERENCE_POINTS:
                    out(f"  timer check: torch F.linear fp16 M=1 {c.K}x{c.N}: {fmt_us(r.us('torch'))} us "
                        f"(DESIGN ref {CUDA_REFERENCE_POINTS[key]:.0f} us)")

    header = (f"  {'case':<38} {'ours us':>7} {'torch':>7} {'ratio':>6} {'GB/s':>5} {'%bw':>5} {'TF/s':>6} "
              f"{'triton':>7} {'tri/ours':>8}")
    for part, title in (("int8", "int8 weight-only (per-channel) vs torch fp16 "
                                 "(best of [K,N] matmul / [N,K] F.linear)"),
                        ("prefill", "prefill linear + bias vs torch.addmm"),
                        ("qkv", "fused QKV + RoPE (rotate_half, rotary_dim=D=128) vs the eager torch chain")):
        sel = [c for c in cases if c.part == part]
        if not sel:
            continue
        out(f"\n  {title}")
        out(header)
        prev = None
        for k, c in enumerate(sel):
            if budget_exhausted():
                skip_rest(report, sel[k:])
                break
            prev = shape_change(prev, c)
            row = run_case(c, env, timer.measure)
            report.rows.append(row)
            print_cuda_row(row, copy_gbs)
            print_unavailable_once([row], seen)
            if part == "prefill" and c.dtype == "fp16" and c.layout == "kn":
                out(f"      timer check: torch.addmm {fmt_us(row.us('torch'))} us "
                    f"(DESIGN ref {CUDA_REFERENCE_POINTS['torch fp16 M=2048 K=4096 N=12288 us']:.0f} us)")
        env.clear()


# ---------------------------------------------------------------------------------------------------
# Goals


def judge(key: str, value: float | None, detail: str = "", why: str = "") -> dict[str, Any]:
    desc, cmp, target, unit = GOALS[key]
    g = {"key": key, "goal": desc, "target": f"{cmp} {target:g}{unit}", "value": value, "unit": unit,
         "detail": detail}
    if value is None:
        g.update(status="n/a", margin=None, why=why or "not measured")
        return g
    ok = value >= target if cmp == ">=" else value <= target
    if cmp == ">=":
        margin = value / target - 1 if target else None
    else:
        margin = target / value - 1 if value > 0 else None  # at or below zero: no meaningful ratio
    g.update(status="PASS" if ok else "MISS", margin=margin)
    return g


def evaluate_goals(report: Report, device: str) -> list[dict[str, Any]]:
    goals: list[dict[str, Any]] = []
    b = report.build
    if b:
        v = b.get("import_dsinf_ms", {}).get("median")
        goals.append(judge("build.import", v, why="import child failed"))
        for variant in ("cpu", "cuda"):
            if variant not in b:
                continue
            e = b[variant]
            cold = e.get("cold", {})
            if cold or variant == device:
                goals.append(judge(f"build.{variant}.cold", cold.get("beyond_torch"),
                                   f"child {cold['wall']:.1f}s, manifest {fmt_num(cold.get('build_seconds'), 1)}s"
                                   if "wall" in cold and cold.get("beyond_torch") is not None else "",
                                   why=build_failure_reason(cold) if cold.get("error")
                                   else "cold build not run (--quick)"))
            warm = e.get("warm", {})
            if warm.get("wall_noisy"):
                diffs = warm["paired_diffs"]
                detail = ("in-process; " + (f"wall diffs {', '.join(f'{d:+.2f}' for d in diffs)} too noisy"
                                            if len(diffs) > 1 else "one wall pair only"))
            elif "in_process" in warm:
                detail = f"paired wall diff; in-process {warm['in_process']:.3f}s"
            else:
                detail = ""
            goals.append(judge(f"build.{variant}.warm", warm.get("value"), detail,
                               why=(warm.get("error") or warm.get("skipped") or "not run")[:80]))

    rows = report.rows
    cpu = [r for r in rows if r.case.section == "cpu"]
    for r in cpu:
        c = r.case
        shape = f"{c.K}x{c.N}"
        if c.part == "int8" and c.dtype == "fp32":
            goals.append(judge("cpu.int8_vs_fp32", r.ratio("torch"), shape, why=why_missing(r)))
            goals.append(judge("cpu.int8_vs_aten", r.ratio("aten_int8"), shape,
                               why=why_missing(r, "ours", "aten_int8")))
        elif c.part == "qkv":
            goals.append(judge("cpu.qkv", r.ratio("torch"), f"M={c.M} hidden={c.K}", why=why_missing(r)))
        elif c.part == "prefill":
            goals.append(judge("cpu.prefill", r.ratio("torch"), shape, why=why_missing(r)))

    cuda = [r for r in rows if r.case.section == "cuda"]
    copy_gbs = report.ceilings.get("cuda_copy_GBs")
    dec = [r for r in cuda if r.case.part == "decode"]
    for r in dec:
        c = r.case
        if c.M == 1 and c.K == 4096 and c.N == 4096:
            goals.append(judge("cuda.decode_4096", r.ratio("torch"), f"{c.dtype} {c.layout}",
                               why=why_missing(r)))
    for dtype in sorted({r.case.dtype for r in dec}):
        sel = [r for r in dec if r.case.dtype == dtype and r.case.M <= 8]
        goals.append(worst(sel, lambda r: r.gbs() / copy_gbs * 100 if (r.gbs() and copy_gbs) else None,
                           "cuda.decode_bw", dtype, min))
    i8 = [r for r in cuda if r.case.part == "int8" and r.case.M == 1]
    if i8:
        goals.append(worst(i8, lambda r: (best_torch_us(r) / r.us("ours")) if (best_torch_us(r) and r.us("ours"))
                           else None, "cuda.int8", "fp16 act", min))
    for r in (r for r in cuda if r.case.part == "prefill"):
        goals.append(judge("cuda.prefill", r.ratio("torch"), f"{r.case.dtype} {r.case.layout}",
                           why=why_missing(r)))
    qkv = [r for r in cuda if r.case.part == "qkv"]
    if qkv:
        goals.append(worst([r for r in qkv if r.case.M <= 16], lambda r: r.ratio("torch"), "cuda.qkv",
                           "decode M<=16", min))
        for r in (r for r in qkv if r.case.M > 16):
            goals.append(judge("cuda.qkv", r.ratio("torch"), f"{r.case.dtype} M={r.case.M}",
                               why=why_missing(r)))
    tri_dec = [r for r in cuda if r.case.part in ("decode", "int8") and r.case.M <= 16]
    if tri_dec:
        goals.append(worst(tri_dec, lambda r: r.ratio("triton"), "triton.decode", "decode + int8 rows", max))
    for r in (r for r in cuda if r.case.part == "prefill"):
        v = r.us("torch") / r.us("triton") if (r.us("torch") and r.us("triton")) else None
        goals.append(judge("triton.prefill", v, f"{r.case.dtype} {r.case.layout}",
                           why=why_missing(r, "torch", "triton")))
    return goals


def build_failure_reason(cold: dict[str, Any]) -> str:
    """One line for the summary: the last informative error line (not the temp log path), and the saved log."""
    lines = [ln.strip() for ln in cold["error"].splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(("full log:", "#", "File ", "^"))]
    msg = (useful or lines or ["?"])[-1][:70]
    return f"build failed: {msg}" + (f" (log: {cold['log_saved']})" if cold.get("log_saved") else "")


def why_missing(row: Row, *names: str) -> str:
    """Why a goal on `row` has no value: the first of `names` (default: ours and torch) without a time."""
    for n in names or ("ours", "torch"):
        r = row.impls.get(n)
        if r is None:
            return row.note or f"{n} not measured"
        if r.status != "ok":
            reason = r.reason if r.reason.startswith(f"{n}:") else f"{n}: {r.reason}"
            return (reason if r.status == "n/a" else f"{n} {r.status}: {r.reason}")[:90]
    return row.note[:90]


def worst(rows: list[Row], metric: Callable[[Row], float | None], key: str, scope: str, pick) -> dict[str, Any]:
    """The goal on the worst row (pick=min for higher-is-better, max for lower-is-better)."""
    vals = [(metric(r), r) for r in rows]
    have = [(v, r) for v, r in vals if v is not None]
    if not have:
        why = why_missing(rows[0], "ours", "triton" if key.startswith("triton") else "torch") if rows else "no rows"
        return judge(key, None, scope, why=why)
    v, r = pick(have, key=lambda t: t[0])
    detail = f"{scope}; worst {r.case.label}"
    if len(have) < len(vals):
        detail += f" ({len(vals) - len(have)} rows n/a)"
    return judge(key, v, detail)


def print_summary(report: Report) -> None:
    out("\n== summary: goals ==")
    c = report.ceilings
    refs = []
    if "cuda_copy_GBs" in c:
        refs.append(f"cuda copy {c['cuda_copy_GBs']:.0f} GB/s (ref {CUDA_REFERENCE_POINTS['copy_GBs']:.0f})")
        refs.append(f"fp16 mm {c['cuda_fp16_mm_8192_TFLOPs']:.0f} TFLOP/s")
        for r in report.rows:
            k = r.case
            if k.section == "cuda" and k.part == "decode" and k.dtype == "fp16" and k.M == 1 and k.layout == "nk" \
                    and f"torch fp16 M=1 {k.K}x{k.N} us" in CUDA_REFERENCE_POINTS:
                refs.append(f"torch M=1 {k.K}x{k.N} {fmt_us(r.us('torch'))}us "
                            f"(ref {CUDA_REFERENCE_POINTS[f'torch fp16 M=1 {k.K}x{k.N} us']:.0f})")
            if k.section == "cuda" and k.part == "prefill" and k.dtype == "fp16" and k.layout == "kn":
                refs.append(f"addmm M=2048 {fmt_us(r.us('torch'))}us (ref 270)")
    if "cpu_copy_GBs" in c:
        refs.append(f"cpu copy {c['cpu_copy_GBs']:.1f} GB/s")
    if refs:
        out("  ceilings / timer checks: " + "; ".join(refs))
    out(f"  {'goal':<52} {'target':>9} {'measured':>10}  verdict")
    goals: list[dict[str, Any]] = []  # identical n/a lines of one goal (e.g. no triton) collapse into one
    for g in report.goals:
        prev = goals[-1] if goals else None
        same = prev is not None and (prev["key"], prev["status"], prev.get("why")) == (g["key"], "n/a", g.get("why"))
        if same and g["status"] == "n/a":
            prev["times"] = prev.get("times", 1) + 1
            continue
        goals.append(dict(g))
    for g in goals:
        unit = g["unit"]
        v = g["value"]
        meas = "n/a" if v is None else (f"{v:.2f}{unit}" if unit in ("x", "s") else f"{v:.0f}{unit}" if unit == "%"
                                        else f"{v:.1f}{unit}")
        if g["status"] == "n/a":
            verdict = f"n/a ({g['why']})" + (f" x{g['times']}" if g.get("times") else "")
        else:
            verdict = g["status"] + (f" {g['margin'] * 100:+.0f}%" if g["margin"] is not None else "")
        det = f"  [{g['detail']}]" if g["detail"] and not g.get("times") else ""
        out(f"  {g['goal'][:52]:<52} {g['target']:>9} {meas:>10}  {verdict}{det}")
    fails = [(r.case.label, n, i.reason) for r in report.rows for n, i in r.impls.items() if i.status == "FAIL"]
    if fails:
        out(f"  CORRECTNESS FAILURES ({len(fails)}): " + "; ".join(f"{l} [{n}] {why}" for l, n, why in fails[:6]))
    n_pass = sum(g["status"] == "PASS" for g in report.goals)
    n_miss = sum(g["status"] == "MISS" for g in report.goals)
    n_na = sum(g["status"] == "n/a" for g in report.goals)
    m = report.meta
    out(f"  {n_pass} PASS, {n_miss} MISS, {n_na} n/a | {m.get('device_name', '')} | torch {m.get('torch')} | "
        f"commit {m.get('commit')} | {m.get('elapsed_s', 0):.0f} s")


# ---------------------------------------------------------------------------------------------------
# Plan (no measurement): the accounting, checkable without hardware


def print_plan(device: str, quick: bool) -> None:
    cases = cuda_cases(quick) if device == "cuda" else cpu_cases(quick)
    cache = 50 << 20 if device == "cuda" else cpu_l3_bytes()
    factor, lo, hi = (4.0, 2, 16) if device == "cuda" else (2.0, 1, 8)
    out(f"plan for {device} ({'quick' if quick else 'full'}): {len(cases)} cases; cache {cache >> 20} MiB")
    out(f"  {'case':<44} {'weight MB':>9} {'bytes MB':>9} {'GFLOP':>8} {'copies':>6}")
    for c in cases:
        out(f"  {c.label:<44} {c.weight_bytes / 1e6:>9.1f} {c.bytes / 1e6:>9.2f} {c.flops / 1e9:>8.3f} "
            f"{copies_for(c.weight_bytes, cache, factor, lo, hi):>6}")


# ---------------------------------------------------------------------------------------------------
# Main


def git_commit() -> str:
    # A copy of the tree without .git (the lent GPU machine) names its commit in DSINF_BENCH_COMMIT.
    if os.environ.get("DSINF_BENCH_COMMIT"):
        return os.environ["DSINF_BENCH_COMMIT"]
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return "no-commit"
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dsinf.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto",
                   help="auto: cuda if torch sees a GPU, else cpu")
    p.add_argument("--quick", action="store_true", help="few shapes, short timing, no cold build (smoke test)")
    p.add_argument("--json", metavar="PATH", help="write every measurement as JSON to PATH")
    p.add_argument("--only", metavar="SECTION[,SECTION]", default="",
                   help=f"run only these: {', '.join(SECTIONS)} (the last four are parts of the ops section)")
    bt = p.add_mutually_exclusive_group()
    bt.add_argument("--build-times", dest="build_times", action="store_true", default=None,
                    help="measure the cold build too (default: on, off with --quick)")
    bt.add_argument("--no-build-times", dest="build_times", action="store_false", help="skip the build section")
    p.add_argument("--no-triton", action="store_true", help="skip the Triton column")
    p.add_argument("--budget", type=float, default=0.0, metavar="SECONDS",
                   help="skip the remaining cases once the run has taken this long (the summary and JSON are "
                        "still written); 0 = no limit")
    p.add_argument("--plan", action="store_true", help="print the cases with their bytes/FLOPs and exit")
    return p.parse_args(argv)


def select_sections(only: set[str], device: str, build_times: bool | None) -> tuple[bool, bool, bool, set[str]]:
    """(build?, cpu ops?, cuda ops?, ops parts) from --only / --device / --build-times.

    No --only: build (unless --no-build-times) and the ops section of the device, all parts. With --only:
    "build", "cpu", "cuda" name sections; a part (decode, int8, prefill, qkv) alone runs that part of
    the device's ops section, and with "cpu"/"cuda" restricts that section to it. --no-build-times wins.
    """
    named_parts = only & set(OPS_PARTS)
    parts = named_parts or set(OPS_PARTS)
    if not only:
        return build_times is not False, device == "cpu", device == "cuda", parts
    run_build = "build" in only and build_times is not False
    run_cpu = "cpu" in only or (device == "cpu" and bool(named_parts))
    run_cuda = "cuda" in only or (device == "cuda" and bool(named_parts))
    return run_build, run_cpu, run_cuda, parts


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    bad = only - set(SECTIONS)
    if bad:
        print(f"dsinf.bench: unknown section(s) {', '.join(sorted(bad))}; choose from {', '.join(SECTIONS)}",
              file=sys.stderr)
        return 2

    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.plan:
        print_plan(device, args.quick)
        return 0

    started = time.perf_counter()
    global _deadline
    _deadline = started + args.budget if args.budget > 0 else None
    report = Report(args=vars(args))
    report.meta.update(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), device=device,
        host=platform.node(), python=platform.python_version(), torch=torch.__version__,
        torch_cuda=torch.version.cuda, cpu_threads=torch.get_num_threads(), commit=git_commit(),
        quick=args.quick, device_name=f"{cpu_name()} x{os.cpu_count()}",
        loadavg_at_start=os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0)
    out(f"dsinf.bench: device={device} {'quick' if args.quick else 'full'} | torch {torch.__version__} | "
        f"python {platform.python_version()} | commit {report.meta['commit']} | {report.meta['date']}")

    run_build, run_cpu_ops, run_cuda_ops, parts = select_sections(only, device, args.build_times)

    reuse_root = None
    cold = args.build_times if args.build_times is not None else not args.quick
    variants = ["cuda", "cpu"] if device == "cuda" else ["cpu"]
    reps = 1 if args.quick and not args.build_times else 3

    def write_json() -> None:
        if not args.json:
            return
        try:
            report.meta["elapsed_s"] = time.perf_counter() - started
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(args.json + ".tmp")
            tmp.write_text(json.dumps(report.to_json(), indent=1, default=str))
            os.replace(tmp, args.json)
        except OSError as exc:
            report.note(f"could not write {args.json}: {exc}")

    def section(name: str, fn: Callable[[], Any]) -> Any:
        """Run one section: never let it take the run down; time it; save what we have."""
        t0 = time.perf_counter()
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001
            report.note(f"{name} section failed: {type(exc).__name__}: {first_line(exc)}")
            traceback.print_exc()
            return None
        finally:
            report.meta.setdefault("section_s", {})[name] = round(time.perf_counter() - t0, 1)
            out(f"  ({name}: {time.perf_counter() - t0:.0f} s)")
            report.goals = evaluate_goals(report, device)
            write_json()

    def build_section() -> str | None:
        budget_left = (_deadline - time.perf_counter()) if _deadline else 900.0
        return section("build", lambda: section_build(report, variants, cold, reps,
                                                      timeout=max(60.0, min(900.0, budget_left))))

    try:
        # With a cold build, the build section runs first and the ops sections load that fresh cache
        # (same sources, same key: no second build). Without one (--quick), it runs after them, so the
        # warm-load children find the module the ops section loaded (or built).
        if run_build and cold:
            reuse_root = build_section()
            if reuse_root and "TORCH_EXTENSIONS_DIR" not in os.environ:
                os.environ["TORCH_EXTENSIONS_DIR"] = reuse_root
                report.meta["ops_cache"] = reuse_root
        if run_cpu_ops:
            section("cpu", lambda: section_cpu(report, parts, args.quick))
        if run_cuda_ops:
            section("cuda", lambda: section_cuda(report, parts, args.quick, not args.no_triton))
        if run_build and not cold:
            build_section()
        if device == "cuda" and report.meta.get("gpu"):
            report.meta["device_name"] = report.meta["gpu"]
        report.meta["elapsed_s"] = time.perf_counter() - started
        report.goals = evaluate_goals(report, device)
        write_json()
        if args.json:
            out(f"\nfull results: {args.json}")
        print_summary(report)
    finally:
        if reuse_root:
            shutil.rmtree(reuse_root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # e.g. `| head`: stop quietly, like other command-line tools
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
