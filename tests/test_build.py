"""op_builder.build: the build transaction, proven with real processes, a real compiler and real ninja.

Most tests build the tiny test op (tests/fixtures/tiny_op, kernel-only mode: a few seconds per build);
the cold/warm test builds the real CPU inference module. Every child is waited for with a timeout: a
hang fails the test instead of blocking the suite. A `CXX` wrapper (fixtures/procs.CxxWrapper) counts
compiler invocations and can hold a compile at a gate, so "kill it mid-build" is deterministic.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fixtures.procs import (FIXTURES, INFERENCE, REPO, TINY, Child, CxxWrapper, child_env, cold_cpu_build,
                            path_without_ninja, processes_with_cwd_under, run, run_json, variant_dir, wait_until)
from op_builder import build as build_mod
from op_builder.cache import BuildKey
from op_builder.errors import BuildError, classify, first_errors

BUILD_TIMEOUT = 300  # seconds a child may take to build the tiny op on a very busy box


def tiny_env(tmp_path: Path, **overrides: str) -> dict[str, str]:
    """Child env for the kernel-only tiny op with a private cache under tmp_path."""
    return child_env(tmp_path, TINY_OP_BINDING="0", **overrides)


def published(vdir: Path) -> list[Path]:
    return sorted(p for p in vdir.iterdir() if not p.name.startswith(".")) if vdir.exists() else []


def leftovers(vdir: Path) -> list[str]:
    return sorted(p.name for p in vdir.iterdir() if p.name.startswith((".tmp-", ".trash-")))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def broken_source(tmp_path: Path, edit) -> Path:
    src = tmp_path / "src"
    shutil.copytree(FIXTURES / "tiny_op", src, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    kernel = src / "tiny_kernel.cpp"
    kernel.write_text(edit(kernel.read_text()))
    return src


# ------------------------------------------------------------------------------ the cache lifecycle
@pytest.fixture(scope="module")
def tiny_template(tmp_path_factory) -> Path:
    """A TORCH_EXTENSIONS_DIR holding one published tiny-op entry (built once per module)."""
    tmp = tmp_path_factory.mktemp("tiny-template")
    env = tiny_env(tmp)
    r = run_json(TINY, env, timeout=BUILD_TIMEOUT)
    assert r.rc == 0 and r.data["how"] == "built", r
    return Path(env["TORCH_EXTENSIONS_DIR"])


def cache_from_template(template: Path, tmp_path: Path, **overrides: str) -> tuple[dict[str, str], Path]:
    env = tiny_env(tmp_path, **overrides)
    shutil.copytree(template, env["TORCH_EXTENSIONS_DIR"])
    (entry,) = published(variant_dir(env))
    return env, entry


def _truncate(entry: Path) -> None:
    lib = entry / "tiny_test_op_cpu.so"
    lib.write_bytes(lib.read_bytes()[: lib.stat().st_size // 2])


def _flip_bytes(entry: Path) -> None:
    lib = entry / "tiny_test_op_cpu.so"
    data = bytearray(lib.read_bytes())
    middle = len(data) // 2
    for i in range(middle, middle + 64):
        data[i] ^= 0xA5
    lib.write_bytes(bytes(data))


def _foreign_torch(entry: Path) -> None:
    """The manifest of a build made with another torch: its fields and key say torch 2.12."""
    manifest = json.loads((entry / "manifest.json").read_text())
    fields = {**manifest["key_fields"], "torch": "2.12.0+cpu"}
    manifest.update(key_fields=fields, key=BuildKey.of(**fields).digest)
    (entry / "manifest.json").write_text(json.dumps(manifest))


def _drop_manifest(entry: Path) -> None:
    (entry / "manifest.json").unlink()


def _garble_manifest(entry: Path) -> None:
    text = (entry / "manifest.json").read_text()
    (entry / "manifest.json").write_text(text[: len(text) // 2])  # cut mid-write


@pytest.mark.parametrize("damage, why", [
    (_truncate, "truncated"),
    (_flip_bytes, "corrupted"),
    (_foreign_torch, "does not match"),
    (_drop_manifest, "manifest missing or unreadable"),
    (_garble_manifest, "manifest missing or unreadable"),
], ids=["truncated-so", "flipped-bytes-so", "manifest-from-other-torch", "missing-manifest", "garbled-manifest"])
def test_damaged_entry_is_detected_and_rebuilt(tiny_template, tmp_path, damage, why):
    # Python's default logging (no configuration): the warning must still reach the user.
    env, entry = cache_from_template(tiny_template, tmp_path, TINY_OP_NO_LOGGING="1")
    damage(entry)
    r = run_json(TINY, env, timeout=BUILD_TIMEOUT)
    assert r.rc == 0 and r.data["ok"], r
    assert r.data["how"] == "built", r
    warnings = [line for line in r.stderr.splitlines() if "rebuilding tiny_test_op[cpu]" in line]
    assert len(warnings) == 1, r.stderr
    assert str(entry) in warnings[0] and why in warnings[0], warnings[0]
    # the published replacement is intact (so a damaged library is gone), and it is what was loaded
    assert Path(r.data["path"]) == entry / "tiny_test_op_cpu.so"
    manifest = json.loads((entry / "manifest.json").read_text())
    assert manifest["key"] == entry.name and manifest["library_sha256"] == sha256(entry / "tiny_test_op_cpu.so")
    assert leftovers(variant_dir(env)) == []


def test_manifest_torch_field_alone_is_checked(tiny_template, tmp_path):
    env, entry = cache_from_template(tiny_template, tmp_path)
    manifest = json.loads((entry / "manifest.json").read_text())
    manifest["key_fields"]["torch"] = "2.12.0+cpu"
    (entry / "manifest.json").write_text(json.dumps(manifest))
    r = run_json(TINY, env, timeout=BUILD_TIMEOUT)
    assert r.rc == 0 and r.data["how"] == "built", r


# ---------------------------------------------------------------------------------- failed builds
def test_compile_error_raises_one_build_error_with_op_error_line_and_log(tmp_path):
    src = broken_source(tmp_path, lambda s: s.replace("x[i] * s", "x[i] * not_declared_here"))
    env = tiny_env(tmp_path, TINY_OP_SRC=str(src))
    r = run_json(TINY, env, timeout=BUILD_TIMEOUT)
    assert r.rc == 1 and r.data["error_type"] == "BuildError", r
    message = r.data["message"]
    assert "tiny_test_op[cpu]" in message
    error_lines = [line for line in message.splitlines() if "error:" in line]
    assert error_lines and "tiny_kernel.cpp" in error_lines[0] and "not_declared_here" in error_lines[0], message
    log = Path(r.data["log_path"])
    assert log.is_file() and f"full log: {log}" in message
    assert "not_declared_here" in log.read_text()
    # nothing was published; the failed build is kept for inspection, no temp dir is left behind
    vdir = variant_dir(env)
    assert published(vdir) == [] and leftovers(vdir) == []
    assert log.parent.name.startswith(".failed-")
    assert "Traceback" not in message and "ninja: build stopped" not in message


FAIL_TWICE_THEN_FIX = """
import json, shutil, sys
from tiny_op.builder import TinyBuilder
out = []
for attempt in range(2):
    try:
        TinyBuilder().load_variant("cpu")
    except Exception as exc:
        out.append({"type": type(exc).__name__, "message": str(exc)})
