"""Routes: for each matmul shape, which M run on our GEMV and which on the ATen path, measured per device.

The compiled bindings run a matmul of M = B*S rows on our GEMV up to a crossover M and on the ATen path above
it (cuBLAS on CUDA; on CPU MKL's fp32 GEMM, or torch's bf16 GEMM for bf16 activations on a host with
avx512_bf16). The compiled crossover is one number per dtype; the measured one is per shape: on an H200 a bf16
[K, N] 8192x8192 weight runs faster on our GEMV at M = 1 and on cuBLAS from M = 4, while 4096x4096 stays
faster on ours up to M = 16. The binding keeps a route table (csrc/inference/binding/routes.h):

    (activation dtype, weight layout kn | nk | int8, K, N) -> min_m..max_m: the Ms run on our GEMV
                                                              (max_m 0: always ATen; absent: 1..the compiled
                                                              crossover)

min_m is 1 unless ATen measured faster at the smallest Ms and ours above them (on an Intel Xeon MKL's fp32
GEMV edges ours at M = 1 on a wide [K, N] weight, 0.95-0.97x, where ours leads 1.4-1.8x at M = 2..16).

and, for int8 weights above the GEMV's range (CUDA):

    (activation dtype, int8-gemm, K, N) -> max_m: the largest M run on the int8 GEMM (reads the int8 weights
        once; min_m 1), above it dequantize + cuBLAS (cuBLAS's GEMM is faster from M ~ 256-1024 on an H200).
        Measured at the prefill sizes GEMM_BUCKETS with the shape's GEMV route held at 0, so every bucket is a choice
        between the two; the GEMM keeps the Ms up to the first bucket where it measured slower at all
        (`decide_key`: a tie's sliver of loss there was a real loss when checked). Tuned
        with the int8 key on CUDA (fp16 / bf16 activations: fp32 ones never take the GEMM).

and, for rms_mlp_gemm's gate|up (hidden K -> N = 2I outputs), the gated layouts:

    (activation dtype, gated-kn | gated-nk | gated-int8, K, N) -> max_m: the largest M run on the gated kernel
        (act(gate) * up in its epilogue; min_m 1); above it the gate|up runs as a matmul (itself routed by its
        plain key) and then the gated epilogue. On an H200 the gated kernel wins at decode on small weights and
        loses on large ones (16-bit gate|up of 80 MiB or more): the compiled rule is that crossover, a
        measured route replaces it per device and shape.

This module measures it, persists it, and pushes it into the binding:

- measure (`tune_routes`, `tune_mlp_routes`, or `dsinf.inject` for a model's distinct linear and fused-MLP
  shapes on CUDA): for each M of `buckets()`, time the binding itself (vector_matmul; rms_mlp_gemm for a
  gated key) with the shape's route forced to our GEMV and to ATen (gated: matmul + epilogue) (CUDA:
  CUDA-graph replays timed with events, over rotating weight copies larger than twice the L2 cache; CPU:
  the fastest of individually timed calls over rotating copies larger than twice the largest cache, at
  most 8 (`_cpu_copies`), and the buckets where the decision starts and stops are timed again before it
  stands), then `decide_span`: max_m is the largest bucket at which our GEMV beats ATen by more than MARGIN
  (2%) with no bucket between min_m and it where ATen was faster by more than MARGIN;
  a tie (within MARGIN either way) alone goes to torch, and ties below a win go along with it only when
  that win is clear (RIDE_ALONG, 5%); min_m is the first bucket from which that rule finds a win (1 when it
  finds one from the smallest), so the Ms below it measured ATen faster or tied; a gated key keeps the gated
  kernel up to the first M where the matmul path wins by more than MARGIN (`decide_gated`: a tie goes to
  the one launch); an int8-gemm key keeps the GEMM up to the first M where it measured slower at all.
- persist: <data root>/routes.v4.json (op_builder.cache.data_root(): $DSINF_CACHE_DIR, else beside the
  JIT cache root, or in it where that directory is shared), one table per device key
  `<variant>|<device name>|torch=<version>|build=<module key>`: a rebuilt module, another torch or another
  GPU measures again. Written under op_builder.locking.FileLock (re-read, merged, written with
  op_builder.atomic.write_json); read with read_json. A malformed file is an empty table (one warning); a
  malformed entry is dropped (one warning). A table that cannot be written is a warning per failed save;
  the process still reuses what it measured.
- apply: when a compiled module loads (InferenceBuilder.post_load), its device's persisted table is pushed
  once; a tuning pushes its result at once. Reading the route costs the op a pointer load and a search.

Never measured inside CUDA-graph capture or torch.compile tracing: the route is read by the op when it
runs, so a captured graph or a compiled program replays the route in force when it was made.

The knob DSINF_ROUTES (op_builder.knobs): auto (default: apply persisted routes; inject measures missing
shapes on CUDA), measure (inject measures on CPU too), load (apply, never measure automatically), off
(compiled crossovers only; nothing read or measured automatically). An explicit `tune_routes` always
measures and applies. `python -m dsinf.routes` prints the persisted tables.

While a shape is measured its route is forced in the process-wide binding table, so measure before
serving, not beside it (inject and an explicit call do).
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import statistics
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch

from op_builder import knobs
from op_builder.atomic import read_json, remove_orphans, write_json
from op_builder.locking import FileLock

logger = logging.getLogger("dsinf")

FORMAT = "dsinf-routes"
VERSION = 4  # 2: the gated keys; 3: the int8-gemm keys; 4: min_m. Each version has its own file, so an
#              older dsinf sharing the cache never reads (and, rewriting it, drops) keys it cannot parse; a new
#              version measures again.
FILENAME = f"routes.v{VERSION}.json"
LOCK_TIMEOUT_S = 30.0
MARGIN = 0.02  # our GEMV is routed only up to an M where it beats ATen by more than this (a tie alone goes to torch)
RIDE_ALONG = 0.05  # ties below such an M go along with it only when it beat ATen by more than this
BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # the Ms measured, capped at what the GEMV accepts
# The Ms an int8-gemm key is measured at: from the int8 GEMV's largest M up to a long prompt's. Where cuBLAS's
# GEMM overtakes ours is M ~ 256-1024 on an H200 (earlier on small weights and on bf16, later on large ones).
GEMM_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048)
WARM_FIRST_S = 0.05  # CUDA: a shape's first bucket replays its graphs this long before timing (clocks ramp up)
WARM_S = 0.002  # ... and every later bucket (its graphs are new; the clocks are up)
# Shared with csrc/inference/binding/routes.h (DtypeCode, LayoutCode).
DTYPE_CODES = {"fp32": 0, "fp16": 1, "bf16": 2}
LAYOUT_CODES = {"kn": 0, "nk": 1, "int8": 2, "gated-kn": 3, "gated-nk": 4, "gated-int8": 5, "int8-gemm": 6}
INT8_GEMM = "int8-gemm"  # an int8 matmul above the GEMV's range: max_m = the largest M on the int8 GEMM (CUDA)
INT8_GEMM_LIMIT = 1 << 40  # the GEMM takes any M (the binding sets no cap on these keys)
GATED = "gated-"  # a gated layout is this prefix + the gate|up weight's plain layout
INT64_MAX = 2**63 - 1  # the binding's K, N and max_m are int64: ctypes would wrap a larger int, not refuse it
SILU = 4  # ActivationFuncType.GATED_SILU: the activation a gated key is timed with (GELU's cost is alike)
_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
#: A value of the binding's table (Binding.set): max_m (min_m 1), or (min_m, max_m).
Span = int | tuple[int, int]
_OP = "transformer_inference"  # InferenceBuilder.NAME


def table_path() -> Path:
    from op_builder.cache import data_root

    return data_root() / FILENAME


# ---------------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class RouteKey:
    """One matmul shape as the binding sees it: activation dtype, weight layout, K, N. A gated layout is
    rms_mlp_gemm's gate|up: K = hidden, N = 2I."""
    dtype: str  # fp32 | fp16 | bf16 (the activation dtype; int8 weights are a layout)
    layout: str  # kn | nk | int8, gated-kn | gated-nk | gated-int8, or int8-gemm
    K: int
    N: int

    def __post_init__(self):
        if self.dtype not in DTYPE_CODES:
            raise ValueError(f"routes: dtype {self.dtype!r}: expected one of {', '.join(DTYPE_CODES)}")
        if self.layout not in LAYOUT_CODES:
            raise ValueError(f"routes: layout {self.layout!r}: expected one of {', '.join(LAYOUT_CODES)}")
        for name in ("K", "N"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= INT64_MAX:
                raise ValueError(f"routes: {name} must be an int in [1, 2**63 - 1], got {value!r}")
        if self.gated and self.N % 2:
            raise ValueError(f"routes: a gated key's N is the gate|up's 2I outputs, so even; got {self.N}")

    @property
    def gated(self) -> bool:
        return self.layout.startswith(GATED)

    @property
    def weight(self) -> str:
        """The weight's layout: kn | nk | int8 (an int8-gemm key's weight is int8, a gated key's its plain one's)."""
        return "int8" if self.layout == INT8_GEMM else self.plain.layout

    @property
    def plain(self) -> "RouteKey":
        """The gate|up matmul's own key (itself for a plain key)."""
        return RouteKey(self.dtype, self.layout[len(GATED):], self.K, self.N) if self.gated else self

    @property
    def text(self) -> str:
        return f"{self.dtype}|{self.layout}|K={self.K}|N={self.N}"

    @classmethod
    def parse(cls, text: str) -> "RouteKey":
        dtype, layout, k, n = text.split("|")
        if not (k.startswith("K=") and n.startswith("N=")):
            raise ValueError(text)
        return cls(dtype, layout, int(k[2:]), int(n[2:]))


@dataclass(frozen=True)
class Route:
    """A measured route: our GEMV for min_m <= M <= max_m, ATen outside (a gated key: the gated kernel, else
    the matmul + gated epilogue; max_m 0: ATen for every M); with the times it was decided from."""
    key: RouteKey
    max_m: int
    default_max_m: int  # the compiled crossover it replaces
    buckets: tuple[int, ...] = ()
    ours_ms: tuple[float, ...] = ()  # per bucket: the op with the route forced to our GEMV (gated kernel)
    aten_ms: tuple[float, ...] = ()  # ... forced to ATen (matmul + gated epilogue)
    tuned_at: str = ""
    min_m: int = 1

    def __post_init__(self):
        if not 1 <= self.min_m <= max(self.max_m, 1):
            raise ValueError(f"routes: {self.key.text}: min_m {self.min_m} is not in [1, max(max_m {self.max_m}, 1)]")

    @property
    def entry(self) -> Span:
        """What the binding's table holds for this route: max_m, or (min_m, max_m) when min_m > 1."""
        return self.max_m if self.min_m == 1 else (self.min_m, self.max_m)

    @property
    def ratios(self) -> tuple[float, ...]:
        """ATen time / our time per bucket (> 1: ours is faster)."""
        return tuple(a / o for a, o in zip(self.aten_ms, self.ours_ms))

    def explain(self) -> str:
        key = self.key
        if key.layout == INT8_GEMM:
            shape = f"{key.dtype} int8 {key.K}x{key.N} above the GEMV"
            where = ("dequantize + cuBLAS for every M" if self.max_m == 0 else
                     f"int8 GEMM for M <= {self.max_m}, dequantize + cuBLAS above")
            versus = "dequantize+cuBLAS/GEMM"
        elif key.gated:
            shape = f"{key.dtype} {key.plain.layout} gate|up {key.K}x{key.N}"
            where = ("matmul + gated epilogue for every M" if self.max_m == 0 else
                     f"gated kernel for M <= {self.max_m}, matmul + gated epilogue above")
            versus = "matmul/gated"
        elif key.layout == "int8":  # past the GEMV: on CUDA the int8 GEMM up to its own route, then dequantize
            shape = f"{key.dtype} int8 {key.K}x{key.N}"
            where = ("past the GEMV for every M" if self.max_m == 0 else
                     f"our GEMV for M <= {self.max_m}, past it above" if self.min_m == 1 else
                     f"our GEMV for {self.min_m} <= M <= {self.max_m}, past it below and above")
            where += " (past the GEMV: the int8 GEMM by its int8-gemm route, else dequantize + ATen)"
            versus = "past-the-GEMV/GEMV"
        else:
            shape = f"{key.dtype} {key.layout} {key.K}x{key.N}"
            where = ("ATen for every M" if self.max_m == 0 else f"ours for M <= {self.max_m}, ATen above"
                     if self.min_m == 1 else f"ours for {self.min_m} <= M <= {self.max_m}, ATen below and above")
            versus = "ATen/ours"
        measured = ", ".join(f"M={m}: {r:.2f}x" for m, r in zip(self.buckets, self.ratios))
        return (f"{shape}: {where} (compiled crossover {self.default_max_m}; measured {versus} {measured})"
                if measured else f"{shape}: {where} (compiled crossover {self.default_max_m})")

    def to_json(self) -> dict:
        return {"min_m": self.min_m, "max_m": self.max_m, "default_max_m": self.default_max_m,
                "buckets": list(self.buckets), "ours_ms": list(self.ours_ms), "aten_ms": list(self.aten_ms),
                "tuned_at": self.tuned_at}

    @classmethod
    def from_json(cls, key: RouteKey, doc) -> "Route":
        """Raises ValueError/TypeError/KeyError on a malformed entry."""
        def ints(v):
            if not isinstance(v, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in v):
                raise ValueError("not a list of ints")
            return tuple(v)

        def floats(v):
            if not isinstance(v, list) or not all(isinstance(f, (int, float)) and not isinstance(f, bool)
                                                  and math.isfinite(f) and f > 0 for f in v):
                raise ValueError("not a list of positive times")
            return tuple(float(f) for f in v)

        min_m, max_m, default = doc["min_m"], doc["max_m"], doc["default_max_m"]
        if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= INT64_MAX
                   for v in (min_m, max_m, default)):
            raise ValueError("min_m / max_m / default_max_m must be ints in [0, 2**63 - 1]")
        route = cls(key, max_m, default, ints(doc["buckets"]), floats(doc["ours_ms"]), floats(doc["aten_ms"]),
                     str(doc.get("tuned_at", "")), min_m)
        if not len(route.buckets) == len(route.ours_ms) == len(route.aten_ms):
            raise ValueError("buckets and times differ in length")
        return route


