"""The build cache as a trust boundary (docs/TRUST.md), attacked for real.

Real files, symlinks, processes and a second (and third) uid: CI runs as root, so "the other user"
owns directories through os.chown, and the victim runs under `setpriv --reuid`. Each attack must
end with nothing foreign loaded, nothing of the victim's clobbered, and the op still working.
Planted libraries carry a constructor that writes a marker file: "not loaded" means no marker.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import pytest

from fixtures.procs import FIXTURES, TINY, Child, CxxWrapper, child_env, run, run_json, snapshot_repo, wait_until
from op_builder.cache import BuildKey, write_manifest

VICTIM, ATTACKER, ADMIN = 12345, 12346, 12347
SETPRIV = shutil.which("setpriv")
BUILD_TIMEOUT = 300
LIB = "tiny_test_op_cpu.so"

two_users = pytest.mark.skipif(os.geteuid() != 0 or SETPRIV is None,
                               reason="acting as two users needs root and setpriv (CI runs as root)")


def _other_user_python() -> list[str] | None:
    """An interpreter command another uid can run AND re-exec (the build worker is `sys.executable`):
    this one, or (when it lives under a private home, like pyenv's under /root) the system Python of
    the same version with this environment's site-packages on its path."""
    probe = "import subprocess, sys, torch; subprocess.run([sys.executable, '-c', 'import torch'], check=True)"
    site = sysconfig.get_paths()["purelib"]
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    for cmd in ([sys.executable], [f"/usr/bin/python{version}"]):
        env = dict(os.environ, PYTHONPATH=site)
        try:
            ok = subprocess.run([SETPRIV, f"--reuid={VICTIM}", f"--regid={VICTIM}", "--clear-groups", "--", *cmd,
                                 "-c", probe], env=env, cwd="/", capture_output=True, timeout=120).returncode == 0
        except OSError:
            ok = False
        if ok:
            return cmd
    return None


_python_cache: list = []


def as_user(uid: int, cmd: list[str], env: dict[str, str]) -> list[str]:
    """`cmd` (starting with sys.executable) run as `uid`; adds this environment's site-packages to
    env's PYTHONPATH when another interpreter must stand in."""
    if uid == os.geteuid():
        return cmd
    if not _python_cache:
        _python_cache.append(_other_user_python())
    python = _python_cache[0]
    if python is None:
        pytest.skip("no Python interpreter that another uid can run was found")
    if python != [sys.executable]:
        env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], sysconfig.get_paths()["purelib"]])
    return [SETPRIV, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--", *python, *cmd[1:]]


def chown_tree(path: Path, uid: int, mode: int | None = None) -> None:
    for p in [path, *path.rglob("*")]:
        os.lchown(p, uid, uid)
        if mode is not None and not p.is_symlink():
            p.chmod(mode)


@pytest.fixture
def world():
    """A directory every uid can traverse (pytest's tmp dirs are 0700 root), removed afterwards."""
    base = Path(tempfile.mkdtemp(prefix="dsinf-trust-", dir="/tmp"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def home_of(world: Path, uid: int) -> Path:
    home = world / f"home-{uid}"
    home.mkdir(mode=0o700)
    os.chown(home, uid, uid)
    return home


def key_fields(env: dict[str, str]) -> dict:
    """What anyone on the machine can compute: the key of the victim's build."""
    r = run_json([*TINY, "--key"], env, timeout=120)
    return r.data["key_fields"]


def evil_library(directory: Path, marker: Path, *, kernel_only: bool = True) -> Path:
    """A shared library whose constructor writes `marker` (proof it was dlopen'ed) and whose
    tiny_scale returns 666 (proof its code ran)."""
    src = directory / "evil.cpp"
    src.write_text(f"""
#include <stdio.h>
#include <stdint.h>
__attribute__((constructor)) static void pwned() {{ FILE* f = fopen("{marker}", "w"); if (f) fclose(f); }}
extern "C" void tiny_scale(const float* x, float* y, int64_t n, float s) {{ for (int64_t i = 0; i < n; ++i) y[i] = 666; }}
""")
    out = directory / "evil.so"
    subprocess.run(["g++", "-shared", "-fPIC", "-o", str(out), str(src)], check=True, timeout=120)
    return out


def kernel_only_library(directory: Path) -> Path:
    """The tiny kernel without its torch binding: loads fine, registers no custom op."""
    out = directory / "no-kernels.so"
    subprocess.run(["g++", "-shared", "-fPIC", "-O1", "-I", str(FIXTURES / "tiny_op"), "-o", str(out),
                    str(FIXTURES / "tiny_op" / "tiny_kernel.cpp")], check=True, timeout=120)
    return out


def plant_entry(vdir: Path, fields: dict, library: Path, *, kernels: tuple[str, ...] = ()) -> Path:
    """A published entry that passes every content check: right key, right size and SHA-256."""
    key = BuildKey.from_dict(fields)
    entry = vdir / key.digest
    entry.mkdir(parents=True)
    shutil.copy(library, entry / LIB)
    write_manifest(entry, op="tiny_test_op", variant="cpu", key=key, library=LIB, build_seconds=1.0,
                   kernels=kernels)
    return entry


def expect_works(r, how: str = "built") -> None:
    assert r.rc == 0 and r.data["ok"], r
    assert r.data["result"] == [v * 2.5 for v in range(6)], r.data  # our kernel, not the planted one
    assert r.data["how"] == how, r.data


# ------------------------------------------------------------------------ 1. planted library
@two_users
@pytest.mark.parametrize("victim", [VICTIM, 0], ids=["victim-user", "victim-root"])
def test_planted_library_in_a_foreign_fallback_dir_is_never_loaded(world, victim):
    """The configured and per-user roots are unusable, so builds fall back to <tmp>/dsinf-<uid>. Another
    user created that name first (mode 777) with an entry for the victim's exact key, manifest and all."""
    home = home_of(world, victim)
    shared_tmp = world / "tmp"
    shared_tmp.mkdir()
    shared_tmp.chmod(0o1777)
    blocker = home / "a-file"
    blocker.write_text("x")
    os.chown(blocker, victim, victim)
    env = child_env(home, TINY_OP_BINDING="0", HOME=str(home), TMPDIR=str(shared_tmp),
                    TORCH_EXTENSIONS_DIR=str(blocker / "ext"), XDG_CACHE_HOME=str(blocker / "xdg"))
    marker = shared_tmp / "PWNED"
    trap = shared_tmp / f"dsinf-{victim}"
    vdir = trap / "extensions" / "tiny_test_op-cpu"
    plant_entry(vdir, key_fields(env), evil_library(world, marker))
    chown_tree(trap, ATTACKER, 0o777)

    r = run_json(as_user(victim, TINY, env), env, timeout=BUILD_TIMEOUT)
    expect_works(r)
    assert not marker.exists(), "the planted library was loaded"
    assert not Path(r.data["path"]).is_relative_to(trap)
    assert Path(r.data["path"]).is_relative_to(shared_tmp)  # a fresh private dir there instead
    root = Path(r.data["path"]).parents[2]
    assert root.stat().st_uid == victim and stat.S_IMODE(root.stat().st_mode) == 0o700
    assert f"{trap}" in r.stderr and f"owned by uid {ATTACKER}" in r.stderr, r.stderr


# --------------------------------------------------------------------------- 2. lock symlinks
@two_users
def test_shared_1777_root_with_another_users_lock_symlink(world):
    """TORCH_EXTENSIONS_DIR is a shared sticky dir; another user got there first and left a `.lock`
    symlink to the victim's ~/.bashrc. The victim's file is untouched and the op builds privately."""
    home = home_of(world, VICTIM)
    bashrc = home / ".bashrc"
    bashrc.write_text("export PATH=precious\n")
    os.chown(bashrc, VICTIM, VICTIM)
    shared = world / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    vdir = shared / "dsinf" / "tiny_test_op-cpu"
    vdir.mkdir(parents=True)
    os.symlink(bashrc, vdir / ".lock")
    chown_tree(shared / "dsinf", ATTACKER, 0o777)
    env = child_env(home, TINY_OP_BINDING="0", HOME=str(home), TORCH_EXTENSIONS_DIR=str(shared))

    r = run_json(as_user(VICTIM, TINY, env), env, timeout=BUILD_TIMEOUT)
    expect_works(r)
    assert bashrc.read_text() == "export PATH=precious\n"
    assert Path(r.data["path"]).is_relative_to(home / "xdg")
    assert "PermissionError" not in r.stderr and f"{shared / 'dsinf'}" in r.stderr, r.stderr


@two_users
@pytest.mark.parametrize("target", ["victims-own-dir", "attackers-tree"])
def test_another_users_symlink_midway_in_the_cache_path_is_never_followed(world, target):
    """TORCH_EXTENSIONS_DIR names a path through a shared sticky dir, where another user planted the
    link `torch_extensions` first: pointing at a private dir of the victim's (it passes every check
    there, and the attacker repoints it at will, e.g. between our check and our dlopen), or at the
    attacker's own tree holding an entry for the victim's key. Neither is used; the op builds privately.
    Sticky but not world-writable (1775), so the kernel's protected_symlinks, where on, does not stop
    the lookup before our check does."""
    home = home_of(world, VICTIM)
    shared = world / "shared"
    shared.mkdir()
    shared.chmod(0o1775)
    marker = world / "PWNED"
    if target == "victims-own-dir":
        dest = home / "ext"
        dest.mkdir(mode=0o700)
        os.chown(dest, VICTIM, VICTIM)
    else:
        dest = world / "attacker"
        env0 = child_env(home, TINY_OP_BINDING="0", HOME=str(home), TORCH_EXTENSIONS_DIR=str(dest))
        plant_entry(dest / "dsinf" / "tiny_test_op-cpu", key_fields(env0), evil_library(world, marker))
        chown_tree(dest, ATTACKER, 0o755)
    link = shared / "torch_extensions"
    os.symlink(dest, link)
    os.lchown(link, ATTACKER, ATTACKER)
    env = child_env(home, TINY_OP_BINDING="0", HOME=str(home), TORCH_EXTENSIONS_DIR=str(link))

    r = run_json(as_user(VICTIM, TINY, env), env, timeout=BUILD_TIMEOUT)
    expect_works(r)
    assert not marker.exists(), "the planted library was loaded"
    assert not Path(r.data["path"]).is_relative_to(link) and not Path(r.data["path"]).is_relative_to(dest)
    assert Path(r.data["path"]).is_relative_to(home / "xdg")
    assert f"{link} is a symlink owned by uid {ATTACKER}" in r.stderr, r.stderr


@two_users
def test_another_users_symlink_midway_in_a_sticky_dir_is_refused(tmp_path):
    """trust.dir_problem itself: in a sticky shared dir (/tmp) a link is its owner's to repoint, between our
    check and our dlopen: refused when it is another user's (midway or last), followed when it is ours or
    root's (nobody else can touch it); our link to another user's link is refused for theirs."""
    from op_builder import trust

    (tmp_path / "real" / "dir").mkdir(parents=True, mode=0o700)
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    link = shared / "torch_extensions"
    os.symlink(tmp_path / "real", link)
    assert trust.dir_problem(link / "dir") is None  # ours (root's): followed
    os.lchown(link, ATTACKER, ATTACKER)
    problem = trust.dir_problem(link / "dir")
    assert problem and f"{link} is a symlink owned by uid {ATTACKER}" in problem
    assert f"{link} is a symlink owned by uid {ATTACKER}" in trust.dir_problem(link)  # as the last part too
    os.symlink(link, tmp_path / "outer")
    assert f"owned by uid {ATTACKER}" in trust.dir_problem(tmp_path / "outer" / "dir")


@pytest.mark.parametrize("kind", ["symlink", "hardlink"])
def test_lock_that_is_not_our_plain_file_is_moved_aside_never_followed(tmp_path, kind):
    victim_file = tmp_path / "bashrc"
    victim_file.write_text("export PATH=precious\n")
    env = child_env(tmp_path, TINY_OP_BINDING="0")
    vdir = Path(env["TORCH_EXTENSIONS_DIR"]) / "dsinf" / "tiny_test_op-cpu"
    vdir.mkdir(parents=True, mode=0o700)
    (os.symlink if kind == "symlink" else os.link)(victim_file, vdir / ".lock")

    r = run_json(TINY, env, timeout=BUILD_TIMEOUT)
    expect_works(r)
    assert victim_file.read_text() == "export PATH=precious\n"
    lock = os.lstat(vdir / ".lock")
    assert stat.S_ISREG(lock.st_mode) and lock.st_nlink == 1
    assert "moving aside the build lock" in r.stderr


# ------------------------------------------------------------------ 3. manifests naming any library
@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_manifest_library_must_stay_inside_its_entry(tmp_path, how):
    env = child_env(tmp_path, TINY_OP_BINDING="0")
    vdir = Path(env["TORCH_EXTENSIONS_DIR"]) / "dsinf" / "tiny_test_op-cpu"
    vdir.mkdir(parents=True)
    marker = tmp_path / "PWNED"
    evil = shutil.copy(evil_library(tmp_path, marker), vdir / "evil.so")
    entry = plant_entry(vdir, key_fields(env), Path(evil))
    manifest = json.loads((entry / "manifest.json").read_text())
    if how == "symlink":  # a plain name, but the file is a link leaving the entry
        (entry / LIB).unlink()
        os.symlink("../evil.so", entry / LIB)
    else:
        manifest["library"] = "../evil.so" if how == "dotdot" else str(evil)
        (entry / "manifest.json").write_text(json.dumps(manifest))

    r = run_json(TINY, env, timeout=BUILD_TIMEOUT)
    expect_works(r)
    assert not marker.exists(), "a library outside the entry was loaded"
    assert Path(r.data["path"]).parent == entry and not Path(r.data["path"]).is_symlink()
    assert "rebuilding tiny_test_op[cpu]" in r.stderr, r.stderr


def test_library_that_registers_no_kernel_is_rejected_and_rebuilt(tmp_path):
    """Right key, right checksum, manifest listing dsinf_test_tiny::scale; but the library registers
    nothing. It is loaded (only loading can tell), rejected, rebuilt, and the rebuilt one serves."""
    env = child_env(tmp_path)  # with the torch binding: the op must be dsinf_test_tiny::scale
    vdir = Path(env["TORCH_EXTENSIONS_DIR"]) / "dsinf" / "tiny_test_op-cpu"
    entry = plant_entry(vdir, key_fields(env), kernel_only_library(tmp_path), kernels=("dsinf_test_tiny::scale",))

    r = run_json(TINY, env, timeout=BUILD_TIMEOUT)
    expect_works(r)
    assert "registers no CPU kernel for dsinf_test_tiny::scale" in r.stderr, r.stderr
    manifest = json.loads((entry / "manifest.json").read_text())
    assert manifest["kernels"] == ["dsinf_test_tiny::scale"]
    assert (entry / LIB).read_bytes() != kernel_only_library(tmp_path).read_bytes()


def test_build_that_registers_no_kernel_is_never_published(tmp_path):
    env = child_env(tmp_path, TINY_OP_BINDING="0", TINY_OP_KERNELS="dsinf_test_tiny::scale")
    r = run_json(TINY, env, timeout=BUILD_TIMEOUT)
    assert r.rc == 1 and r.data["error_type"] == "BuildError", r
    assert "registers no CPU kernel for dsinf_test_tiny::scale" in r.data["message"]
    vdir = Path(env["TORCH_EXTENSIONS_DIR"]) / "dsinf" / "tiny_test_op-cpu"
    assert [p.name for p in vdir.iterdir() if not p.name.startswith(".")] == []


# ------------------------------------------------------------------ 4. non-directories at an entry
@pytest.mark.parametrize("what", ["dangling-symlink", "file", "symlink-to-foreign-dir"])
def test_non_directory_at_the_entry_path_is_moved_aside(tmp_path, what):
    env = child_env(tmp_path, TINY_OP_BINDING="0")
    vdir = Path(env["TORCH_EXTENSIONS_DIR"]) / "dsinf" / "tiny_test_op-cpu"
    vdir.mkdir(parents=True)
    entry = vdir / BuildKey.from_dict(key_fields(env)).digest
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("keep")
    if what == "dangling-symlink":
        os.symlink(tmp_path / "nowhere", entry)
    elif what == "file":
        entry.write_text("junk")
    else:
        os.symlink(elsewhere, entry)

    for attempt in range(2):  # heals once, then is a plain cached entry
        r = run_json(TINY, env, timeout=BUILD_TIMEOUT)
        expect_works(r, "built" if attempt == 0 else "cached")
    assert entry.is_dir() and not entry.is_symlink()
    assert (elsewhere / "keep.txt").read_text() == "keep"  # a link is removed, never its target


# ---------------------------------------------------------------------------- 5. build limits
def hanging_cxx(directory: Path, marker: str, *, stage: str) -> Path:
    """A CXX whose compiles (stage 'compile') or every call (stage 'all') hang in `sleep <marker>`."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "hanging-cxx"
    hang = f"exec sleep {marker}"
    body = hang if stage == "all" else f'case " $* " in *" -c "*) {hang} ;; esac\nexec g++ "$@"'
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


def sleepers(marker: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if f"sleep {marker}" in cmd and state != "Z":
                found.append(f"{entry.name} {cmd}")
    return found


@pytest.mark.parametrize("stage", ["compile", "all"])
def test_hanging_compiler_is_killed_at_the_build_time_limit(tmp_path, stage):
    marker = f"{900 + secrets.randbelow(99)}.{secrets.randbelow(10**6)}"
    limit = 4
    env = child_env(tmp_path, TINY_OP_BINDING="0", CXX=str(hanging_cxx(tmp_path / "cxx", marker, stage=stage)),
                    DSINF_BUILD_TIME_LIMIT=str(limit))
    start = time.monotonic()
    r = run_json(TINY, env, timeout=240)
    elapsed = time.monotonic() - start
    try:
        assert r.rc == 1 and r.data["error_type"] == "BuildError", r
        message = r.data["message"]
        assert "tiny_test_op[cpu]" in message and f"{limit} s" in message and "DSINF_BUILD_TIME_LIMIT" in message
        assert r.data["log_path"] and r.data["log_path"] in message and Path(r.data["log_path"]).is_file()
        assert elapsed < limit + 60, f"a {limit} s limit took {elapsed:.0f} s"
        wait_until(lambda: not sleepers(marker), 10, "the hung compiler to be gone")
    finally:
        for line in sleepers(marker):
            os.kill(int(line.split()[0]), 9)


def test_sigkilled_build_worker_leaves_no_compiler_and_shows_its_log(tmp_path):
    """The OOM killer takes the build worker mid-compile: its compiler must not live on, and the
    error shows what the log says (not only our headers)."""
    marker = f"{800 + secrets.randbelow(99)}.{secrets.randbelow(10**6)}"
    env = child_env(tmp_path, TINY_OP_BINDING="0", CXX=str(hanging_cxx(tmp_path / "cxx", marker, stage="compile")))
    try:
        with Child(TINY, env, tmp_path / "logs", "loader") as loader:
            wait_until(lambda: bool(sleepers(marker)), 120, "the compile to start", alive=loader)
            workers = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _is_worker_of(p, loader.pid)]
            assert len(workers) == 1, workers
            os.kill(workers[0], 9)
            r = loader.wait(120)
        assert r.rc == 1 and r.data["error_type"] == "BuildError", r
        message = r.data["message"]
        assert "killed by SIGKILL" in message and "last log lines" in message, message
        assert "hanging-cxx" in message or "ninja" in message.lower(), message  # the log's own content
        wait_until(lambda: not sleepers(marker), 15, "the orphaned compiler to be stopped")
    finally:
        for line in sleepers(marker):
            os.kill(int(line.split()[0]), 9)
    env.pop("CXX")
    expect_works(run_json(TINY, env, timeout=BUILD_TIMEOUT))  # and the op still builds


def _is_worker_of(proc: Path, parent: int) -> bool:
    try:
        ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        cmd = (proc / "cmdline").read_bytes()
    except (OSError, IndexError, ValueError):
        return False
    return ppid == parent and b"op_builder._build_worker" in cmd


# --------------------------------------------------------------- 6. shared and read-only caches
def tree_state(root: Path) -> list[tuple[str, int, float]]:
    return sorted((str(p.relative_to(root)), p.lstat().st_mode, p.lstat().st_mtime) for p in root.rglob("*"))


@two_users
def test_read_only_shared_cache_is_used_as_is_with_zero_compiler_calls(world):
    """A cluster's prebuilt cache (root-owned, read-only to users): loaded without a write or a compile.
    An entry it lacks is built in the user's own cache, and the warning says so."""
    shared = world / "shared"
    cxx = CxxWrapper.create(world / "cxx")  # the compiler is part of the key: the same CXX for both
    admin_env = child_env(world / "admin", TINY_OP_BINDING="0", TORCH_EXTENSIONS_DIR=str(shared), CXX=str(cxx.path))
    expect_works(run_json(TINY, admin_env, timeout=BUILD_TIMEOUT))
    assert cxx.compiles()
    cxx.reset()
    cxx.log.touch(mode=0o666)
    cxx.log.chmod(0o666)
    for p in [shared, *shared.rglob("*")]:  # what an admin does to share it: everyone reads, nobody writes
        p.chmod(0o755 if p.is_dir() or p.suffix == ".so" else 0o644)
    before = tree_state(shared)

    home = home_of(world, VICTIM)
    env = child_env(home, TINY_OP_BINDING="0", HOME=str(home), TORCH_EXTENSIONS_DIR=str(shared), CXX=str(cxx.path))
    r = run_json(as_user(VICTIM, TINY, env), env, timeout=BUILD_TIMEOUT)
    expect_works(r, "cached")
    assert Path(r.data["path"]).is_relative_to(shared)
    assert cxx.calls() == [], "a valid read-only cache must not run the compiler"
    assert tree_state(shared) == before, "nothing written into the shared cache (no lock file either)"
    assert "WARNING" not in r.stderr.upper() or "cannot build" not in r.stderr

    env["TINY_OP_CFLAGS"] = "-DTINY_TRUST_TEST=1"  # another key: missing from the shared cache
    r = run_json(as_user(VICTIM, TINY, env), env, timeout=BUILD_TIMEOUT)
    expect_works(r)
    assert Path(r.data["path"]).is_relative_to(home / "xdg")
    warning = [line for line in r.stderr.splitlines() if "cannot build into" in line]
    assert len(warning) == 1 and f"{shared / 'dsinf'} is read-only for you" in warning[0], r.stderr
    assert f"building into {home / 'xdg'}" in warning[0]
    assert tree_state(shared) == before


@two_users
def test_installed_binary_in_an_environment_another_account_owns(world):
    """A shared environment a software-admin account (not root) installed, prebuilt binaries and all: its
    owner can already change the op_builder code the user runs, so its binaries are loaded without a
    compile (the threat model leaves that owner out). The same binaries owned by anyone else are refused."""
    built = run_json(TINY, child_env(world / "build", TINY_OP_BINDING="0"), timeout=BUILD_TIMEOUT)
    expect_works(built)
    env_dir = world / "shared-env"
    snapshot_repo(env_dir / "site")  # the installed op_builder (the package whose owner is trusted)
    installed = env_dir / "prebuilt" / "tiny_test_op-cpu"
    shutil.copytree(Path(built.data["path"]).parent, installed)
    chown_tree(env_dir, ADMIN, 0o755)
    home = home_of(world, VICTIM)
    cxx = CxxWrapper.create(world / "cxx")
    cxx.log.touch(mode=0o666)
    cxx.log.chmod(0o666)
    env = child_env(home, pythonpath=[env_dir / "site", FIXTURES], TINY_OP_BINDING="0", HOME=str(home),
                    TINY_OP_PREBUILT=str(env_dir / "prebuilt"), CXX=str(cxx.path))

    r = run_json(as_user(VICTIM, TINY, env), env, cwd=home, timeout=BUILD_TIMEOUT)  # cwd: not the repo's op_builder
    expect_works(r, "prebuilt")
    assert Path(r.data["path"]).is_relative_to(installed) and cxx.calls() == [], (r.stderr, cxx.calls())

    chown_tree(env_dir / "prebuilt", ATTACKER, 0o755)  # not the package's owner: an ordinary other user
    r = run_json(as_user(VICTIM, TINY, env), env, cwd=home, timeout=BUILD_TIMEOUT)
    expect_works(r)
    assert not Path(r.data["path"]).is_relative_to(env_dir) and cxx.compiles()
    assert f"owned by uid {ATTACKER}" in r.stderr, r.stderr


# ------------------------------------------------------------------------------------ 7. parsers
def test_deeply_nested_manifest_is_a_rebuild_not_a_crash(tmp_path):
    env = child_env(tmp_path, TINY_OP_BINDING="0")
    first = run_json(TINY, env, timeout=BUILD_TIMEOUT)
    expect_works(first)
    manifest = Path(first.data["path"]).parent / "manifest.json"
    manifest.write_text("[" * 200000 + "]" * 200000)
    r = run_json(TINY, env, timeout=BUILD_TIMEOUT)
    expect_works(r)
    assert "RecursionError" not in r.stderr and "nested too deeply" in r.stderr, r.stderr


def test_cxx_with_arguments_is_a_compiler(tmp_path):
    """CXX='g++ -O0' (a command line, as make and torch accept) said "no C++ compiler found"."""
    env = child_env(tmp_path, TINY_OP_BINDING="0", CXX=f"{shutil.which('g++')} -O0")
    r = run([sys.executable, "-c", "from op_builder.system import current_system; s = current_system(); "
             "print(s.cxx.path, s.cxx.identity)"], env, timeout=60)
    assert r.rc == 0 and r.stdout.split()[0] == shutil.which("g++"), r
    assert "-O0" in r.stdout
