"""The build lock: a kernel advisory lock that cannot go stale.

`fcntl.flock` on an open file descriptor belongs to the process holding the descriptor; the kernel
drops it when that process exits for any reason, `kill -9` included. There is no lock *file* whose
existence means "locked" (torch's FileBaton and DeepSpeed's builds hang forever on one left behind by
a killed process). The lock file is never deleted: deleting it would let two processes lock two
different inodes.

The holder writes who it is (pid, host, what it builds, the log path, start time) into the lock file,
so a waiter can say whom it waits for. Waits are bounded; the timeout error says what to do.
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

from .errors import BuildTimeoutError

log = logging.getLogger("op_builder")


def _holder_info(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _describe(info: dict) -> str:
    if not info:
        return "another process"
    age = time.time() - info.get("started", time.time())
    return (f"pid {info.get('pid', '?')} on {info.get('host', '?')}, started {age:.0f} s ago, "
            f"log {info.get('log', '?')}")


class BuildLock:
    """`with BuildLock(path, what=..., log_path=..., timeout=...):` exclusive across processes."""

    def __init__(self, path: Path, *, what: str, log_path: Path | str, timeout: float,
                 poll: float = 0.05, report_every: float = 30.0):
        self.path = Path(path)
        self.what = what
        self.log_path = str(log_path)
        self.timeout = timeout
        self.poll = poll
        self.report_every = report_every
        self._fd: int | None = None
        self.waited = 0.0

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        start = time.monotonic()
        next_report = 0.0
        delay = self.poll
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    pass
                waited = time.monotonic() - start
                if waited >= self.timeout:
                    raise BuildTimeoutError(
                        f"gave up after {waited:.0f} s waiting for the {self.what} build held by "
                        f"{_describe(_holder_info(self.path))}. If that process is stuck, stop it (its lock is released "
                        f"when it exits); to wait longer set DS_BUILD_TIMEOUT (seconds). Lock: {self.path}")
                if waited >= next_report:
                    if next_report == 0.0:
                        # The holder writes who it is right after locking: give it a moment to do so.
                        info, deadline = _holder_info(self.path), time.monotonic() + 0.5
                        while not info and time.monotonic() < deadline:
                            time.sleep(0.05)
                            info = _holder_info(self.path)
                        log.info("waiting for %s build (%s)", self.what, _describe(info))
                    else:
                        log.info("still waiting for %s build after %.0f s (%s)", self.what, waited,
                                 _describe(_holder_info(self.path)))
                    next_report += self.report_every
                time.sleep(delay)
                delay = min(delay * 1.5, 0.5)
        except BaseException:
            os.close(fd)
            raise
        self.waited = time.monotonic() - start
        self._fd = fd
        info = {"pid": os.getpid(), "host": socket.gethostname(), "what": self.what, "log": self.log_path,
                "started": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "BuildLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
