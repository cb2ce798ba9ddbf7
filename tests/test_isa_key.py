"""The CPU ISA level is a field of the build key in its own right.

Two builds for different ISA levels usually differ in their -m flags too, so a test comparing their keys
passes even when the ISA field has left the key (the flags alone separate them). Here the flags are made
identical for every level (`isa_flags` patched), so only the ISA field can tell the builds apart: a key
without it fails. A binary's ISA level must stay in its identity even where the flags do not show it
(e.g. -march=native on two CPUs of one flag list, or a level whose flags gain a synonym).
"""
from __future__ import annotations

import pytest

import dsinf.builder
from op_builder import InferenceBuilder
from op_builder.system import Compiler, Cpu, System

GXX = Compiler("/usr/bin/g++", "/usr/bin/g++-12:1305592:1700000000")
FLAGS = {
    "avx2": frozenset({"avx2", "fma", "f16c"}),
    "avx512": frozenset({"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl"}),
}


def system(level: str) -> System:
    return System.fake(torch_version="2.13.0+cpu", torch_cxx11_abi=True, ninja="1.11.1", cxx=GXX,
                       cpu=Cpu("x86_64", "fake EPYC", FLAGS[level], "fake"))


@pytest.fixture
def same_flags_for_every_level(monkeypatch):
    monkeypatch.setattr(dsinf.builder, "isa_flags", lambda level: ("-mavx2",))
    monkeypatch.setenv("DSINF_NATIVE_ISA", "0")  # explicit flags, not -march=native
    monkeypatch.delenv("DSINF_CPU_ISA", raising=False)


def cpu_key(builder: InferenceBuilder):
    return builder.key("cpu", builder.spec("cpu"))


def test_isa_level_alone_changes_the_key(same_flags_for_every_level):
    avx2, avx512 = InferenceBuilder(system("avx2")), InferenceBuilder(system("avx512"))
    assert avx2.spec("cpu").cflags == avx512.spec("cpu").cflags  # the flags cannot tell them apart
    assert cpu_key(avx2).as_dict()["isa"] == "avx2" and cpu_key(avx512).as_dict()["isa"] == "avx512"
    assert cpu_key(avx2).digest != cpu_key(avx512).digest
    assert cpu_key(avx2).digest == cpu_key(InferenceBuilder(system("avx2"))).digest  # and it is stable


def test_chosen_level_alone_changes_the_key(same_flags_for_every_level, monkeypatch):
    builder, digests = InferenceBuilder(system("avx512")), {}
    for level in ("avx512", "avx2", "baseline"):
        monkeypatch.setenv("DSINF_CPU_ISA", level)
        key = cpu_key(builder)
        assert key.as_dict()["isa"] == level
        digests[level] = key.digest
    assert len(set(digests.values())) == 3, digests
