"""Child process of op_builder.build: run one BuildSpec's ninja build, then load and check the library.

Run as `python -m op_builder._build_worker <spec.json>`; stdout/stderr go to the build log. The parent
has written `build.ninja` (torch.utils.cpp_extension's own writer), so ninja starts first and `import
torch` (seconds) runs while the compilers do. Exit 0 only if ninja built the library AND it loads in this
process AND registers every kernel the spec lists (so a library with an undefined symbol, or one that
registers nothing, is never published). The log ends with where the time went: the compile of each
translation unit (from ninja's log), and the worker's phases, each line written when it happens
(`# phase <seconds> s: <what>`).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import traceback


def _on_sigterm(signum, frame):
    """Parent died or asked us to stop: pass SIGTERM to our process group (ninja stops its compilers)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        os.killpg(0, signal.SIGTERM)
    finally:
        os._exit(128 + signum)


def _sigterm_when_parent_dies() -> None:
    """PR_SET_PDEATHSIG: SIGTERM when the thread that started this process ends (it waits for us), so a
    `kill -9`ed loader leaves no compiler running. Set here, not between fork and exec, so that the
    parent can start us with vfork (op_builder.build._run_worker)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def main(spec_path: str) -> int:
    signal.signal(signal.SIGTERM, _on_sigterm)
    # A parent that ignores SIGCHLD passes that on through exec: ninja could then not wait for its compilers.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    _sigterm_when_parent_dies()
    spec = json.load(open(spec_path))
    if os.getppid() != spec["parent_pid"]:  # the parent died before PR_SET_PDEATHSIG took effect
        return 1
    if spec["nice"]:  # ninja and the compilers inherit it (build.niceness_increments)
        os.nice(spec["nice"])
    build_dir = spec["build_dir"]
    start = time.monotonic()

    def phase(what: str) -> float:
        now = time.monotonic() - start
        print(f"# phase {now:6.2f} s: {what}", flush=True)
        return now

    try:
        # ninja inherits our stdout/stderr (the log) and our process group (stopped as one).
        jobs = spec.get("jobs")  # the parent's budget (MAX_JOBS, or what memory and cores allow)
        print(f"# ninja -j {jobs or 'default'}", flush=True)
        print(f"# niceness {os.nice(0)}", flush=True)  # as the compilers inherit it (build.niceness_increments)
        ninja = subprocess.Popen(["ninja", "-v"] + (["-j", str(jobs)] if jobs else []), cwd=build_dir,
                                 stdin=subprocess.DEVNULL)
        phase("ninja started")
        from torch.utils import cpp_extension

        imported = phase("torch imported")
        # what cpp_extension.load checks before it builds: warns (in the log) about an ABI-incompatible CXX
        cpp_extension.get_compiler_abi_compatibility_and_version(cpp_extension.get_cxx_compiler())
        if spec.get("pre_load"):  # define schemas first, so load checks the kernels' signatures against them
            import importlib

            module, _, func = spec["pre_load"].partition(":")
            getattr(importlib.import_module(module), func)()
        status = ninja.wait()
        phase("ninja finished")
        if status < 0:  # not a compile error: say so where the log's tail and the first errors show it
            name = signal.Signals(-status).name if -status in signal.valid_signals() else str(-status)
            print(f"error: ninja was killed by {name}: the build failed", flush=True)
            return 1
        if status != 0:
            print(f"# ninja exited with status {status}: the build failed", flush=True)
            return 1
        import torch

        torch.ops.load_library(os.path.join(build_dir, f"{spec['library_name']}.so"))
        if spec["kernels"]:
            from op_builder.build import missing_kernels

            missing = missing_kernels(tuple(spec["kernels"]), spec["dispatch_key"])
            if missing:
                print(f"error: the library loads but registers no {spec['dispatch_key']} kernel for "
                      f"{', '.join(missing)}", flush=True)
                return 1
        phase("library loaded, kernels checked")
    except Exception:
        sys.stdout.flush()
        traceback.print_exc()
        print(f"# build failed after {time.monotonic() - start:.1f} s", flush=True)
        return 1
    _print_compile_times(build_dir)
    print(f"# built and loaded in {time.monotonic() - start:.1f} s (torch imported at {imported:.1f} s, "
          f"while ninja compiled)", flush=True)
    return 0


def _print_compile_times(build_dir: str) -> None:
    """One line per ninja step, slowest first: on a machine with a core per source the slowest compile
    bounds the build."""
    try:
        lines = open(os.path.join(build_dir, ".ninja_log")).read().splitlines()[1:]
    except OSError:
        return
    steps = sorted(((int(end) - int(begin)) / 1000, out) for begin, end, _, out, *_ in
                   (line.split("\t") for line in lines if line.count("\t") >= 4))
    for seconds, out in reversed(steps):
        print(f"# {seconds:6.2f} s  {out}", flush=True)


if __name__ == "__main__":
    status = main(sys.argv[1])
    sys.stdout.flush()
    sys.stderr.flush()
    # The status, for a parent that ignores SIGCHLD and so cannot read the exit status (build._worker_status).
    from op_builder.build import STATUS_FILE

    with open(os.path.join(os.path.dirname(os.path.abspath(sys.argv[1])), STATUS_FILE), "w") as f:
        f.write(str(status))
    # Skip the interpreter's shutdown: after `import torch` (a CUDA wheel) and loading the library it takes
    # 0.4-1 s, all of it on the cold build's critical path, and there is nothing left to clean up (ninja has
    # exited, the log is flushed, the parent reads the exit status).
    os._exit(status)