shutil.copy(sys.argv[1], sys.argv[2])  # the source fixed: another key
out.append({"how": TinyBuilder().load_variant("cpu").how})
print(json.dumps(out))
"""


def test_a_failed_build_is_not_run_again_in_the_same_process(tmp_path):
    """Every op instance that resolves its backend asks for the module: after a failed build the same sources
    and flags fail at once with the same errors and log, not after another full build; edited sources
    (another key) are built again."""
    src = broken_source(tmp_path, lambda s: s.replace("x[i] * s", "x[i] * not_declared_here"))
    cxx = CxxWrapper.create(tmp_path / "cxx")
    env = tiny_env(tmp_path, TINY_OP_SRC=str(src), CXX=str(cxx.path))
    r = run([sys.executable, "-c", FAIL_TWICE_THEN_FIX, str(FIXTURES / "tiny_op" / "tiny_kernel.cpp"),
             str(src / "tiny_kernel.cpp")], env, timeout=BUILD_TIMEOUT)
    first, second, fixed = json.loads(r.stdout.strip().splitlines()[-1])
    assert first["type"] == second["type"] == "BuildError", (first, second)
    assert "not_declared_here" in second["message"] and "already failed in this process" in second["message"]
    assert second["message"].split("full log:")[1] == first["message"].split("full log:")[1]
    assert fixed["how"] == "built"
    assert len(cxx.compiles()) == 2, cxx.calls()  # the broken source once, the fixed one once


def test_the_ninja_wheel_builds_when_ninja_is_not_on_path(tmp_path):
    """A venv's python run without activating the venv: its `ninja` wheel's binary is not on PATH. The report
    and the compatibility check find it there (system.ninja_binary), so the build must run that one too
    (it once failed with "ninja is not installed" after the report said [OKAY])."""
    import ninja

    bin_dir = path_without_ninja(tmp_path)
    assert Path(ninja.BIN_DIR, "ninja").is_file() and not (bin_dir / "ninja").exists()
    env = tiny_env(tmp_path, PATH=str(bin_dir))
    r = run_json(TINY, env, timeout=BUILD_TIMEOUT)
    assert r.rc == 0 and r.data["how"] == "built", r


def test_missing_header_is_classified(tmp_path):
    src = broken_source(tmp_path, lambda s: '#include "no_such_header.h"\n' + s)
    env = tiny_env(tmp_path, TINY_OP_SRC=str(src))
    r = run_json(TINY, env, timeout=BUILD_TIMEOUT)
    assert r.rc == 1 and r.data["error_type"] == "BuildError", r
    assert r.data["cause"] == "missing header no_such_header.h"
    assert "missing header no_such_header.h" in r.data["message"].splitlines()[0]
    assert "tiny_kernel.cpp" in r.data["message"] and Path(r.data["log_path"]).is_file()


def test_library_with_undefined_symbol_is_never_published(tmp_path):
    """It links (shared objects may have undefined symbols) but cannot load: the worker's load check
    turns that into a BuildError instead of a cache entry that crashes every later process."""
    src = broken_source(tmp_path, lambda s: s.replace(
        'extern "C" void tiny_scale', 'extern "C" float tiny_missing(float);\nextern "C" void tiny_scale').replace(
        "x[i] * s", "x[i] * tiny_missing(s)"))
    env = tiny_env(tmp_path, TINY_OP_SRC=str(src))
    r = run_json(TINY, env, timeout=BUILD_TIMEOUT)
    assert r.rc == 1 and r.data["error_type"] == "BuildError", r
    assert "undefined symbol" in r.data["message"] and "tiny_missing" in r.data["message"]
    assert published(variant_dir(env)) == []


def test_build_works_when_op_builder_is_found_through_sys_path_only(tmp_path):
    env = tiny_env(tmp_path)
    del env["PYTHONPATH"]
    code = (f"import sys; sys.path[:0] = [{str(REPO)!r}, {str(FIXTURES)!r}]; "
            "from tiny_op.run_tiny import main; sys.exit(main())")
    r = run_json([sys.executable, "-c", code], env, cwd=tmp_path, timeout=BUILD_TIMEOUT)
    assert r.rc == 0 and r.data["how"] == "built", r.data


# ----------------------------------------------------------------------- kill -9, waits, timeouts
@contextlib.contextmanager
def cxx_released(cxx: CxxWrapper):
    """Open the gate on the way out, whatever happens: held compilers (orphans included) must finish."""
    try:
        yield
    finally:
        cxx.release()


def start_held_build(tmp_path: Path, env: dict[str, str], cxx: CxxWrapper, name: str = "a") -> Child:
    """Start a build whose compiler is held at the gate; return once the compiler has been invoked."""
    cxx.hold()
    child = Child(TINY, env, tmp_path / "logs", name)
    wait_until(lambda: cxx.compiles(), BUILD_TIMEOUT, "the first build's compiler to start", alive=child)
    return child


@pytest.mark.slow
def test_sigkill_mid_build_then_next_process_builds(tmp_path):
    env = tiny_env(tmp_path)
    cxx = CxxWrapper.create(tmp_path / "cxx")
    env["CXX"] = str(cxx.path)
    vdir = variant_dir(env)
    a = start_held_build(tmp_path, env, cxx)
    with a, Child(TINY, env, tmp_path / "logs", "b") as b, cxx_released(cxx):
        (a_tmp,) = [p for p in vdir.iterdir() if p.name.startswith(".tmp-")]
        assert f"-{a.pid}-" in a_tmp.name and (a_tmp / "build.log").is_file()
        # B waits for A, and says whom it waits for
        wait_until(lambda: "waiting for tiny_test_op[cpu] build" in b.stderr, BUILD_TIMEOUT, "B to wait", alive=b)
        waiting = next(line for line in b.stderr.splitlines() if "waiting for tiny_test_op[cpu] build" in line)
        assert f"(pid {a.pid} on " in waiting and f"log {a_tmp / 'build.log'}" in waiting, waiting
        # kill -9 the builder mid-compile: the kernel drops its lock; B takes over and builds
        os.kill(a.pid, signal.SIGKILL)
        assert a.proc.wait(timeout=30) == -signal.SIGKILL
        orphans = surviving_compilers(vdir, killed_pid=a.pid)
        cxx.release()
        rb = b.wait(timeout=BUILD_TIMEOUT)
    assert rb.rc == 0 and rb.data["ok"] and rb.data["how"] == "built", rb
    assert not a_tmp.exists(), "the killed build's temp dir must be cleaned up by the next builder"
    (entry,) = published(vdir)
    assert leftovers(vdir) == []
    # a third process loads what B published, without compiling
    cxx.reset()
    rc = run_json(TINY, env, timeout=BUILD_TIMEOUT)
    assert rc.rc == 0 and rc.data["how"] == "cached" and Path(rc.data["path"]).parent == entry, rc
    assert cxx.calls() == []
    # The killed loader's worker gets SIGTERM (PR_SET_PDEATHSIG) and passes it to ninja, which stops its compilers.
    assert not orphans, "compilers of the killed loader kept running:\n" + "\n".join(orphans)


def surviving_compilers(vdir: Path, killed_pid: int, grace: float = 3.0) -> list[str]:
    """Processes still working in the killed loader's temp dir (`.tmp-<key>-<pid>-*`, possibly renamed to
    `.trash-...` or deleted by now) `grace` seconds after it was killed."""
    deadline = time.monotonic() + grace
    while True:
        orphans = [p for p in processes_with_cwd_under(vdir) if f"-{killed_pid}-" in p.split("]")[0]]
        if not orphans or time.monotonic() > deadline:
            return orphans
        time.sleep(0.1)


def test_waiter_times_out_with_an_actionable_error(tmp_path):
    env = tiny_env(tmp_path)
    cxx = CxxWrapper.create(tmp_path / "cxx")
    env["CXX"] = str(cxx.path)
    with cxx_released(cxx), start_held_build(tmp_path, env, cxx) as a:
        start = time.monotonic()
        # Python's default logging in the waiter, as in a user's script
        r = run_json(TINY, {**env, "DS_BUILD_TIMEOUT": "2", "TINY_OP_NO_LOGGING": "1"}, timeout=120)
        elapsed = time.monotonic() - start
        assert a.proc.poll() is None, "the holder must still be building"
    assert r.rc == 1 and r.data["error_type"] == "BuildTimeoutError", r
    message = r.data["message"]
    assert "tiny_test_op[cpu]" in message and f"pid {a.pid}" in message and "DS_BUILD_TIMEOUT" in message
    assert ".tmp-" in message and "build.log" in message  # the holder's log, to go and look
    assert elapsed < 60, f"a 2 s DS_BUILD_TIMEOUT took {elapsed:.0f} s"
    # Python's default logging shows only warnings: op_builder still shows whom the waiter waits for.
    assert "waiting for tiny_test_op[cpu] build" in r.stderr and f"pid {a.pid}" in r.stderr, r.stderr


# --------------------------------------------------------------- what a build may and may not leave
def tiny_src(tmp_path: Path) -> Path:
    """A private copy of the tiny op's sources, free to edit."""
    return broken_source(tmp_path, lambda s: s)


