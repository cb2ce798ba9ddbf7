"""dsinf.triton.autotune: the persisted autotune table (no GPU, no triton needed).

The benchmark is injected (`tune(key, candidates, bench)`), so selection and persistence run anywhere.
Multi-process behaviour is tested with real processes (subprocess), never with threads standing in.
Every test points DSINF_CACHE_DIR at its own tmp_path: the real cache is never touched.
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

from dsinf.triton import autotune
from op_builder import atomic
from op_builder.locking import FileLock

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DSINF_CACHE_DIR", str(tmp_path))
    autotune.reset()
    yield tmp_path
    autotune.reset()


def key(m=16, **over) -> autotune.TuneKey:
    fields = dict(kernel="matmul", gpu="NVIDIA Test GPU", triton="3.6.0", source="0123456789ab", dtype="fp16",
                  layout="nk", m=m, n=4096, k=4096)
    fields.update(over)
    return autotune.TuneKey(**fields)


CFG_A = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 256, "GROUP_M": 8, "SPLIT_K": 1, "num_warps": 4, "num_stages": 3}
CFG_B = dict(CFG_A, SPLIT_K=2)
CFG_C = dict(CFG_A, BLOCK_N=64)


def read_doc(path: Path) -> dict:
    return json.loads(path.read_text())


def run_child(code: str, cache: Path, timeout: float = 120, **popen) -> subprocess.CompletedProcess:
    env = dict(os.environ, DSINF_CACHE_DIR=str(cache), PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=str(REPO), **popen)


CHILD_PRELUDE = """
import json, sys
from dsinf.triton import autotune
from op_builder import atomic
from op_builder.locking import FileLock
def key(m=16, **over):
    f = dict(kernel="matmul", gpu="NVIDIA Test GPU", triton="3.6.0", source="0123456789ab", dtype="fp16",
             layout="nk", m=m, n=4096, k=4096)
    f.update(over)
    return autotune.TuneKey(**f)
