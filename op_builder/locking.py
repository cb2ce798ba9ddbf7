"""Cross-process locks: kernel advisory locks that cannot go stale, on files that cannot be hijacked.

`fcntl.flock` on an open file descriptor belongs to the process holding the descriptor; the kernel
drops it when that process exits for any reason, `kill -9` included. There is no lock *file* whose
existence means "locked" (torch's FileBaton and DeepSpeed's builds hang forever on one left behind by
a killed process). A lock file is never deleted: deleting it would let two processes lock two
different inodes.

A lock file is opened with O_NOFOLLOW and must be a regular file owned by us with one link
(`trust.open_private_file`): a `.lock` symlink planted towards ~/.bashrc is refused, never truncated.
The holder writes who it is into the file, so a waiter can say whom it waits for. Waits are bounded.
One implementation serves the build lock (`BuildLock`) and the Triton autotune table (`FileLock`).
Assumes a node-local filesystem (flock over NFS is emulated or absent, depending on the client).
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Callable

from .errors import BuildTimeoutError, UnsafeCacheError
from .trust import open_private_file

log = logging.getLogger("op_builder")

FIRST_REPORT = 0.5  # seconds before a waiter says whom it waits for

# Descriptors of the locks this process holds. A child forked meanwhile (a DataLoader or multiprocessing
# worker started while another thread builds) shares each one's open file, and flock holds the lock until the
# last descriptor of it closes: a child outliving a killed holder would keep the build locked. The child closes
# its copies at once; the parent's lock is unaffected.
_held: set[int] = set()


def _close_held_in_child() -> None:
    for fd in list(_held):
        try:
            os.close(fd)
        except OSError:
            pass
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_held_in_child)


class LockTimeout(TimeoutError):
    """The lock was still held by another process when the wait ran out; `holder` says who holds it."""

    def __init__(self, path: Path, waited: float, holder: dict):
        self.holder = holder
        self.waited = waited  # on this holder
        super().__init__(f"lock {path} still held after {waited:.0f} s (holder: {describe_holder(holder)})")


def _holder_info(fd: int) -> dict:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode(errors="replace") or "{}")
    except (OSError, ValueError, RecursionError):
        return {}
    return info if isinstance(info, dict) else {}


class FileLock:
    """`with FileLock(path, timeout=...):` exclusive across processes, waiting at most `timeout` s for
    one holder (the wait starts again when another process takes the lock first: waiting behind a queue
    of builds of other keys is not waiting on a stuck one).

    `on_wait(waited_seconds, holder_info)` is called between polls while another process holds it.
    Raises LockTimeout when the wait runs out, PermissionError when the lock file is not ours."""

    def __init__(self, path: Path, *, timeout: float, holder: dict | None = None, poll: float = 0.05,
                 max_poll: float = 0.5, on_wait: Callable[[float, dict], None] | None = None):
        self.path = Path(path)
        self.timeout = timeout
        self.holder = holder or {}
        self.poll = poll
        self.max_poll = max_poll
        self.on_wait = on_wait
        self._fd: int | None = None
        self.waited = 0.0

    def acquire(self) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = open_private_file(self.path, os.O_RDWR | os.O_CREAT)
        start = since = time.monotonic()
        delay = self.poll
        holder = None
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    pass
                info = _holder_info(fd)
                who = (info.get("pid"), info.get("host"), info.get("started"))
                if info and who != holder:  # the timeout bounds one holder: a queue of builds is not a stuck one
                    holder, since = who, time.monotonic()
                waited = time.monotonic() - since
                if waited >= self.timeout:
                    raise LockTimeout(self.path, waited, info)
                if self.on_wait is not None:
                    self.on_wait(time.monotonic() - start, info)
                time.sleep(delay)
                delay = min(delay * 1.5, self.max_poll)
        except BaseException:
            os.close(fd)
            raise
        self.waited = time.monotonic() - start
        self._fd = fd
        _held.add(fd)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), **self.holder}
        os.ftruncate(fd, 0)  # our own single-link regular file (checked at open)
        os.pwrite(fd, json.dumps(info).encode(), 0)

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            _held.discard(self._fd)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "FileLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def describe_holder(info: dict) -> str:
    if not info:
        return "another process"
    started = info.get("started")
    age = time.time() - started if isinstance(started, (int, float)) else float("nan")
    return (f"pid {info.get('pid', '?')} on {info.get('host', '?')}, started {age:.0f} s ago, "
            f"log {info.get('log', '?')}")


class BuildLock(FileLock):
    """The lock of one op variant's builds: progress lines while waiting, errors that say what to do."""

    def __init__(self, path: Path, *, what: str, log_path: Path | str, timeout: float,
                 poll: float = 0.05, report_every: float = 30.0):
        super().__init__(path, timeout=timeout, holder={"what": what, "log": str(log_path)}, poll=poll,
                         on_wait=self._report)
        self.what = what
        self.report_every = report_every
        self._next_report, self._reported = FIRST_REPORT, False

    def _report(self, waited: float, info: dict) -> None:
        # The first line waits half a second: the holder writes who it is right after locking.
        if waited < self._next_report:
            return
        if not self._reported:
            log.info("waiting for %s build (%s)", self.what, describe_holder(info))
            self._reported = True
            self._next_report = self.report_every
        else:
            log.info("still waiting for %s build after %.0f s (%s)", self.what, waited, describe_holder(info))
            self._next_report += self.report_every

    def acquire(self) -> None:
        self._next_report, self._reported = FIRST_REPORT, False
        try:
            super().acquire()
        except LockTimeout as exc:
            info = exc.holder
            raise BuildTimeoutError(
                f"gave up after {exc.waited:.0f} s waiting for the {self.what} build held by "
                f"{describe_holder(info)}. If that process is stuck, stop it (its lock is released "
                f"when it exits); to wait longer set DS_BUILD_TIMEOUT (seconds). Lock: {self.path}") from None
        except PermissionError as exc:
            raise UnsafeCacheError(f"cannot use the build lock of {self.what}: {exc}. Another user's file sits in "
                                   f"your cache; point TORCH_EXTENSIONS_DIR at a directory only you can write") \
                from None
