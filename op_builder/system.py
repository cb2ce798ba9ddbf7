"""`System`: a frozen snapshot of the machine, probed lazily.

Every field is computed the first time it is read and never again in this process (probes such as
`nvcc --version`, the GPU query or the CPU flags cost milliseconds to a second, and DeepSpeed ran
them on every import). Reading a CPU field never starts nvcc; reading a CUDA field never reads the
CPU flags. Nothing is probed at import.

Tests build fake systems with `System.fake(...)`: unknown fields are then "absent" rather than
probed, so compatibility decisions can be checked without hardware.
"""
from __future__ import annotations

import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import knobs


@dataclass(frozen=True)
class Nvcc:
    path: str
    version: tuple[int, int]  # (13, 0)
    archs: tuple[tuple[int, int], ...]  # real targets from `nvcc --list-gpu-arch`, e.g. ((7, 5), ...)

    @property
    def version_str(self) -> str:
        return f"{self.version[0]}.{self.version[1]}"


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    capability: tuple[int, int]


@dataclass(frozen=True)
class Compiler:
    """The host C++ compiler, identified WITHOUT running it (a warm load must not invoke the
    compiler): resolved path, size and mtime change whenever the compiler is upgraded."""

    path: str
    identity: str  # "<realpath>:<size>:<mtime>"


@dataclass(frozen=True)
class CompilerVersion:
    version: str  # first line of `--version`
    family: str  # "gcc", "clang" or "unknown"


@dataclass(frozen=True)
class Cpu:
    arch: str  # platform.machine()
    brand: str
    flags: frozenset[str] = field(default_factory=frozenset)
    source: str = ""

    @property
    def isa(self) -> str:
        """The best instruction-set level our CPU kernels have a path for."""
        return isa_level(self.arch, self.flags)


