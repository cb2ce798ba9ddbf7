"""op_builder.locking: a kernel flock that cannot go stale, with talkative, bounded waits.

Holders are real child processes (no torch import: these are fast). The build-level versions of the
same behaviours (a real op build held, waited for, killed) are in test_build.py.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fixtures.procs import REPO, Child, wait_until
from op_builder.errors import BuildTimeoutError, OpBuilderError, UnsafeCacheError
from op_builder.locking import BuildLock, FileLock

HOLDER = textwrap.dedent("""
    import sys, time
    from op_builder.locking import BuildLock
    lock = BuildLock(sys.argv[1], what="demo_op[cpu]", log_path=sys.argv[2], timeout=60)
    lock.acquire()
    print("locked", flush=True)
    time.sleep(float(sys.argv[3]))
    lock.release()
    print("released", flush=True)
""")


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def start_holder(tmp_path: Path, lock_path: Path, hold: float = 300, name: str = "holder") -> Child:
    holder = Child([sys.executable, "-c", HOLDER, str(lock_path), "/logs/demo_op.log", str(hold)], env(),
                   tmp_path / "logs", name)
    wait_until(lambda: "locked" in holder.stdout, 60, "the holder to take the lock", alive=holder)
    return holder


def test_uncontended_lock_is_immediate(tmp_path):
    path = tmp_path / "a" / "b" / ".lock"  # parent dirs are created
    lock = BuildLock(path, what="demo_op[cpu]", log_path="/x.log", timeout=5)
    start = time.monotonic()
    with lock:
        info = json.loads(path.read_text())
        assert info["pid"] == os.getpid() and info["what"] == "demo_op[cpu]" and info["log"] == "/x.log"
        assert "host" in info and "started" in info
    assert time.monotonic() - start < 1
    assert lock.waited < 1
    assert path.exists(), "the lock file must never be deleted (two inodes would mean two locks)"
    assert path.read_text() == "", "holder info is cleared on release"
    with BuildLock(path, what="demo_op[cpu]", log_path="/x.log", timeout=5):  # re-acquirable
        pass


def test_waiter_says_whom_it_waits_for_and_times_out(tmp_path, caplog):
    lock_path = tmp_path / ".lock"
    with start_holder(tmp_path, lock_path) as holder:
        lock = BuildLock(lock_path, what="demo_op[cpu]", log_path="/mine.log", timeout=3, report_every=0.5)
        start = time.monotonic()
        with caplog.at_level(logging.INFO, logger="op_builder"), pytest.raises(BuildTimeoutError) as info:
            lock.acquire()
        waited = time.monotonic() - start
    assert 3 <= waited < 15, f"bounded wait took {waited:.1f} s"
    message = str(info.value)
    assert f"pid {holder.pid}" in message and "/logs/demo_op.log" in message
    assert "demo_op[cpu]" in message and "DS_BUILD_TIMEOUT" in message and str(lock_path) in message
    assert "stop it" in message  # says what to do
    assert isinstance(info.value, OpBuilderError)
    lines = [r.getMessage() for r in caplog.records]
    waiting = [line for line in lines if line.startswith("waiting for demo_op[cpu] build")]
    assert len(waiting) == 1, lines
    assert f"(pid {holder.pid} on " in waiting[0] and "log /logs/demo_op.log" in waiting[0]
    assert any(line.startswith("still waiting for demo_op[cpu] build") for line in lines), lines


# A second holder that queues on the lock with a blocking flock (the kernel hands it the lock the moment the
# first lets go, before any polling waiter), then says who it is and holds it, like a build of another key.
BLOCKING_HOLDER = textwrap.dedent("""
    import fcntl, json, os, socket, sys, time
    fd = os.open(sys.argv[1], os.O_RDWR)
    print("queued", flush=True)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}).encode(), 0)
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
""")


def test_the_wait_is_bounded_per_holder_not_across_a_queue_of_them(tmp_path):
    """Builds of other keys of one op share its lock: a waiter behind two of them, each shorter than its
    timeout, together longer, waits them out (it used to give up although nothing was stuck); one holder
    longer than the timeout still times it out."""
    lock_path = tmp_path / ".lock"
    with start_holder(tmp_path, lock_path, hold=3.5, name="first") as first:
        second = Child([sys.executable, "-c", BLOCKING_HOLDER, str(lock_path), "3.5"], env(), tmp_path / "logs",
                       "second")
        with second:
            wait_until(lambda: "queued" in second.stdout, 60, "the second holder to queue", alive=second)
            start = time.monotonic()
            with BuildLock(lock_path, what="demo_op[cpu]", log_path="/w.log", timeout=4):
                waited = time.monotonic() - start
            assert "locked" in second.stdout and first.wait(timeout=30).rc == 0
    assert 4 < waited < 30, f"got the lock after {waited:.1f} s: it must have waited for both holders"
    with start_holder(tmp_path, lock_path, hold=300, name="stuck"):
        with pytest.raises(BuildTimeoutError, match=r"gave up after \d+ s waiting"):
            BuildLock(lock_path, what="demo_op[cpu]", log_path="/w.log", timeout=1.5).acquire()


FORKING_HOLDER = textwrap.dedent("""
    import os, sys, time
    from op_builder.locking import BuildLock
    lock = BuildLock(sys.argv[1], what="demo_op[cpu]", log_path="/logs/demo_op.log", timeout=60)
    lock.acquire()
    if os.fork() == 0:  # a worker forked while the lock is held (its parent is killed below; it lives on)
        time.sleep(120)
        os._exit(0)
    print("locked and forked", flush=True)
    time.sleep(300)
