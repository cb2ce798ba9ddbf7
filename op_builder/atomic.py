"""JSON files that are written atomically and read without ever raising.

Writers (cache manifests, the Triton autotune table) put the document in a fresh temp file beside the
target (O_EXCL | O_NOFOLLOW: a planted name or symlink is never written through), fsync it and
`os.replace` it over the target: a reader sees the old file or the new one, never a partial write.

Readers treat any malformed file as absent: unreadable, too large, not UTF-8, not JSON, nested deep
enough to exhaust the parser's recursion (RecursionError), or not a JSON object.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
from pathlib import Path
from typing import Any

MAX_BYTES = 16 << 20  # far above any manifest or autotune table we write


def temp_name(path: Path) -> Path:
    """A fresh temp name beside `path`; `.<name>.*.tmp` is what orphan cleanup may remove."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def remove_orphans(path: Path) -> None:
    """Remove the temp files `write_json` left beside `path` when killed between create and rename. Only
    under the lock of `path`'s writers: there, no temp file is a live write."""
    path = Path(path)
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        with contextlib.suppress(OSError):
            tmp.unlink()


def write_json(path: Path, doc: Any, *, mode: int = 0o644, indent: int | None = 1) -> None:
    """Atomically replace `path` with `doc` as JSON (temp file in the same directory, fsync, rename)."""
    path = Path(path)
    tmp = temp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=indent, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def read_json(path: Path) -> tuple[dict | None, str | None]:
    """(document, None) when `path` holds a JSON object; (None, why) for anything else, never raising.
    `why` is "missing" when there is no file. A symlink at `path` is not followed."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None, "missing"
    except OSError as exc:
        return None, "a symlink" if exc.errno == errno.ELOOP else f"unreadable ({exc.strerror})"
    try:
        with os.fdopen(fd, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except OSError as exc:
        return None, f"unreadable ({exc.strerror})"
    if len(raw) > MAX_BYTES:
        return None, f"larger than {MAX_BYTES} bytes"
    try:
        doc = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return None, "not UTF-8"
    except ValueError as exc:
        return None, f"not valid JSON ({exc})"
    except RecursionError:
        return None, "nested too deeply"
    if not isinstance(doc, dict):
        return None, "not a JSON object"
    return doc, None
