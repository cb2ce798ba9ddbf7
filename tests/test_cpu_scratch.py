"""The CPU kernels' scratch memory (csrc/inference/cpu/cpu_simd.h: AlignedBuffer, Scratch), compiled with the
host's g++ into a small program: every buffer starts on a 64-byte line and is zero-filled, whatever malloc's
state. The kernels read scratch rows (x widened to fp32, weights widened per K block, accumulators) with
full-width vector loads, and a buffer off a line made each of those loads straddle two cache lines (fp32 GEMV
4096x4096 at M = 8: 3.1 ms instead of 2.0, in the processes where malloc placed x off a line). Speed is the
bench's to measure; this checks the property it depends on."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CPU = REPO / "csrc" / "inference" / "cpu"

PROGRAM = r"""
#include <cstdio>
#include <cstdlib>
#include <cstdint>
#include <vector>
#include "cpu_simd.h"
using namespace dsinf_cpu;

static int bad = 0;
template <class T>
static void check(const char* what, size_t n, const T* p) {
  if (n && reinterpret_cast<uintptr_t>(p) % 64 != 0) { std::printf("misaligned %s n=%zu\n", what, n); ++bad; }
  const unsigned char* b = reinterpret_cast<const unsigned char*>(p);
  for (size_t i = 0; i < n * sizeof(T); ++i)
    if (b[i]) { std::printf("not zero %s n=%zu at %zu\n", what, n, i); ++bad; break; }
}

int main() {
  std::vector<void*> noise;  // odd-sized blocks first, so malloc's next addresses are 16-byte aligned only
  for (size_t n : {24, 40, 72, 136, 264, 520, 1032, 4104, 40968, 200008}) {
    noise.push_back(std::malloc(n));
    std::memset(noise.back(), 0xff, n);
  }
  for (size_t n : {1, 3, 17, 100, 4096, 4097, 8193, 33000, 70000, 1 << 20}) {
    for (int round = 0; round < 3; ++round) {  // freed and allocated again: malloc reuses the space
      AlignedBuffer<float> f(n);
      check("AlignedBuffer<float>", n, f.data());
      std::memset(static_cast<void*>(f.data()), 0xff, n * sizeof(float));  // dirty it for the next round
      AlignedBuffer<bf16_t> h(n);
      check("AlignedBuffer<bf16_t>", n, h.data());
      std::memset(static_cast<void*>(h.data()), 0xff, n * sizeof(bf16_t));
      Scratch<float, 8192> s(n);
      check("Scratch<float, 8192>", n, s.data());
      std::memset(static_cast<void*>(s.data()), 0xff, n * sizeof(float));
      void* odd = std::malloc(n * 3 + 8);  // shift what malloc hands out next
      noise.push_back(odd);
    }
  }
  AlignedBuffer<float> a(100), b;
  float* p = a.data();
  b = std::move(a);
  if (b.data() != p || a.data() != nullptr) { std::printf("move\n"); ++bad; }
  AlignedBuffer<float> c(std::move(b));
  if (c.data() != p || b.data() != nullptr) { std::printf("move construct\n"); ++bad; }
  for (void* q : noise) std::free(q);
  std::printf("%s\n", bad ? "FAIL" : "OK");
  return bad ? 1 : 0;
}
"""


@pytest.fixture(scope="module")
def program(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.fail("no C++ compiler on PATH: the CPU module cannot be built here either")
    d = tmp_path_factory.mktemp("scratch")
    src, exe = d / "scratch.cpp", d / "scratch"
    src.write_text(PROGRAM)
    # The header's vector layer at the host's best level; the buffers themselves do not depend on it.
    build = subprocess.run([cxx, "-std=c++17", "-O1", "-march=native", "-Wall", "-Werror", f"-I{CPU}",
                            f"-I{REPO / 'csrc' / 'inference' / 'include'}", str(src), "-o", str(exe)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-4000:]
    return exe


def test_scratch_buffers_start_on_a_cache_line_and_are_zero_filled(program):
    run = subprocess.run([str(program)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.strip().endswith("OK"), run.stdout[-3000:] + run.stderr[-1000:]
