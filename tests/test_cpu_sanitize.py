"""The AMX int8 kernel (csrc/inference/cpu/gemv_amx.cpp) alone, built with AddressSanitizer and UBSan.

Its results cannot show a read past the end of the weight or of x: a line's bytes past K meet x's zero padding
in the tiles, so a load that reads too far still gives the right sums. ASan does not see masked AVX-512 loads or
tile loads either, so the driver (tests/fixtures/amx_sanitize.cpp) ends the weight and x exactly at an
inaccessible page, where such a read faults; ASan and UBSan watch the rest. It runs random shapes on each of the
kernel's paths, serially and on two threads, and checks each output too. The build uses avx512_bf16's exact -m
flags (as a portable or DSINF_NATIVE_ISA=0 build does), so the file's own GCC target pragma for the tiles is what
enables them. Runs on a host with AMX tiles; elsewhere there is nothing to run.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from op_builder.system import current_system, isa_flags

REPO = Path(__file__).resolve().parents[1]
AMX_HOST = {"amx_bf16", "amx_tile", "avx512_bf16"} <= set(current_system().cpu.flags)


@pytest.mark.skipif(not AMX_HOST, reason="no AMX-BF16 tiles on this CPU")
def test_amx_kernel_under_asan_and_ubsan(tmp_path):
    cxx = shutil.which("g++")  # the kernel's AMX pragma is GCC's (clang compiles the tiles only for an AMX target)
    assert cxx, "g++ builds the CPU module on this host too"
    exe = tmp_path / "amx_sanitize"
    cmd = [cxx, "-O1", "-g", "-std=c++17", "-pthread", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
           "-fno-omit-frame-pointer", *isa_flags("avx512_bf16"),
           f"-I{REPO / 'csrc/inference/include'}", f"-I{REPO / 'csrc/inference/cpu'}",
           str(REPO / "tests/fixtures/amx_sanitize.cpp"), str(REPO / "csrc/inference/cpu/gemv_amx.cpp"), "-o", str(exe)]
    build = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([str(exe), "150"], capture_output=True, text=True, timeout=300)
    if run.returncode == 77:  # CPUID has the tiles but the OS keeps their state (XCR0) or refused it
        pytest.skip("the OS does not grant AMX tile state here")
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    assert "150 shapes, 0 failed" in run.stdout