CFG_A = %r
CFG_B = %r
CFG_C = %r
""" % (CFG_A, CFG_B, CFG_C)


# --------------------------------------------------------------------------------------------------
# Buckets and keys


def test_m_bucket_ladder():
    expected = {1: 1, 2: 2, 3: 4, 4: 4, 5: 8, 9: 16, 16: 16, 17: 24, 24: 24, 25: 32, 33: 48, 49: 64,
                65: 96, 97: 128, 129: 192, 2047: 2048, 2048: 2048, 2049: 3072, 3073: 4096}
    assert {m: autotune.m_bucket(m) for m in expected} == expected
    for m in range(1, 5000):  # every M lands in a bucket >= M, and buckets are monotone
        b = autotune.m_bucket(m)
        assert b >= m and autotune.m_bucket(b) == b and b >= autotune.m_bucket(m - 1 or 1)
    with pytest.raises(ValueError):
        autotune.m_bucket(0)


def test_buckets_between_covers_the_range():
    assert autotune.buckets_between(1, 16) == [1, 2, 4, 8, 16]
    assert autotune.buckets_between(20, 70) == [24, 32, 48, 64, 96]
    assert autotune.buckets_between(5, 5) == [8]
    full = autotune.buckets_between(1, 4096)
    assert len(full) == 21 and full[-1] == 4096
    assert {autotune.m_bucket(m) for m in range(1, 4097)} == set(full)


def test_key_text_has_every_field_and_distinguishes_them():
    base = key()
    text = base.text
    for part in ("matmul", "NVIDIA Test GPU", "triton=3.6.0", "src=0123456789ab", "fp16", "nk", "M=16", "N=4096",
                 "K=4096"):
        assert part in text
    variants = [key(gpu="NVIDIA H100 80GB HBM3"), key(triton="3.5.1"), key(source="ffffffffffff"), key(dtype="bf16"),
                key(layout="kn"), key(layout="int8"), key(m=8), key(n=12288), key(k=11008), key(kernel="other")]
    texts = {v.text for v in variants} | {text}
    assert len(texts) == len(variants) + 1
    assert "|" not in key(gpu="weird|gpu").text.split("|")[1]  # a separator in a GPU name cannot shift fields


# --------------------------------------------------------------------------------------------------
# Selection


def test_tune_picks_fastest_records_and_reuses(cache_dir):
    timings = [(CFG_A, 0.30), (CFG_B, 0.10), (CFG_C, 0.20)]
    calls = []

    def bench(cfg):
        calls.append(dict(cfg))
        return next(t for c, t in timings if c == cfg)

    best = autotune.tune(key(), [c for c, _ in timings], bench)
    assert best == CFG_B and len(calls) == 3 + autotune.CONFIRM_TOP  # one pass, then the top 3 again
    assert calls[3:] == [CFG_B, CFG_C, CFG_A]  # confirmed fastest first
    assert autotune.stats()["benchmarks_run"] == 6
    entry = read_doc(autotune.table_path())["entries"][key().text]
    assert entry["config"] == CFG_B and entry["ms"] == pytest.approx(0.10) and entry["candidates"] == 3

    # recorded: no more benchmarks for the same key, in memory or from a fresh load of the file
    assert autotune.tune(key(), [CFG_A], bench) == CFG_B
    autotune.reset()
    assert autotune.tune(key(), [CFG_A], bench) == CFG_B
    assert autotune.stats()["benchmarks_run"] == 0 and len(calls) == 6
    # force re-tunes
    assert autotune.tune(key(), [CFG_A, CFG_C], bench, force=True) == CFG_C


def test_confirmation_round_overrules_a_lucky_first_pass():
    seen = {}

    def bench(cfg):  # A looks fastest once (clocks drifting, say), then shows its real time
        n = seen[cfg["BLOCK_N"]] = seen.get(cfg["BLOCK_N"], 0) + 1
        return {32: (0.10, 0.50), 64: (0.20, 0.21)}[cfg["BLOCK_N"]][n - 1]

    assert autotune.tune(key(), [CFG_A, CFG_C], bench) == CFG_C
    assert autotune.stats()["benchmarks_run"] == 4
    assert autotune.tune(key(m=2), [CFG_A, CFG_C], lambda c: 1.0, confirm=1) == CFG_A  # no second look
    assert autotune.stats()["benchmarks_run"] == 6


def test_tune_skips_failing_candidates_ties_keep_first_and_all_failing_raises():
    def bench(cfg):
        if cfg is CFG_A:
            raise RuntimeError("out of shared memory")
        return 1.0

    assert autotune.tune(key(m=1), [CFG_A, CFG_B, CFG_C], bench) == CFG_B  # B and C tie: B came first
    assert autotune.tune(key(m=2), [CFG_A, CFG_B], lambda c: float("nan") if c is CFG_B else 2.0) == CFG_A
    with pytest.raises(autotune.AutotuneError, match="out of shared memory"):
        autotune.tune(key(m=4), [CFG_A], bench)
    with pytest.raises(autotune.AutotuneError):
        autotune.tune(key(m=8), [], bench)
    assert autotune.lookup(key(m=4)) is None


# --------------------------------------------------------------------------------------------------
# Loading: lazily, once


def test_table_is_loaded_lazily_once(cache_dir):
    path = autotune.table_path()
    assert path == cache_dir / "triton" / autotune.FILENAME
    autotune.record(key(), CFG_A, 0.1)
    autotune.reset()
    tab = autotune.table()
    assert autotune.stats()["loads"] == 0  # getting the table object reads nothing
    assert autotune.lookup(key()) == CFG_A and autotune.lookup(key(m=8)) is None
    assert autotune.stats()["loads"] == 1 and tab is autotune.table()
    autotune.lookup(key())
    assert autotune.stats()["loads"] == 1


def test_import_reads_and_writes_nothing_and_imports_no_triton(cache_dir):
    path = cache_dir / "triton" / autotune.FILENAME
    path.parent.mkdir(parents=True)
    path.write_text("{garbage")
    before = path.stat().st_mtime_ns
    proc = run_child("""
        import sys, logging
        logging.basicConfig(level=logging.DEBUG)
        import torch
        import dsinf.triton, dsinf.triton.autotune
        print("supports:", dsinf.triton.supports(torch.float16, "cuda"), dsinf.triton.available())
        print("triton imported:", "triton" in sys.modules)
    """, cache_dir)
    assert proc.returncode == 0, proc.stderr
    assert "triton imported: False" in proc.stdout
    assert "ignoring" not in proc.stderr  # the corrupt table was not even read
    assert path.read_text() == "{garbage" and path.stat().st_mtime_ns == before


# --------------------------------------------------------------------------------------------------
# Writing: format, merge, atomicity


def test_file_format(cache_dir):
    autotune.record(key(), CFG_A, 0.0123, candidates=7)
    doc = read_doc(autotune.table_path())
    assert doc["format"] == autotune.FORMAT and doc["version"] == autotune.VERSION
    entry = doc["entries"][key().text]
    assert entry["config"] == CFG_A and entry["candidates"] == 7 and entry["tuned_at"].endswith("Z")
    assert not list(autotune.table_path().parent.glob("*.tmp"))


def test_merge_keeps_entries_written_meanwhile_by_another_writer(cache_dir):
    path = autotune.table_path()
    a = autotune.AutotuneTable(path)  # two tables on one file stand for two processes
    b = autotune.AutotuneTable(path)
    assert a.get("x") is None and b.get("y") is None  # both loaded (empty) before either writes
    assert a.put(key(m=1).text, {"config": CFG_A})
    assert b.put(key(m=2).text, {"config": CFG_B})  # b never saw a's entry in memory
    entries = read_doc(path)["entries"]
    assert entries[key(m=1).text]["config"] == CFG_A and entries[key(m=2).text]["config"] == CFG_B
    assert b.get(key(m=1).text)["config"] == CFG_A  # and b picked it up while merging
    # a re-tune of an existing key replaces it; other keys stay
    assert a.put(key(m=2).text, {"config": CFG_C})
    entries = read_doc(path)["entries"]
    assert entries[key(m=2).text]["config"] == CFG_C and key(m=1).text in entries


def test_failed_write_leaves_the_old_file_and_no_temp(cache_dir, monkeypatch):
    autotune.record(key(m=1), CFG_A, 0.1)
    path = autotune.table_path()
    before = path.read_bytes()

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "replace", broken_replace)
    assert autotune.record(key(m=2), CFG_B, 0.1) is False
    assert path.read_bytes() == before
    assert not list(path.parent.glob("*.tmp"))
    assert autotune.lookup(key(m=2)) == CFG_B  # still served from memory
    assert autotune.stats()["write_failures"] == 1
    monkeypatch.undo()
    monkeypatch.setenv("DSINF_CACHE_DIR", str(cache_dir))
    autotune.record(key(m=4), CFG_C, 0.1)  # the pending entry is written with the next one
    assert set(read_doc(path)["entries"]) == {key(m=1).text, key(m=2).text, key(m=4).text}


def test_unwritable_cache_never_raises(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("DSINF_CACHE_DIR", str(blocker))
    with caplog.at_level(logging.WARNING, logger=autotune.logger.name):
        assert autotune.record(key(), CFG_A, 0.1) is False
    assert autotune.lookup(key()) == CFG_A
    assert any("could not write" in r.getMessage() for r in caplog.records)


def test_no_cache_directory_at_all_keeps_results_in_memory(monkeypatch, caplog):
    def no_root():
        raise OSError("neither /a nor /b is writable")

    monkeypatch.setattr(autotune, "table_path", no_root)
    with caplog.at_level(logging.WARNING, logger=autotune.logger.name):
        assert autotune.lookup(key()) is None
        assert autotune.record(key(), CFG_A, 0.1) is False
        assert autotune.lookup(key()) == CFG_A
    assert [r.getMessage() for r in caplog.records if "no cache directory" in r.getMessage()] != []


def test_lock_wait_is_bounded_and_pending_entries_are_written_later(cache_dir, monkeypatch, caplog):
    monkeypatch.setattr(autotune, "LOCK_TIMEOUT_S", 0.3)
    autotune.record(key(m=1), CFG_A, 0.1)
    lock = autotune.table().lock_path
    with FileLock(lock, timeout=1.0):  # another holder (a separate fd conflicts even in-process)
        t0 = time.monotonic()
        with caplog.at_level(logging.WARNING, logger=autotune.logger.name):
            assert autotune.record(key(m=2), CFG_B, 0.1) is False
        assert time.monotonic() - t0 < 5
    assert any("still held" in r.getMessage() for r in caplog.records)
    assert autotune.lookup(key(m=2)) == CFG_B
    assert autotune.record(key(m=4), CFG_C, 0.1) is True
    assert set(read_doc(autotune.table_path())["entries"]) == {key(m=1).text, key(m=2).text, key(m=4).text}


# --------------------------------------------------------------------------------------------------
# Corruption: one warning, ignored, rewritten


@pytest.mark.parametrize("content, problem", [
    ("{not json", "not valid JSON"),
    ("", "not valid JSON"),
    ('["a list"]', "not a JSON object"),
    ('{"format": "other"}', "not a dsinf-triton-autotune file"),
    ('{"format": "dsinf-triton-autotune", "version": 999, "entries": {}}', "format version 999"),
    ('{"format": "dsinf-triton-autotune", "version": 1, "entries": {"k": {"config": {"BLOCK_M": "16"}}}}',
     "malformed entries"),
    (b"\xff\xfe\x00garbage", "not UTF-8"),
    ("[" * 100000 + "]" * 100000, "nested too deeply"),
    ('{"format": "dsinf-triton-autotune", "version": 1, "entries": ' + "[" * 100000 + "]" * 100000 + "}",
     "nested too deeply"),
])
def test_corrupt_or_foreign_file_warns_once_and_is_rewritten(cache_dir, caplog, content, problem):
    path = autotune.table_path()
    path.parent.mkdir(parents=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with caplog.at_level(logging.WARNING, logger=autotune.logger.name):
        assert autotune.lookup(key()) is None
        assert autotune.lookup(key(m=2)) is None
        autotune.record(key(), CFG_A, 0.1)  # the write re-reads the file under the lock: no new warning
        assert autotune.lookup(key()) == CFG_A
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert problem in warnings[0] and str(path) in warnings[0]
    doc = read_doc(path)
    assert doc["version"] == autotune.VERSION and doc["entries"][key().text]["config"] == CFG_A


def test_a_malformed_entry_drops_that_entry_only(cache_dir, caplog):
    """One bad entry (a string where an int belongs, a list for a config, a number for an entry) must
    not wipe the valid ones: they are still served, and the repaired file keeps them."""
    path = autotune.table_path()
    path.parent.mkdir(parents=True)
    good = {"config": CFG_A, "ms": 0.1}
    path.write_text(json.dumps({"format": autotune.FORMAT, "version": autotune.VERSION, "entries": {
        key(m=1).text: good, key(m=2).text: {"config": {"BLOCK_M": "16"}}, key(m=4).text: {"config": [1]},
        key(m=8).text: 7, key(m=16).text: good}}))
    with caplog.at_level(logging.WARNING, logger=autotune.logger.name):
        assert autotune.lookup(key(m=1)) == CFG_A and autotune.lookup(key(m=16)) == CFG_A
        assert autotune.lookup(key(m=2)) is None and autotune.lookup(key(m=8)) is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "3 malformed entries dropped" in warnings[0], warnings
    assert set(read_doc(path)["entries"]) == {key(m=1).text, key(m=16).text}  # repaired, valid ones kept


def test_table_lock_symlink_is_refused_and_its_target_untouched(cache_dir, tmp_path, caplog):
    """A `.lock` planted as a symlink to a file of the user's must not be followed (it was truncated)."""
    victim = tmp_path / "bashrc"
    victim.write_text("export PATH=precious\n")
    path = autotune.table_path()
    path.parent.mkdir(parents=True)
    os.symlink(victim, path.with_name(path.name + ".lock"))
    with caplog.at_level(logging.WARNING, logger=autotune.logger.name):
        assert autotune.record(key(), CFG_A, 0.1) is False  # not written, but the op goes on
    assert autotune.lookup(key()) == CFG_A  # kept in memory
    assert victim.read_text() == "export PATH=precious\n"
    assert any("symlink" in r.getMessage() for r in caplog.records)