def decide(buckets: Iterable[int], ours_ms: Iterable[float], aten_ms: Iterable[float], margin: float = MARGIN,
           ride_along: float = RIDE_ALONG) -> int:
    """The largest bucket M at which our GEMV beat ATen by more than `margin`, looking only below the first
    bucket where ATen was faster by more than `margin`; 0 if there is none. Buckets where the two are within
    the margin either way (ties, not wins or losses) go along with a win above them when that win is more
    than `ride_along`: H200, fp16 [N,K] 14336x4096, ATen/ours 1.01x at M=1, 1.02x at 2 and 4, 1.09x at 8 - a
    rule that stopped at the first tie sent every M to cuBLAS; run 44 measured 1.00x at M=1 (ours 0.2%
    slower) and 1.11x at M=8, and a rule that stopped at any loss did the same. Below a narrower win the
    first tie stops it: bf16 [N,K] 8192x8192 measured 1.01x at M=1 and 1.02x at 2, was routed to ours up to
    M=2, and M=1 then timed at 0.97x of torch (run 43). An M between two buckets runs where both agree."""
    max_m = 0
    tie_below = False  # a tie since the last win
    for m, ours, aten in sorted(zip(buckets, ours_ms, aten_ms)):
        if ours > aten * (1.0 + margin):
            break
        if ours * (1.0 + margin) < aten:
            if tie_below and not ours * (1.0 + ride_along) < aten:
                break
            max_m, tie_below = m, False
        else:
            tie_below = True
    return max_m