# Ordered best first: (level, flags the CPU must have, gcc flags that enable it).
ISA_LEVELS: tuple[tuple[str, frozenset[str], tuple[str, ...]], ...] = (
    ("avx512_bf16", frozenset({"avx512f", "avx512bw", "avx512vl", "avx512_bf16", "fma", "f16c"}),
     ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mavx2", "-mfma", "-mf16c")),
    ("avx512", frozenset({"avx512f", "avx512bw", "avx512vl", "fma", "f16c"}),
     ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma", "-mf16c")),
    ("avx2", frozenset({"avx2", "fma", "f16c"}), ("-mavx2", "-mfma", "-mf16c")),
    ("baseline", frozenset(), ()),
)
ISA_RANK = {name: len(ISA_LEVELS) - i for i, (name, _, _) in enumerate(ISA_LEVELS)}


def isa_level(arch: str, flags: frozenset[str]) -> str:
    if arch not in ("x86_64", "AMD64", "amd64"):
        return "baseline"
    for name, needed, _ in ISA_LEVELS:
        if needed <= flags:
            return name
    return "baseline"


def isa_flags(level: str) -> tuple[str, ...]:
    for name, _, flags in ISA_LEVELS:
        if name == level:
            return flags
    raise ValueError(f"unknown ISA level {level!r}")


def _run(cmd: list[str], timeout: float = 30.0) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout


# --------------------------------------------------------------------------- probes
def _probe_torch_version() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.__version__


def _probe_torch_cxx11_abi() -> bool | None:
    try:
        import torch
    except ImportError:
        return None
    return bool(torch._C._GLIBCXX_USE_CXX11_ABI)


def _probe_torch_cuda() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.version.cuda


def _probe_cuda_home() -> str | None:
    home = knobs.get("CUDA_HOME") or knobs.get("CUDA_PATH")
    if home:
        return home
    # A toolkit root has the runtime headers; /usr/local/bin/nvcc may be a wrapper outside the root.
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for root in candidates:
        if os.path.exists(os.path.join(root, "include", "cuda_runtime.h")):
            return root
    return None


_ARCH_RE = re.compile(r"(?:sm|compute)_(\d+)([a-z]?)")


def _probe_nvcc(cuda_home: str | None) -> Nvcc | None:
    candidates = []
    if cuda_home:
        candidates.append(os.path.join(cuda_home, "bin", "nvcc"))
    if shutil.which("nvcc"):
        candidates.append(shutil.which("nvcc"))
    for path in candidates:
        if not path or not os.path.exists(path):
            continue
        text = _run([path, "--version"])
        if not text:
            continue
        m = re.search(r"release (\d+)\.(\d+)", text)
        if not m:
            continue
        archs_text = _run([path, "--list-gpu-arch"]) or ""
        archs = set()
        for num, suffix in _ARCH_RE.findall(archs_text):
            if not suffix:
                archs.add((int(num[:-1]), int(num[-1])))
        return Nvcc(path=path, version=(int(m.group(1)), int(m.group(2))), archs=tuple(sorted(archs)))
    return None


def _probe_gpus() -> tuple[tuple[Gpu, ...] | str, str]:
    """(the visible GPUs, or a string saying why they could not be listed; what answered: "nvml" or
    "torch"). NVML first: it answers without initialising CUDA (see nvml.py), and asked first in every
    process, it gives every process the same GPU names (the measured routes are keyed by them)."""
    try:
        import torch
    except ImportError:
        return "torch is not installed", "torch"
    if torch.version.cuda is None:
        return "torch is built without CUDA", "torch"
    if torch.cuda._is_in_bad_fork():
        return ("CUDA was initialised before fork(); cannot query GPUs in this child (set TORCH_CUDA_ARCH_LIST)",
                "torch")
    from . import nvml

    try:
        found = nvml.visible_gpus(torch.version.cuda, knobs.get("CUDA_VISIBLE_DEVICES"),
                                  knobs.get("CUDA_DEVICE_ORDER"))
    except Exception:  # noqa: BLE001 - an odd NVML is torch's to answer for
        found = None
    if found:  # none visible: torch says why
        return tuple(Gpu(i, g.name, g.capability) for i, g in enumerate(found)), "nvml"
    try:
        if not torch.cuda.is_available():
            return "no CUDA device is visible", "torch"
        return tuple(Gpu(i, torch.cuda.get_device_name(i), tuple(torch.cuda.get_device_capability(i)))
                     for i in range(torch.cuda.device_count())), "torch"
    except Exception as exc:  # a broken driver must not break the report
        return f"GPU query failed: {exc}", "torch"


def _identity(path: str, args: list[str]) -> str:
    """A program's identity without running it: its resolved path, size and mtime (an upgrade changes
    them), then the arguments it is given."""
    real = os.path.realpath(path)
    st = os.stat(real)
    return " ".join([f"{real}:{st.st_size}:{int(st.st_mtime)}", *args])


def _command_identity(raw: str) -> str:
    """`_identity` of a command line (the program not found: the command line as written)."""
    try:
        argv = shlex.split(raw)
    except ValueError:
        return raw
    path = shutil.which(argv[0]) if argv else None
    return _identity(path, argv[1:]) if path else raw


def _probe_cuda_toolchain(nvcc: "Nvcc | None") -> dict[str, str | None]:
    """What a CUDA build runs beyond the version `nvcc --version` gave, identified without running it:
    the nvcc command torch writes into build.ninja (PYTORCH_NVCC, else the toolkit's), the host compiler
    nvcc then runs (CC, which torch passes as -ccbin; else NVCC_CCBIN; else gcc and g++ on PATH) and the
    flags nvcc adds to every command (NVCC_PREPEND_FLAGS / NVCC_APPEND_FLAGS). Each changes the binary."""
    nvcc_command = knobs.get("PYTORCH_NVCC") or (nvcc.path if nvcc else None)
    host = knobs.get("CC") or knobs.get("NVCC_CCBIN")
    return {"nvcc": _command_identity(nvcc_command) if nvcc_command else None,
            "host": _command_identity(host) if host else
            " ".join(_command_identity(tool) for tool in ("gcc", "g++")),
            "prepend_flags": knobs.get("NVCC_PREPEND_FLAGS"), "append_flags": knobs.get("NVCC_APPEND_FLAGS")}


def _cxx_command() -> tuple[Compiler | None, str | None]:
    """(the compiler, None) or (None, why not). CXX is a command line, as make and torch read it:
    `g++ -O0` is the compiler g++ with a flag (its arguments are part of the identity)."""
    raw = knobs.get("CXX") or "c++"
    try:
        argv = shlex.split(raw)
    except ValueError as exc:
        return None, f"CXX={raw!r} cannot be parsed as a command line ({exc})"
    if not argv:
        argv = ["c++"]
    path = shutil.which(argv[0]) or (argv[0] if os.path.isfile(argv[0]) and os.access(argv[0], os.X_OK) else None)
    if not path:
        if knobs.get("CXX"):
            return None, f"CXX={raw!r}: {argv[0]!r} is not an executable file or a command on PATH"
        return None, "no c++ on PATH (set CXX or install g++)"
    return Compiler(path=path, identity=_identity(path, argv[1:])), None


def _probe_cxx() -> Compiler | None:
    return _cxx_command()[0]


def _probe_cxx_problem() -> str | None:
    return _cxx_command()[1]


def _probe_cxx_version(cxx: Compiler | None) -> CompilerVersion | None:
    if cxx is None:
        return None
    text = _run([cxx.path, "--version"], timeout=10)
    if not text:
        return None
    lower = text.lower()
    family = "clang" if "clang" in lower else "gcc" if "free software foundation" in lower else "unknown"
    return CompilerVersion(version=text.splitlines()[0].strip(), family=family)


def ninja_binary() -> str | None:
    """The ninja builds run: on PATH, else the `ninja` wheel's (its binary sits next to the package even when
    its scripts directory is not on PATH, e.g. a venv's python run without activating the venv)."""
    path = shutil.which("ninja")
    if path is None:
        try:
            import ninja  # type: ignore

            path = os.path.join(ninja.BIN_DIR, "ninja")
        except (ImportError, AttributeError):
            return None
    return path if os.access(path, os.X_OK) else None


def _probe_ninja() -> str | None:
    path = ninja_binary()
    text = _run([path, "--version"], timeout=10) if path else None
    return text.strip() if text else None


def _probe_cpu() -> Cpu:
    """CPU flags. On Linux /proc/cpuinfo answers in microseconds with the same data py-cpuinfo
    reports; elsewhere py-cpuinfo (~1 s, it runs CPUID in a child process) is the portable source."""
    arch = platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            text = f.read()
        flags_m = re.search(r"^(?:flags|Features)\s*:\s*(.*)$", text, re.M)
        brand_m = re.search(r"^model name\s*:\s*(.*)$", text, re.M)
        if flags_m:
            return Cpu(arch=arch, brand=brand_m.group(1).strip() if brand_m else arch,
                       flags=frozenset(flags_m.group(1).split()), source="/proc/cpuinfo")
    except OSError:
        pass
    try:
        import cpuinfo  # py-cpuinfo

        info = cpuinfo.get_cpu_info()
        return Cpu(arch=arch, brand=info.get("brand_raw", arch), flags=frozenset(info.get("flags", ())),
                   source="py-cpuinfo")
    except Exception as exc:
        return Cpu(arch=arch, brand=arch, flags=frozenset(), source=f"unknown ({exc})")


def _probe_memory_available() -> int | None:
    """Bytes of memory available to us: MemAvailable, capped by a cgroup v2/v1 limit."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            raw = open(path).read().strip()
        except OSError:
            continue
        if raw.isdigit() and int(raw) < (1 << 60):
            avail = min(avail, int(raw)) if avail else int(raw)
    return avail


def _probe_cpu_cache() -> int | None:
    """Bytes of cpu0's largest cache (the last level: L3 on x86) from sysfs; None where none is listed."""
    best = 0
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            size = (index / "size").read_text().strip().upper()
            best = max(best, int(size.rstrip("KMG")) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1:], 1))
        except (OSError, ValueError):
            continue
    return best or None