def set_offset(src: Path, offset: str) -> None:
    header = src / "tiny_kernel.h"
    header.write_text(re.sub(r"#define TINY_OFFSET \S+", f"#define TINY_OFFSET {offset}", header.read_text()))


def test_sources_edited_during_a_build_are_never_published_under_the_old_key(tmp_path):
    """An edit (a checkout, a `git pull`) while a build compiles: the binary is of the new sources (or a mix),
    so publishing it under the key of the old ones served it for good to whoever builds the old sources
    again (a reverted edit got the edited kernel, "cached"). Now the build is discarded and the sources as
    they are now are built."""
    src = tiny_src(tmp_path)
    cxx = CxxWrapper.create(tmp_path / "cxx")
    env = tiny_env(tmp_path, TINY_OP_SRC=str(src), CXX=str(cxx.path))
    vdir = variant_dir(env)
    with cxx_released(cxx), start_held_build(tmp_path, env, cxx) as a:
        set_offset(src, "1.0f")  # edited while the first compile waits at the gate
        cxx.release()
        r = a.wait(timeout=BUILD_TIMEOUT)
    assert r.data["how"] == "built" and r.data["result"] == [v * 2.5 + 1 for v in range(6)], r
    assert "changed while it was built" in r.stderr, r.stderr
    set_offset(src, "0.0f")  # the edit reverted: the old key, whose build was discarded, builds now
    r = run_json(TINY, env, timeout=BUILD_TIMEOUT)
    assert r.rc == 0 and r.data["ok"] and r.data["how"] == "built", r
    assert len(published(vdir)) == 2 and leftovers(vdir) == []