def decide_span(buckets: Iterable[int], ours_ms: Iterable[float], aten_ms: Iterable[float], margin: float = MARGIN,
                ride_along: float = RIDE_ALONG) -> tuple[int, int]:
    """(min_m, max_m) of a plain key: `decide` over the buckets from min_m up, where min_m is the first bucket
    from which it finds a win ((1, 0) when none does). From the smallest bucket that is `decide` itself,
    min_m 1; past it, the buckets below min_m measured ATen faster or within the margin (a win there would
    have been found from it). Intel Xeon, 2 threads, fp32 [K, N] 4096x11008 over weight copies past twice the
    L3: ATen/ours 0.95-0.97x at M = 1 and 1.4-1.8x at M = 2..16, which `decide` alone sent to ATen at every
    M (docs/PERFORMANCE.md, "fifty-sixth round"). An M between min_m and the bucket below it runs on ATen."""
    rows = sorted(zip(buckets, ours_ms, aten_ms))
    for i, (m, _, _) in enumerate(rows):
        found = decide(*zip(*rows[i:]), margin=margin, ride_along=ride_along)
        if found:
            return (1 if i == 0 else m), found
    return 1, 0


def decide_gated(buckets: Iterable[int], gated_ms: Iterable[float], matmul_ms: Iterable[float],
                 margin: float = MARGIN) -> int:
    """A gated key's max_m: the largest bucket below the first where the matmul + gated epilogue beat the
    gated kernel by more than `margin`. Ties go to the gated kernel, the other way from `decide`: it is one
    launch where the matmul path is two and an [M, 2I] temporary, which costs the host in eager mode, and
    the GPU time alone cannot see that. H200, int8 gate|up 4096x28672 (Llama-3-8B): matmul/gated
    1.00-1.02x, a tie that `decide` sent to the matmul."""
    max_m = 0
    for m, gated, matmul in sorted(zip(buckets, gated_ms, matmul_ms)):
        if matmul * (1.0 + margin) < gated:
            break
        max_m = m
    return max_m


def decide_key(key: RouteKey, buckets: Iterable[int], ours_ms: Iterable[float],
               aten_ms: Iterable[float]) -> tuple[int, int]:
    """`key`'s (min_m, max_m) from its measured times: `decide_span` for a plain key; min_m 1 and `decide_gated`
    for a gated one (its rule already keeps ties on the gated kernel from the smallest M), and for an int8-gemm
    key `decide` with no ride-along (its buckets start at the GEMV's largest M): the int8 GEMM up to the first
    bucket where it did not beat dequantize + cuBLAS by more than the margin, whatever wins above it. Ties go
    to cuBLAS, the other way from `decide_gated`: the one-launch argument does not carry to prefill sizes (the
    GEMM takes 20 us and more there, the host cost of a second launch hides behind it), and the bucket where
    the two cross measured a sliver either way that a second timing did not keep: H200, fp16 4096x4096, M=512
    measured 0.99x and read 0.94x in a second timing (run 122) and 0.95x in the probe (run 124); H100, the
    same shape and M, measured 1.02-1.03x in five tunings and read 0.96-1.00x in the second timing of the test
    that checks it (2026-12-06)."""
    if key.layout == INT8_GEMM:
        return 1, decide(buckets, ours_ms, aten_ms, ride_along=math.inf)
    if key.gated:
        return 1, decide_gated(buckets, ours_ms, aten_ms)
    return decide_span(buckets, ours_ms, aten_ms)


def buckets(gemv_cap: int, default_max_m: int, gemm: bool = False) -> tuple[int, ...]:
    """The Ms measured: BUCKETS (`gemm`, an int8-gemm key: GEMM_BUCKETS) and the compiled crossover, up to the
    largest M a route may give the key (`Binding.cap`)."""
    return tuple(sorted({m for m in (*(GEMM_BUCKETS if gemm else BUCKETS), default_max_m) if 1 <= m <= gemv_cap}))


# ---------------------------------------------------------------------------------------------------
# The persisted file: {"format", "version", "tables": {device key: {route key: Route.to_json()}}}


class _Problem(ValueError):
    pass


_warned: set[str] = set()


def _warn_once(path: Path, problem: str) -> None:
    if (str(path), problem) not in _warned:
        _warned.add((str(path), problem))
        logger.warning("dsinf: route table %s: %s; ignored (it is rewritten by the next tuning)", path, problem)


def read_tables(path: Path | None = None) -> dict[str, dict[str, Route]]:
    """Every device's routes in the file; a malformed file is empty, malformed entries are dropped (each
    problem warned once per process). Never raises."""
    path = table_path() if path is None else Path(path)
    doc, why = read_json(path)
    if why == "missing":
        return {}
    try:
        if doc is None:
            raise _Problem(why)
        if doc.get("format") != FORMAT:
            raise _Problem(f"not a {FORMAT} file")
        if doc.get("version") != VERSION:
            raise _Problem(f"format version {doc.get('version')!r}, this dsinf reads version {VERSION}")
        tables = doc.get("tables")
        if not isinstance(tables, dict) or not all(isinstance(t, dict) for t in tables.values()):
            raise _Problem("'tables' is not an object of objects")
    except _Problem as exc:
        _warn_once(path, str(exc))
        return {}
    out: dict[str, dict[str, Route]] = {}
    dropped = 0
    for device, entries in tables.items():
        good = out.setdefault(device, {})
        for text, entry in entries.items():
            try:
                key = RouteKey.parse(text)
                good[key.text] = Route.from_json(key, entry)
            except (ValueError, TypeError, KeyError, AttributeError):
                dropped += 1
    if dropped:
        _warn_once(path, f"{dropped} malformed entries dropped")
    return out


def _save(device: str, routes: Iterable[Route], path: Path | None = None) -> bool:
    """Merge `routes` into `device`'s table on disk (ours win). False (and a warning) if it cannot be written."""
    path = table_path() if path is None else Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(path.with_name(path.name + ".lock"), timeout=LOCK_TIMEOUT_S, poll=0.005, max_poll=0.25,
                      holder={"what": "dsinf route table"}):
            remove_orphans(path)  # temp files of writers killed mid-write
            tables = read_tables(path)
            table = tables.setdefault(device, {})
            table.update({r.key.text: r for r in routes})
            doc = {"format": FORMAT, "version": VERSION,
                   "tables": {d: {k: r.to_json() for k, r in sorted(t.items())} for d, t in sorted(tables.items())}}
            write_json(path, doc, indent=1)
    except (OSError, TimeoutError) as exc:
        logger.warning("dsinf: could not write the route table %s (%s); the routes apply to this process only",
                       path, exc)
        return False
    return True


# ---------------------------------------------------------------------------------------------------
# The binding's table (C entry points of routes.h, through ctypes)


