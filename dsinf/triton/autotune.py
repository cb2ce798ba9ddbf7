"""The persisted Triton autotune table: which kernel config is fastest for which problem.

Nothing here imports torch or triton, so the selection and persistence logic is testable anywhere;
the benchmark itself is injected (`tune(..., bench=...)`, like Triton's `Autotuner(do_bench=...)`).

File:   <data root>/triton/autotune.v1.json  (op_builder.cache.data_root(): $DSINF_CACHE_DIR, else beside
        the JIT cache root, e.g. ~/.cache/dsinf/triton/autotune.v1.json, or in it where that is shared)
Lock:   <same>.lock, a separate file that is never replaced or deleted (fcntl.flock on it).
Format: {"format": "dsinf-triton-autotune", "version": 1,
         "entries": {"<key text>": {"config": {...ints...}, "ms": 0.0123, "candidates": 12,
                                    "tuned_at": "2026-...Z"}}}
Config: BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, SPLIT_K, num_warps, num_stages, and two keys an entry may
        leave out: KERNEL (which matmul kernel: 0 pointer, 1 TMA one program per tile, 2 persistent TMA;
        absent means 0, so entries written before the TMA kernels stay valid) and EPILOGUE_SUBTILE
        (0/1, TMA kernels only; absent means 0). dsinf.triton.ops (CONFIG_KEYS, OPTIONAL_KEYS,
        valid_config) owns their meaning; this module stores any {str: int} config.
Key:    kernel | GPU name | triton version | kernel source hash | dtype | weight layout | M bucket | N | K,
        e.g. "matmul|NVIDIA H100 80GB HBM3|triton=3.6.0|src=1f2e3d4c5b6a|fp16|nk|M=16|N=4096|K=4096".
        N and K are exact (a model has few of them and the best tile depends on their divisibility);
        M is bucketed (`m_bucket`).

Reliability rules (DeepSpeed's autotune table, a pickle per key in
deepspeed/ops/transformer/inference/triton/matmul_ext.py, broke each of them):
- loaded lazily, on the first lookup, never at import; JSON, never pickle;
- written eagerly right after tuning, never at exit: nothing is registered with atexit;
- each write holds the lock, re-reads the file, merges (entries written meanwhile by other
  processes are kept; ours win on the keys we tuned), writes a temp file in the same directory,
  fsyncs it and `os.replace`s it over the table: readers never see a partial file and take no lock;
- the lock is op_builder.locking.FileLock (the build lock's implementation): a kernel advisory lock,
  released when its holder dies (SIGKILL included), so it cannot go stale, on a file opened without
  following symlinks and refused unless it is ours; the writer is op_builder.atomic.write_json; a temp file left by a killed writer is removed by the next writer (temps are
  only written under the lock, so any temp seen while holding it is an orphan);
- waiting for the lock is bounded (LOCK_TIMEOUT_S): on timeout the result stays in memory, pending,
  and is written with the next successful write; an unwritable cache never fails an op;
- a corrupt file (bad JSON, nested too deep, wrong format or version) is ignored with one warning and
  rewritten; a malformed entry drops that entry only (the valid ones are kept and rewritten).
"""
from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

from op_builder.atomic import read_json, remove_orphans, write_json
from op_builder.locking import FileLock

logger = logging.getLogger(__name__)

FORMAT = "dsinf-triton-autotune"
VERSION = 1
FILENAME = f"autotune.v{VERSION}.json"
LOCK_TIMEOUT_S = 30.0
CONFIRM_TOP = 3  # the fastest candidates of the first pass are timed a second time

Config = Mapping[str, int]


class AutotuneError(RuntimeError):
    """No candidate config could be benchmarked."""


def table_path() -> Path:
    """<data root>/triton/autotune.v1.json; the data root is $DSINF_CACHE_DIR, else beside the JIT
    cache (op_builder.cache.data_root, which falls back to a per-user temp dir when unwritable)."""
    from op_builder.cache import data_root

    return data_root() / "triton" / FILENAME