def session_processes(marker: str) -> list[str]:
    """'pid cmdline' of live processes whose command line holds `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if marker in cmd and state != "Z":
            found.append(f"{entry.name} {cmd}")
    return found


def test_a_compiler_that_ignores_sigterm_does_not_outlive_the_time_limit(tmp_path):
    """ninja runs each compile in a process group of its own: stopping the worker's group (what the time
    limit did) missed a compiler that ignores ninja's SIGTERM, which then ran on, orphaned, although the
    error said every compiler process was killed. Every process of the build's session is stopped now."""
    wrapper = tmp_path / "stubborn-cxx"
    wrapper.write_text(f"""#!/bin/sh
case " $* " in *" -c "*) trap '' TERM INT; sleep 120 ;; esac
exec '{shutil.which("g++")}' "$@"
""")
    wrapper.chmod(0o755)
    env = tiny_env(tmp_path, CXX=str(wrapper), DSINF_BUILD_TIME_LIMIT="3")
    r = run_json(TINY, env, timeout=BUILD_TIMEOUT)
    assert r.rc == 1 and r.data["error_type"] == "BuildError", r
    assert "time limit of 3 s" in r.data["message"] and "every compiler process was killed" in r.data["message"]
    assert session_processes(str(wrapper)) == []


IGNORING_SIGCHLD = """
import json, signal, sys
signal.signal(signal.SIGCHLD, signal.SIG_IGN)
from tiny_op.builder import TinyBuilder
try:
    print(json.dumps({"how": TinyBuilder().load_variant("cpu").how}))
except Exception as exc:
    print(json.dumps({"type": type(exc).__name__, "message": str(exc)}))
"""


