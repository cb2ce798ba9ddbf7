"""Child process of op_builder.build: compile one BuildSpec with torch.utils.cpp_extension.

Run as `python -m op_builder._build_worker <spec.json>`; stdout/stderr go to the build log. Exit 0
only if the library was built AND loads in this process AND registers every kernel the spec lists
(so a library with an undefined symbol, or one that registers nothing, is never published). The log ends
with where the time went: the compile of each translation unit (from ninja's log) and the worker's phases.
"""
from __future__ import annotations

import json
import os
import signal
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


def main(spec_path: str) -> int:
    signal.signal(signal.SIGTERM, _on_sigterm)
    if os.getppid() == 1:  # the parent died before PR_SET_PDEATHSIG took effect
        return 1
    spec = json.load(open(spec_path))
    start = time.monotonic()
    try:
        from torch.utils import cpp_extension

        imported = time.monotonic()
        if spec.get("pre_load"):  # define schemas first, so load checks the kernels' signatures against them
            import importlib

            module, _, func = spec["pre_load"].partition(":")
            getattr(importlib.import_module(module), func)()

        # load() compiles, links and loads the library; each compile's time is in ninja's log.
        cpp_extension.load(
            name=spec["library_name"],
            sources=spec["sources"],
            extra_cflags=spec["cflags"],
            extra_cuda_cflags=spec["cuda_cflags"] or None,
            extra_ldflags=spec["ldflags"],
            extra_include_paths=spec["include_dirs"],
            build_directory=spec["build_dir"],
            with_cuda=spec["with_cuda"],
            is_python_module=False,
            verbose=True,
        )
        if spec["kernels"]:
            from op_builder.build import missing_kernels

            missing = missing_kernels(tuple(spec["kernels"]), spec["dispatch_key"])
            if missing:
                print(f"error: the library loads but registers no {spec['dispatch_key']} kernel for "
                      f"{', '.join(missing)}", flush=True)
                return 1
    except Exception:
        sys.stdout.flush()
        traceback.print_exc()
        print(f"# build failed after {time.monotonic() - start:.1f} s", flush=True)
        return 1
    _print_compile_times(spec["build_dir"])
    print(f"# built and loaded in {time.monotonic() - start:.1f} s (torch imported in {imported - start:.1f} s)",
          flush=True)
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
    sys.exit(main(sys.argv[1]))