def summary(path: Path | None = None) -> dict[str, int]:
    """Entries of the table file per GPU and triton version ("<GPU name>|triton=<version>"), read only (no
    repair, no write: the report's view; a problem is warned once, as a lookup would); an unusable file has none."""
    entries, _ = AutotuneTable(table_path() if path is None else path)._read()
    counts: dict[str, int] = {}
    for text in entries:
        fields = text.split("|")
        where = "|".join(fields[1:3]) if len(fields) > 2 else "?"
        counts[where] = counts.get(where, 0) + 1
    return counts


# ---------------------------------------------------------------------------------------------------
# Keys and buckets


def m_bucket(m: int) -> int:
    """The M a problem of `m` rows is tuned at: the smallest ladder value >= m.

    Ladder: 1, 2, 4, 8, 16 (the decode/GEMV regime, where the best split-K depends on M's order of
    magnitude), then 24, 32, 48, 64, 96, 128, ... (powers of two and their 1.5x midpoints). Beyond
    M = 16 the best tile depends on how many tiles fill the GPU, which moves with log(M), not with
    M mod 32: geometric buckets keep the table logarithmic in max_seqlen (14 buckets up to 4096
    instead of DeepSpeed's 128 stride-32 buckets), so a full warm-up takes seconds, not minutes.
    """
    if m < 1:
        raise ValueError(f"m_bucket: m must be >= 1, got {m}")
    if m <= 16:
        return 1 << (m - 1).bit_length()
    p = 1 << (m - 1).bit_length()  # next power of two >= m
    mid = p // 2 + p // 4  # 1.5x the previous power of two
    return mid if m <= mid else p


def buckets_between(lo: int, hi: int) -> list[int]:
    """Every bucket that an M in [lo, hi] can fall into, in increasing order."""
    lo, hi = max(1, int(lo)), max(1, int(hi))
    if lo > hi:
        lo, hi = hi, lo
    out, b = [], m_bucket(lo)
    while True:
        out.append(b)
        if b >= hi:
            return out
        b = m_bucket(b + 1)


@dataclass(frozen=True)
class TuneKey:
    kernel: str  # which tuned kernel, e.g. "matmul"
    gpu: str  # torch.cuda.get_device_name(), or "triton-interpreter"
    triton: str  # triton.__version__
    source: str  # hash of the kernel source text (see ops._source_hash)
    dtype: str  # activation dtype: fp16, bf16, fp32
    layout: str  # weight layout: kn, nk or int8 (int8 weights are always [N, K])
    m: int  # m_bucket(M)
    n: int
    k: int

    @property
    def text(self) -> str:
        gpu = self.gpu.replace("|", "/")
        return (f"{self.kernel}|{gpu}|triton={self.triton}|src={self.source}|{self.dtype}|{self.layout}"
                f"|M={self.m}|N={self.n}|K={self.k}")


# ---------------------------------------------------------------------------------------------------
# Statistics (tests read them: a second process must run zero benchmarks)

_stats_lock = threading.Lock()
_STATS_ZERO = {"benchmarks_run": 0, "tunes": 0, "hits": 0, "misses": 0, "loads": 0, "writes": 0,
               "write_failures": 0}
_stats = dict(_STATS_ZERO)


def _count(name: str, n: int = 1) -> None:
    with _stats_lock:
        _stats[name] += n


def stats() -> dict[str, int]:
    """Counters of this process: benchmarks_run (candidate timings), tunes, hits, misses, loads
    (table files read for a lookup), writes, write_failures."""
    with _stats_lock:
        return dict(_stats)


# ---------------------------------------------------------------------------------------------------
# The file


def _valid_entry(entry) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("config"), dict)
            and all(isinstance(k, str) and type(v) is int for k, v in entry["config"].items()))


class _Problem(Exception):
    """The table file exists but cannot be used (message says why)."""


