"""The CPU kernels at every ISA level this host runs, through the same parity tests.

The session's CPU module is built for the host's best level (JIT: -march=native), so the other vector
paths of the kernels (the AVX2 path on an AVX-512 machine, the scalar path everywhere) would never run
in CI. Each other level the host can run - and the session's own level with exactly its flags, when the
session's module was built -march=native - is built here from the current sources with
DSINF_CPU_ISA=<level> (exactly that level's -m flags) and runs the CPU parity tests
(tests/test_cpu_module.py) against the reference, and the CPU route tests (tests/test_routes.py), whose
compiled crossovers depend on the build (the vdpbf16ps tile is avx512_bf16's alone). A module is loaded once
per process, so each level runs in a child pytest (~10 s build + ~35 s tests on 2 cores); the child's
conftest checks that its module was built for that level from this tree. On a CPU with only the baseline
there is nothing to add.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from op_builder import InferenceBuilder, knobs
from op_builder.system import ISA_RANK, Cpu, System, current_system, isa_flags

REPO = Path(__file__).resolve().parents[1]
HOST = current_system().cpu.isa
SESSION = HOST if knobs.get("DSINF_CPU_ISA") == "auto" else knobs.get("DSINF_CPU_ISA")
RUNNABLE = [level for level, rank in ISA_RANK.items() if rank <= ISA_RANK[HOST]]  # best first
# A session module built with -march=native (the default) enables more than its level's exact -m flags, which a
# DSINF_NATIVE_ISA=0 or prebuilt build uses (AMX, say, which gemv_amx.cpp had to ask for itself under the exact
# avx512_bf16 flags): that level is built here with its exact flags too.
NATIVE = knobs.get("DSINF_CPU_ISA") == "auto" and knobs.get("DSINF_NATIVE_ISA")
OTHER_LEVELS = [level for level in RUNNABLE if level != SESSION or NATIVE]
PARITY_TESTS = ["tests/test_cpu_module.py", "tests/test_routes.py"]  # their CPU tests (-m "not gpu")


@pytest.mark.parametrize("level", OTHER_LEVELS)
def test_parity_at_isa_level(level, tmp_path):
    env = {**os.environ, "DSINF_CPU_ISA": level, "PYTHONPATH": os.pathsep.join(
        [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    env.pop("DSINF_BACKEND", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-rf", "-p", "no:cacheprovider", "-m", "not gpu",
           *PARITY_TESTS]
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", run.stdout, re.M)
    assert run.returncode == 0, (f"the CPU kernels built with DSINF_CPU_ISA={level} fail the parity tests: "
                                 f"{', '.join(failed) or 'see output'}\n{run.stdout[-6000:]}\n{run.stderr[-3000:]}")
    assert re.search(r"\d+ passed", run.stdout) and "skipped" not in run.stdout, run.stdout[-2000:]


def test_every_level_the_host_runs_is_covered():
    # The session's module covers its level (its exact flags too, above, when it was built native); the
    # parametrized test above covers the rest.
    assert SESSION in RUNNABLE and sorted(set(OTHER_LEVELS) | {SESSION}) == sorted(RUNNABLE)
    assert (SESSION in OTHER_LEVELS) == bool(NATIVE)
    assert RUNNABLE[-1] == "baseline"


@pytest.mark.parametrize("level", RUNNABLE)
def test_chosen_level_builds_exactly_its_flags(level, monkeypatch):
    monkeypatch.setenv("DSINF_CPU_ISA", level)
    spec = InferenceBuilder().spec("cpu")
    assert spec.manifest_extra == {"isa": level, "native": False}
    assert [f for f in spec.cflags if f.startswith("-m")] == list(isa_flags(level))  # never -march=native


def test_levels_build_under_distinct_keys(monkeypatch):
    builder, keys = InferenceBuilder(), {}
    for level in RUNNABLE:
        monkeypatch.setenv("DSINF_CPU_ISA", level)
        keys[level] = builder.key("cpu", builder.spec("cpu")).digest
    assert len(set(keys.values())) == len(keys), keys


def test_level_above_the_cpu_is_refused(monkeypatch):
    avx2_cpu = System.fake(cpu=Cpu("x86_64", "fake", frozenset({"avx2", "fma", "f16c"}), "fake"))
    monkeypatch.setenv("DSINF_CPU_ISA", "avx2")
    assert InferenceBuilder(avx2_cpu).spec("cpu").manifest_extra["isa"] == "avx2"
    monkeypatch.setenv("DSINF_CPU_ISA", "avx512")
    with pytest.raises(knobs.KnobError, match="DSINF_CPU_ISA=avx512: this CPU runs only avx2, baseline"):
        InferenceBuilder(avx2_cpu).spec("cpu")


def test_unknown_level_is_refused(monkeypatch):
    monkeypatch.setenv("DSINF_CPU_ISA", "sse4")
    with pytest.raises(knobs.KnobError, match="DSINF_CPU_ISA='sse4': expected auto or one of avx512_bf16"):
        knobs.get("DSINF_CPU_ISA")
