"""The build cache: where entries live, what names them, and what makes one trustworthy.

Layout (one directory per key, immutable once published):

    <root>/<op>-<variant>/<key>/manifest.json     what was built, from what, for what
    <root>/<op>-<variant>/<key>/<op>_<variant>.so
    <root>/<op>-<variant>/<key>/build.log
    <root>/<op>-<variant>/.lock                   the build lock (never deleted)

The key hashes everything that changes the binary (DESIGN §5): source and included header contents,
all flags, compiler identity, torch version and C++ ABI, CUDA version and targets, CPU ISA level,
Python tag and the builder's own version. `TORCH_EXTENSIONS_DIR` is honoured as the root without
dropping any field.

A loader trusts an entry only when its manifest parses, names this key, and the library's size and
SHA-256 match: a truncated or corrupted `.so` is rebuilt instead of being dlopen'ed into a crash.
"""
from __future__ import annotations

import getpass
import hashlib
import json
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import knobs

log = logging.getLogger("op_builder")

# Bump when the build procedure changes in a way the other key fields do not capture.
BUILDER_VERSION = "1"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1

_warned_fallback = False


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return str(os.getuid())


def _default_root() -> Path:
    xdg = knobs.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "dsinf" / "extensions"


def _writable(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".probe-", delete=True)
        probe.close()
        return True
    except OSError:
        return False


def cache_root() -> Path:
    """The JIT cache root: $TORCH_EXTENSIONS_DIR/dsinf, else the per-user cache dir.

    A read-only or unwritable root (a shared /tmp/torch_extensions owned by someone else, a read-only
    venv) falls back to a per-user temp dir, with one warning per process.
    """
    global _warned_fallback
    env = knobs.get("TORCH_EXTENSIONS_DIR")
    root = Path(env) / "dsinf" if env else _default_root()
    if _writable(root):
        return root
    fallback = Path(tempfile.gettempdir()) / f"dsinf-{_user()}" / "extensions"
    if not _writable(fallback):
        raise OSError(f"neither {root} nor {fallback} is writable: set TORCH_EXTENSIONS_DIR to a writable directory")
    if not _warned_fallback:
        log.warning("op_builder: cache root %s is not writable; using %s instead (set TORCH_EXTENSIONS_DIR "
                    "to choose)", root, fallback)
        _warned_fallback = True
    return fallback


def data_root() -> Path:
    """Root for non-build caches (the Triton autotune table): $DSINF_CACHE_DIR, else next to the JIT cache."""
    env = knobs.get("DSINF_CACHE_DIR")
    if env:
        return Path(env)
    return cache_root().parent


# ----------------------------------------------------------------------------- source hashing
_INCLUDE = re.compile(rb'^\s*#\s*include\s*"([^"]+)"', re.M)


def source_closure(sources: list[Path], include_dirs: list[Path]) -> list[Path]:
    """Sources plus every project header they include (transitively), in a stable order.

    Only quoted includes found in the source's own dir or `include_dirs` count; system and torch
    headers are covered by the toolchain and torch-version fields of the key.
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
        for name in _INCLUDE.findall(text):
            rel = name.decode()
            for base in [path.parent, *include_dirs]:
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
        return cls(tuple(sorted((k, json.dumps(v, sort_keys=True, default=str)) for k, v in fields.items())))

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
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(entry_dir: Path, *, op: str, variant: str, key: BuildKey, library: str,
                   build_seconds: float, extra: dict[str, Any] | None = None) -> dict[str, Any]:
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
        "build_seconds": round(build_seconds, 2),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **(extra or {}),
    }
    tmp = entry_dir / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, entry_dir / MANIFEST)
    return manifest


def read_manifest(entry_dir: Path) -> dict[str, Any] | None:
    try:
        with open(entry_dir / MANIFEST) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def entry_problem(entry_dir: Path, expected_key: str | None, *, check_hash: bool = True) -> str | None:
    """Why this entry must not be loaded (None when it is complete and intact)."""
    if not entry_dir.is_dir():
        return "not built"
    manifest = read_manifest(entry_dir)
    if manifest is None:
        return "manifest missing or unreadable (interrupted or foreign entry)"
    if manifest.get("format") != MANIFEST_FORMAT:
        return f"manifest format {manifest.get('format')!r}, expected {MANIFEST_FORMAT}"
    if expected_key is not None and manifest.get("key") != expected_key:
        return f"manifest key {manifest.get('key')} does not match {expected_key}"
    fields = manifest.get("key_fields")
    if not isinstance(fields, dict) or BuildKey.of(**fields).digest != manifest.get("key"):
        return "manifest key_fields do not hash to its key (edited or foreign manifest)"
    lib = entry_dir / str(manifest.get("library", ""))
    if not lib.is_file():
        return f"library {lib.name} missing"
    if lib.stat().st_size != manifest.get("library_size"):
        return f"library {lib.name} has {lib.stat().st_size} bytes, manifest says {manifest.get('library_size')} (truncated?)"
    if check_hash and sha256_file(lib) != manifest.get("library_sha256"):
        return f"library {lib.name} checksum differs from the manifest (corrupted)"
    return None
