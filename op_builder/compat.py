"""Can a variant be built here? Pure functions of a `System` that return a `BuildDecision`.

Decisions carry their reasons; the report, the error messages, the install step and the tests all
read the same objects (nothing re-derives them). No function here runs a compiler or a GPU query
itself: they only read `System` fields (which probe lazily on a real machine, and are given
values on a fake one).
"""
from __future__ import annotations

from dataclasses import dataclass

from .archs import ArchResolution, resolve_archs
from .system import System

# The oldest GPU our CUDA kernels are written for (half2 arithmetic, warp shuffles, cp.async-free).
MIN_CUDA_CAPABILITY = (7, 0)


@dataclass(frozen=True)
class BuildDecision:
    ok: bool
    reasons: tuple[str, ...] = ()  # why not (when ok is False)
    notes: tuple[str, ...] = ()  # true facts worth showing even when ok (e.g. "bf16 omitted")

    def __bool__(self) -> bool:
        return self.ok

    @classmethod
    def of(cls, problems: list[str], notes: list[str] | None = None) -> "BuildDecision":
        return cls(ok=not problems, reasons=tuple(problems), notes=tuple(notes or ()))


#: The former name, for the modules that still import it (op_builder/builder.py, prebuilt.py); new code
#: says BuildDecision (dsinf.dispatch has its own BackendDecision).
Decision = BuildDecision


def _toolchain_problems(system: System) -> list[str]:
    problems = []
    if system.torch_version is None:
        problems.append("torch is not installed")
    if system.ninja is None:
        problems.append("ninja is not installed or not on PATH (pip install ninja)")
    if system.cxx is None:
        problems.append(f"no C++ compiler found: {system.cxx_problem}" if system.cxx_problem
                        else "no C++ compiler found (set CXX or install g++)")
    return problems


def cpu_compatible(system: System) -> BuildDecision:
    """The CPU variant needs torch, ninja and a C++ compiler; any CPU works (scalar path)."""
    return BuildDecision.of(_toolchain_problems(system))


def cuda_version_problem(torch_cuda: str | None, nvcc_version: tuple[int, int]) -> str | None:
    """Same-major rule: nvcc X.a builds for torch's CUDA X.b (minor versions are ABI compatible
    since CUDA 11); DeepSpeed's hand-kept whitelist of minors needed an edit every release."""
    if torch_cuda is None:
        return "torch is built without CUDA (CPU-only wheel)"
    major = int(torch_cuda.split(".")[0])
    if major != nvcc_version[0]:
        return (f"nvcc is CUDA {nvcc_version[0]}.{nvcc_version[1]} but torch was built with CUDA {torch_cuda}: "
                f"the major versions must match (install a matching toolkit or point CUDA_HOME at one)")
    return None


def cuda_compatible(system: System, arch_list: str | None) -> tuple[BuildDecision, ArchResolution | None]:
    """The CUDA variant needs the toolchain, nvcc matching torch's CUDA major, and targets that nvcc
    can build and that are >= MIN_CUDA_CAPABILITY. bf16 kernels are dropped (a note, not a failure)
    when a target is below 8.0."""
    problems = _toolchain_problems(system)
    notes: list[str] = []
    if system.torch_cuda is None and system.torch_version is not None:
        problems.append("torch is built without CUDA (CPU-only wheel)")
    nvcc = system.nvcc
    if nvcc is None:
        problems.append("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
        return BuildDecision.of(problems, notes), None
    if system.torch_cuda is not None:
        mismatch = cuda_version_problem(system.torch_cuda, nvcc.version)
        if mismatch:
            problems.append(mismatch)
        elif system.torch_cuda != nvcc.version_str:
            notes.append(f"nvcc CUDA {nvcc.version_str} with torch CUDA {system.torch_cuda}: same major, accepted")
    resolution = resolve_archs(system, arch_list)
    problems.extend(resolution.problems)
    if not resolution.archs and not resolution.problems:
        problems.append("no CUDA targets")
    old = [str(a) for a in resolution.archs if a.capability < MIN_CUDA_CAPABILITY]
    if old:
        problems.append(f"targets {', '.join(old)} are older than the minimum "
                        f"{MIN_CUDA_CAPABILITY[0]}.{MIN_CUDA_CAPABILITY[1]}")
    if resolution.archs and not resolution.bf16:
        low = [str(a) for a in resolution.archs if a.major < 8]
        notes.append(f"bf16 kernels omitted: targets {', '.join(low)} are below 8.0")
    if not system.gpu_list and isinstance(system.gpus, str):
        notes.append(f"no GPU visible ({system.gpus}); building for {resolution.source}")
    notes.append(f"targets: {' '.join(str(a) for a in resolution.archs) or 'none'} (from {resolution.source})")
    return BuildDecision.of(problems, notes), resolution
