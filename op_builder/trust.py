"""Which directories and files on disk may be trusted with code we dlopen (docs/TRUST.md).

A cache entry is native code loaded into the user's process, so a directory is trusted only when
nobody but the current user and root can change what it holds:

- the directory itself is a real directory (not a symlink), owned by us or root, and writable by
  neither group nor others;
- every ancestor of its resolved path is owned by us or root and, when group/world writable, sticky
  (like /tmp: others may add their own names there but cannot rename or remove ours).

A read-only cache owned by root (a cluster's shared prebuilt cache) passes; a directory that another
user created first, or any world-writable one, does not.
"""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

_TRUSTED_WRITE = stat.S_IWGRP | stat.S_IWOTH


def _owners() -> tuple[int, ...]:
    return (os.getuid(), 0)


def _private_group(gid: int) -> bool:
    """A user-private group (umask 002 systems): our primary group, named after us, no other members."""
    if gid != os.getgid():
        return False
    try:
        import grp
        import pwd

        me = pwd.getpwuid(os.getuid()).pw_name
        group = grp.getgrgid(gid)
    except (ImportError, KeyError):
        return False
    return group.gr_name == me and set(group.gr_mem) <= {me}


def _mode_problem(path: Path, st: os.stat_result, *, leaf: bool) -> str | None:
    if st.st_uid not in _owners():
        return f"{path} is owned by uid {st.st_uid}, not by you (uid {os.getuid()}) or root"
    writers = st.st_mode & _TRUSTED_WRITE
    if writers == stat.S_IWGRP and _private_group(st.st_gid):
        writers = 0
    if writers and (leaf or not st.st_mode & stat.S_ISVTX):
        return f"{path} is writable by other users (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def dir_problem(path: Path) -> str | None:
    """Why the existing directory `path` must not be trusted (None: it may be)."""
    path = Path(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return f"{path} does not exist"
    except OSError as exc:
        return f"{path} cannot be inspected ({exc.strerror})"
    if stat.S_ISLNK(st.st_mode):
        # The configured root may be a symlink the user made (~/.cache -> /data/...): judge where it
        # leads, provided the link itself sits in a trusted directory.
        parent = dir_problem(path.parent) if path.parent != path else None
        if parent:
            return parent
        try:
            return dir_problem(path.resolve(strict=True))
        except (OSError, RuntimeError) as exc:
            return f"{path} is a symlink that cannot be resolved ({exc})"
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a directory"
    problem = _mode_problem(path, st, leaf=True)
    if problem:
        return problem
    for ancestor in path.resolve().parents:
        try:
            problem = _mode_problem(ancestor, os.stat(ancestor), leaf=False)
        except OSError as exc:
            return f"{ancestor} cannot be inspected ({exc.strerror})"
        if problem:
            return problem
    return None


def file_problem(path: Path) -> str | None:
    """Why `path` is not a regular file that only we (or root) can change."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        return f"{Path(path).name} missing ({exc.strerror})"
    if not stat.S_ISREG(st.st_mode):
        return f"{Path(path).name} is not a regular file (symlink or special file)"
    return _mode_problem(Path(path), st, leaf=True)


def ensure_private_dir(path: Path) -> str | None:
    """Create `path` (and missing parents) with mode 0700, then check it. None when it is trusted,
    else why not (foreign owner, open mode, not a directory, cannot be created)."""
    path = Path(path).absolute()
    for directory in [*reversed(path.parents), path]:
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            pass
        except OSError as exc:
            if directory.is_dir():  # exists on a read-only filesystem
                continue
            return f"{directory} cannot be created ({exc.strerror})"
    return dir_problem(path)


def writable(path: Path) -> bool:
    """Whether we may create files in the existing directory `path` (no probe file is written)."""
    return os.access(path, os.W_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids)


def open_private_file(path: Path, flags: int, mode: int = 0o600) -> int:
    """os.open that never follows a symlink at `path` and refuses a file that is not ours.

    A lock or table file lives in a directory others may have been able to write before we checked
    it; a `.lock` symlink to ~/.bashrc must not be opened (let alone truncated), and a hard link to
    one of our files (st_nlink > 1) neither. Raises PermissionError naming the file."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise PermissionError(f"refusing {path}: it is a symlink") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_nlink != 1:
            raise PermissionError(f"refusing {path}: not a regular file owned by you with a single link "
                                  f"(owner uid {st.st_uid}, links {st.st_nlink})")
    except BaseException:
        os.close(fd)
        raise
    return fd
