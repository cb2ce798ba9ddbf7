"""The build cache: where entries live, what names them, and what makes one trustworthy.

Layout (one directory per key, immutable once published):

    <root>/<op>-<variant>/<key>/manifest.json     what was built, from what, for what
    <root>/<op>-<variant>/<key>/<op>_<variant>.so
    <root>/<op>-<variant>/<key>/build.log
    <root>/<op>-<variant>/.lock                   the build lock (never deleted)

The key hashes everything that changes the binary (docs/DESIGN.md, build behaviour): source and included header contents,
all flags, compiler identity, torch version and C++ ABI, CUDA version and targets, CPU ISA level,
Python tag and the builder's own version. `TORCH_EXTENSIONS_DIR` is honoured as the root without
dropping any field.

A loader trusts an entry only when its directories are ones nobody else can write (`trust`, see
docs/TRUST.md), its manifest parses, names this key, names a library inside the entry, and the
library's size and SHA-256 match: a truncated or corrupted `.so` is rebuilt instead of being dlopen'ed
into a crash, and nothing another user planted is loaded. A read-only root is searched as is (no
lock, no write); only a build needs a writable root (`cache_root`).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import atomic, knobs, trust

log = logging.getLogger("op_builder")

# Bump when the build procedure changes in a way the other key fields do not capture.
BUILDER_VERSION = "1"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1

_warned: set[str] = set()
_session_root: Path | None = None  # a fresh private temp root, when nothing better was usable
_preview = threading.local()  # `previewing()`: say where things would go, create nothing


@contextlib.contextmanager
def previewing():
    """Within it, cache_root() and data_root() say where builds and tables would go without creating any
    directory (the report: a look at the machine must not change it)."""
    _preview.on = True
    try:
        yield
    finally:
        _preview.on = False


def _make_private(path: Path) -> str | None:
    """trust.ensure_private_dir, or while previewing the same answer without creating anything."""
    if not getattr(_preview, "on", False):
        return trust.ensure_private_dir(path)
    if path.is_dir():
        return trust.dir_problem(path)
    return None if _creatable(path) else f"{path} cannot be created"


def _default_root() -> Path:
    xdg = knobs.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "dsinf" / "extensions"


def configured_root() -> Path:
    """$TORCH_EXTENSIONS_DIR/dsinf, else the per-user cache dir (nothing is created or checked)."""
    env = knobs.get("TORCH_EXTENSIONS_DIR")
    return Path(env) / "dsinf" if env else _default_root()


def _fallback_roots(configured: Path) -> list[Path]:
    """Where builds go when the configured root cannot take them: the per-user cache dir (when
    TORCH_EXTENSIONS_DIR chose another root), then <tmp>/dsinf-<uid>, checked like any root: a
    directory someone else created first under that predictable name is refused."""
    roots = [_default_root()] if _default_root() != configured else []
    return roots + [Path(tempfile.gettempdir()) / f"dsinf-{os.getuid()}" / "extensions"]


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning("op_builder: %s", message)


def _creatable(path: Path) -> bool:
    """Whether `path` (absent) could be created by us: its nearest existing ancestor is a directory we can
    write into (cache_root then makes it, privately, and builds go there)."""
    parent = path
    while not parent.exists():
        if parent.parent == parent:
            return False
        parent = parent.parent
    return parent.is_dir() and os.access(parent, os.W_OK | os.X_OK)


def lookup_roots() -> list[Path]:
    """Roots whose published entries may be loaded, in order; creates and writes nothing.

    The configured root when it is trusted (a read-only one too: a cluster's shared cache), then,
    when it cannot take builds, the trusted fallbacks a previous build may have used."""
    configured = configured_root()
    roots = []
    if configured.is_dir():
        problem = trust.dir_problem(configured)
        if problem is None:
            roots.append(configured)
            if trust.writable(configured):
                return roots
        else:
            _warn_once(f"not loading anything from the cache root {configured}: {problem}")
    elif _creatable(configured):  # not made yet, but builds will make it: the fallbacks are not in play
        return [_session_root] if _session_root is not None else []
    roots += [r for r in _fallback_roots(configured) if r.is_dir() and trust.dir_problem(r) is None]
    if _session_root is not None:
        roots.append(_session_root)
    return roots


def cache_root() -> Path:
    """The root builds go to: the configured root when it is (or can be made) a private, writable
    directory; else the first fallback that is; else a fresh private temp dir for this process.
    Says once why the configured root was passed over and where builds go instead."""
    global _session_root
    configured = configured_root()
    reasons = []
    for root in [configured, *_fallback_roots(configured)]:
        problem = _make_private(root)
        if problem is None and root.is_dir() and not trust.writable(root):
            problem = f"{root} is read-only for you"
        if problem is None:
            break
        reasons.append(problem)
    else:
        if getattr(_preview, "on", False) and _session_root is None:
            return Path(tempfile.gettempdir()) / f"dsinf-{os.getuid()}-<made at the first build>" / "extensions"
        if _session_root is None:
            _session_root = Path(tempfile.mkdtemp(prefix=f"dsinf-{os.getuid()}-")) / "extensions"
            _session_root.mkdir(mode=0o700)
        root = _session_root
    if reasons:
        _warn_once(f"cannot build into the cache root {configured} ({'; '.join(reasons)}); building into {root} "
                   f"instead (set TORCH_EXTENSIONS_DIR to a directory only you can write to choose)"
                   if not knobs.get("TORCH_EXTENSIONS_DIR") else
                   f"cannot build into the cache root {configured} from TORCH_EXTENSIONS_DIR "
                   f"({'; '.join(reasons)}); building into {root} instead")
    return root


def data_root() -> Path:
    """Root for non-build caches (the route and Triton autotune tables): $DSINF_CACHE_DIR, else next to the
    JIT cache root when that directory is private to us (~/.cache/dsinf), else in the root itself: with
    TORCH_EXTENSIONS_DIR a shared sticky dir, say, its other users could plant our tables there."""
    env = knobs.get("DSINF_CACHE_DIR")
    if env:
        chosen = Path(env)
        if not os.path.lexists(chosen):
            _make_private(chosen)  # made private where it can be; where not, the writers say why
        problem = trust.dir_problem(chosen) if chosen.is_dir() else None
        if problem is None:
            return chosen
        _warn_once(f"not using DSINF_CACHE_DIR={env} for the route and autotune tables ({problem}): another user "
                   f"could plant tables there; using the default place instead")
    root = cache_root()  # made, with its parents private where they were missing (previewing: would be)
    return root.parent if _make_private(root.parent) is None else root


# ----------------------------------------------------------------------------- source hashing
_INCLUDE = re.compile(rb'^\s*#\s*include\s*(?:"([^"]+)"|<([^>]+)>)', re.M)


def source_closure(sources: list[Path], include_dirs: list[Path]) -> list[Path]:
    """Sources plus every project header they include (transitively), in a stable order.

    A quoted include counts when found in the including file's dir or `include_dirs`, an angle-bracket
    one when found in `include_dirs` (where the compiler's -I finds it first); system and torch headers
    are covered by the toolchain and torch-version fields of the key.
    """
    seen: dict[Path, None] = {}
    stack = [p.resolve() for p in sources]
    while stack:
        path = stack.pop()
        if path in seen:
            continue
        seen[path] = None
        try:
            text = path.read_bytes()
        except OSError:
            continue
        for quoted, angled in _INCLUDE.findall(text):
            rel = (quoted or angled).decode()
            for base in ([path.parent] if quoted else []) + list(include_dirs):
                candidate = (base / rel).resolve()
                if candidate.is_file():
                    stack.append(candidate)
                    break
    return sorted(seen)


def hash_files(paths: list[Path], root: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        try:
            rel = str(p.relative_to(root))
        except ValueError:
            rel = p.name
        h.update(rel.encode() + b"\0")
        h.update(p.read_bytes() + b"\0")
    return h.hexdigest()


@dataclass(frozen=True)
class BuildKey:
    """Everything that determines the binary. `digest` names the cache directory."""

    fields: tuple[tuple[str, str], ...]

    @classmethod
    def of(cls, **fields: Any) -> "BuildKey":
        return cls.from_dict(fields)

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> "BuildKey":
        """From a mapping whose keys may be any strings (a manifest's `cls` or `self` too)."""
        return cls(tuple(sorted((str(k), json.dumps(v, sort_keys=True, default=str)) for k, v in fields.items())))

    def as_dict(self) -> dict[str, Any]:
        return {k: json.loads(v) for k, v in self.fields}

    @property
    def digest(self) -> str:
        h = hashlib.sha256()
        for k, v in self.fields:
            h.update(k.encode() + b"=" + v.encode() + b"\n")
        return h.hexdigest()[:20]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(entry_dir: Path, *, op: str, variant: str, key: BuildKey, library: str,
                   build_seconds: float, kernels: tuple[str, ...] = (),
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
    lib = entry_dir / library
    manifest = {
        "format": MANIFEST_FORMAT,
        "op": op,
        "variant": variant,
        "key": key.digest,
        "key_fields": key.as_dict(),
        "library": library,
        "library_size": lib.stat().st_size,
        "library_sha256": sha256_file(lib),
        "kernels": list(kernels),
        "build_seconds": round(build_seconds, 2),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **(extra or {}),
    }
    atomic.write_json(entry_dir / MANIFEST, manifest, indent=2)
    return manifest


def read_manifest(entry_dir: Path) -> dict[str, Any] | None:
    """The manifest as a dict, or None for anything malformed (never raises; see atomic.read_json)."""
    return atomic.read_json(Path(entry_dir) / MANIFEST)[0]


def library_name_problem(name: Any) -> str | None:
    """A manifest's library must be a plain file name inside its own entry: no path, no `..`."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        return f"manifest library {name!r} is not a file name inside the entry (foreign or edited manifest)"
    return None


def entry_problem(entry_dir: Path, expected_key: str | None, *, check_hash: bool = True,
                  kernels: tuple[str, ...] | None = None, owners: tuple[int, ...] | None = None) -> str | None:
    """Why this entry must not be loaded (None when it is complete, intact and trusted).

    `kernels`: the custom ops the builder requires the library to register; the manifest must list
    exactly these (the loader then checks that they are registered). `owners`: who may own the entry and
    its path (default: us and root; an installed binary: `trust.package_owners`). Never raises."""
    try:
        return _entry_problem(Path(entry_dir), expected_key, check_hash, kernels, owners)
    except (OSError, ValueError, TypeError, RecursionError) as exc:  # a manifest of the wrong shape
        return f"manifest unusable ({type(exc).__name__}: {exc})"


def _entry_problem(entry_dir: Path, expected_key: str | None, check_hash: bool,
                   kernels: tuple[str, ...] | None, owners: tuple[int, ...] | None) -> str | None:
    if not os.path.lexists(entry_dir):
        return "not built"
    if entry_dir.is_symlink() or not entry_dir.is_dir():
        return f"{entry_dir} is not a directory"
    problem = trust.dir_problem(entry_dir, owners)
    if problem:
        return f"untrusted entry: {problem}"
    manifest, why = atomic.read_json(entry_dir / MANIFEST)
    if manifest is None:
        return f"manifest missing or unreadable: {why} (interrupted or foreign entry)"
    if manifest.get("format") != MANIFEST_FORMAT:
        return f"manifest format {manifest.get('format')!r}, expected {MANIFEST_FORMAT}"
    if expected_key is not None and manifest.get("key") != expected_key:
        return f"manifest key {manifest.get('key')} does not match {expected_key}"
    fields = manifest.get("key_fields")
    if not isinstance(fields, dict) or BuildKey.from_dict(fields).digest != manifest.get("key"):
        return "manifest key_fields do not hash to its key (edited or foreign manifest)"
    name = manifest.get("library")
    problem = library_name_problem(name)
    if problem:
        return problem
    listed = manifest.get("kernels", [])
    if not isinstance(listed, list) or not all(isinstance(k, str) for k in listed):
        return f"manifest kernels {listed!r} is not a list of op names"
    if kernels is not None and listed != list(kernels):
        return f"manifest lists kernels {manifest.get('kernels')!r}, the builder requires {list(kernels)}"
    lib = entry_dir / name
    problem = trust.file_problem(lib, owners)
    if problem:
        return f"library {problem}"
    size = lib.stat().st_size
    if size != manifest.get("library_size"):
        return f"library {name} has {size} bytes, manifest says {manifest.get('library_size')} (truncated?)"
    if check_hash and sha256_file(lib) != manifest.get("library_sha256"):
        return f"library {name} checksum differs from the manifest (corrupted)"
    return None