class Binding:
    """The route table inside one loaded compiled module ('cpu' or 'cuda')."""

    def __init__(self, variant: str, library: Path):
        self.variant = variant
        lib = ctypes.CDLL(str(library))  # already loaded by torch.ops.load_library: the same handle
        prefix = f"dsinf_{variant}_routes_"
        self._set = getattr(lib, prefix + "set")
        self._set.argtypes, self._set.restype = [ctypes.POINTER(ctypes.c_int64), ctypes.c_int64], ctypes.c_int64
        self._default = getattr(lib, prefix + "default")
        self._default.argtypes, self._default.restype = [ctypes.c_int64] * 4, ctypes.c_int64
        for name in ("gemv_cap", "gated_cap", "last", "last_gated"):
            getattr(lib, prefix + name).restype = ctypes.c_int64
        self.gemv_cap = int(getattr(lib, prefix + "gemv_cap")())
        self.gated_cap = int(getattr(lib, prefix + "gated_cap")())  # the largest M the gated kernel takes
        self._last = getattr(lib, prefix + "last")
        self._last_gated = getattr(lib, prefix + "last_gated")
        # The CPU module's host choices of GEMM past the GEMV, with their overrides and counters (None: a binary
        # without one): bf16 activations on the native bf16 GEMM, fp32 on oneDNN, [K, N] weights on ours.
        def fn(name: str, takes_mode: bool = False):
            f = getattr(lib, f"dsinf_{variant}_{name}", None)
            if f is not None:
                f.argtypes, f.restype = ([ctypes.c_int64] if takes_mode else []), ctypes.c_int64
            return f

        self._native_bf16, self._bf16_override = fn("native_bf16_gemm"), fn("native_bf16_override", True)
        self._onednn, self._onednn_calls = fn("onednn_fp32_gemm"), fn("onednn_fp32_calls")
        self._onednn_override = fn("onednn_fp32_override", True)
        self._kn_gemm, self._kn_calls = fn("kn_gemm"), fn("kn_gemm_calls")
        self._kn_override = fn("kn_gemm_override", True)
        self._gemv_dpbf16 = fn("gemv_has_dpbf16")
        self._amx, self._amx_override = fn("amx_bf16"), fn("amx_bf16_override", True)
        self._amx_gemv, self._amx_gemv_calls = fn("amx_gemv"), fn("amx_gemv_calls")
        self._amx_gemv_override = fn("amx_gemv_override", True)
        self.applied: dict[RouteKey, Span] = {}  # what the binding holds now
        self.routes: dict[RouteKey, Route] = {}  # the measured routes behind it, for explain()

    def default(self, key: RouteKey) -> int:
        """The compiled crossover of `key` (gated keys: the compiled rule, which may depend on the size)."""
        return int(self._default(DTYPE_CODES[key.dtype], LAYOUT_CODES[key.layout], key.K, key.N))

    def limit(self, key: RouteKey) -> int:
        """The largest M the kernel of `key` accepts: our GEMV, (gated) the gated kernel, or (int8-gemm) any."""
        if key.layout == INT8_GEMM:
            return INT8_GEMM_LIMIT
        return self.gated_cap if key.gated else self.gemv_cap

    def cap(self, key: RouteKey) -> int:
        """The largest max_m a measured route may give `key`: every M our GEMV accepts; for a gated key on
        CUDA, as far as the compiled rule takes the gated kernel on small weights (8 on tensor cores; 2 on
        the CUDA-core paths, fp32 activations or [K, N] weights), the Ms the GPU parity tests run it at, so
        a measured route moves the size threshold only (`forced` may go to the kernel's limit,
        `gated_cap`). On CPU the gated GEMV takes any M."""
        if not key.gated or self.variant == "cpu":
            return self.limit(key)
        return min(self.gated_cap, self.default(RouteKey(key.dtype, key.layout, 1, 2)))

    def _override(self, setter, what: str, mode: int) -> int:
        """Set one of the module's host-choice overrides (-1: the host's choice); returns the one replaced."""
        if setter is None:
            raise RuntimeError(f"the {self.variant} module has {what} to override")
        return int(setter(mode))

    def native_bf16_gemm(self) -> bool:
        """CPU: whether bf16 activations past the GEMV run torch's native bf16 GEMM (a host with avx512_bf16)
        rather than the fp32 GEMM (MKL's or oneDNN's) on widened weights; that also sets the bf16 compiled
        crossovers."""
        return self._native_bf16 is not None and bool(self._native_bf16())

    def onednn_fp32_gemm(self) -> bool:
        """CPU: whether fp32 past the GEMV (and 16-bit / int8 weights widened to fp32 there) runs oneDNN's fp32
        GEMM (torch's mkldnn::_linear_pointwise; an AMD host) rather than MKL's."""
        return self._onednn is not None and bool(self._onednn())

    def onednn_calls(self) -> int:
        """CPU: how many fp32 GEMMs oneDNN has run in this process (tests: which GEMM ran)."""
        return int(self._onednn_calls()) if self._onednn_calls is not None else 0

    def _override_onednn(self, mode: int) -> int:
        return self._override(self._onednn_override, "no choice of fp32 GEMM", mode)

    def kn_gemm(self) -> bool:
        """CPU: whether float [K, N] weights past the GEMV run on our GEMM (gemm_kn.cpp: reads the weight in
        place, no transpose) at some M on this host (an AVX-512 build where fp32 runs on oneDNN; N >= 1024: up to
        M = 128, and to 512 for N >= 2K), rather than on oneDNN's or MKL's."""
        return self._kn_gemm is not None and bool(self._kn_gemm())

    def kn_gemm_calls(self) -> int:
        """CPU: how many fp32 GEMMs our [K, N] GEMM has run in this process (tests: which GEMM ran)."""
        return int(self._kn_calls()) if self._kn_calls is not None else 0

    def _override_kn(self, mode: int) -> int:
        return self._override(self._kn_override, "no fp32 [K, N] GEMM of its own", mode)

    def gemv_dpbf16(self) -> bool:
        """CPU: whether this build's GEMV multiplies bf16 activations on vdpbf16ps (an avx512_bf16 build):
        with the native bf16 GEMM it raises the bf16 crossovers and keeps the bf16 gate|up off the gated
        kernel (its GEMV + the gated epilogue ran faster at every decode M)."""
        return self._gemv_dpbf16 is not None and bool(self._gemv_dpbf16())

    def _override_bf16(self, mode: int) -> int:
        return self._override(self._bf16_override, "no choice of bf16 GEMM", mode)

    def amx_bf16(self) -> bool:
        """CPU: whether the bf16 crossovers take the AMX rule (torch's native bf16 GEMM runs on AMX tiles here:
        [N, K] weights leave our GEMV above M = 4 and int8 above 8, or above 16 where they run on our own AMX
        tiles, amx_gemv, which then take them on to M = 256)."""
        return self._amx is not None and bool(self._amx())

    def _override_amx(self, mode: int) -> int:
        return self._override(self._amx_override, "no AMX rule", mode)

    def amx_gemv(self) -> bool:
        """CPU: whether int8 weights with bf16 activations run on AMX tiles at 2 <= M <= 256 here (gemv_amx.cpp: an
        avx512_bf16 build, a CPU with AMX-BF16 and the OS's tile state) rather than on the vdpbf16ps GEMV or
        dequantize + torch's GEMM."""
        return self._amx_gemv is not None and bool(self._amx_gemv())

    def amx_gemv_calls(self) -> int:
        """CPU: how many matmuls the AMX tiles have run in this process (tests: the path that ran)."""
        return int(self._amx_gemv_calls()) if self._amx_gemv_calls is not None else 0

    def _override_amx_gemv(self, mode: int) -> int:
        return self._override(self._amx_gemv_override, "no AMX kernel", mode)

    def last(self) -> str:
        """The path this thread's last matmul on this module took: 'gemv', 'aten' (cuBLAS / MKL; int8
        weights: dequantized first), 'int8-gemm' (CUDA, int8 weights off the GEMV: the GEMM that reads them
        as int8) or 'none'."""
        return ("none", "gemv", "aten", "int8-gemm")[int(self._last())]

    def last_gated(self) -> str:
        """The path this thread's last rms_mlp_gemm gate|up took: 'gated', 'matmul' (then the gated
        epilogue) or 'none'."""
        return ("none", "gated", "matmul")[int(self._last_gated())]

    def set(self, table: dict[RouteKey, Span]) -> None:
        """Replace the binding's table with `table` (key -> max_m, or (min_m, max_m): `Route.entry`)."""
        spans = {k: _span(k, v) for k, v in table.items()}
        rows = [v for k, (lo, hi) in sorted(spans.items(), key=lambda kv: kv[0].text)
                for v in (DTYPE_CODES[k.dtype], LAYOUT_CODES[k.layout], k.K, k.N, lo, hi)]
        status = self._set((ctypes.c_int64 * len(rows))(*rows), len(table))
        if status < 0:
            why = {-1: "a bad code or size, or a span that is not 1 <= min_m <= max(max_m, 1)",
                   -2: f"a max_m above the GEMV's limit {self.gemv_cap} (the gated kernel's: {self.gated_cap})",
                   -3: "a repeated shape"}.get(status, f"status {status}")
            raise ValueError(f"routes: the {self.variant} binding rejected the table: {why}")
        self.applied = dict(table)

    def span(self, key: RouteKey) -> tuple[int, int]:
        """(min_m, max_m) in force for `key`: its entry in the table, else (1, the compiled crossover)."""
        return _span(key, self.applied[key]) if key in self.applied else (1, self.default(key))

    def runs_ours(self, key: RouteKey, M: int) -> bool:
        """Whether a matmul of `key` at `M` rows runs our GEMV (a gated key: the gated kernel; an int8-gemm key:
        the int8 GEMM) under the table in force."""
        lo, hi = self.span(key)
        return lo <= M <= hi


