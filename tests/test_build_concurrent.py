"""OpBuilder.load_variants: the builds several variants need run at once, with real compilers and ninja.

A two-variant copy of the tiny test op (kernel-only: a plain C library, so it can be loaded in this
process) builds both variants through `load_variants`. A `CXX` wrapper holds every compile at a gate
until both variants' compiles have started: one build after the other would never get there (the test
would time out), so passing proves the builds overlap. The job budget is split between them, a build with
threaded compile jobs runs at a lower priority beside one without (as its worker saw it: the build log), and
a failed build raises its own variant's BuildError while the other variant is still published.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import threading
import uuid
from pathlib import Path

import pytest

from fixtures.procs import FIXTURES, CxxWrapper, wait_until
from fixtures.tiny_op.builder import TinyBuilder
from op_builder import build as build_mod
from op_builder import builder as builder_module
from op_builder.build import SHARED_CORES_NICE, BuildSpec, job_shares, niceness_increments
from op_builder.builder import loaded_variants
from op_builder.compat import Decision
from op_builder.errors import BuildError

TIMEOUT = 120  # seconds for two tiny builds on a very busy box


class TwoVariantTiny(TinyBuilder):
    """The kernel-only tiny op as variants "a" and "b" (each from its own copy of the sources)."""

    VARIANTS = ("a", "b")

    def __init__(self, sources: dict[str, Path], threads_per_job: dict[str, int] | None = None):
        super().__init__(binding=False)
        self.NAME = f"tiny_two_{uuid.uuid4().hex[:8]}"  # fresh per test: load_variant memoises per name
        self.sources = sources
        self.threads_per_job = threads_per_job or {}

    def compatible(self, variant: str) -> Decision:
        return super().compatible("cpu")

    def spec(self, variant: str, *, portable: bool = False) -> BuildSpec:
        self.src_dir = self.sources[variant]
        spec = super().spec(variant, portable=portable)
        return dataclasses.replace(spec, threads_per_job=self.threads_per_job.get(variant, 1))


@pytest.fixture
def sources(tmp_path) -> dict[str, Path]:
    out = {}
    for variant in TwoVariantTiny.VARIANTS:
        out[variant] = tmp_path / f"src-{variant}"
        shutil.copytree(FIXTURES / "tiny_op", out[variant], ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    return out


@pytest.fixture
def private_cache(session_cache_dir, monkeypatch):
    """A fresh cache root inside the session's cache; the test ops it loads are forgotten afterwards (they
    are no op of the registry, which the suite's check of loaded binaries looks them up in)."""
    root = Path(session_cache_dir) / f"two-variants-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(root))
    monkeypatch.setenv("DSINF_NO_PREBUILT", "1")
    monkeypatch.setenv("MAX_JOBS", "4")
    monkeypatch.delenv("DSINF_CONCURRENT_BUILDS", raising=False)
    yield root
    for key in [k for k in builder_module._loaded if k[0].startswith("tiny_two_")]:
        del builder_module._loaded[key]


def _load_in_thread(builder: TwoVariantTiny) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def run():
        try:
            result["loaded"] = builder.load_variants(["a", "b"])
        except BaseException as exc:  # noqa: BLE001 - inspected by the test
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def _compiling(cxx: CxxWrapper, library_name: str) -> bool:
    return any(f"-DTORCH_EXTENSION_NAME={library_name} " in c for c in cxx.compiles())


def test_two_variants_build_at_once_with_the_jobs_split(sources, private_cache, tmp_path, monkeypatch):
    cxx = CxxWrapper.create(tmp_path / "cxx")
    monkeypatch.setenv("CXX", str(cxx.path))
    builder = TwoVariantTiny(sources)
    cxx.hold()
    thread, result = _load_in_thread(builder)
    try:
        # Both variants' compiles are waiting at the gate at the same time: the builds overlap.
        wait_until(lambda: "error" in result or all(_compiling(cxx, f"{builder.NAME}_{v}") for v in ("a", "b")),
                   timeout=TIMEOUT, what="compiles of both variants while the gate is held")
    finally:
        cxx.release()
    thread.join(TIMEOUT)
    assert not thread.is_alive() and "error" not in result, result
    loaded = result["loaded"]
    assert [(lv.variant, lv.how) for lv in loaded] == [("a", "built"), ("b", "built")]
    for lv in loaded:
        assert loaded_variants()[(builder.NAME, lv.variant)] is lv
        log = (lv.path.parent / "build.log").read_text()
        assert "# MAX_JOBS=2\n" in log, log[:200]  # MAX_JOBS=4 split between two one-source builds
        assert "# ninja -j 2\n" in log, log[:400]  # ... and what each build's ninja was given


def _niceness(lv) -> int:
    """The niceness the variant's build worker (and so its compilers) ran at, from its build log."""
    log = (lv.path.parent / "build.log").read_text()
    lines = [line for line in log.splitlines() if line.startswith("# niceness ")]
    assert len(lines) == 1, log[:400]
    return int(lines[0].split()[-1])