""")


def test_a_child_forked_while_the_lock_is_held_does_not_keep_it(tmp_path):
    """flock holds a lock until the last descriptor of its open file closes, and a forked child shares them:
    a worker forked while the lock was held kept it after its parent was killed, so every waiter timed out."""
    lock_path = tmp_path / ".lock"
    holder = Child([sys.executable, "-c", FORKING_HOLDER, str(lock_path)], env(), tmp_path / "logs", "forker")
    try:
        with holder:
            wait_until(lambda: "locked and forked" in holder.stdout, 60, "the holder to fork", alive=holder)
            os.kill(holder.pid, signal.SIGKILL)
            holder.wait(timeout=30)
            with BuildLock(lock_path, what="demo_op[cpu]", log_path="/w.log", timeout=10) as lock:
                assert json.loads(lock_path.read_text())["pid"] == os.getpid()
            assert lock.waited < 5
    finally:
        subprocess.run(["pkill", "-f", str(lock_path)], check=False)  # the forked child, still sleeping


def test_lock_released_when_holder_is_sigkilled(tmp_path):
    lock_path = tmp_path / ".lock"
    holder = start_holder(tmp_path, lock_path)
    with pytest.raises(BuildTimeoutError):
        BuildLock(lock_path, what="demo_op[cpu]", log_path="/w.log", timeout=0.3).acquire()
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=30)
    start = time.monotonic()
    with BuildLock(lock_path, what="demo_op[cpu]", log_path="/w.log", timeout=30) as lock:
        assert json.loads(lock_path.read_text())["pid"] == os.getpid()
    assert time.monotonic() - start < 5
    assert lock.waited < 5


def test_waiter_proceeds_when_holder_is_killed_while_it_waits(tmp_path):
    """A waiter blocked on a holder gets the lock as soon as the holder dies (kill -9, no cleanup)."""
    lock_path = tmp_path / ".lock"
    holder = start_holder(tmp_path, lock_path)
    waiter_code = textwrap.dedent("""
        import logging, sys, time
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        from op_builder.locking import BuildLock
        start = time.monotonic()
        with BuildLock(sys.argv[1], what="demo_op[cpu]", log_path="/w.log", timeout=120):
            print(f"acquired after {time.monotonic() - start:.1f}", flush=True)
    """)
    with Child([sys.executable, "-c", waiter_code, str(lock_path)], env(), tmp_path / "logs", "waiter") as waiter:
        wait_until(lambda: "waiting for demo_op[cpu] build" in waiter.stderr, 60, "the waiter to wait", alive=waiter)
        assert f"pid {holder.pid}" in waiter.stderr
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
        result = waiter.wait(timeout=30)
    assert result.rc == 0, result
    assert "acquired after" in result.stdout


def test_mutual_exclusion_across_processes(tmp_path):
    lock_path, trace = tmp_path / ".lock", tmp_path / "trace"
    code = textwrap.dedent("""
        import os, sys, time
        from op_builder.locking import BuildLock
        with BuildLock(sys.argv[1], what="demo_op[cpu]", log_path="/x", timeout=60):
            with open(sys.argv[2], "a") as f:
                f.write(f"in {os.getpid()}\\n"); f.flush()
                time.sleep(0.2)
                f.write(f"out {os.getpid()}\\n")
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(lock_path), str(trace)], env=env())
             for _ in range(4)]
    for p in procs:
        assert p.wait(timeout=120) == 0
    lines = trace.read_text().split()
    events = list(zip(lines[0::2], lines[1::2]))
    assert len(events) == 8
    for i in range(0, 8, 2):  # strictly alternating in/out of the same pid
        assert events[i][0] == "in" and events[i + 1][0] == "out" and events[i][1] == events[i + 1][1], events