def _parse(doc: dict | None, why: str | None) -> tuple[dict[str, dict], str | None]:
    """(valid entries, what was wrong). A malformed entry drops that entry only; a malformed file
    (see op_builder.atomic.read_json) is an empty table. Raises _Problem when the whole file is unusable."""
    if doc is None:
        raise _Problem(why or "unreadable")
    if doc.get("format") != FORMAT:
        raise _Problem(f"not a {FORMAT} file")
    if doc.get("version") != VERSION:
        raise _Problem(f"format version {doc.get('version')!r}, this dsinf reads version {VERSION}")
    entries = doc.get("entries")
    if not isinstance(entries, dict):
        raise _Problem("'entries' is not an object")
    good = {k: v for k, v in entries.items() if _valid_entry(v)}
    bad = len(entries) - len(good)
    return good, f"{bad} malformed entries dropped" if bad else None


def _document(entries: Mapping[str, dict]) -> dict:
    return {"format": FORMAT, "version": VERSION, "entries": dict(sorted(entries.items()))}


class AutotuneTable:
    """One table file, with its in-memory copy. Thread-safe; one instance per path per process.
    `path=None`: no cache directory could be found; the table lives in memory only."""

    def __init__(self, path: Path | None):
        self.path = None if path is None else Path(path)
        self.lock_path = None if path is None else self.path.with_name(self.path.name + ".lock")
        self._mutex = threading.RLock()
        self._entries: dict[str, dict] | None = None  # None until the first lookup
        self._pending: dict[str, dict] = {}  # tuned here, not yet on disk
        self._warned: set[str] = set()

    # -- reading
    def _read(self) -> tuple[dict[str, dict], bool]:
        """(entries on disk, whether the file needs rewriting). Never raises; warns once per problem."""
        if self.path is None:
            return {}, False
        doc, why = read_json(self.path)
        if why == "missing":
            return {}, False
        try:
            entries, problem = _parse(doc, why)
        except _Problem as exc:
            self._warn_once(str(exc))
            return {}, True
        if problem:
            self._warn_once(problem)
        return entries, problem is not None

    def _warn_once(self, problem: str) -> None:
        if problem not in self._warned:
            self._warned.add(problem)
            logger.warning("dsinf: Triton autotune table %s: %s; ignored, it will be rewritten", self.path, problem)

    def _loaded(self) -> dict[str, dict]:
        with self._mutex:
            if self._entries is None:
                entries, bad = self._read()
                self._entries = entries
                _count("loads")
                if bad:  # repair now (quietly: the one warning was given by _read); valid entries are kept
                    self._write(entries, quiet=True)
            return self._entries

    def get(self, key_text: str) -> dict | None:
        return self._loaded().get(key_text)

    def __len__(self) -> int:
        return len(self._loaded())

    # -- writing
    def put(self, key_text: str, entry: dict) -> bool:
        """Record `entry` in memory and write it to disk now. False if it could not be written yet."""
        with self._mutex:
            self._loaded()[key_text] = entry
            self._pending[key_text] = entry
            return self._write(self._pending)

    def _write(self, new: Mapping[str, dict], quiet: bool = False) -> bool:
        if self.path is None:
            return False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(self.lock_path, timeout=LOCK_TIMEOUT_S, poll=0.005, max_poll=0.25,
                          holder={"what": "Triton autotune table"}):
                on_disk, _ = self._read()
                merged = {**on_disk, **new}
                remove_orphans(self.path)
                write_json(self.path, _document(merged), indent=1)
        except (OSError, TimeoutError) as exc:
            _count("write_failures")
            (logger.debug if quiet else logger.warning)("dsinf: could not write the Triton autotune table %s (%s); "
                           "the result stays in memory and is written with the next tuning", self.path, exc)
            return False
        _count("writes")
        self._pending.clear()
        # Pick up what other processes tuned meanwhile; ours are in `merged` already.
        self._entries = merged
        return True


_tables: dict[Path | None, AutotuneTable] = {}
_no_root_warned: list[bool] = []
_tables_lock = threading.Lock()
_generation = 0


