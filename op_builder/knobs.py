"""Every environment knob of op_builder and dsinf, read in this one place.

Each knob is declared once with its default and meaning; `python -m op_builder.report` prints them
all with their current value and where the value came from. Knobs are read when asked for (not at
import), so a test or a long-lived process that changes the environment sees the new value.

Booleans accept 1/0, true/false, yes/no, on/off (any case). DeepSpeed's `int()` parsing crashed on
"true"; a value we cannot parse raises `KnobError` naming the variable instead.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable

_TRUE = {"1", "true", "yes", "on", "y", "t"}
_FALSE = {"0", "false", "no", "off", "n", "f", ""}


class KnobError(ValueError):
    """An environment variable holds a value we cannot interpret."""


def parse_bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise KnobError(f"{name}={raw!r} is not a boolean: use 1/0, true/false, yes/no or on/off")


def _parse_positive_int(name: str, raw: str) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        raise KnobError(f"{name}={raw!r} is not an integer") from None
    if value < 1:
        raise KnobError(f"{name}={raw!r} must be >= 1")
    return value


def _parse_seconds(name: str, raw: str) -> float:
    """A positive, finite number of seconds: `nan` would wait forever, `inf` never time out."""
    try:
        value = float(raw.strip())
    except ValueError:
        raise KnobError(f"{name}={raw!r} is not a number") from None
    if not math.isfinite(value):
        raise KnobError(f"{name}={raw!r} must be a finite number of seconds")
    if value <= 0:
        raise KnobError(f"{name}={raw!r} must be > 0")
    return value


def _parse_str(name: str, raw: str) -> str:
    return raw.strip()




def _choice(*choices: str) -> Callable[[str, str], str]:
    """A parser accepting one of `choices` (any case; empty = the first)."""
    def parse(name: str, raw: str) -> str:
        value = raw.strip().lower() or choices[0]
        if value not in choices:
            raise KnobError(f"{name}={raw!r}: expected one of {', '.join(choices)}")
        return value
    return parse


def _parse_cpu_isa(name: str, raw: str) -> str:
    from .system import ISA_RANK  # here: system imports this module

    value = raw.strip().lower() or "auto"
    if value != "auto" and value not in ISA_RANK:
        raise KnobError(f"{name}={raw!r}: expected auto or one of {', '.join(ISA_RANK)}")
    return value


@dataclass(frozen=True)
class Knob:
    name: str
    default: Any
    parse: Callable[[str, str], Any]
    meaning: str

    def read(self) -> tuple[Any, str]:
        """(value, source) where source is 'env' or 'default'."""
        raw = os.environ.get(self.name)
        if raw is None:
            return self.default, "default"
        return self.parse(self.name, raw), "env"

    @property
    def value(self) -> Any:
        return self.read()[0]


_KNOBS = [
    # --- build ---
    Knob("TORCH_EXTENSIONS_DIR", None, _parse_str,
         "Root of the JIT cache (torch's own variable); builds go to <root>/dsinf/<op>-<variant>/<key>. "
         "Default: $XDG_CACHE_HOME/dsinf/extensions or ~/.cache/dsinf/extensions."),
    Knob("DSINF_CACHE_DIR", None, _parse_str,
         "Root for dsinf's non-build caches (Triton autotune table, route table). Default: the parent of the JIT cache root."),
    Knob("TORCH_CUDA_ARCH_LIST", None, _parse_str,
         "CUDA targets, ';' or space separated: X.Y, X.Ya, X.Y+PTX. Wins over the visible GPUs."),
    Knob("MAX_JOBS", None, _parse_positive_int,
         "Parallel compile jobs (torch's variable). Default: sized from cores and free memory."),
    Knob("DSINF_CONCURRENT_BUILDS", True, parse_bool,
         "Build the variants one load() needs (cpu and cuda) at once (the one whose nvcc jobs run several threads "
         "a step lower in priority; op_builder.build.job_shares gives each its compile jobs); 0: one after the other."),
    Knob("DSINF_NVCC_SPLIT_COMPILE", None, _parse_positive_int,
         "Threads nvcc and ptxas may use to optimise the kernels of one CUDA source (--split-compile; the SASS is "
         "the same). Default: as many as CPUs; 1: off."),
    Knob("CUDA_VISIBLE_DEVICES", None, _parse_str,
         "CUDA's own variable: the GPUs a process sees. The GPU probe applies it to NVML's list without "
         "initialising CUDA where the mapping is certain (op_builder/nvml.py), else asks torch."),
    Knob("CUDA_DEVICE_ORDER", None, _parse_str,
         "CUDA's own variable: PCI_BUS_ID numbers GPUs in bus order (CUDA's default puts the fastest first)."),
    Knob("CXX", None, _parse_str, "Host C++ compiler (torch's variable). Default: c++ on PATH."),
    Knob("CC", None, _parse_str, "Host compiler nvcc runs (torch passes it as -ccbin); part of the CUDA build's key."),
    Knob("PYTORCH_NVCC", None, _parse_str, "The nvcc command torch's CUDA builds run instead of CUDA_HOME's (e.g. "
         "through ccache); part of the CUDA build's key."),
    Knob("NVCC_CCBIN", None, _parse_str, "nvcc's own default host compiler; part of the CUDA build's key."),
    Knob("NVCC_PREPEND_FLAGS", None, _parse_str, "Flags nvcc adds to every command line; part of the CUDA build's key."),
    Knob("NVCC_APPEND_FLAGS", None, _parse_str, "Flags nvcc adds to every command line; part of the CUDA build's key."),
    Knob("CUDA_HOME", None, _parse_str, "CUDA toolkit root (torch's variable). Default: CUDA_PATH, nvcc on PATH, "
         "/usr/local/cuda."),
    Knob("CUDA_PATH", None, _parse_str, "CUDA toolkit root, the name CUDA's installers set (used if CUDA_HOME is unset)."),
    Knob("XDG_CACHE_HOME", None, _parse_str, "Per-user cache base; the default JIT cache is <it>/dsinf/extensions."),
    Knob("DS_BUILD_OPS", False, parse_bool,
         "At pip install: precompile every op compatible with this machine into the package."),
    Knob("DS_BUILD_TIMEOUT", 1800.0, _parse_seconds,
         "Seconds a process waits for another process's build of the same op before giving up (per build "
         "it waits on: behind a queue of builds the wait starts again with each)."),
    Knob("DSINF_BUILD_TIME_LIMIT", 1800.0, _parse_seconds,
         "Seconds one build may take; then every compiler process of it is killed and the build fails "
         "(a hung compiler cannot block a process forever)."),
    Knob("DSINF_NO_PREBUILT", False, parse_bool,
         "Ignore binaries installed with the package and always use the JIT cache."),
    Knob("DSINF_NATIVE_ISA", True, parse_bool,
         "JIT CPU builds may use -march=native. Prebuilt CPU binaries always target the portable baseline."),
    Knob("DSINF_CPU_ISA", "auto", _parse_cpu_isa,
         "ISA level of JIT CPU builds: auto (the best this CPU runs), avx512_bf16, avx512, avx2 or baseline "
         "(scalar). A level above what this CPU runs is an error. Not auto: exactly that level's -m flags, "
         "never -march=native (the tests build every level the host runs this way)."),
    # --- dispatch ---
    Knob("DS_KI_FALLBACK", True, parse_bool,
         "DeepSpeed's switch: False makes an op raise instead of falling back to a slower backend."),
    Knob("DSINF_BACKEND", "auto", _choice("auto", "compiled", "triton", "torch"),
         "Force one backend for every op: auto, compiled, triton or torch (tests, benchmarks)."),
    Knob("DSINF_ROUTES", "auto", _choice("auto", "measure", "load", "off"),
         "Measured per-shape routes between the compiled GEMV and ATen (dsinf.routes): auto = apply the "
         "persisted routes, dsinf.inject measures a model's missing shapes on CUDA; measure = on CPU too; "
         "load = apply, never measure automatically; off = compiled crossovers only."),
    Knob("DSINF_TRITON_PDL", True, parse_bool,
         "Launch the Triton decode kernels (M <= 16) with programmatic dependent launch on sm_90+ GPUs (each "
         "waits for the previous kernel before its first load); 0: plain launches."),
    Knob("THP_MEM_ALLOC_ENABLE", "0", _choice("0", "1"),
         "torch's variable, read at its first CPU allocation (set it before Python starts): 1 = torch's CPU "
         "allocator advises 2 MiB pages (transparent huge pages) for tensors of 2 MiB and more: fewer TLB misses "
         "when a GEMV streams a weight (2-core Xeon guest: dsinf's int8 GEMV alone 5-14% faster, ATen's 8-19%; "
         "a whole model's decode within that host's spread); loading pays more page-fault time. The report's "
         "cpu_pages line says what the process gets."),
    Knob("TRITON_INTERPRET", False, parse_bool,
         "Triton's own variable: run Triton kernels on CPU tensors (fp32/fp16 only; used by the CPU tests)."),
]

KNOBS: dict[str, Knob] = {k.name: k for k in _KNOBS}


def get(name: str) -> Any:
    """Current value of a declared knob."""
    return KNOBS[name].value


def build_var_enabled(var: str) -> bool | None:
    """Value of a per-op `DS_BUILD_<OP>` variable: True/False when set, None when unset."""
    raw = os.environ.get(var)
    if raw is None or raw.strip() == "":
        return None
    return parse_bool(var, raw)


def snapshot() -> list[dict[str, Any]]:
    """Every knob with its value and source, for the report. Never raises: a bad value is shown."""
    rows = []
    for knob in _KNOBS:
        try:
            value, source = knob.read()
        except KnobError as exc:
            value, source = f"INVALID ({exc})", "env"
        rows.append({"name": knob.name, "value": value, "source": source, "meaning": knob.meaning})
    for name in sorted(os.environ):  # per-op DS_BUILD_<OP> switches: one name per op, listed when set
        if name.startswith("DS_BUILD_") and name not in KNOBS:
            try:
                value = build_var_enabled(name)
            except KnobError as exc:
                value = f"INVALID ({exc})"
            rows.append({"name": name, "value": value, "source": "env",
                         "meaning": "At pip install: precompile this op or variant (DS_BUILD_<OP>[_<VARIANT>]; "
                                    "overrides DS_BUILD_OPS)."})
    return rows