@pytest.mark.parametrize("broken", [False, True])
def test_a_process_that_ignores_sigchld_builds_and_gets_its_build_errors(tmp_path, broken):
    """With SIGCHLD ignored (some servers do; it is inherited through exec) the kernel reaps the worker, so
    its exit status cannot be read: every build failed with a bare ChildProcessError, and read as success
    (Popen's answer then) a library that links but fails the worker's load check would be published. The
    worker's own status says."""
    src = broken_source(tmp_path, (lambda s: s.replace(
        'extern "C" void tiny_scale', 'extern "C" float tiny_missing(float);\nextern "C" void tiny_scale').replace(
        "x[i] * s", "x[i] * tiny_missing(s)")) if broken else (lambda s: s))
    env = tiny_env(tmp_path, TINY_OP_SRC=str(src))
    r = run([sys.executable, "-c", IGNORING_SIGCHLD], env, timeout=BUILD_TIMEOUT)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    if broken:
        assert out["type"] == "BuildError" and "undefined symbol" in out["message"], out
        assert published(variant_dir(env)) == []
    else:
        assert out == {"how": "built"}, (out, r.stderr)


def test_temp_and_trash_dirs_of_interrupted_builds_are_swept_by_the_next_build(tmp_path):
    """An interrupted build (Ctrl-C, kill -9, a full disk at publication) leaves its .tmp- dir, and a kill
    between a move aside and its delete a .trash- dir; only those of the same key used to be removed. A temp
    dir whose builder still runs here stays (were the lock ever not exclusive, it is a live build)."""
    env = tiny_env(tmp_path)
    vdir = variant_dir(env)
    vdir.mkdir(parents=True)
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid that no longer runs
    live = f".tmp-0123456789abcdef0123-{os.getpid()}-abcdef"
    for name in (f".tmp-0123456789abcdef0123-{gone.pid}-abcdef", f".trash-0123456789abcdef0123-{gone.pid}-abcdef",
                 live):
        (vdir / name).mkdir()
        (vdir / name / "build.log").write_text("left behind")
    r = run_json(TINY, env, timeout=BUILD_TIMEOUT)
    assert r.rc == 0 and r.data["how"] == "built", r
    assert leftovers(vdir) == [live]


INTERRUPT_THEN_RETRY = """
import json, os, signal, sys, threading
from tiny_op.builder import TinyBuilder
out = []
try:
    TinyBuilder().load_variant("cpu")
except Exception as exc:
    out.append({"type": type(exc).__name__, "transient": getattr(exc, "transient", None), "message": str(exc)})
os.environ["DSINF_BUILD_TIME_LIMIT"] = "600"
os.unlink(sys.argv[1])  # the gate opens: the compiler runs through this time
out.append({"how": TinyBuilder().load_variant("cpu").how})
print(json.dumps(out))
"""


