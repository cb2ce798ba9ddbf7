"""One build, as a transaction: lock, re-check, compile in a temp dir, publish with one rename.

    with lock(<variant dir>/.lock):
        if <key>/ is complete and intact: done (someone built it while we waited)
        move aside whatever else sits at <key>/ (a broken entry, a file, a dangling symlink) and
        leftovers of killed builds
        compile into .tmp-<key>-<pid>/ in a child process (log to .tmp-.../build.log), within
        DSINF_BUILD_TIME_LIMIT seconds
        write the manifest (sizes + SHA-256 + the kernels it registers), rename .tmp-... -> <key>/

The compile runs in a child `python -m op_builder._build_worker` so the compiler output goes to a
log file without redirecting this process's stdout, a crash of the toolchain cannot take the caller
down, and the child proves the library loads (`torch.ops.load_library`) and registers the spec's
kernels before it is published. The worker leads its own session: on the time limit, an interrupt,
or the worker's own death (the OOM killer's SIGKILL), every process of the session is stopped, so no
compiler outlives its build.
This process writes the temp dir's `build.ninja` with torch.utils.cpp_extension's own writer (the file
`cpp_extension.load` would write: same flags, same targets), so the worker starts ninja at once and
imports torch while the compilers run: the worker's `import torch` (seconds) is off the critical path.
torch's own lock file (which can go stale) is never involved.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from . import cache, knobs, system, trust
from .errors import OUT_OF_MEMORY, BuildError, UnsafeCacheError, classify, first_errors
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
    # Custom ops ("namespace::name") the library must register a kernel for, under `dispatch_key`:
    # checked by the worker before publishing and by the loader after every load (a library that
    # registers none of them is not the binary we built).
    kernels: tuple[str, ...] = ()
    # Threads one compile job may run (nvcc and ptxas --split-compile); not hashed: the code is the same.
    threads_per_job: int = 1

    @property
    def label(self) -> str:
        return f"{self.op}[{self.variant}]"

    @property
    def dispatch_key(self) -> str:
        return dispatch_key(self.variant)


def dispatch_key(variant: str) -> str:
    """The dispatcher key a variant's kernels are registered under: CUDA for cuda variants, else CPU."""
    return "CUDA" if variant.startswith("cuda") else "CPU"


def missing_kernels(kernels: tuple[str, ...], key: str) -> list[str]:
    """The listed ops with no kernel registered for dispatch key `key` in this process (all must be)."""
    import torch

    missing = []
    for name in kernels:
        try:
            registered = torch._C._dispatch_has_kernel_for_dispatch_key(name, key)
        except RuntimeError:  # no such op at all
            registered = False
        if not registered:
            missing.append(name)
    return missing


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


# Niceness of a build whose compile jobs run several threads each (`BuildSpec.threads_per_job`: nvcc and ptxas
# with --split-compile, as many threads as CPUs) while another build runs beside it. As equals its threads
# crowd out the other build's one-thread compiles, whose slowest (the CPU binding) bounds load(); a step down
# in priority, it takes the cores the other leaves idle. 16-core H100 host, cold load() of cpu + cuda (alone:
# cpu 11.1 s, cuda 8.7 s): 13.8 / 15.6 s as equals (the CPU binding's compile 9.7 -> 12.6 / 14.3 s), 11.1 /
# 11.7 s with the cuda build at niceness 10 (its own build 8.6 / 10.9 s); niceness 19: 10.6 s
# (docs/PERFORMANCE.md, thirty-fifth round). Re-checked with both builds near 6.5 s alone (thirty-eighth round):
# the cuda build niced 7.3-7.4 s, as equals 8.1-8.7 s, the cpu build niced instead 9.0-9.8 s.
SHARED_CORES_NICE = 10