def _span(key: RouteKey, value) -> tuple[int, int]:
    """(min_m, max_m) of a table value; ValueError naming `key` for one the binding's int64 cannot hold (ctypes
    would wrap it, not refuse it)."""
    lo, hi = value if isinstance(value, tuple) else (1, value)
    for name, v in (("min_m", lo), ("max_m", hi)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"routes: the {name} of {key.text} is not an int: {v!r}")
        if not -INT64_MAX - 1 <= v <= INT64_MAX:
            raise ValueError(f"routes: the {name} of {key.text} does not fit int64: {v}")
    return lo, hi


_bindings: dict[str, Binding] = {}
_lock = threading.RLock()
# Routes measured in this process, per device key: reused like persisted ones, so an unwritable cache
# (the route table could not be saved) does not make the next tuning measure the same shapes again.
_measured: dict[str, dict[str, Route]] = {}


def measured_count() -> int:
    """How many routes this process has measured rather than reused from the persisted table (the caller of a
    tuning reports its share: a first run measures, later ones reuse)."""
    with _lock:
        return sum(len(t) for t in _measured.values())


def binding(variant: str) -> Binding:
    """The loaded `variant` module's route table (loads the module, building it if needed)."""
    with _lock:
        found = _bindings.get(variant)
        if found is None:
            from op_builder.builder import loaded_variants

            from .builder import InferenceBuilder

            InferenceBuilder().load(variant)
            found = _bindings[variant] = Binding(variant, loaded_variants()[(_OP, variant)].path)
        return found


def key_of(input: torch.Tensor, weight: torch.Tensor, q_int8: bool, transposed_mode: bool) -> RouteKey:
    """The route key of a `vector_matmul` / `linear_layer` call (int8 weights are [N, K])."""
    nk = q_int8 or transposed_mode
    return RouteKey(_DTYPES[input.dtype], "int8" if q_int8 else ("nk" if nk else "kn"), int(input.shape[-1]),
                    int(weight.shape[0] if nk else weight.shape[-1]))


def mlp_key_of(input: torch.Tensor, weight_interm: torch.Tensor, q_int8: bool, transposed_mode: bool) -> RouteKey:
    """The gated route key of an `rms_mlp_gemm` call: its gate|up `weight_interm` (K -> 2I)."""
    plain = key_of(input, weight_interm, q_int8, transposed_mode)
    return RouteKey(plain.dtype, GATED + plain.layout, plain.K, plain.N)


@contextmanager
def forced(variant: str, keys: Iterable[RouteKey], max_m: int | None = None) -> Iterator[Binding]:
    """While the block runs, `keys` take our GEMV (gated keys: the gated kernel; int8-gemm keys: the int8 GEMM)
    for every M it accepts (max_m None) or up to max_m (0: ATen; gated: matmul + epilogue; int8-gemm:
    dequantize + cuBLAS) in the `variant` module, whatever the
    compiled crossover or a persisted table says; the table in force before is restored after. For checks
    and probes of the kernels themselves. Host-side: a graph captured inside the block replays the forced
    route."""
    b = binding(variant)
    with _lock:  # no route tuning or apply() from another thread in between
        saved = b.applied
        b.set({**saved, **{k: b.limit(k) if max_m is None else max_m for k in keys}})
        try:
            yield b
        finally:
            b.set(saved)  # the binding republishes a table it has seen: no growth


def fp32_gemm(onednn: bool) -> contextlib.AbstractContextManager[Binding]:
    """While the block runs, the CPU module runs fp32 past the GEMV on oneDNN's GEMM (onednn, where torch has
    it) or on MKL's, whatever the host would choose; the choice in force before is restored after. For checks
    and probes of both paths on any host."""
    return _cpu_choice(Binding._override_onednn, 1 if onednn else 0)


def kn_gemm(ours: bool) -> contextlib.AbstractContextManager[Binding]:
    """While the block runs, the CPU module runs float [K, N] weights past the GEMV on our GEMM (ours: at
    every M; bf16 activations only where torch's native bf16 GEMM is off, which takes them first) or on the
    library's (oneDNN's or MKL's, as fp32_gemm picks), whatever the host would choose; the
    choice in force before is restored after. For checks and probes of both paths on any host."""
    return _cpu_choice(Binding._override_kn, 1 if ours else 0)


def bf16_gemm(native: bool) -> contextlib.AbstractContextManager[Binding]:
    """While the block runs, the CPU module runs bf16 activations past the GEMV on torch's native bf16 GEMM
    (native) or on the fp32 GEMM over widened weights, whatever the host would choose; the choice in force
    before is restored after. For checks and probes of both paths on any host."""
    return _cpu_choice(Binding._override_bf16, 1 if native else 0)


def amx_bf16(on: bool) -> contextlib.AbstractContextManager[Binding]:
    """While the block runs, the CPU module's bf16 crossovers on the native bf16 GEMM follow the AMX rule (on) or
    the vdpbf16ps one, whatever the host has; the choice in force before is restored after. For checks of both
    rules on any host."""
    return _cpu_choice(Binding._override_amx, 1 if on else 0)


def amx_gemv(on: bool) -> contextlib.AbstractContextManager[Binding]:
    """While the block runs, the CPU module runs int8 weights with bf16 activations on AMX tiles at every M from 2
    (on, where the host has them; the host's own rule stops at 256) or never (off: the vdpbf16ps GEMV, or
    dequantize + torch's GEMM, as the route says), whatever the host would choose; the choice in force before is
    restored after. For checks and timings of every path on an AMX host."""
    return _cpu_choice(Binding._override_amx_gemv, 1 if on else 0)


@contextmanager
def _cpu_choice(override, mode: int) -> Iterator[Binding]:
    """The CPU module with one of its host choices overridden (`override(binding, mode)` returns the mode
    it replaced) while the block runs, then restored."""
    b = binding("cpu")
    with _lock:
        saved = override(b, mode)
        try:
            yield b
        finally:
            override(b, saved)


def device_key(variant: str, device: torch.device | None = None) -> str:
    """`<variant>|<device name>|torch=<version>|build=<module key>`: what a measurement holds for."""
    from op_builder.builder import loaded_variants
    from op_builder.system import current_system

    build = str(loaded_variants()[(_OP, variant)].manifest.get("key", "?"))[:16]
    if variant == "cuda":
        # The name the GPU probe found (NVML where it can answer): a load that applies the routes must not
        # initialise CUDA to learn it. Before CUDA is up, the current device is device 0.
        if device is not None and device.index is not None:
            index = device.index
        else:
            index = torch.cuda.current_device() if torch.cuda.is_initialized() else 0
        gpus = current_system().gpu_list
        name = gpus[index].name if index < len(gpus) else torch.cuda.get_device_name(index)
    else:
        name = f"{current_system().cpu.brand}|threads={torch.get_num_threads()}"
    return f"{variant}|{name}|torch={torch.__version__}|build={build}"