def _probe_cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


_PROBES: dict[str, Callable[["System"], Any]] = {
    "python_tag": lambda s: f"cp{sys.version_info[0]}{sys.version_info[1]}",
    "platform": lambda s: f"{sys.platform}-{platform.machine()}",
    "torch_version": lambda s: _probe_torch_version(),
    "torch_cxx11_abi": lambda s: _probe_torch_cxx11_abi(),
    "torch_cuda": lambda s: _probe_torch_cuda(),
    "cuda_home": lambda s: _probe_cuda_home(),
    "nvcc": lambda s: _probe_nvcc(s.cuda_home),
    "cuda_toolchain": lambda s: _probe_cuda_toolchain(s.nvcc),
    "gpu_probe": lambda s: _probe_gpus(),
    "gpus": lambda s: s.gpu_probe[0],
    "cxx": lambda s: _probe_cxx(),
    "cxx_problem": lambda s: _probe_cxx_problem(),
    "cxx_version": lambda s: _probe_cxx_version(s.cxx),
    "ninja": lambda s: _probe_ninja(),
    "cpu": lambda s: _probe_cpu(),
    "cpu_count": lambda s: _probe_cpu_count(),
    "cpu_cache": lambda s: _probe_cpu_cache(),
    "memory_available": lambda s: _probe_memory_available(),
}
FIELDS = tuple(_PROBES)