def job_shares(specs: list[BuildSpec], cpu_count: int, memory_available: int | None) -> list[int]:
    """Compile jobs of builds that run at once, at least 1 each.

    Builds of one priority (or a MAX_JOBS budget): the budget of one build (`max_jobs`) split in proportion to
    their translation units, so each build's sources start together and the builds finish together.

    Builds of different priorities (`niceness_increments`): each gets the jobs it would get alone (up to one
    per translation unit), while their jobs' peak memory fits. The lowered build takes only the cores the
    other leaves idle, so the cores need no split, and a split only queues the lowered build's sources. On a
    16-core H100 host cpu (7 units) beside cuda (14) split 5 + 11: cuda's last three sources in build order
    (mlp_gemm_bf16.cu, a 4.9 s compile on the CI box, among them) waited for a slot, and that build took 8.6 s
    beside the other against 6.1 s alone, its slowest compile 6.7 s (docs/PERFORMANCE.md, thirty-seventh
    round). With 7 + 14, cold load() of both took 7.3-7.6 s there against 7.8-8.3 s (thirty-eighth round)."""
    units = [max(1, len(s.sources)) for s in specs]
    if not knobs.get("MAX_JOBS") and len(set(niceness_increments(specs))) > 1:
        alone = [min(u, max_jobs(cpu_count, memory_available, s.with_cuda)) for u, s in zip(units, specs)]
        peak = sum(n * JOB_MEMORY["nvcc" if s.with_cuda else "cxx"] for n, s in zip(alone, specs))
        if memory_available is None or peak <= memory_available:
            return alone
    total = max_jobs(cpu_count, memory_available, any(s.with_cuda for s in specs))
    shares = [max(1, total * u // sum(units)) for u in units]
    shares[units.index(max(units))] += max(0, total - sum(shares))  # the remainder to the largest build
    return shares


def niceness_increments(specs: list[BuildSpec]) -> list[int]:
    """How much lower each of builds that run at once runs (`SHARED_CORES_NICE`): the ones with threaded
    compile jobs, when one without runs beside them; 0 for the others."""
    if all(s.threads_per_job > 1 for s in specs):
        return [0] * len(specs)
    return [SHARED_CORES_NICE if s.threads_per_job > 1 else 0 for s in specs]


def _session_members(sid: int) -> list[int] | None:
    """The live (non-zombie) processes of session `sid`, the worker's (it leads one): ninja runs each
    compile in a process group of its own, so the worker's group alone misses them, while the session
    holds every process the build started. The worker itself stays a zombie until reaped, so it is not
    counted. None where there is no /proc to read (then assume some are left)."""
    proc = Path("/proc")
    if not (proc / "self" / "stat").exists():
        return None
    members = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[3]) == sid:  # state, ppid, pgrp, session
            members.append(int(entry.name))
    return members


def _signal_session(sid: int, signum: int) -> bool:
    """Send `signum` to every live process of session `sid`; whether there was one to send it to."""
    members = _session_members(sid)
    if members is None:  # no /proc: the worker's group, which ninja's own SIGTERM handling covers
        with contextlib.suppress(OSError):
            os.killpg(sid, signum)
        return True
    for pid in members:
        with contextlib.suppress(OSError):
            os.kill(pid, signum)
    return bool(members)


def _stop_session(sid: int, grace: float = 5.0) -> None:
    """Stop every process of the build's session: SIGTERM (ninja passes it on to its compilers), then
    SIGKILL whatever is left after `grace` seconds (a compiler that ignores SIGTERM, or one ninja did not
    reach because it was killed first)."""
    if not _signal_session(sid, signal.SIGTERM):
        return
    deadline = time.monotonic() + grace
    while _session_members(sid) != [] and time.monotonic() < deadline:
        time.sleep(0.05)
    _signal_session(sid, signal.SIGKILL)


def _wait_unreaped(pid: int, timeout: float) -> bool:
    """Wait for the worker to exit WITHOUT reaping it: while it is a zombie its pid (= the session id)
    cannot be reused, so stopping the session afterwards cannot hit an unrelated process. In a process
    that ignores SIGCHLD the kernel reaps the worker itself (ECHILD): it has exited."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        except ChildProcessError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))


def _show_progress() -> None:
    """Builds and waits take seconds to minutes; a user must see them even if the application never
    configured logging (Python then shows only warnings). Only then, give our logger a stderr handler."""
    if not logging.getLogger().handlers and not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("op_builder: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


class _TimeLimit(Exception):
    pass


def _cpp_extension_call(fn, **kwargs):
    """Call a torch.utils.cpp_extension helper by keyword, leaving out the arguments this torch does not
    take (the SYCL ones came with torch 2.7; the builder supports torch >= 2.1)."""
    params = inspect.signature(fn).parameters
    return fn(**{name: value for name, value in kwargs.items() if name in params})


def write_ninja_file(spec: BuildSpec, build_dir: Path) -> Path:
    """Write `build_dir/build.ninja` exactly as `torch.utils.cpp_extension.load(name=spec.library_name,
    ..., with_cuda=spec.with_cuda, is_python_module=False)` would: its ldflags (torch's libraries, and CUDA's
    with_cuda), its compile flags and include paths, its `<library_name>.so` target."""
    from torch.utils import cpp_extension as ce

    ldflags = _cpp_extension_call(ce._prepare_ldflags, extra_ldflags=list(spec.ldflags), with_cuda=spec.with_cuda,
                                  with_sycl=False, verbose=False, is_standalone=False)
    path = build_dir / "build.ninja"
    _cpp_extension_call(ce._write_ninja_file_to_build_library, path=str(path), name=spec.library_name,
                        sources=list(spec.sources), extra_cflags=list(spec.cflags),
                        extra_cuda_cflags=list(spec.cuda_cflags), extra_sycl_cflags=[], extra_ldflags=ldflags,
                        extra_include_paths=list(spec.include_dirs), with_cuda=spec.with_cuda, with_sycl=False,
                        is_standalone=False)
    return path


def _run_worker(spec: BuildSpec, build_dir: Path, log_path: Path, jobs: int, limit: float,
                nice: int = 0) -> tuple[int, float]:
    """Run the build worker (`nice`: that much lower, `niceness_increments`); (exit status, seconds).
    Raises _TimeLimit after `limit` seconds, with every process of the worker's session stopped. Whatever way
    the worker ends (a SIGKILL from the OOM killer included), nothing it started outlives this call.

    The worker leads a session of its own, every process of which is stopped at the end (ninja puts each
    compile in a process group of its own, inside that session), and itself asks for
    SIGTERM when this process dies and lowers its priority (`_build_worker.main`). No Python code runs
    between fork and exec: concurrent builds start their workers from two threads, where a `preexec_fn` may
    deadlock in the child (a lock another thread held at fork time), and without one Python starts the
    worker with vfork. A plain fork of a process that has imported torch copies its page tables first
    (60-130 ms per start with 2 GiB resident, against 0.2-0.8 ms with vfork), time the loading process
    spends on each build's critical path."""
    spec_path = build_dir / "spec.json"
    spec_path.write_text(json.dumps({**asdict(spec), "build_dir": str(build_dir), "dispatch_key": spec.dispatch_key,
                                     "jobs": jobs, "nice": nice, "parent_pid": os.getpid()}))
    env = dict(os.environ)
    env["MAX_JOBS"] = str(jobs)  # for torch's own build helpers in the worker; ninja's -j comes from the spec
    ninja = system.ninja_binary()  # the one the report and the compatibility check found, on PATH or not
    if ninja:
        env["PATH"] = os.pathsep.join([os.path.dirname(ninja)] + ([env["PATH"]] if env.get("PATH") else []))
    # The worker imports op_builder (and the schema module) the way this process did, even when
    # that was through a sys.path entry rather than an installed package.
    package_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([package_root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    # torch would otherwise add its own -gencode flags or warn about an unset arch list; ours are explicit.
    env.pop("TORCH_CUDA_ARCH_LIST", None)
    start = time.monotonic()
    with open(log_path, "ab") as logf:
        logf.write(f"# {spec.label} {spec.describe}\n# MAX_JOBS={jobs}\n".encode())
        try:
            write_ninja_file(spec, build_dir)
        except Exception:  # noqa: BLE001 - e.g. CUDA_HOME unset: a failed build, with the reason in its log
            logf.write(f"# writing build.ninja failed:\n{traceback.format_exc()}".encode())
            return 1, time.monotonic() - start
        logf.flush()
        proc = subprocess.Popen([sys.executable, "-m", "op_builder._build_worker", str(spec_path)],
                                stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
    next_report = PROGRESS_AFTER
    try:
        while not _wait_unreaped(proc.pid, 0.2):
            elapsed = time.monotonic() - start
            if elapsed >= limit:
                raise _TimeLimit()
            if elapsed >= next_report:
                if next_report == PROGRESS_AFTER:
                    log.info("building %s %s with %d jobs (log: %s)", spec.label, spec.describe, jobs, log_path)
                else:
                    log.info("still building %s: %.0f s (log: %s)", spec.label, elapsed, log_path)
                next_report = PROGRESS_EVERY * (elapsed // PROGRESS_EVERY + 1)  # then at 15 s, 30 s, ...
    finally:  # normal exit, time limit, KeyboardInterrupt: no compiler outlives the build
        _stop_session(proc.pid)
        proc.wait()
    return _worker_status(proc.returncode, build_dir), time.monotonic() - start


STATUS_FILE = "worker.status"  # the worker's own exit status, written last (_build_worker)


def _worker_status(returncode: int, build_dir: Path) -> int:
    """The worker's exit status. A process that ignores SIGCHLD cannot read it (the kernel reaps the
    worker; Popen then reports 0), so success needs the status the worker itself wrote as well."""
    if returncode != 0:
        return returncode
    try:
        return int((build_dir / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return 1


def _builder_alive(build_dir: Path) -> bool:
    """Whether the process named in `.tmp-<key>-<pid>-<hex>` runs here (a reused pid errs on the safe side:
    that dir goes with a later build)."""
    try:
        pid = int(build_dir.name.split("-")[2])
    except (IndexError, ValueError):
        return False
    if pid == os.getpid():
        return False  # ours is made after the sweep: one with our pid is an earlier, interrupted one of ours
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    """Move aside, then delete: a process that has the old .so mapped keeps its copy. Anything at
    `path` goes: a directory, a file, a dangling or foreign symlink (the link, never its target)."""
    if not os.path.lexists(path):
        return
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}-{secrets.token_hex(3)}")
    try:
        os.rename(path, trash)
    except OSError:
        trash = path
    if trash.is_dir() and not trash.is_symlink():
        shutil.rmtree(trash, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            trash.unlink()


def _log_tail(text: str, lines: int = 20) -> str:
    """The log's last lines after our own '#' headers (what ninja and the compiler said)."""
    body = [line for line in text.strip().splitlines() if not line.startswith("# ")]
    if not body:
        return "the build log holds no compiler output"
    return "last log lines:\n" + "\n".join("  " + line for line in body[-lines:])


def failed_dir(variant_dir: Path, digest: str) -> Path:
    """Where the last failed build of key `digest` is kept (its log stays readable; the report points at it)."""
    return variant_dir / f".failed-{digest}"


def _failed(spec: BuildSpec, build_dir: Path, variant_dir: Path, digest: str, cause: str | None = None, *,
            transient: bool = False):
    """Keep the failed build as .failed-<key> (its log stays readable) and return the BuildError.
    `transient`: the failure says nothing about the sources (a time limit, a signal, a full disk)."""
    failed = failed_dir(variant_dir, digest)
    _remove(failed)
    os.rename(build_dir, failed)
    failed_log = failed / "build.log"
    try:
        text = failed_log.read_text(errors="replace")
    except OSError:
        text = ""
    errors = first_errors(text)
    detail = "" if errors and not cause else _log_tail(text)
    cause = cause or classify(text)
    transient = transient or cause == OUT_OF_MEMORY or "No space left on device" in text or \
        "Disk quota exceeded" in text
    return BuildError(spec.label, errors, cause, str(failed_log), detail, transient=transient)


def _signal_cause(rc: int) -> str | None:
    if rc >= 0:
        return None
    name = signal.Signals(-rc).name if -rc in signal.valid_signals() else str(-rc)
    hint = " (the out-of-memory killer? lower MAX_JOBS)" if -rc == signal.SIGKILL else ""
    return f"the build worker was killed by {name}{hint}"


class SourcesChanged(Exception):
    """The key's inputs changed while its build ran (an edit, a checkout): what was compiled is not what
    the key names, so nothing was published."""


def build_or_wait(spec: BuildSpec, key: cache.BuildKey, variant_dir: Path, *, system_cpu_count: int,
                  memory_available: int | None, reject: str | None = None,
                  jobs: int | None = None, nice: int = 0,
                  current_digest: Callable[[], str] | None = None) -> tuple[Path, str]:
    """Return (entry dir, how): how is 'cached' (someone else built it) or 'built'.

    `reject`: why the published entry, although intact, must be rebuilt (it loaded without
    registering its kernels). `jobs`: compile jobs (default `max_jobs`; a share of it when several
    builds run at once); `nice`: how much lower the build runs (`niceness_increments`).
    `current_digest`: the key's digest computed again from the files as they are now; asked after the
    compile, and when it differs the build is discarded and SourcesChanged raised (published, it would
    serve the old sources' key with a binary of the new ones, or of a mix, for good)."""
    _show_progress()
    digest = key.digest
    entry = variant_dir / digest
    problem = trust.ensure_private_dir(variant_dir)
    if problem:
        raise UnsafeCacheError(f"cannot build {spec.label}: {problem}; point TORCH_EXTENSIONS_DIR at a directory "
                               f"only you can write")
    lock_path = variant_dir / ".lock"
    problem = trust.file_problem(lock_path) if os.path.lexists(lock_path) else None
    if problem is None and os.path.lexists(lock_path) and os.lstat(lock_path).st_nlink != 1:
        problem = "a hard link to another file"
    if problem:  # our own private directory, so not an attack in progress: heal it, never follow it
        log.warning("op_builder: moving aside the build lock %s (%s)", lock_path, problem)
        _remove(lock_path)
    build_dir = variant_dir / f".tmp-{digest}-{os.getpid()}-{secrets.token_hex(3)}"
    log_path = build_dir / "build.log"
    limit = knobs.get("DSINF_BUILD_TIME_LIMIT")
    lock = BuildLock(lock_path, what=spec.label, log_path=log_path,
                     timeout=knobs.get("DS_BUILD_TIMEOUT"))
    with lock:
        problem = reject or cache.entry_problem(entry, digest, kernels=spec.kernels)
        if problem is None:
            return entry, "cached"
        if os.path.lexists(entry):
            log.warning("op_builder: rebuilding %s: cached entry %s is unusable (%s)", spec.label, entry, problem)
            _remove(entry)
        # Every build and every move aside in this directory runs under this lock: a temp or trash dir here
        # now was left by a build killed before it could clean up - unless the lock was not exclusive after
        # all (a .lock moved aside under a live holder, a filesystem without flock), so a temp dir whose
        # builder still runs on this host stays.
        for stale in variant_dir.iterdir():
            if stale.name.startswith(".trash-") or (stale.name.startswith(".tmp-") and not _builder_alive(stale)):
                _remove(stale)
        build_dir.mkdir(mode=0o700)
        jobs = jobs or max_jobs(system_cpu_count, memory_available, spec.with_cuda)
        try:
            return _build(spec, key, build_dir, entry, variant_dir, jobs, limit, nice, current_digest)
        finally:  # published, kept as .failed-<key>, or (an interrupt, a full disk) removed here
            _remove(build_dir)


def _build(spec: BuildSpec, key: cache.BuildKey, build_dir: Path, entry: Path, variant_dir: Path, jobs: int,
           limit: float, nice: int, current_digest: Callable[[], str] | None) -> tuple[Path, str]:
    """build_or_wait's compile and publication, under the lock, into `build_dir`."""
    digest = key.digest
    log_path = build_dir / "build.log"
    try:
        rc, seconds = _run_worker(spec, build_dir, log_path, jobs, limit, nice)
    except _TimeLimit:
        raise _failed(spec, build_dir, variant_dir, digest,
                      f"stopped after the build time limit of {limit:g} s (DSINF_BUILD_TIME_LIMIT); every "
                      f"compiler process was killed", transient=True) from None
    library = f"{spec.library_name}.so"
    if rc != 0 or not (build_dir / library).is_file():
        # the OOM killer's SIGKILL says nothing about the sources; a crash (SIGSEGV loading the library) does
        raise _failed(spec, build_dir, variant_dir, digest, _signal_cause(rc), transient=rc == -signal.SIGKILL)
    if current_digest is not None:
        try:
            now = current_digest()
        except OSError as exc:  # a source removed meanwhile (a checkout in progress)
            raise SourcesChanged(f"the sources of {spec.label} changed while it was built ({exc})") from None
        if now != digest:
            raise SourcesChanged(f"the sources of {spec.label} changed while it was built")
    for junk in build_dir.iterdir():  # keep the library, the log, and nothing the loader could trip on
        if junk.name not in (library, "build.log"):
            if junk.is_dir() and not junk.is_symlink():
                shutil.rmtree(junk, ignore_errors=True)
            else:
                junk.unlink()
    os.chmod(build_dir / library, 0o755)  # whatever the umask: nobody else may rewrite what we load
    cache.write_manifest(build_dir, op=spec.op, variant=spec.variant, key=key, library=library,
                         build_seconds=seconds, kernels=spec.kernels, extra=spec.manifest_extra)
    os.rename(build_dir, entry)
    log.info("built %s in %.1f s: %s", spec.label, seconds, entry)
    return entry, "built"