@pytest.mark.parametrize("concurrent", [True, False])
def test_a_threaded_build_runs_lower_beside_a_one_thread_build(sources, private_cache, monkeypatch, concurrent):
    # b's compile jobs are threaded (as nvcc --split-compile's are): beside a, whose are not, it runs at
    # SHARED_CORES_NICE more than a does; built one after the other, each runs at the caller's priority.
    monkeypatch.setenv("DSINF_CONCURRENT_BUILDS", "1" if concurrent else "0")
    base = os.nice(0)
    loaded = TwoVariantTiny(sources, threads_per_job={"b": 8}).load_variants(["a", "b"])
    assert [lv.how for lv in loaded] == ["built", "built"]
    want_b = min(19, base + SHARED_CORES_NICE) if concurrent else base
    assert [_niceness(lv) for lv in loaded] == [base, want_b]


@pytest.mark.parametrize("threads, want", [
    ((1, 16), [0, SHARED_CORES_NICE]),  # cpu beside cuda with nvcc --split-compile on 16 cores
    ((16, 1), [SHARED_CORES_NICE, 0]),
    ((1, 1), [0, 0]),
    ((4, 16), [0, 0]),  # all threaded: none lower than another
    ((1, 2, 1), [0, SHARED_CORES_NICE, 0]),
])
def test_niceness_increments(threads, want):
    specs = [BuildSpec(op="x", variant=str(i), library_name="x", sources=("s",), include_dirs=(), cflags=(),
                       threads_per_job=n) for i, n in enumerate(threads)]
    assert niceness_increments(specs) == want


def test_a_failed_build_raises_its_own_error_and_the_other_is_published(sources, private_cache):
    kernel = sources["b"] / "tiny_kernel.cpp"
    kernel.write_text(kernel.read_text().replace("x[i] * s", "x[i] * not_declared_here"))
    builder = TwoVariantTiny(sources)
    with pytest.raises(BuildError) as info:
        builder.load_variants(["a", "b"])
    message = str(info.value)
    assert f"{builder.NAME}[b]" in message and f"{builder.NAME}[a]" not in message
    assert "not_declared_here" in message and "tiny_kernel.cpp" in message
    assert f"full log: {info.value.log_path}" in message and Path(info.value.log_path).is_file()
    # variant a was built meanwhile and is published: the next load finds it without compiling
    entry, why = builder.cached_entry("a")
    assert entry is not None, why
    assert builder.load_variants(["a"])[0].how == "cached"


def test_sequential_when_disabled(sources, private_cache, monkeypatch):
    monkeypatch.setenv("DSINF_CONCURRENT_BUILDS", "0")
    calls = []
    real = build_mod.build_or_wait

    def spy(spec, *args, **kw):
        calls.append(kw.get("jobs"))
        return real(spec, *args, **kw)

    monkeypatch.setattr("op_builder.builder.build_or_wait", spy)
    loaded = TwoVariantTiny(sources).load_variants(["a", "b"])
    assert [lv.how for lv in loaded] == ["built", "built"] and calls == [None, None]  # each with the full budget


@pytest.mark.parametrize("units, total, want", [
    ((6, 14), 16, [4, 12]),  # cpu (binding + 5 kernels) beside cuda (4 binding files + 10 .cu) on 16 cores
    ((1, 1), 4, [2, 2]),
    ((1, 1), 1, [1, 1]),  # never 0 jobs
    ((3, 1), 2, [1, 1]),
])
def test_job_shares(units, total, want, monkeypatch):
    monkeypatch.setenv("MAX_JOBS", str(total))
    specs = [BuildSpec(op="x", variant=str(i), library_name="x", sources=("s",) * n, include_dirs=(), cflags=())
             for i, n in enumerate(units)]
    assert job_shares(specs, cpu_count=total, memory_available=None) == want


GIB = 2**30


@pytest.mark.parametrize("threads, memory, want", [
    ((1, 16), None, [7, 14]),  # cpu beside a lowered cuda build: each its jobs alone, one per unit
    ((1, 16), 64 * GIB, [7, 14]),  # 7 x 1 + 14 x 2.5 GiB fit
    ((1, 16), 20 * GIB, [2, 6]),  # they do not (7 + 8 x 2.5 GiB): a split of cuda's 8-job budget
    ((1, 1), None, [5, 11]),  # one priority: a split of the 16 cores, as before
    ((16, 16), None, [5, 11]),
])
def test_job_shares_of_builds_of_different_priorities(threads, memory, want, monkeypatch):
    """A build a step lower (niceness_increments) only takes the cores the other leaves idle, so it needs no
    share of them: both get the jobs they would alone, unless their compiles' memory does not fit."""
    monkeypatch.delenv("MAX_JOBS", raising=False)
    specs = [BuildSpec(op="x", variant=str(i), library_name="x", sources=("s",) * n, include_dirs=(), cflags=(),
                       with_cuda=t > 1, threads_per_job=t) for i, (n, t) in enumerate(zip((7, 14), threads))]
    assert job_shares(specs, cpu_count=16, memory_available=memory) == want
