"""Exceptions raised by op_builder, and the reading of compiler logs into a cause.

A failed build raises ONE `BuildError` whose message holds what a user needs to act: the op, the
first compiler error lines (not ninja's "exit status 1" noise, not a secondary ImportError), the
classified cause when we recognise it, and the path of the full log.
"""
from __future__ import annotations

import re

MAX_ERROR_LINES = 8


class OpBuilderError(RuntimeError):
    pass


class IncompatibleError(OpBuilderError):
    """The op cannot be built (or loaded) on this machine; `reasons` says why."""

    def __init__(self, op: str, reasons: tuple[str, ...] | list[str]):
        self.op = op
        self.reasons = tuple(reasons)
        super().__init__(f"{op} cannot be built here:\n" + "\n".join(f"  - {r}" for r in self.reasons))


class BuildError(OpBuilderError):
    """`transient`: the failure says nothing about the sources or flags (the time limit, the out-of-memory
    killer's SIGKILL, a full disk): building the same key again may succeed."""

    def __init__(self, op: str, errors: list[str], cause: str | None, log_path: str | None, detail: str = "", *,
                 transient: bool = False):
        self.op = op
        self.transient = transient
        self.errors = errors
        self.cause = cause
        self.log_path = log_path
        lines = [f"building {op} failed" + (f": {cause}" if cause else "")]
        if detail:
            lines.append(detail)
        if errors:
            lines.append("first compiler errors:")
            lines.extend(f"  {e}" for e in errors)
        if log_path:
            lines.append(f"full log: {log_path}")
        super().__init__("\n".join(lines))


class BuildTimeoutError(OpBuilderError):
    pass


class UnsafeCacheError(OpBuilderError):
    """A cache directory or file could be changed by another user: nothing in it is trusted."""


OUT_OF_MEMORY = "the compiler ran out of memory (lower MAX_JOBS)"  # a transient cause (BuildError.transient)

# (pattern, cause) in priority order. Causes are short and say what to do.
_CAUSES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"unsupported (GNU|clang) version|unsupported host compiler|-allow-unsupported-compiler"),
     "the host C++ compiler is newer than this nvcc supports (install an older g++ and set CXX, or a newer CUDA)"),
    (re.compile(r"nvcc: (not found|No such file)|No such file or directory: '[^']*nvcc'|nvcc.*command not found"),
     "nvcc not found (set CUDA_HOME or put nvcc on PATH)"),
    (re.compile(r"Ninja is required|ninja: (not found|command not found)|No such file or directory: 'ninja'"),
     "ninja is not installed (pip install ninja)"),
    (re.compile(r"fatal error: ([^:]+): No such file or directory|cannot open source file \"([^\"]+)\""),
     "missing header"),
    (re.compile(r"Killed signal terminated program|internal compiler error: Killed|virtual memory exhausted|"
                r"out of memory allocating"), OUT_OF_MEMORY),
    (re.compile(r"undefined symbol"),
     "the library has an undefined symbol (a function missing from the sources, or built against another torch)"),
    (re.compile(r"(c\+\+|g\+\+|cc1plus|x86_64-linux-gnu-g\+\+)[^\n]*: (not found|No such file)|"
                r"command not found: c\+\+"), "C++ compiler not found (set CXX or install g++)"),
    # torch probes the compiler (`<cxx> -v`) before building; a CXX that cannot run ends up here.
    # (a CalledProcessError naming ninja - logs of torch's own ninja runs, tools/ - is not a cause.)
    (re.compile(r"CalledProcessError: Command '\['(?!ninja')([^']+)'"), "command failed"),
)

_ERROR_LINE = re.compile(r"(\berror\b[:\s]|\bfatal error\b|: undefined reference|undefined symbol)", re.I)
_NOISE = re.compile(r"^(ninja: build stopped|FAILED: |subprocess\.CalledProcessError|error: command|"
                    r"RuntimeError: Error building extension)")


def first_errors(log: str, limit: int = MAX_ERROR_LINES) -> list[str]:
    """The first compiler error lines in a build log, de-duplicated, without ninja's noise."""
    out: list[str] = []
    for line in log.splitlines():
        line = line.rstrip()
        if not line or _NOISE.search(line) or not _ERROR_LINE.search(line):
            continue
        if line not in out:
            out.append(line[:400])
        if len(out) >= limit:
            break
    return out


def classify(log: str) -> str | None:
    for pattern, cause in _CAUSES:
        m = pattern.search(log)
        if m:
            if cause == "missing header":
                header = next((g for g in m.groups() if g), "?")
                return f"missing header {header}"
            if cause == "command failed":
                return f"{m.group(1)} failed to run (is CXX set to a working C++ compiler?)"
            return cause
    return None
