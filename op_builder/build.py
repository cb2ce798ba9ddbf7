"""One build, as a transaction: lock, re-check, compile in a temp dir, publish with one rename.

    with lock(<variant dir>/.lock):
        if <key>/ is complete and intact: done (someone built it while we waited)
        remove a broken <key>/ and leftovers of killed builds
        compile into .tmp-<key>-<pid>/ in a child process (log to .tmp-.../build.log)
        write the manifest (sizes + SHA-256), rename .tmp-... -> <key>/

The compile runs in a child `python -m op_builder._build_worker` so the compiler output goes to a
log file without redirecting this process's stdout, a crash of the toolchain cannot take the caller
down, and the child proves the library loads (`torch.ops.load_library`) before it is published.
The child uses the public `torch.utils.cpp_extension.load` (ninja) with `build_directory` set to the
temp dir, so torch's own lock file (which can go stale) is never shared between builds.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import cache, knobs
from .errors import BuildError, classify, first_errors
from .locking import BuildLock

log = logging.getLogger("op_builder")

PROGRESS_AFTER = 2.0  # seconds before the first "building ..." line
PROGRESS_EVERY = 15.0
# Peak resident memory of one compile job, to size parallelism from free memory (nvcc with
# several arch targets is the hungry one).
JOB_MEMORY = {"cxx": 1.0 * 2**30, "nvcc": 2.5 * 2**30}


@dataclass(frozen=True)
class BuildSpec:
    """Everything the compile needs; also what the key hashes (with the toolchain identity)."""

    op: str
    variant: str
    library_name: str  # file stem of the .so
    sources: tuple[str, ...]
    include_dirs: tuple[str, ...]
    cflags: tuple[str, ...]
    cuda_cflags: tuple[str, ...] = ()
    ldflags: tuple[str, ...] = ()
    with_cuda: bool = False
    pre_load: str = ""  # "module:function" run before loading the library (defines the op schemas)
    describe: str = ""  # e.g. "for sm_90a" / "for avx2", shown in progress lines
    manifest_extra: dict = field(default_factory=dict)  # recorded for load-time validation

    @property
    def label(self) -> str:
        return f"{self.op}[{self.variant}]"


def max_jobs(cpu_count: int, memory_available: int | None, with_cuda: bool) -> int:
    """MAX_JOBS if set; else min(cores, free memory / peak memory per job), at least 1."""
    forced = knobs.get("MAX_JOBS")
    if forced:
        return forced
    jobs = max(1, cpu_count)
    if memory_available:
        per_job = JOB_MEMORY["nvcc" if with_cuda else "cxx"]
        jobs = min(jobs, max(1, int(memory_available // per_job)))
    return jobs


def _worker_preexec() -> None:
    """In the worker, before exec: lead a process group of its own (so the whole build can be stopped
    as one) and get SIGTERM when the parent dies. The worker's SIGTERM handler forwards it to ninja,
    which stops its compilers: a `kill -9`ed loader leaves no compiler running."""
    os.setpgrp()
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _stop(proc: subprocess.Popen) -> None:
    """Stop a worker and everything it started (SIGTERM lets ninja stop its compilers; then SIGKILL)."""
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        proc.wait()


def _show_progress() -> None:
    """Builds and waits take seconds to minutes; a user must see them even if the application never
    configured logging (Python then shows only warnings). Only then, give our logger a stderr handler."""
    if not logging.getLogger().handlers and not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("op_builder: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def _run_worker(spec: BuildSpec, build_dir: Path, log_path: Path, jobs: int) -> tuple[int, float]:
    spec_path = build_dir / "spec.json"
    spec_path.write_text(json.dumps({**asdict(spec), "build_dir": str(build_dir)}))
    env = dict(os.environ)
    env["MAX_JOBS"] = str(jobs)
    # The worker imports op_builder (and the schema module) the way this process did, even when
    # that was through a sys.path entry rather than an installed package.
    package_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([package_root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    # torch would otherwise add its own -gencode flags or warn about an unset arch list; ours are explicit.
    env.pop("TORCH_CUDA_ARCH_LIST", None)
    start = time.monotonic()
    with open(log_path, "ab") as logf:
        logf.write(f"# {spec.label} {spec.describe}\n# MAX_JOBS={jobs}\n".encode())
        logf.flush()
        proc = subprocess.Popen([sys.executable, "-m", "op_builder._build_worker", str(spec_path)],
                                stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                preexec_fn=_worker_preexec)
        next_report = PROGRESS_AFTER
        while True:
            try:
                rc = proc.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                pass
            except BaseException:  # KeyboardInterrupt: do not leave an orphan compiler behind
                _stop(proc)
                raise
            elapsed = time.monotonic() - start
            if elapsed >= next_report:
                if next_report == PROGRESS_AFTER:
                    log.info("building %s %s with %d jobs (log: %s)", spec.label, spec.describe, jobs, log_path)
                else:
                    log.info("still building %s: %.0f s (log: %s)", spec.label, elapsed, log_path)
                next_report = PROGRESS_EVERY * (elapsed // PROGRESS_EVERY + 1)  # then at 15 s, 30 s, ...
    return rc, time.monotonic() - start


def _remove(path: Path) -> None:
    """Move aside, then delete: a process that has the old .so mapped keeps its copy."""
    if not path.exists():
        return
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}-{secrets.token_hex(3)}")
    try:
        os.rename(path, trash)
    except OSError:
        trash = path
    shutil.rmtree(trash, ignore_errors=True)


def build_or_wait(spec: BuildSpec, key: cache.BuildKey, variant_dir: Path, *, system_cpu_count: int,
                  memory_available: int | None) -> tuple[Path, str]:
    """Return (entry dir, how): how is 'cached' (someone else built it) or 'built'."""
    _show_progress()
    digest = key.digest
    entry = variant_dir / digest
    variant_dir.mkdir(parents=True, exist_ok=True)
    build_dir = variant_dir / f".tmp-{digest}-{os.getpid()}-{secrets.token_hex(3)}"
    log_path = build_dir / "build.log"
    lock = BuildLock(variant_dir / ".lock", what=spec.label, log_path=log_path,
                     timeout=knobs.get("DS_BUILD_TIMEOUT"))
    with lock:
        problem = cache.entry_problem(entry, digest)
        if problem is None:
            return entry, "cached"
        if entry.exists():
            log.warning("op_builder: rebuilding %s: cached entry %s is unusable (%s)", spec.label, entry, problem)
            _remove(entry)
        for stale in variant_dir.glob(f".tmp-{digest}-*"):  # left by killed builds; we hold the lock
            _remove(stale)
        build_dir.mkdir(parents=True)
        jobs = max_jobs(system_cpu_count, memory_available, spec.with_cuda)
        rc, seconds = _run_worker(spec, build_dir, log_path, jobs)
        library = f"{spec.library_name}.so"
        if rc != 0 or not (build_dir / library).is_file():
            failed = variant_dir / f".failed-{digest}"
            _remove(failed)
            os.rename(build_dir, failed)
            failed_log = failed / "build.log"
            text = failed_log.read_text(errors="replace")
            errors = first_errors(text)
            detail = "" if errors else "last log lines:\n" + "\n".join(
                "  " + line for line in text.strip().splitlines()[-12:])
            raise BuildError(spec.label, errors, classify(text), str(failed_log), detail)
        for junk in build_dir.iterdir():  # keep the library, the log, and nothing the loader could trip on
            if junk.name not in (library, "build.log"):
                if junk.is_dir():
                    shutil.rmtree(junk, ignore_errors=True)
                else:
                    junk.unlink()
        cache.write_manifest(build_dir, op=spec.op, variant=spec.variant, key=key, library=library,
                             build_seconds=seconds, extra=spec.manifest_extra)
        os.rename(build_dir, entry)
        log.info("built %s in %.1f s: %s", spec.label, seconds, entry)
        return entry, "built"
