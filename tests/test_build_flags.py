"""CUDA build flags that only change how long a build takes: nvcc/ptxas --split-compile.

The flag must leave the machine code alone: one real .cu is compiled to a cubin with and without it and
every kernel's code (and its per-kernel info: registers, shared memory) must be byte-identical. Skipped
only without nvcc (the toolchain is absent).
"""
from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from dsinf.builder import InferenceBuilder
from op_builder.archs import Arch
from op_builder.system import current_system

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
from cuda_build_times import _cubin_code  # noqa: E402

SM90A = (Arch(9, 0, "a"),)
NVCC = current_system().nvcc
needs_nvcc = pytest.mark.skipif(NVCC is None or NVCC.version < (12, 8), reason="needs nvcc >= 12.8")


def _split(flags) -> list[str]:
    return [f for f in flags if "split-compile" in f]


@needs_nvcc
@pytest.mark.parametrize("knob, want", [(None, ["--split-compile=0", "--split-compile=0"]),
                                        ("4", ["--split-compile=4", "--split-compile=4"]), ("1", [])])
def test_split_compile_flags_follow_the_knob(knob, want, monkeypatch):
    if knob is None:
        monkeypatch.delenv("DSINF_NVCC_SPLIT_COMPILE", raising=False)
    else:
        monkeypatch.setenv("DSINF_NVCC_SPLIT_COMPILE", knob)
    builder = InferenceBuilder()
    spec = builder.spec("cuda", archs=SM90A)
    flags = spec.cuda_cflags
    assert _split(flags) == want
    # what a concurrent CPU build is told about these jobs (op_builder.build.niceness_increments)
    assert spec.threads_per_job == {None: builder.system.cpu_count, "4": 4, "1": 1}[knob]
    assert builder.spec("cpu").threads_per_job == 1
    if want:  # nvcc's own option, then ptxas's
        i = flags.index(want[0])
        assert flags[i + 1:i + 3] == ("-Xptxas", want[1])


@needs_nvcc
def test_split_compile_leaves_every_kernel_identical(tmp_path):
    spec = InferenceBuilder().spec("cuda", archs=SM90A)
    source = REPO / "csrc" / "inference" / "cuda" / "qkv_rope.cu"
    base = [NVCC.path, "-std=c++20", "-I", str(REPO / "csrc" / "inference" / "include"), "-cubin", str(source)]
    plain = [f for f in spec.cuda_cflags if f not in _split(spec.cuda_cflags) and f != "-Xptxas"]
    code = {}
    for name, flags in (("split", spec.cuda_cflags), ("plain", plain)):
        out = tmp_path / f"{name}.cubin"
        r = subprocess.run(base + list(flags) + ["-o", str(out)], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{shlex.join(base + list(flags))}\n{r.stderr[-2000:]}"
        code[name] = _cubin_code(out)
    kernels = [k for k in code["plain"] if k.startswith(".text.")]
    assert len(kernels) >= 5, code["plain"].keys()
    assert code["split"] == code["plain"]