def test_garbled_holder_info_still_describes_something(tmp_path):
    lock_path = tmp_path / ".lock"
    with start_holder(tmp_path, lock_path):
        lock_path.write_text("{garbage")  # the holder's info is unreadable: the waiter still explains
        with pytest.raises(BuildTimeoutError, match="another process"):
            BuildLock(lock_path, what="demo_op[cpu]", log_path="/w.log", timeout=0.3).acquire()


def test_timeout_does_not_leak_file_descriptors(tmp_path):
    lock_path = tmp_path / ".lock"
    with start_holder(tmp_path, lock_path):
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(5):
            with pytest.raises(BuildTimeoutError):
                BuildLock(lock_path, what="demo_op[cpu]", log_path="/w.log", timeout=0.05).acquire()
        assert len(os.listdir("/proc/self/fd")) == before


# ------------------------------------------------------------------------- lock files that are not ours
@pytest.mark.parametrize("plant", ["symlink", "dangling-symlink", "hardlink", "fifo"])
def test_lock_file_that_is_not_our_plain_file_is_refused_untouched(tmp_path, plant):
    """A `.lock` planted as a symlink (to ~/.bashrc) or hard link must never be opened for writing,
    let alone truncated; a FIFO must not block the open."""
    victim = tmp_path / "bashrc"
    victim.write_text("export PATH=precious\n")
    lock_path = tmp_path / "variant" / ".lock"
    lock_path.parent.mkdir()
    if plant == "symlink":
        os.symlink(victim, lock_path)
    elif plant == "dangling-symlink":
        os.symlink(tmp_path / "created-through-the-link", lock_path)
    elif plant == "hardlink":
        os.link(victim, lock_path)
    else:
        os.mkfifo(lock_path)
    lock = BuildLock(lock_path, what="demo_op[cpu]", log_path="/x.log", timeout=5)
    with pytest.raises(UnsafeCacheError) as info:
        lock.acquire()
    assert str(lock_path) in str(info.value) and "demo_op[cpu]" in str(info.value)
    assert victim.read_text() == "export PATH=precious\n"
    assert not (tmp_path / "created-through-the-link").exists()
    with pytest.raises(PermissionError):  # the generic lock refuses the same way
        FileLock(lock_path, timeout=1).acquire()


def test_lock_file_owned_by_another_user_is_refused(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("chown to another uid needs root (CI runs as root)")
    lock_path = tmp_path / ".lock"
    lock_path.write_text('{"pid": 1}')
    os.chown(lock_path, 12345, 12345)
    with pytest.raises(UnsafeCacheError) as info:
        BuildLock(lock_path, what="demo_op[cpu]", log_path="/x.log", timeout=5).acquire()
    assert "owner uid 12345" in str(info.value)
    assert lock_path.read_text() == '{"pid": 1}'


def test_existing_lock_file_of_ours_is_reused_and_private(tmp_path):
    lock_path = tmp_path / ".lock"
    with FileLock(lock_path, timeout=1, holder={"what": "x"}):
        info = json.loads(lock_path.read_text())
        assert info["pid"] == os.getpid() and info["what"] == "x"
    assert oct(lock_path.stat().st_mode & 0o777) == oct(0o600)
    with FileLock(lock_path, timeout=1):  # the same inode, again
        pass