def apply(variant: str) -> int:
    """Push the persisted routes of this device and build into the loaded `variant` module (once per
    load: InferenceBuilder.post_load). Returns how many; 0 when DSINF_ROUTES=off."""
    if knobs.get("DSINF_ROUTES") == "off":
        return 0
    with _lock:
        b = binding(variant)
        found = read_tables().get(device_key(variant), {})
        routes = {r.key: r for r in found.values()}
        b.set({**b.applied, **{k: r.entry for k, r in routes.items() if r.max_m <= b.cap(k)}})
        b.routes.update(routes)
    if routes:
        logger.info("dsinf: %d measured routes applied to the %s module", len(routes), variant)
    return len(routes)


def aten_only(device_type: str, act_dtype: torch.dtype, K: int, N: int) -> bool:
    """True when the routes in force send every M of a float `[N, K]` (nn.Linear layout) matmul of this
    dtype to ATen: then a caller may call torch's own linear directly and skip the custom op's host cost."""
    b = _bindings.get(device_type)
    dtype = _DTYPES.get(act_dtype)
    if b is None or dtype is None:
        return False
    key = RouteKey(dtype, "nk", K, N)
    return key in b.applied and b.span(key)[1] == 0


def describe(device_type: str, act_dtype: torch.dtype, int8: bool, gated: bool = False) -> str:
    """The measured routes in force for a decision's device and dtype (BackendDecision.explain), the gated
    keys too when `gated` (rms_mlp_gemm, whose matmuls take the plain routes as well); "" when none: every
    shape runs on the compiled crossover."""
    b = _bindings.get(device_type)
    dtype = _DTYPES.get(act_dtype)
    mine = [] if b is None else [b.routes[k] for k in sorted(b.applied, key=lambda k: k.text)
                                 if k.dtype == dtype and (k.weight == "int8") == int8 and k in b.routes
                                 and (gated or not k.gated)]
    return "routes: " + "; ".join(r.explain() for r in mine) if mine else ""


# ---------------------------------------------------------------------------------------------------
# Measuring


def _refuse_if_tracing(what: str) -> None:
    if torch.compiler.is_compiling():
        raise RuntimeError(f"{what}: cannot measure routes while torch.compile traces; tune before compiling")
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"{what}: cannot measure routes during CUDA-graph capture; tune before capturing")


def _weight(layout: str, K: int, N: int, device: torch.device, act: torch.dtype, gen: torch.Generator):
    """A random weight mapping K -> N in `layout` (kn | nk | int8), made on `device`, and its q_scale."""
    w = torch.randn((K, N) if layout == "kn" else (N, K), generator=gen, device=device)
    if layout == "int8":
        return (w * 40).clamp_(-127, 127).to(torch.int8), torch.full((1,), 0.01, dtype=torch.float32, device=device)
    return (w * 0.05).to(act), None