def test_a_build_stopped_by_the_time_limit_is_built_again_when_asked_again(tmp_path):
    """A failure that says nothing about the sources (the time limit here; a signal, a full disk) is not
    remembered for the rest of the process like a compile error: the next ask builds."""
    cxx = CxxWrapper.create(tmp_path / "cxx")
    cxx.hold()
    env = tiny_env(tmp_path, CXX=str(cxx.path), DSINF_BUILD_TIME_LIMIT="2")
    with cxx_released(cxx):
        r = run([sys.executable, "-c", INTERRUPT_THEN_RETRY, str(cxx.gate)], env, timeout=BUILD_TIMEOUT)
    failed, retried = json.loads(r.stdout.strip().splitlines()[-1])
    assert failed["type"] == "BuildError" and failed["transient"] is True and "time limit" in failed["message"]
    assert retried == {"how": "built"}, r.stderr


FULL_DISK_TWICE = """
import json, time
from tiny_op.builder import TinyBuilder
out = []
for attempt in range(3):
    start = time.monotonic()
    try:
        TinyBuilder().load_variant("cpu")
    except Exception as exc:
        out.append({"type": type(exc).__name__, "transient": exc.transient, "message": str(exc),
                    "seconds": time.monotonic() - start})
print(json.dumps(out))
"""


def test_a_transient_failure_is_not_rebuilt_by_every_op_instance_of_the_same_burst(tmp_path):
    """Not remembering transient failures at all (the first fix) made every op instance's first call build
    again: dozens of builds for an injected model, each failing the same way on a full disk."""
    calls = tmp_path / "calls.log"
    full = tmp_path / "full-disk-cxx"
    full.write_text(f"""#!/bin/sh
case " $* " in *" -c "*) echo compile >> '{calls}'; echo "fatal error: cannot write: No space left on device" >&2; exit 1 ;; esac
exec '{shutil.which("g++")}' "$@"
""")
    full.chmod(0o755)
    r = run([sys.executable, "-c", FULL_DISK_TWICE], tiny_env(tmp_path, CXX=str(full)), timeout=BUILD_TIMEOUT)
    first, *again = json.loads(r.stdout.strip().splitlines()[-1])
    assert first["type"] == "BuildError" and first["transient"] is True, first
    assert all(a["type"] == "BuildError" and "failed in this process" in a["message"] for a in again), again
    assert calls.read_text().count("compile") == 1


def test_a_compiler_killed_for_memory_is_transient(tmp_path):
    """A compile the OOM killer stopped ("Killed signal terminated program cc1plus") says nothing about the
    sources: built again later (or at once with a lower MAX_JOBS), not refused for the life of the process."""
    from op_builder.build import BuildSpec

    build_dir = tmp_path / "v" / ".tmp-x"
    build_dir.mkdir(parents=True)
    (build_dir / "build.log").write_text("g++: fatal error: Killed signal terminated program cc1plus\n")
    spec = BuildSpec(op="o", variant="cpu", library_name="o_cpu", sources=(), include_dirs=(), cflags=())
    err = build_mod._failed(spec, build_dir, tmp_path / "v", "0123")
    assert err.transient and "out of memory" in err.cause
    (tmp_path / "w" / ".tmp-y").mkdir(parents=True)
    (tmp_path / "w" / ".tmp-y" / "build.log").write_text("x.cpp:1:1: error: 'y' was not declared\n")
    assert not build_mod._failed(spec, tmp_path / "w" / ".tmp-y", tmp_path / "w", "0123").transient


NOTHING_TO_LOAD = """
import json, sys
sys.modules["ninja"] = None
from tiny_op.builder import TinyBuilder
out = []
for _ in range(3):
    try:
        TinyBuilder().load_variant("cpu")
    except Exception as exc:
        out.append(type(exc).__name__)
print(json.dumps(out))
"""