def test_corrupt_file_is_repaired_on_load_even_without_tuning(cache_dir):
    path = autotune.table_path()
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    assert autotune.lookup(key()) is None
    assert read_doc(path) == {"format": autotune.FORMAT, "version": autotune.VERSION, "entries": {}}


# --------------------------------------------------------------------------------------------------
# Real processes


def test_six_concurrent_writer_processes_lose_nothing(cache_dir):
    go = cache_dir / "go"
    code = CHILD_PRELUDE + """
import os, time
wid = int(sys.argv[1])
while not os.path.exists(%r):
    time.sleep(0.005)
for i in range(5):
    ok = autotune.record(key(m=1 << i, n=1000 + wid), dict(CFG_A, BLOCK_N=16 << (wid %% 3)), 0.01 * i)
    assert ok
print("done", wid)
""" % str(go)
    env = dict(os.environ, DSINF_CACHE_DIR=str(cache_dir), PYTHONPATH=str(REPO))
    procs = [subprocess.Popen([sys.executable, "-c", code, str(w)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for w in range(6)]
    time.sleep(0.5)  # let them all start and wait at the barrier
    go.write_text("go")
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    doc = read_doc(autotune.table_path())
    expected = {key(m=1 << i, n=1000 + w).text for w in range(6) for i in range(5)}
    assert set(doc["entries"]) == expected
    for w in range(6):
        assert doc["entries"][key(m=1, n=1000 + w).text]["config"]["BLOCK_N"] == 16 << (w % 3)
    assert not list(autotune.table_path().parent.glob("*.tmp"))


def test_writer_killed_mid_write_corrupts_nothing_and_blocks_nobody(cache_dir):
    autotune.record(key(m=1), CFG_A, 0.1)
    path = autotune.table_path()
    before = path.read_bytes()
    # The child writes its temp file, then hangs (holding the lock) where it would os.replace it.
    code = CHILD_PRELUDE + """
import os, time
def hang(src, dst):
    print("HOLDING", src, flush=True)
    time.sleep(600)
os.replace = hang
autotune.record(key(m=2), CFG_B, 0.1)
"""
    env = dict(os.environ, DSINF_CACHE_DIR=str(cache_dir), PYTHONPATH=str(REPO))
    child = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        line = child.stdout.readline()
        assert line.startswith("HOLDING"), child.stderr.read()
        orphan = Path(line.split(None, 1)[1].strip())
        assert orphan.exists() and orphan.parent == path.parent
        # while it holds the lock, a writer here waits (bounded) ...
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            with FileLock(path.with_name(path.name + ".lock"), timeout=0.3):
                pass
        assert time.monotonic() - t0 < 5
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert path.read_bytes() == before  # the table is the old one, whole
    assert orphan.exists()  # the killed writer's temp is still there ...
    t0 = time.monotonic()
    assert autotune.record(key(m=4), CFG_C, 0.1) is True  # ... the lock is not stale ...
    assert time.monotonic() - t0 < 5
    assert not orphan.exists()  # ... and the next writer removed the orphan
    entries = read_doc(path)["entries"]
    assert set(entries) == {key(m=1).text, key(m=4).text}


def test_second_process_reuses_the_table_without_benchmarking(cache_dir):
    code = CHILD_PRELUDE + """
mode = sys.argv[1]
def bench(cfg):
    if mode == "second":
        raise AssertionError("the second process must not benchmark")
    return {16: 0.3, 32: 0.1, 64: 0.2}[cfg["BLOCK_N"]]
chosen = [autotune.tune(key(m=m), [CFG_A, CFG_C, dict(CFG_A, BLOCK_N=32)], bench) for m in (1, 16, 64)]
print(json.dumps({"chosen": chosen, "stats": autotune.stats()}))
"""
    results = []
    for mode in ("first", "second"):
        proc = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, timeout=120,
                              env=dict(os.environ, DSINF_CACHE_DIR=str(cache_dir), PYTHONPATH=str(REPO)))
        assert proc.returncode == 0, proc.stderr
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    first, second = results
    assert first["stats"]["benchmarks_run"] == 3 * (3 + 3) and first["stats"]["writes"] == 3  # 3 keys, 3 + 3 timings
    assert second["stats"]["benchmarks_run"] == 0 and second["stats"]["writes"] == 0
    assert second["stats"]["hits"] == 3 and second["stats"]["loads"] == 1
    assert second["chosen"] == first["chosen"] and all(c["BLOCK_N"] == 32 for c in first["chosen"])


def test_nothing_is_written_at_exit(cache_dir):
    autotune.record(key(m=1), CFG_A, 0.1)
    path = autotune.table_path()
    code = CHILD_PRELUDE + """
import atexit, os
n0 = atexit._ncallbacks()
assert autotune.lookup(key(m=1)) == CFG_A
autotune.record(key(m=2), CFG_B, 0.1)
autotune.lookup(key(m=2))
st = os.stat(autotune.table_path())
print(json.dumps({"atexit_added": atexit._ncallbacks() - n0, "ino": st.st_ino, "mtime": st.st_mtime_ns,
                  "bytes": open(autotune.table_path()).read()}))
"""
    proc = run_child(code, cache_dir)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["atexit_added"] == 0
    st = path.stat()
    assert (st.st_ino, st.st_mtime_ns) == (seen["ino"], seen["mtime"])  # untouched after the child's last write
    assert path.read_text() == seen["bytes"]