class System:
    """Immutable view of the machine; each field is probed on first read, once.

    Fields: python_tag, platform, torch_version, torch_cxx11_abi, torch_cuda (e.g. "13.0" or None),
    cuda_home, nvcc (`Nvcc` or None), cuda_toolchain (what nvcc runs: `_probe_cuda_toolchain`), gpus (tuple of `Gpu`, or a str saying why none could be
    listed), gpu_probe ((gpus, "nvml" or "torch": what answered)), cxx (`Compiler` or None; not run),
    cxx_problem (why cxx is None), cxx_version (`CompilerVersion`; runs `--version`), ninja (version or
    None), cpu (`Cpu`), cpu_count, cpu_cache (bytes of the largest CPU cache, or None), memory_available
    (bytes or None).
    """

    __slots__ = ("_values", "_probe", "_lock")

    def __init__(self, *, probe: bool = True, **values: Any):
        unknown = set(values) - set(FIELDS)
        if unknown:
            raise TypeError(f"unknown System field(s): {', '.join(sorted(unknown))}")
        object.__setattr__(self, "_values", dict(values))
        object.__setattr__(self, "_probe", probe)
        object.__setattr__(self, "_lock", threading.RLock())  # re-entrant: a probe reads other fields (nvcc -> cuda_home)

    @classmethod
    def fake(cls, **values: Any) -> "System":
        """A system for tests: given fields as given, every other field absent (None / no GPUs)."""
        defaults = {"gpus": "fake system: no GPU", "cpu": Cpu(arch="x86_64", brand="fake", source="fake"),
                    "cpu_count": 2, "python_tag": "cp311", "platform": "linux-x86_64"}
        return cls(probe=False, **{**defaults, **values})

    def __getattr__(self, name: str) -> Any:
        if name not in _PROBES:
            raise AttributeError(name)
        values = object.__getattribute__(self, "_values")
        if name in values:
            return values[name]
        if not object.__getattribute__(self, "_probe"):
            return None
        with object.__getattribute__(self, "_lock"):
            if name not in values:
                values[name] = _PROBES[name](self)
        return values[name]

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("System is immutable")

    def known(self) -> dict[str, Any]:
        """Fields probed so far (no new probes)."""
        return dict(object.__getattribute__(self, "_values"))

    @property
    def gpu_list(self) -> tuple[Gpu, ...]:
        gpus = self.gpus
        return gpus if isinstance(gpus, tuple) else ()


_current: System | None = None
_current_lock = threading.Lock()


def current_system() -> System:
    """The process-wide snapshot (created on first use, probes nothing until a field is read)."""
    global _current
    with _current_lock:
        if _current is None:
            _current = System()
        return _current