def test_nothing_to_load_and_nothing_buildable_is_worked_out_once(tmp_path):
    """Every op instance asks: with no build tools, an unusable installed binary and nothing cached, each ask
    checksummed the binary, hashed the sources and warned that it was 'falling back to a JIT build' (there
    was none to fall back to)."""
    prebuilt = tmp_path / "prebuilt" / "tiny_test_op-cpu"
    prebuilt.mkdir(parents=True)
    (prebuilt / "manifest.json").write_text("{not json")
    env = tiny_env(tmp_path, PATH=str(path_without_ninja(tmp_path)), TINY_OP_PREBUILT=str(tmp_path / "prebuilt"))
    r = run([sys.executable, "-c", NOTHING_TO_LOAD], env, timeout=BUILD_TIMEOUT)
    assert json.loads(r.stdout.strip().splitlines()[-1]) == ["IncompatibleError"] * 3, r
    warnings = [line for line in r.stderr.splitlines() if "cannot be used here" in line]
    assert len(warnings) == 1 and "falling back" not in warnings[0], r.stderr


def test_a_cached_build_loads_without_ninja(tmp_path, tiny_template):
    """Loading an intact published entry needs no build tool: with ninja gone it used to be refused as
    'cannot be built here: ninja is not installed'."""
    env, entry = cache_from_template(tiny_template, tmp_path)
    bin_dir = path_without_ninja(tmp_path)
    code = ("import sys, ninja; sys.modules['ninja'] = None; "  # the ninja wheel gone too
            "from tiny_op.run_tiny import main; sys.exit(main())")
    r = run_json([sys.executable, "-c", code], {**env, "PATH": str(bin_dir)}, timeout=BUILD_TIMEOUT)
    assert r.rc == 0 and r.data["how"] == "cached" and Path(r.data["path"]).parent == entry, r
    report = run([sys.executable, "-c", code.replace("from tiny_op.run_tiny import main; sys.exit(main())",
                  "from tiny_op.builder import TinyBuilder; print(TinyBuilder().cached_entry('cpu'))")],
                 {**env, "PATH": str(bin_dir)}, timeout=BUILD_TIMEOUT)
    assert str(entry) in report.stdout, report