def _weights(key: RouteKey, device: torch.device, act: torch.dtype, copies: int, gen: torch.Generator):
    """`copies` argument tuples of `key`'s shape: (weight, q_scale); a gated key's (W_interm, q_scale, W_out,
    q_scale1), W_out mapping I = N / 2 back to K."""
    layout = key.weight
    out = []
    for _ in range(copies):
        w = _weight(layout, key.K, key.N, device, act, gen)
        out.append(w + _weight(layout, key.N // 2, key.K, device, act, gen) if key.gated else w)
    return out


def _op(key: RouteKey, device: torch.device, act: torch.dtype, gen: torch.Generator):
    """fn(x, *weights) of `key`: vector_matmul, or (gated) rms_mlp_gemm with x as its residual too."""
    int8, transposed = key.weight == "int8", key.weight != "kn"
    if not key.gated:
        fn = getattr(torch.ops.dsinf, f"vector_matmul_{key.dtype}").default
        return lambda x, w, scale: fn(x, w, False, scale, int8, transposed)
    fn = getattr(torch.ops.dsinf, f"rms_mlp_gemm_{key.dtype}").default
    gamma = torch.rand(key.K, generator=gen, device=device).add_(0.5).to(act)
    return lambda x, w1, s1, w2, s2: fn(x, x, w1, w2, gamma, 1e-5, s1, s2, int8, SILU, transposed)


def _cpu_copies(weight_bytes: int) -> int:
    """How many copies of a weight a CPU measure rotates: a decode step streams each layer's weight from
    memory, so the copies together exceed twice the largest cache - at most 8, and a quarter of the memory
    available. One copy timed again and again ran from the cache where it fit: on an Intel Xeon listing a
    480 MiB L3 (2 threads), fp32 [K, N] 4096x11008 at M = 16 read ATen/ours 0.99x on one copy and 0.70x over
    three (docs/PERFORMANCE.md, "fifty-fifth round")."""
    from op_builder.system import current_system

    system, size = current_system(), max(weight_bytes, 1)
    want = math.ceil(2 * (system.cpu_cache or 32 << 20) / size) + 1
    room = system.memory_available // 4 // size if system.memory_available else 8
    return max(1, min(8, want, room))


def _time_cpu(run, calls: int) -> float:
    """The fastest of `calls` individually timed calls `run(i)`, ms: a call that lost its core to another
    process (or one of its OpenMP threads did) is an outlier, never the measure."""
    best = math.inf
    for i in range(calls):
        start = time.perf_counter()
        run(i)
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def _graph(run):
    """A CUDA graph of one `run()`, or None when capture fails (then timing falls back to eager)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()  # warm-up outside capture (allocator, cuBLAS handle and workspace)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            run()
    except RuntimeError as exc:
        logger.debug("dsinf: routes: CUDA-graph capture failed (%s); timing eagerly", exc)
        return None
    return graph


def _time_cuda(replay, calls: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls


def measure(key: RouteKey, device: str | torch.device = "cpu", *, reps: int | None = None) -> Route:
    """Time `key` on the binding at each bucket with its route forced to our GEMV and to ATen (a gated key:
    rms_mlp_gemm with its gate|up forced to the gated kernel and to matmul + epilogue, the matmul on the
    route in force for its plain key; an int8-gemm key: vector_matmul forced to the int8 GEMM and to
    dequantize + cuBLAS, its GEMV route held at 0); decide. On CPU the buckets where the decision starts and
    stops are timed a second time before it stands."""
    device = _device("measure", device)
    variant = device.type
    gemm = key.layout == INT8_GEMM
    if gemm and variant != "cuda":
        raise ValueError(f"routes: {key.text}: int8-gemm keys are measured on CUDA (the CPU module has no int8 GEMM)")
    _refuse_if_tracing("measure")
    b = binding(variant)
    default = b.default(key)
    ms = buckets(b.cap(key), default, gemm)
    act = {v: k for k, v in _DTYPES.items()}[key.dtype]
    gen = torch.Generator(device).manual_seed(0)
    weight_bytes = key.K * key.N * (1 if key.weight == "int8" else torch.finfo(act).bits // 8)
    weight_bytes += weight_bytes // 2 if key.gated else 0  # W_out: half the gate|up's
    if variant == "cuda":
        l2 = torch.cuda.get_device_properties(device).L2_cache_size
        copies = max(1, min(64, math.ceil(2 * l2 / weight_bytes) + 1))
    else:
        copies = _cpu_copies(weight_bytes)
    # On an AMX host the CPU module runs plain int8 matmuls with bf16 activations on its tiles ahead of the route
    # (2 <= M <= 256), so both sides timed would be the tiles: the route decides between the GEMV and dequantize
    # + GEMM, the paths where the tiles are off, and is measured with them off.
    tiles = variant == "cpu" and key.weight == "int8" and key.dtype == "bf16" and not key.gated and b.amx_gemv()
    with torch.cuda.device(device) if variant == "cuda" else contextlib.nullcontext(), \
            amx_gemv(False) if tiles else contextlib.nullcontext():
        weights = _weights(key, device, act, copies, gen)
        xs = {m: torch.randn(1, m, key.K, generator=gen, device=device).to(act) for m in ms}
        op = _op(key, device, act, gen)
        ours: dict[int, list[float]] = {m: [] for m in ms}
        aten: dict[int, list[float]] = {m: [] for m in ms}
        saved = dict(b.applied)
        # An int8-gemm key's Ms all run past the GEMV (its route held at 0): each bucket times the GEMM
        # against dequantize + cuBLAS, whatever the GEMV's route.
        base = {**saved, RouteKey(key.dtype, "int8", key.K, key.N): 0} if gemm else saved
        try:
            if gemm and not _takes_the_gemm(b, key, base, op, xs[ms[0]], weights[0]):
                return Route(key, 0, default, tuned_at=_now())
            if variant == "cuda":
                _measure_cuda(b, key, base, op, xs, weights, ours, aten, reps or 7)
                ours_ms, aten_ms, (min_m, max_m) = _decided(key, ms, ours, aten, statistics.median)
            else:
                _measure_cpu(b, key, base, op, xs, weights, ours, aten, reps or 5, weight_bytes)
                ours_ms, aten_ms, (min_m, max_m) = _decided(key, ms, ours, aten, min)
                # The buckets that bound the decision - the first one past max_m, and the last one below min_m -
                # are timed again, once each, and the decision made from all their samples; while that moves a
                # bound, the new bound's bucket too. A CPU time is the fastest of a few calls on a shared host,
                # so one bucket can read a few % off: Zen 4 guest, fp32 gate|up 4096x28672, matmul / gated
                # 1.09x at M = 2, 0.96x at 4, 1.05x at 8 - the 4% at M = 4 stopped the gated kernel at 2 and
                # cost the batch-8 decode 12% (docs/PERFORMANCE.md, "CPU: fp32 at M = 8 against oneDNN").
                # CUDA's medians of graph replays hold to ~1%, and its rules were set against them.
                confirmed: set[int] = set()
                while again := [m for m in _bounds(ms, min_m, max_m) if m not in confirmed]:
                    confirmed.update(again)
                    _measure_cpu(b, key, base, op, {m: xs[m] for m in again}, weights, ours, aten, reps or 5,
                                 weight_bytes)
                    ours_ms, aten_ms, (min_m, max_m) = _decided(key, ms, ours, aten, min)
        finally:
            b.set(saved)
    return Route(key, max_m, default, ms, ours_ms, aten_ms, _now(), min_m)


def _bounds(ms: tuple[int, ...], min_m: int, max_m: int) -> list[int]:
    """The buckets just outside a decided span: the first past max_m (or, max_m 0, the first of all) and the
    last below min_m."""
    above = next((m for m in ms if m > max_m), None)
    below = max((m for m in ms if m < min_m), default=None)
    return [m for m in (below, above) if m is not None]


def _decided(key: RouteKey, ms, ours: dict, aten: dict, pick) -> tuple[tuple, tuple, tuple[int, int]]:
    """Each bucket's time (`pick` of its samples, rounded as persisted: a reused route equals the measured one)
    and `key`'s (min_m, max_m) from them."""
    ours_ms = tuple(round(pick(ours[m]), 6) for m in ms)
    aten_ms = tuple(round(pick(aten[m]), 6) for m in ms)
    return ours_ms, aten_ms, decide_key(key, ms, ours_ms, aten_ms)


def _now() -> str:
    """A route's tuned_at: UTC, ISO 8601."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _takes_the_gemm(b: "Binding", key: RouteKey, base: dict, op, x, args) -> bool:
    """Whether the int8 GEMM runs this shape when routed to it (it takes fp16 / bf16 activations, K % 16 == 0
    and K <= 2^24: cuda_kernels.h, gemm_int8_supported); a shape it does not take is never timed."""
    b.set({**base, key: b.cap(key)})
    op(x, *args)
    return b.last() == INT8_GEMM


def _measure_cpu(b, key, base, op, xs, weights, ours, aten, reps, weight_bytes):
    # ~2 ms of weight streaming per sample at 10 GB/s, and every copy once
    calls = max(3, len(weights), min(50, int(2e7 / max(weight_bytes, 1))))
    for _ in range(reps):  # the two routes alternate, so drift (clocks, other load) hits both alike
        for route, times in ((b.cap(key), ours), (0, aten)):
            b.set({**base, key: route})
            for m, x in xs.items():
                op(x, *weights[-1])  # warm; the timed calls start from the copy read longest ago
                times[m].append(_time_cpu(lambda i: op(x, *weights[i % len(weights)]), calls))


def _warm(replays, seconds: float) -> None:
    """Replay each of `replays` in turn, at least once and until `seconds` have passed (synchronized): a GPU
    that sat idle runs at a fraction of its clock (an idle H200 reads 345 MHz) until load has held for a
    while, and the times are persisted and shown, not only compared."""
    deadline = time.perf_counter() + seconds
    while True:
        for replay in replays:
            replay()
        torch.cuda.synchronize()
        if time.perf_counter() >= deadline:
            return


def _measure_cuda(b, key, base, op, xs, weights, ours, aten, reps):
    calls = len(weights) * max(1, math.ceil(16 / len(weights)))  # every copy, >= 16 calls per replay
    first = next(iter(xs))
    for m, x in xs.items():  # a bucket at a time: one bucket's graphs (and their memory pools) alive at once
        def run(x=x):
            for i in range(calls):
                op(x, *weights[i % len(weights)])

        graphs = []
        for route, times in ((b.cap(key), ours), (0, aten)):
            table = {**base, key: route}
            b.set(table)  # the route is taken at capture, and replayed
            graph = _graph(run)
            graphs.append((graph.replay if graph is not None else lambda t=table: (b.set(t), run()), times[m]))
        _warm([replay for replay, _ in graphs], WARM_FIRST_S if m == first else WARM_S)
        for _ in range(reps):  # interleaved: clock drift hits both routes alike
            for replay, times in graphs:
                times.append(_time_cuda(replay, calls))
        del graphs


def _act_and_layout(what: str, dtype: torch.dtype, layout: str, act_dtype: torch.dtype | None):
    if dtype == torch.int8:
        act, layout = act_dtype or torch.float16, "int8"
        if act not in _DTYPES:
            raise ValueError(f"{what}: argument 'act_dtype': expected float32, float16 or bfloat16 (the "
                             f"activations of int8 weights), got {act_dtype}")
    else:
        act = dtype
    if act not in _DTYPES:
        raise ValueError(f"{what}: argument 'dtype': expected float32, float16, bfloat16 or int8, got {dtype}")
    if layout not in ("nk", "kn", "int8"):
        raise ValueError(f"{what}: argument 'layout': expected 'nk' or 'kn', got {layout!r}")
    return _DTYPES[act], layout


def _device(what: str, device) -> torch.device:
    try:
        found = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"{what}: argument 'device': {device!r} is not a device ({exc})") from None
    if found.type not in ("cpu", "cuda"):
        raise ValueError(f"{what}: argument 'device': expected 'cpu' or a CUDA device, got {device!r}")
    return found


def _keys(what: str, shapes, make) -> list[RouteKey]:
    if isinstance(shapes, (str, bytes)) or not hasattr(shapes, "__iter__"):
        raise ValueError(f"{what}: argument 'shapes': expected (K, N) pairs of ints, got {shapes!r}")
    keys = []
    for shape in shapes:
        try:
            a, b = shape
            new = make(a, b)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{what}: argument 'shapes': {shape!r} is not a pair of ints >= 1 ({exc})") from None
        keys += [k for k in new if k not in keys]
    return keys


def _tune(keys: list[RouteKey], device: torch.device, force: bool) -> list[Route]:
    """Measure (or reuse) `keys` in order, each applied as soon as it is known (a gated key's matmul runs on
    the route of its plain key, listed before it); persist the new ones."""
    variant = device.type
    with _lock:
        b = binding(variant)
        dkey = device_key(variant, device)
        mine = _measured.setdefault(dkey, {})
        known = {} if force else {**read_tables().get(dkey, {}), **mine}
        result, new = [], []
        try:
            for key in keys:
                route = known.get(key.text)
                if route is None or route.max_m > b.cap(key):  # absent, or past what this build allows
                    route = mine[key.text] = measure(key, device)
                    new.append(route)
                    logger.info("dsinf: route measured on %s: %s", dkey, route.explain())
                result.append(route)
                b.set({**b.applied, key: route.entry})
                b.routes[key] = route
        finally:  # a failure midway keeps (and persists) the routes measured before it
            if new:
                _save(dkey, new)
    return result


def tune_routes(shapes, dtype: torch.dtype = torch.float16, device: str | torch.device = "cuda", *,
                layout: str = "nk", act_dtype: torch.dtype | None = None, force: bool = False) -> list[Route]:
    """Measure (or reuse the persisted) routes of `shapes` on `device`, persist them and apply them now.

    Args:
        shapes: (K, N) pairs: the weight maps K inputs to N outputs.
        dtype: float32, float16, bfloat16, or torch.int8 for int8 weight-only (then `act_dtype`, default
            float16, is the activation dtype).
        device: 'cpu' or a CUDA device.
        layout: 'nk' (weight [N, K], nn.Linear's, transposed_mode=True) or 'kn' ([K, N]); int8 is [N, K].
        force: measure again even when this device and build have a persisted route.

    Returns the routes, one per distinct shape; int8 on CUDA with fp16 / bf16 activations: two, the GEMV's
    (int8) and then the int8 GEMM's (int8-gemm, prefill sizes). Refuses to run under torch.compile tracing or
    CUDA-graph capture (RuntimeError).
    """
    _refuse_if_tracing("tune_routes")
    act, layout = _act_and_layout("tune_routes", dtype, layout, act_dtype)
    device = _device("tune_routes", device)
    keys = _keys("tune_routes", shapes, lambda k, n: _matmul_keys(act, layout, k, n, device))
    return _tune(keys, device, force)


def _matmul_keys(act: str, layout: str, K: int, N: int, device: torch.device) -> list[RouteKey]:
    """A matmul shape's keys, in the order they are tuned: its GEMV's, and for int8 weights on CUDA with fp16 /
    bf16 activations its int8 GEMM's (the Ms past the GEMV)."""
    key = RouteKey(act, layout, K, N)
    gemm = layout == "int8" and act != "fp32" and device.type == "cuda"
    return [key, RouteKey(act, INT8_GEMM, K, N)] if gemm else [key]


def tune_mlp_routes(shapes, dtype: torch.dtype = torch.float16, device: str | torch.device = "cuda", *,
                    layout: str = "nk", act_dtype: torch.dtype | None = None, force: bool = False) -> list[Route]:
    """`tune_routes` for a gated MLP (rms_mlp_gemm), per (hidden K, intermediate I) of `shapes`: its two
    matmuls' routes, the gate|up's (K -> 2I) and the down projection's (I -> K) (int8 on CUDA: each one's GEMV
    key and int8 GEMM key), then the gated key: where the gate|up runs the gated kernel and where the matmul +
    gated epilogue. The matmuls come first, so the gated kernel is timed against the matmul as it will run,
    with the down projection on its own route in both. Returns, per distinct shape, the gate|up's routes, the
    down projection's, then the gated one. Arguments as `tune_routes`'s."""
    _refuse_if_tracing("tune_mlp_routes")
    act, layout = _act_and_layout("tune_mlp_routes", dtype, layout, act_dtype)
    device = _device("tune_mlp_routes", device)
    keys = _keys("tune_mlp_routes", shapes, lambda k, i: _matmul_keys(act, layout, k, 2 * i, device) +
                 _matmul_keys(act, layout, i, k, device) + [RouteKey(act, GATED + layout, k, 2 * i)])
    return _tune(keys, device, force)


def tune_model(model: torch.nn.Module) -> list[Route]:
    """Tune the distinct shapes of `model`'s injected linear layers and fused decoder layers' MLPs
    (rms_mlp_gemm's gate|up) that run on a compiled module (inject's one call); the linears first, so a
    gate|up's matmul route is known before its gated route is measured. DSINF_ROUTES: auto measures on CUDA
    only, measure on CPU too, load/off not at all. A failed measurement is a warning: the compiled
    crossovers stay."""
    mode = knobs.get("DSINF_ROUTES")
    if mode in ("load", "off"):
        return []
    from .inject.linear import InjectedLinear
    from .inject.llama import FusedDecoderLayer

    def group_of(linear: InjectedLinear):
        device = linear.weight.device
        if device.type != "cuda" and mode != "measure":
            return None
        int8 = linear.weight_scale is not None
        return device, torch.int8 if int8 else linear._act_dtype, linear._act_dtype

    linears: dict[tuple, set] = {}
    mlps: dict[tuple, set] = {}
    for m in model.modules():
        if isinstance(m, InjectedLinear) and m.decision is not None and m.backend == "compiled":
            group = group_of(m)
            if group is not None:
                linears.setdefault(group, set()).add((m.in_features, m.out_features))
        elif isinstance(m, FusedDecoderLayer) and m.__dict__.get("_dsinf_calls"):  # bound to the compiled op
            gate_up = m.mlp.gate_up_proj
            group = group_of(gate_up)
            if group is not None:
                mlps.setdefault(group, set()).add((gate_up.in_features, gate_up.out_features // 2))
    if (linears or mlps) and (torch.compiler.is_compiling() or
                              (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())):
        return []  # never measured while tracing or capturing: the compiled crossovers stay
    out = []
    for tune, groups in ((tune_routes, linears), (tune_mlp_routes, mlps)):
        for (device, dtype, act), shapes in groups.items():
            try:
                out += tune(sorted(shapes), dtype, device, layout="nk", act_dtype=act)
            except Exception as exc:  # noqa: BLE001 - tuning is an optimisation; the model runs without it
                logger.warning("dsinf: measuring routes on %s failed (%s: %s); the shapes not measured keep the "
                               "compiled crossovers", device, type(exc).__name__, exc)
    return out


# ---------------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m dsinf.routes",
                                     description="Print the persisted route tables (which shapes run on ATen).")
    parser.add_argument("--tune", nargs="*", metavar="KxN", help="measure these shapes first (e.g. 4096x12288)")
    parser.add_argument("--mlp", action="store_true",
                        help="--tune's shapes are gated MLPs, hidden x intermediate (e.g. 4096x14336): tune "
                             "their gate|up and down matmuls, then where rms_mlp_gemm's gate|up runs the gated "
                             "kernel")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp16", choices=["fp32", "fp16", "bf16", "int8"],
                        help="the weights' dtype (int8: weight-only, activations --act-dtype)")
    parser.add_argument("--act-dtype", default="fp16", choices=["fp32", "fp16", "bf16"],
                        help="the activations' dtype of --dtype int8 (on CUDA fp16/bf16 also tune the int8 GEMM)")
    parser.add_argument("--layout", default="nk", choices=["nk", "kn"])
    parser.add_argument("--force", action="store_true", help="re-measure persisted shapes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.tune:
        dtype = torch.int8 if args.dtype == "int8" else {v: k for k, v in _DTYPES.items()}[args.dtype]
        try:
            shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.tune]
        except ValueError:
            parser.error(f"--tune: expected shapes like 4096x12288, got {' '.join(args.tune)}")
        tune = tune_mlp_routes if args.mlp else tune_routes
        act = {v: k for k, v in _DTYPES.items()}[args.act_dtype] if dtype == torch.int8 else None
        tune(shapes, dtype, args.device, layout=args.layout, act_dtype=act, force=args.force)
    path = table_path()
    tables = read_tables(path)
    print(f"route table {path}: {len(tables)} device(s)")
    for dkey, routes in sorted(tables.items()):
        print(f"  {dkey}")
        for route in sorted(routes.values(), key=lambda r: r.key.text):
            print(f"    {route.explain()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