def table() -> AutotuneTable:
    """The table of the current cache root (re-resolved per call so an env change is honoured).
    With no usable cache directory at all, a table that lives in memory only."""
    try:
        path = table_path()
    except OSError as exc:
        path = None
        if not _no_root_warned:
            _no_root_warned.append(True)
            logger.warning("dsinf: no cache directory for the Triton autotune table (%s): tuning results "
                           "stay in memory", exc)
    with _tables_lock:
        tab = _tables.get(path)
        if tab is None:
            tab = _tables[path] = AutotuneTable(path)
        return tab


def generation() -> int:
    """Bumped whenever a lookup could answer differently (a tuning, a reset): launchers that memoize
    configs compare it instead of re-reading the table per call."""
    return _generation


def _bump() -> None:
    global _generation
    _generation += 1


def reset() -> None:
    """Forget every in-memory table and zero the counters (tests; a process never needs it)."""
    with _tables_lock:
        _tables.clear()
    with _stats_lock:
        _stats.update(_STATS_ZERO)
    _bump()


# ---------------------------------------------------------------------------------------------------
# Lookup and tuning


def lookup(key: TuneKey) -> dict | None:
    """The recorded config for `key`, or None. Loads the table on first use."""
    entry = table().get(key.text)
    _count("hits" if entry is not None else "misses")
    return dict(entry["config"]) if entry is not None else None


def record(key: TuneKey, config: Config, ms: float, candidates: int = 0) -> bool:
    """Store `config` as the best for `key` and write the table now (True if it reached the disk)."""
    entry = {"config": {k: int(v) for k, v in config.items()},
             "ms": round(float(ms), 6) if math.isfinite(ms) else None,
             "candidates": int(candidates),
             "tuned_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    ok = table().put(key.text, entry)
    _bump()
    return ok


def tune(key: TuneKey, candidates: Sequence[Config], bench: Callable[[Config], float], *,
         force: bool = False, confirm: int = CONFIRM_TOP) -> dict:
    """Best config for `key`: the recorded one, else the fastest of `candidates` by `bench(config)`
    (milliseconds, lower wins), recorded at once.

    Every candidate is timed once; the `confirm` fastest are timed again and ranked by the mean of
    their two times (then by the first time, then by order): on a GPU whose clocks drift during a
    sweep, one pass can crown a config that is slower on a second look. A candidate whose benchmark
    raises (e.g. out of shared memory) or returns a non-finite time is skipped. `force` re-tunes even
    when the key is recorded."""
    if not force:
        hit = lookup(key)
        if hit is not None:
            return hit
    if not candidates:
        raise AutotuneError(f"no candidate configs for {key.text}")
    _count("tunes")
    errors: list[str] = []

    def timed(cfg) -> float:
        _count("benchmarks_run")
        try:
            ms = float(bench(cfg))
        except Exception as exc:  # a config that cannot run here is not a failure of the tuning
            errors.append(f"{dict(cfg)}: {type(exc).__name__}: {exc}")
            logger.debug("dsinf: autotune candidate %s failed for %s: %s", dict(cfg), key.text, exc)
            return math.inf
        return ms if math.isfinite(ms) else math.inf

    first = [(timed(cfg), i) for i, cfg in enumerate(candidates)]
    ranked = sorted((t, i) for t, i in first if t < math.inf)
    if not ranked:
        raise AutotuneError(f"no candidate config could be benchmarked for {key.text}: " + "; ".join(errors[:3]))
    if confirm > 1 and len(ranked) > 1:
        finals = [((t + timed(candidates[i])) / 2, t, i) for t, i in ranked[:confirm]]
        best_ms, _, best_i = min(finals)
    else:
        best_ms, best_i = ranked[0]
    best = dict(candidates[best_i])
    record(key, best, best_ms, len(candidates))
    logger.info("dsinf: tuned %s -> %s (%.4f ms)", key.text, best, best_ms)
    return best