# ------------------------------------------------------------------------------ unwritable root
def test_unwritable_cache_root_falls_back_with_one_warning(tmp_path):
    """The configured root cannot be created (it lies under a regular file: this blocks root too, where
    chmod would not); the build goes to the per-user cache dir and says so once. A read-only root (chmod,
    which does not stop root, the user CI runs as) is tested as a second uid in test_trust
    (test_read_only_shared_cache_is_used_as_is_with_zero_compiler_calls)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    env = tiny_env(tmp_path, TORCH_EXTENSIONS_DIR=str(blocker / "ext"), TMPDIR=str(tmpdir),
                   TINY_OP_NO_LOGGING="1")
    r = run_json(TINY, env, timeout=BUILD_TIMEOUT)
    assert r.rc == 0 and r.data["ok"] and r.data["how"] == "built", r
    warnings = [line for line in r.stderr.splitlines() if "cannot build into" in line]
    assert len(warnings) == 1, r.stderr
    assert str(blocker / "ext") in warnings[0] and "TORCH_EXTENSIONS_DIR" in warnings[0]
    assert Path(r.data["path"]).is_relative_to(Path(env["XDG_CACHE_HOME"])), r.data["path"]
    assert blocker.read_text() == "not a directory"


# ----------------------------------------------------------------- the real CPU module: cold, warm
@pytest.mark.slow
def test_cold_build_then_warm_load_never_runs_the_compiler(tmp_path_factory):
    cold_build = cold_cpu_build(tmp_path_factory)  # one child, empty cache, CXX = counting wrapper
    cold, cxx, env = cold_build.result, cold_build.cxx, cold_build.env
    assert cold.rc == 0 and not cold.data["errors"], cold
    assert cold.data["how"] == "built"
    assert cold.data["vector_matmul_ok"] and cold.data["linear_layer_ok"], cold.data
    compiled = [c.rsplit(" -c ", 1)[1].split()[0] for c in cold_build.compiles]
    csrc = cold_build.source / "csrc" / "inference"
    bindings = [csrc / "binding" / name for name in ("cpu_binding.cpp", "cpu_binding_ops.cpp")]
    expected = [str(p) for p in [*(csrc / "cpu").glob("*.cpp"), *bindings]]
    assert sorted(compiled) == sorted(expected), "each source compiled exactly once, by the wrapper"
    entry = Path(cold.data["path"]).parent
    manifest = json.loads((entry / "manifest.json").read_text())
    assert manifest["key_fields"]["cxx"].startswith(str(cxx.path)), "the CXX in use is part of the key"

    cxx.reset()
    warm = run_json(INFERENCE, env, timeout=300)
    assert warm.rc == 0 and not warm.data["errors"], warm
    assert warm.data["how"] == "cached" and warm.data["path"] == cold.data["path"]
    assert warm.data["vector_matmul_ok"] and warm.data["linear_layer_ok"]
    assert cxx.calls() == [], f"a warm load ran the compiler: {cxx.calls()}"
    assert "building" not in warm.stderr
    # "later processes load in well under a second" (generous bound: this box is shared and busy)
    assert warm.data["seconds"] < 5, f"warm load_variant took {warm.data['seconds']:.2f} s"


# ---------------------------------------------------------------------- error reading (pure)
GCC_LOG = """\
[1/2] c++ -MMD -c /src/a.cpp -o a.o
FAILED: a.o
c++ -MMD -c /src/a.cpp -o a.o
/src/a.cpp: In function 'void f()':
/src/a.cpp:3:5: error: 'foo' was not declared in this scope
/src/a.cpp:4:5: error: 'bar' was not declared in this scope
/src/a.cpp:3:5: error: 'foo' was not declared in this scope
ninja: build stopped: subcommand failed.
Traceback (most recent call last):
subprocess.CalledProcessError: Command '['ninja', '-v']' returned non-zero exit status 1.
RuntimeError: Error building extension 'x'
"""


def test_first_errors_skips_noise_and_duplicates():
    assert first_errors(GCC_LOG) == ["/src/a.cpp:3:5: error: 'foo' was not declared in this scope",
                                     "/src/a.cpp:4:5: error: 'bar' was not declared in this scope"]


def test_first_errors_is_bounded():
    log = "\n".join(f"/src/a.cpp:{i}:1: error: e{i}" for i in range(100))
    assert len(first_errors(log)) == 8 and len(first_errors(log, limit=3)) == 3


@pytest.mark.parametrize("log, cause", [
    ("/src/a.cpp:1:10: fatal error: cuda_fp8.h: No such file or directory", "missing header cuda_fp8.h"),
    ('/src/k.cu(3): catastrophic error: cannot open source file "cutlass/gemm.h"', "missing header cutlass/gemm.h"),
    ("#error -- unsupported GNU version! gcc versions later than 13 are not supported!", "host C++ compiler is newer"),
    ("/bin/sh: 1: /usr/local/cuda/bin/nvcc: not found\nnvcc: not found", "nvcc not found"),
    ("RuntimeError: Ninja is required to load C++ extensions", "ninja is not installed"),
    ("c++: fatal error: Killed signal terminated program cc1plus", "ran out of memory"),
    ("OSError: /x/y.so: undefined symbol: _ZN3c104cuda9SetDeviceEi", "undefined symbol"),
    ("/bin/sh: 1: c++: not found", "C++ compiler not found"),
    ("/src/a.cpp:3:5: error: 'foo' was not declared in this scope", None),
])
def test_classify(log, cause):
    got = classify(log)
    if cause is None:
        assert got is None
    else:
        assert got is not None and cause in got, got


def test_plain_compile_error_blames_no_tool():
    assert classify(GCC_LOG) is None


def test_cxx_that_cannot_run_is_classified():
    log = "subprocess.CalledProcessError: Command '['/nonexistent/c++', '-v']' returned non-zero exit status 127."
    assert "/nonexistent/c++" in (classify(log) or "")


def test_build_error_message_layout():
    err = BuildError("op[cpu]", ["a.cpp:1:1: error: x"], "missing header y.h", "/logs/build.log")
    lines = str(err).splitlines()
    assert lines[0] == "building op[cpu] failed: missing header y.h"
    assert "  a.cpp:1:1: error: x" in lines and lines[-1] == "full log: /logs/build.log"
    assert err.op == "op[cpu]" and err.cause == "missing header y.h" and err.log_path == "/logs/build.log"


# ------------------------------------------------------------------------------- job sizing (pure)
def test_max_jobs_honours_env(monkeypatch):
    monkeypatch.setenv("MAX_JOBS", "3")
    assert build_mod.max_jobs(64, 1 << 40, True) == 3


def test_max_jobs_from_cores_and_memory(monkeypatch):
    monkeypatch.delenv("MAX_JOBS", raising=False)
    gib = 1 << 30
    assert build_mod.max_jobs(16, 64 * gib, False) == 16
    assert build_mod.max_jobs(16, 4 * gib, False) == 4  # 1 GiB per c++ job
    assert build_mod.max_jobs(16, 10 * gib, True) == 4  # 2.5 GiB per nvcc job
    assert build_mod.max_jobs(16, 100 * (1 << 20), True) == 1  # never zero
    assert build_mod.max_jobs(2, None, False) == 2
    assert build_mod.max_jobs(0, None, False) == 1
