"""Which directories and files on disk may be trusted with code we dlopen (docs/TRUST.md).

A cache entry is native code loaded into the user's process, so a directory is trusted only when
nobody but the current user and root can change what it holds:

- the directory itself (where the path leads) is owned by us or root, and writable by neither group
  nor others;
- every directory its path passes through is owned by us or root and, when group/world writable,
  sticky (like /tmp: others may add their own names there but cannot rename or remove ours);
- every symlink its path follows, at any depth, is owned by us or root: in a sticky directory
  another user's link is theirs to repoint at any moment (between our check and our dlopen).

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


def package_owners(package_dir: Path) -> tuple[int, ...]:
    """Who may own an installed (prebuilt) binary: us, root, and whoever owns the installed package
    `package_dir` itself (a shared environment an admin account installed): they can change the package's
    Python code, which this process runs, so trusting their binary gives them nothing they lack (the
    threat model leaves them out)."""
    try:
        uid = os.stat(package_dir).st_uid
    except OSError:
        return _owners()
    return tuple(dict.fromkeys((*_owners(), uid)))


def _private_group(gid: int) -> bool:
    """A user-private group (umask 002 systems): our primary group, named after us, no other members, and
    no other account's primary group (those accounts are not listed as members: gr_mem omits them)."""
    if gid != os.getgid():
        return False
    try:
        import grp
        import pwd

        me = pwd.getpwuid(os.getuid()).pw_name
        group = grp.getgrgid(gid)
        others = [p.pw_name for p in pwd.getpwall() if p.pw_gid == gid and p.pw_name != me]
    except (ImportError, KeyError):
        return False
    return group.gr_name == me and set(group.gr_mem) <= {me} and not others


def _mode_problem(path: Path, st: os.stat_result, *, leaf: bool, owners: tuple[int, ...]) -> str | None:
    if st.st_uid not in owners:
        return f"{path} is owned by uid {st.st_uid}, not by you (uid {os.getuid()}) or root"
    writers = st.st_mode & _TRUSTED_WRITE
    if writers == stat.S_IWGRP and _private_group(st.st_gid):
        writers = 0
    if writers and (leaf or not st.st_mode & stat.S_ISVTX):
        return f"{path} is writable by other users (mode {stat.S_IMODE(st.st_mode):o})"
    return None


_MAX_LINKS = 40  # as the kernel's limit on symlinks followed in one lookup (ELOOP)


def _walk(path: Path, owners: tuple[int, ...]) -> tuple[Path | None, str | None]:
    """Resolve `path` one component at a time, as the kernel does, judging each directory the lookup
    passes through (as an ancestor: sticky when others may write) and each symlink it follows (owned by
    us or root). (the real path, None), or (None, why not). Path.resolve() alone would hide a link
    another user planted midway, which they can repoint at will."""
    real = Path("/")
    pending = list(Path(path).absolute().parts[1:])
    checked: set[Path] = set()
    links = 0
    while pending:
        name = pending.pop(0)
        if name in ("", "."):
            continue
        if name == "..":
            real = real.parent
            continue
        if real not in checked:
            try:
                problem = _mode_problem(real, os.stat(real), leaf=False, owners=owners)
            except OSError as exc:
                return None, f"{real} cannot be inspected ({exc.strerror})"
            if problem:
                return None, problem
            checked.add(real)
        step = real / name
        try:
            st = os.lstat(step)
        except FileNotFoundError:
            return None, f"{path} does not exist"
        except OSError as exc:
            return None, f"{step} cannot be inspected ({exc.strerror})"
        if not stat.S_ISLNK(st.st_mode):
            real = step
            continue
        if st.st_uid not in owners:
            return None, (f"{step} is a symlink owned by uid {st.st_uid}, not by you (uid {os.getuid()}) or root: "
                          f"its owner can repoint it at any time")
        links += 1
        if links > _MAX_LINKS:
            return None, f"{path} follows more than {_MAX_LINKS} symlinks"
        try:
            target = Path(os.readlink(step))
        except OSError as exc:  # replaced since the lstat
            return None, f"{step} cannot be inspected ({exc.strerror})"
        if target.is_absolute():
            real = Path("/")
        pending[:0] = target.parts[1:] if target.is_absolute() else target.parts
    return real, None


def dir_problem(path: Path, owners: tuple[int, ...] | None = None) -> str | None:
    """Why the existing directory `path` must not be trusted (None: it may be). A symlink on the way (the
    user's ~/.cache -> /data/..., say) is judged by where it leads, provided it is ours or root's and sits in
    a directory the rules above trust. `owners`: the uids trusted to own it (default: us and root;
    `package_owners` for an installed binary)."""
    owners = owners or _owners()
    real, problem = _walk(path, owners)
    if problem:
        return problem
    try:
        st = os.stat(real)
    except OSError as exc:
        return f"{real} cannot be inspected ({exc.strerror})"
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a directory"
    return _mode_problem(real, st, leaf=True, owners=owners)


def file_problem(path: Path, owners: tuple[int, ...] | None = None) -> str | None:
    """Why `path` is not a regular file that only we (or root, or `owners`) can change."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        return f"{Path(path).name} missing ({exc.strerror})"
    if not stat.S_ISREG(st.st_mode):
        return f"{Path(path).name} is not a regular file (symlink or special file)"
    return _mode_problem(Path(path), st, leaf=True, owners=owners or _owners())


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
