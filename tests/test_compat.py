"""op_builder.compat: can a variant build here? Decisions (ok, reasons, notes) from FAKE systems.

Also what the InferenceBuilder makes of those decisions (flags, bf16 define, ISA flags), and the real
System's lazy probes (one regression test runs a fresh interpreter: nested probes once deadlocked).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from op_builder import InferenceBuilder
from op_builder.compat import (MIN_CUDA_CAPABILITY, Decision, cpu_compatible, cuda_compatible,
                               cuda_version_problem)
from op_builder.errors import IncompatibleError
from op_builder.system import Compiler, Cpu, Gpu, Nvcc, System

NVCC_13 = Nvcc("/fake/cuda-13.0/bin/nvcc", (13, 0),
               ((7, 5), (8, 0), (8, 6), (8, 7), (8, 9), (9, 0), (10, 0), (10, 3), (11, 0), (12, 0), (12, 1)))
NVCC_13_1 = Nvcc("/fake/cuda-13.1/bin/nvcc", (13, 1), NVCC_13.archs)
NVCC_12 = Nvcc("/fake/cuda-12.8/bin/nvcc", (12, 8), ((7, 0), (7, 5), (8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)))
GXX = Compiler("/usr/bin/g++", "/usr/bin/x86_64-linux-gnu-g++-12:1305592:1700000000")
H100 = Gpu(0, "NVIDIA H100", (9, 0))
T4 = Gpu(0, "Tesla T4", (7, 5))
AVX2_CPU = Cpu("x86_64", "fake EPYC", frozenset({"avx2", "fma", "f16c", "sse4_2"}), "fake")
AVX512_CPU = Cpu("x86_64", "fake Xeon", frozenset({"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl"}), "fake")


def cuda_box(**overrides) -> System:
    """A complete CUDA 13.0 machine with an H100; override fields to break it."""
    fields = dict(torch_version="2.13.0+cu130", torch_cuda="13.0", torch_cxx11_abi=True, ninja="1.11.1",
                  cxx=GXX, nvcc=NVCC_13, gpus=(H100,), cpu=AVX2_CPU)
    fields.update(overrides)
    return System.fake(**fields)


def cpu_box(**overrides) -> System:
    fields = dict(torch_version="2.13.0+cpu", torch_cuda=None, torch_cxx11_abi=True, ninja="1.11.1", cxx=GXX,
                  cpu=AVX2_CPU)
    fields.update(overrides)
    return System.fake(**fields)


def test_decision_is_data():
    d = Decision.of(["a", "b"], ["n"])
    assert not d and d.ok is False and d.reasons == ("a", "b") and d.notes == ("n",)
    assert Decision.of([]) and Decision.of([]).reasons == ()


# ------------------------------------------------------------------------------------------------- cpu
def test_cpu_variant_ok_on_a_complete_machine():
    d = cpu_compatible(cpu_box())
    assert d.ok and d.reasons == ()


@pytest.mark.parametrize("missing, reason", [
    ("ninja", "ninja is not installed"),
    ("cxx", "no C++ compiler found"),
    ("torch_version", "torch is not installed"),
])
def test_cpu_variant_names_the_missing_tool(missing, reason):
    d = cpu_compatible(cpu_box(**{missing: None}))
    assert not d.ok
    assert len(d.reasons) == 1 and reason in d.reasons[0]


def test_cpu_variant_lists_every_missing_tool():
    d = cpu_compatible(System.fake())
    assert not d.ok and len(d.reasons) == 3


def test_cpu_variant_does_not_need_cuda():
    assert cpu_compatible(cpu_box(nvcc=None, gpus="no GPU")).ok


# ------------------------------------------------------------------------------------------------ cuda
def test_cuda_ok_on_hopper_box():
    d, r = cuda_compatible(cuda_box(), None)
    assert d.ok, d.reasons
    assert [str(a) for a in r.archs] == ["9.0a"]
    assert r.bf16
    assert not any("bf16" in n for n in d.notes)
    assert any("9.0a" in n and "visible GPUs" in n for n in d.notes)


def test_cuda_no_gpu_builds_for_nvcc_default_with_a_note():
    d, r = cuda_compatible(cuda_box(gpus="no CUDA device is visible"), None)
    assert d.ok, d.reasons
    assert r.source == "nvcc default"
    assert any("no GPU visible" in n and "no CUDA device is visible" in n for n in d.notes)
    assert str(r.archs[-1]) == "12.0+PTX"


def test_cuda_major_mismatch_is_refused():
    d, _ = cuda_compatible(cuda_box(nvcc=NVCC_12), None)  # nvcc 12.8 vs torch CUDA 13.0
    assert not d.ok
    reason = next(r for r in d.reasons if "major" in r)
    assert "12.8" in reason and "13.0" in reason


def test_cuda_minor_mismatch_is_accepted_with_a_note():
    d, _ = cuda_compatible(cuda_box(nvcc=NVCC_13_1), None)  # nvcc 13.1 vs torch CUDA 13.0
    assert d.ok, d.reasons
    assert any("13.1" in n and "13.0" in n and "same major" in n for n in d.notes)


def test_cuda_version_problem_rule():
    assert cuda_version_problem("13.0", (13, 2)) is None
    assert cuda_version_problem("12.1", (12, 8)) is None
    assert "major" in cuda_version_problem("12.8", (13, 0))
    assert "CPU-only" in cuda_version_problem(None, (13, 0))


def test_bf16_omitted_on_7x_targets_with_a_note():
    d, r = cuda_compatible(cuda_box(nvcc=NVCC_12, torch_cuda="12.8", gpus=(T4,)), None)
    assert d.ok, d.reasons
    assert not r.bf16
    assert any("bf16 kernels omitted" in n and "7.5" in n for n in d.notes)


def test_bf16_omitted_when_env_list_has_a_7x_target():
    d, r = cuda_compatible(cuda_box(), "7.5;9.0")
    assert d.ok, d.reasons
    assert not r.bf16 and any("bf16 kernels omitted: targets 7.5" in n for n in d.notes)


def test_bf16_present_on_8x_and_newer():
    d, r = cuda_compatible(cuda_box(), "8.0;8.6;9.0")
    assert d.ok and r.bf16
    assert not any("bf16" in n for n in d.notes)


def test_target_below_minimum_is_refused():
    d, _ = cuda_compatible(cuda_box(nvcc=NVCC_12, torch_cuda="12.8"), "6.1;8.0")
    assert not d.ok
    assert any("6.1" in r and f"{MIN_CUDA_CAPABILITY[0]}.{MIN_CUDA_CAPABILITY[1]}" in r for r in d.reasons)


def test_target_this_nvcc_cannot_build_is_refused():
    d, _ = cuda_compatible(cuda_box(), "7.0")  # CUDA 13 dropped sm_70
    assert not d.ok
    assert any("cannot target 7.0" in r for r in d.reasons)


def test_garbage_arch_list_is_a_reason_not_a_crash():
    d, r = cuda_compatible(cuda_box(), "9.x")
    assert not d.ok and r.archs == ()
    assert any("'9.x'" in reason for reason in d.reasons)


def test_no_nvcc():
    d, r = cuda_compatible(cuda_box(nvcc=None), None)
    assert not d.ok and r is None
    assert any("nvcc not found" in reason for reason in d.reasons)


@pytest.mark.parametrize("missing, reason", [("ninja", "ninja"), ("cxx", "C++ compiler")])
def test_cuda_needs_the_host_toolchain_too(missing, reason):
    d, _ = cuda_compatible(cuda_box(**{missing: None}), None)
    assert not d.ok and any(reason in r for r in d.reasons)


def test_cpu_only_torch_cannot_build_cuda():
    d, _ = cuda_compatible(cuda_box(torch_version="2.13.0+cpu", torch_cuda=None), None)
    assert not d.ok
    assert any("CPU-only" in r for r in d.reasons)
    # reported once, not once per check that looks at torch_cuda
    assert sum("without CUDA" in r for r in d.reasons) == 1


def test_everything_missing_gives_every_reason_without_crashing():
    d, _ = cuda_compatible(System.fake(), "garbage")
    assert not d.ok and len(d.reasons) >= 3


# ---------------------------------------------------------------------- what the builder makes of it
def test_inference_builder_cuda_decision_reads_the_env_arch_list(monkeypatch):
    builder = InferenceBuilder(cuda_box())
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "7.0")
    assert not builder.compatible("cuda").ok
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    assert builder.compatible("cuda").ok


def test_inference_cuda_spec_bf16_define_follows_targets(monkeypatch):
    builder = InferenceBuilder(cuda_box())
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    spec = builder.spec("cuda")
    assert "-DDSINF_CUDA_BF16" in spec.cuda_cflags and spec.manifest_extra["bf16"]
    assert "-gencode=arch=compute_90a,code=sm_90a" in spec.cuda_cflags
    assert "-DDSINF_CUDA_SM90A" in spec.cuda_cflags  # the int8 GEMM's warpgroup-MMA kernel is built
    assert spec.manifest_extra["archs"] == ["8.0", "9.0a"]
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    spec = builder.spec("cuda")
    assert "-DDSINF_CUDA_BF16" in spec.cuda_cflags and "-DDSINF_CUDA_SM90A" not in spec.cuda_cflags
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "7.5;8.0")
    spec = builder.spec("cuda")
    assert "-DDSINF_CUDA_BF16" not in spec.cuda_cflags and not spec.manifest_extra["bf16"]
    assert "-DDSINF_CUDA_SM90A" not in spec.cuda_cflags


def test_inference_cuda_spec_refuses_an_incompatible_machine(monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    with pytest.raises(IncompatibleError, match="nvcc not found"):
        InferenceBuilder(cuda_box(nvcc=None)).spec("cuda")


def test_inference_portable_cuda_spec_adds_the_default_targets(monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    builder = InferenceBuilder(cuda_box())
    assert builder.spec("cuda").manifest_extra["archs"] == ["9.0a"]
    portable = builder.spec("cuda", portable=True).manifest_extra["archs"]
    assert "9.0a" in portable and "8.0" in portable and "12.0+PTX" in portable


def test_inference_cpu_spec_isa(monkeypatch):
    monkeypatch.delenv("DSINF_NATIVE_ISA", raising=False)
    jit = InferenceBuilder(cpu_box(cpu=AVX512_CPU)).spec("cpu")
    assert "-march=native" in jit.cflags and jit.manifest_extra == {"isa": "avx512", "native": True}
    portable = InferenceBuilder(cpu_box(cpu=AVX512_CPU)).spec("cpu", portable=True)
    assert "-march=native" not in portable.cflags and "-mavx2" in portable.cflags
    assert portable.manifest_extra == {"isa": "avx2", "native": False}
    monkeypatch.setenv("DSINF_NATIVE_ISA", "0")
    explicit = InferenceBuilder(cpu_box(cpu=AVX512_CPU)).spec("cpu")
    assert "-march=native" not in explicit.cflags and "-mavx512f" in explicit.cflags
    arm = InferenceBuilder(cpu_box(cpu=Cpu("aarch64", "fake Graviton", frozenset({"asimd"}), "fake")))
    assert arm.spec("cpu", portable=True).manifest_extra["isa"] == "baseline"


def test_inference_builder_unknown_variant():
    with pytest.raises(ValueError, match="unknown variant"):
        InferenceBuilder(cpu_box()).compatible("rocm")


def test_wanted_variants_follow_visible_gpus():
    assert InferenceBuilder(cpu_box()).wanted_variants() == ["cpu"]
    assert InferenceBuilder(cuda_box()).wanted_variants() == ["cpu", "cuda"]


def test_fake_system_never_probes():
    s = System.fake(torch_version="2.13.0")
    assert s.nvcc is None and s.cxx is None and s.ninja is None and s.gpu_list == ()
    assert set(s.known()) >= {"torch_version"}
    with pytest.raises(AttributeError):
        s.torch_version = "x"  # immutable
    with pytest.raises(TypeError, match="unknown System field"):
        System.fake(not_a_field=1)


# ------------------------------------------------------------------------------------- the real probes
def test_real_system_nested_probes_do_not_deadlock(tmp_path):
    """Regression: System held a non-reentrant lock while probing, and the nvcc probe reads cuda_home
    (cxx_version reads cxx): the first read of `nvcc` hung the process forever (e.g.
    `InferenceBuilder().compatible("cuda")` on a fresh process)."""
    code = textwrap.dedent("""
        from op_builder.system import System
        from op_builder import InferenceBuilder
        print(System().cxx_version is not None or True)
        print(System().nvcc is not None or True)
        print(InferenceBuilder().compatible("cuda").ok in (True, False))
    """)
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "True", "True"]


def test_real_system_probes_once(monkeypatch):
    """Each field is probed once per System, however often it is read."""
    from op_builder import system as system_mod

    calls = []
    monkeypatch.setitem(system_mod._PROBES, "cpu_count", lambda s: calls.append(1) or 7)
    s = System()
    assert [s.cpu_count for _ in range(5)] == [7] * 5
    assert calls == [1]


def test_real_system_cpu_cache_is_the_largest_listed():
    """cpu_cache: the largest of cpu0's caches in sysfs ("48K", "2048K", "480M"), in bytes; None where sysfs
    lists none (then the route measure and the bench assume 32 MiB)."""
    from pathlib import Path

    listed = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        listed.append(int(size[:-1]) << {"K": 10, "M": 20, "G": 30}[size[-1]] if size[-1] in "KMG" else int(size))
    assert System().cpu_cache == (max(listed) if listed else None)
