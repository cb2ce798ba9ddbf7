"""Many loaders at once: exactly one build, everyone loads it and computes correctly, nobody hangs.

Real processes, real compiler: 8 processes (3 threads each) race on an empty cache for the real CPU
inference module; and threads of one process race on the tiny op (built with its ATen binding).
"""
from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest

from fixtures.procs import (FIXTURES, INFERENCE, TINY, Child, CxxWrapper, child_env, run_json, snapshot_repo,
                            wait_until)

N_PROCESSES = 8
THREADS_PER_PROCESS = 3


@pytest.mark.slow
def test_processes_started_together_build_once(tmp_path):
    source = snapshot_repo(tmp_path / "src")  # one source tree for all 8: a concurrent edit cannot split keys
    env = child_env(tmp_path, pythonpath=[source, FIXTURES])
    cxx = CxxWrapper.create(tmp_path / "cxx")
    env["CXX"] = str(cxx.path)
    go = tmp_path / "go"
    cmd = INFERENCE + ["--threads", str(THREADS_PER_PROCESS), "--go", str(go)]
    children = [Child(cmd, env, tmp_path / "logs", f"p{i}") for i in range(N_PROCESSES)]
    try:
        for child in children:  # everyone imported torch and waits at the start line
            wait_until(lambda: "ready" in child.stderr, 300, f"child {child.pid} to get ready", alive=child)
        go.touch()
        results = [child.wait(timeout=900) for child in children]
    finally:
        for child in children:
            child.kill()

    for r in results:
        assert r.rc == 0 and r.data and not r.data["errors"], r
    hows = Counter(r.data["how"] for r in results)
    assert hows == {"built": 1, "cached": N_PROCESSES - 1}, hows
    assert len({r.data["path"] for r in results}) == 1
    for r in results:
        assert r.data["same"], f"threads of pid {r.data['pid']} got different LoadedVariants"
        assert r.data["loaded_variants"] == ["transformer_inference[cpu]"]
        assert r.data["vector_matmul_ok"] and r.data["linear_layer_ok"], r.data

    # each source was compiled exactly once, by one process
    compiled = [c.rsplit(" -c ", 1)[1].split()[0] for c in cxx.compiles()]
    csrc = source / "csrc" / "inference"
    sources = len(list((csrc / "binding").glob("cpu_binding*.cpp")) + list((csrc / "cpu").glob("*.cpp")))
    assert len(compiled) == len(set(compiled)) == sources, compiled

    # the others waited for the builder, and said so
    builder = next(r for r in results if r.data["how"] == "built")
    waiters = [r for r in results if r.data["how"] == "cached"]
    for r in waiters:
        waiting = [line for line in r.stderr.splitlines()
                   if line.startswith("op_builder: waiting for transformer_inference[cpu] build")]
        assert len(waiting) <= 1, r.stderr  # said once; later reminders say "still waiting"
        if waiting:  # "(another process)" when it looked in the instant between flock and the holder's note
            assert f"(pid {builder.data['pid']} on " in waiting[0] or "(another process)" in waiting[0], waiting[0]
    named = [r for r in waiters if f"build (pid {builder.data['pid']} on " in r.stderr]
    assert named, "no waiter said whom it waited for: the processes did not race"
    # nothing but the entry and the lock is left
    vdir = Path(env["TORCH_EXTENSIONS_DIR"]) / "dsinf" / "transformer_inference-cpu"
    assert sorted(p.name for p in vdir.iterdir() if p.name != ".lock") == [Path(builder.data["path"]).parent.name]


@pytest.mark.slow
def test_threads_of_one_process_share_one_build(tmp_path):
    """Threads calling load at once: one build, one LoadedVariant, one library registration (the tiny op
    with its TORCH_LIBRARY binding: loading it twice in one process would raise)."""
    env = child_env(tmp_path)  # default tiny op: kernel + ATen binding
    cxx = CxxWrapper.create(tmp_path / "cxx")
    env["CXX"] = str(cxx.path)
    start = time.monotonic()
    r = run_json(TINY + ["--threads", "6"], env, timeout=600)
    assert r.rc == 0 and r.data["ok"], r
    assert r.data["how"] == "built" and r.data["same"]
    compiled = sorted(Path(c.rsplit(" -c ", 1)[1].split()[0]).name for c in cxx.compiles())
    assert compiled == ["tiny_binding.cpp", "tiny_kernel.cpp"]
    assert r.stderr.count(": building tiny_test_op[cpu]") == 1, r.stderr
    assert "waiting for" not in r.stderr, "threads of one process wait on the in-process lock, not the file lock"
    assert time.monotonic() - start < 600
