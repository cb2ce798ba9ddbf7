"""op_builder.archs: TORCH_CUDA_ARCH_LIST parsing, arch resolution, -gencode flags, and `covers`.

Hardware-free: resolution is fed fake systems (`System.fake`) with a fake nvcc and fake GPUs.
"""
from __future__ import annotations

import pytest

from op_builder.archs import (Arch, ArchListError, covers, nvcc_gencode_flags, parse_arch_list,
                              resolve_archs)
from op_builder.system import Gpu, Nvcc, System

# What `nvcc --list-gpu-arch` reports for CUDA 13.0 (real targets only) and for CUDA 11.8.
NVCC_13 = Nvcc("/fake/cuda-13.0/bin/nvcc", (13, 0),
               ((7, 5), (8, 0), (8, 6), (8, 7), (8, 9), (9, 0), (10, 0), (10, 3), (11, 0), (12, 0), (12, 1)))
NVCC_12 = Nvcc("/fake/cuda-12.4/bin/nvcc", (12, 4),
               ((5, 0), (6, 0), (7, 0), (7, 5), (8, 0), (8, 6), (8, 9), (9, 0)))
NVCC_11 = Nvcc("/fake/cuda-11.8/bin/nvcc", (11, 8),
               ((3, 5), (5, 0), (6, 0), (7, 0), (7, 5), (8, 0), (8, 6), (8, 9), (9, 0)))

H100 = Gpu(0, "NVIDIA H100 80GB HBM3", (9, 0))
A10 = Gpu(1, "NVIDIA A10", (8, 6))


def A(major, minor, suffix="", ptx=False):
    return Arch(major, minor, suffix, ptx)


# --------------------------------------------------------------------------------------------- parsing
@pytest.mark.parametrize("text, expected", [
    ("9.0a", (A(9, 0, "a"),)),
    ("9.0A", (A(9, 0, "a"),)),
    ("8.6+PTX", (A(8, 6, ptx=True),)),
    ("8.6+ptx", (A(8, 6, ptx=True),)),
    ("9.0a+PTX", (A(9, 0, "a", True),)),
    ("7.5 8.0", (A(7, 5), A(8, 0))),
    ("8.0;8.6", (A(8, 0), A(8, 6))),
    ("8.0,8.6", (A(8, 0), A(8, 6))),
    ("  8.6 ;\t 8.0  ", (A(8, 0), A(8, 6))),  # sorted, surrounding and mixed whitespace ignored
    ("8.0;", (A(8, 0),)),
    ("sm_90", (A(9, 0),)),
    ("sm_90a", (A(9, 0, "a"),)),
    ("compute_86", (A(8, 6),)),
    ("90", (A(9, 0),)),
    ("100", (A(10, 0),)),
    ("10.0f", (A(10, 0, "f"),)),
    ("12.0", (A(12, 0),)),
    ("Hopper", (A(9, 0),)),
    ("hopper+PTX", (A(9, 0, ptx=True),)),
    ("Ampere", (A(8, 0), A(8, 6))),
    ("Ampere+PTX", (A(8, 0), A(8, 6, ptx=True))),  # PTX only for the family's newest
    # duplicates merge; PTX is kept if any duplicate asked for it
    ("8.0;8.0", (A(8, 0),)),
    ("8.0;8.0+PTX", (A(8, 0, ptx=True),)),
    ("8.0+PTX 8.0", (A(8, 0, ptx=True),)),
    ("Ampere;8.0;sm_86", (A(8, 0), A(8, 6))),
    # arch-specific and plain are different targets
    ("9.0;9.0a", (A(9, 0), A(9, 0, "a"))),
])
def test_parse_arch_list(text, expected):
    assert parse_arch_list(text) == expected


@pytest.mark.parametrize("text, bad_entry", [
    ("9.x", "9.x"),
    ("abc", "abc"),
    ("8.0;abc", "abc"),
    ("8.0 9.x 9.0", "9.x"),
    ("+PTX", "+PTX"),
    ("8.0 +PTX", "+PTX"),
    ("sm_9", "sm_9"),  # one digit: no minor version
    ("9", "9"),
    ("9.10", "9.10"),  # minor versions are one digit
    ("0.0", "0.0"),
    ("9.0b", "9.0b"),
    ("Hoppper", "Hoppper"),
    ("8.0++PTX", "8.0++PTX"),
])
def test_parse_garbage_names_the_entry(text, bad_entry):
    with pytest.raises(ArchListError) as info:
        parse_arch_list(text)
    message = str(info.value)
    assert repr(bad_entry) in message, message
    assert "9.0a" in message and "8.6+PTX" in message, f"the error should show the grammar: {message}"


@pytest.mark.parametrize("text", ["", "   ", ";", " ; , "])
def test_parse_empty_list_is_an_error(text):
    with pytest.raises(ArchListError, match="empty CUDA arch list"):
        parse_arch_list(text)


def test_arch_list_error_is_a_value_error():
    assert issubclass(ArchListError, ValueError)


def test_arch_str_and_sm():
    assert str(A(9, 0, "a")) == "9.0a" and A(9, 0, "a").sm == "90a"
    assert str(A(8, 6, ptx=True)) == "8.6+PTX" and A(8, 6, ptx=True).sm == "86"
    assert str(A(12, 0)) == "12.0" and A(12, 0).sm == "120"
    # str() round-trips through the parser (manifests store str(arch))
    for arch in (A(9, 0, "a"), A(8, 6, ptx=True), A(10, 0, "f"), A(12, 1)):
        assert parse_arch_list(str(arch)) == (arch,)


# ------------------------------------------------------------------------------------------ resolution
def test_env_list_wins_over_visible_gpus():
    system = System.fake(nvcc=NVCC_13, gpus=(H100,))
    r = resolve_archs(system, "8.0;8.6+PTX")
    assert r.source == "TORCH_CUDA_ARCH_LIST"
    assert r.archs == (A(8, 0), A(8, 6, ptx=True))
    assert r.ok and r.problems == ()


def test_visible_hopper_gets_arch_specific_target_with_new_nvcc():
    r = resolve_archs(System.fake(nvcc=NVCC_13, gpus=(H100,)), None)
    assert r.source == "visible GPUs"
    assert r.archs == (A(9, 0, "a"),)
    assert r.ok and r.bf16


def test_visible_hopper_plain_target_with_old_nvcc():
    r = resolve_archs(System.fake(nvcc=NVCC_11, gpus=(H100,)), None)
    assert r.archs == (A(9, 0),)
    assert r.ok


def test_visible_gpus_deduplicated_and_sorted():
    gpus = (H100, A10, Gpu(2, "NVIDIA H100", (9, 0)))
    r = resolve_archs(System.fake(nvcc=NVCC_13, gpus=gpus), None)
    assert r.archs == (A(8, 6), A(9, 0, "a"))
    assert r.source == "visible GPUs"


def test_empty_env_value_is_ignored():
    r = resolve_archs(System.fake(nvcc=NVCC_13, gpus=(A10,)), "")
    assert r.source == "visible GPUs" and r.archs == (A(8, 6),)


def test_no_gpu_uses_nvcc_default_with_ptx_on_newest():
    r = resolve_archs(System.fake(nvcc=NVCC_13), None)
    assert r.source == "nvcc default"
    assert r.ok
    assert r.archs == (A(8, 0), A(8, 6), A(8, 9), A(9, 0), A(10, 0), A(12, 0, ptx=True))
    assert [a for a in r.archs if a.ptx] == [max(r.archs)]
    assert all(a.capability in NVCC_13.archs for a in r.archs)
    assert r.bf16


def test_no_gpu_default_limited_to_what_older_nvcc_supports():
    r = resolve_archs(System.fake(nvcc=NVCC_12), None)
    assert r.archs == (A(8, 0), A(8, 6), A(8, 9), A(9, 0, ptx=True))


def test_no_gpu_no_nvcc_is_a_problem_not_a_crash():
    r = resolve_archs(System.fake(), None)
    assert not r.ok and r.archs == ()
    assert "no nvcc" in r.problems[0]


def test_nvcc_without_any_default_candidate_is_a_problem():
    ancient = Nvcc("/fake/nvcc", (10, 2), ((3, 5), (5, 0), (6, 0), (7, 0), (7, 5)))
    r = resolve_archs(System.fake(nvcc=ancient), None)
    assert not r.ok and "supports none of" in r.problems[0]


def test_env_arch_unsupported_by_this_nvcc_is_a_problem():
    r = resolve_archs(System.fake(nvcc=NVCC_13), "7.0;8.0")  # CUDA 13 dropped Volta
    assert not r.ok
    assert r.archs == (A(7, 0), A(8, 0))
    assert len(r.problems) == 1
    assert "nvcc 13.0 cannot target 7.0" in r.problems[0]
    assert "8.0" not in r.problems[0].split("(")[0]  # only the unsupported entry is named before the list


def test_arch_specific_target_needs_nvcc_12():
    r = resolve_archs(System.fake(nvcc=NVCC_11), "9.0a")
    assert not r.ok
    assert any("need nvcc >= 12.0" in p for p in r.problems)


def test_garbage_env_is_a_problem_naming_the_entry():
    r = resolve_archs(System.fake(nvcc=NVCC_13, gpus=(H100,)), "8.0;9.x")
    assert not r.ok and r.archs == ()
    assert r.source == "TORCH_CUDA_ARCH_LIST"
    assert "'9.x'" in r.problems[0]


def test_bf16_needs_every_target_at_least_8_0():
    system = System.fake(nvcc=NVCC_13)
    assert resolve_archs(system, "8.0;9.0").bf16
    assert not resolve_archs(system, "7.5;9.0").bf16
    assert not resolve_archs(system, "abc").bf16  # nothing to build: no bf16 claim


def test_env_list_without_nvcc_is_accepted_as_is():
    # Without nvcc there is nothing to check the list against; compat reports the missing nvcc.
    r = resolve_archs(System.fake(), "8.6")
    assert r.ok and r.archs == (A(8, 6),)


# --------------------------------------------------------------------------------------- gencode flags
def test_nvcc_gencode_flags():
    assert nvcc_gencode_flags((A(9, 0, "a"),)) == ["-gencode=arch=compute_90a,code=sm_90a"]
    assert nvcc_gencode_flags((A(8, 0), A(8, 6, ptx=True))) == [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_86,code=sm_86",
        "-gencode=arch=compute_86,code=compute_86",
    ]
    assert nvcc_gencode_flags((A(12, 0),)) == ["-gencode=arch=compute_120,code=sm_120"]
    assert nvcc_gencode_flags(()) == []


def test_gencode_flags_of_the_default_list_embed_ptx_once():
    flags = nvcc_gencode_flags(resolve_archs(System.fake(nvcc=NVCC_13), None).archs)
    assert sum("code=compute_" in f for f in flags) == 1
    assert flags[-1] == "-gencode=arch=compute_120,code=compute_120"


# ------------------------------------------------------------------------------------------------ covers
@pytest.mark.parametrize("built, capability, expected", [
    ("8.0", (8, 0), True),
    ("8.0", (8, 6), True),  # SASS runs on a newer minor of the same major
    ("8.0", (8, 9), True),
    ("8.6", (8, 0), False),  # ... not on an older one
    ("8.0", (9, 0), False),  # nor on another major
    ("8.0+PTX", (9, 0), True),  # PTX JIT-compiles forward
    ("8.0+PTX", (12, 0), True),
    ("9.0+PTX", (8, 6), False),  # PTX does not run backward
    ("9.0a", (9, 0), True),  # arch-specific: only the exact chip
    ("9.0a", (10, 0), False),
    ("8.0;9.0a", (8, 6), True),
    ("8.0;9.0a", (10, 0), False),
    ("7.5", (7, 5), True),
])
def test_covers(built, capability, expected):
    assert covers(parse_arch_list(built), capability) is expected


def test_covers_nothing_built():
    assert covers((), (9, 0)) is False


def test_arch_specific_ptx_is_not_forward_compatible():
    assert covers(parse_arch_list("9.0a+PTX"), (10, 0)) is False


def test_family_specific_target_covers_its_family():
    assert covers(parse_arch_list("10.0f"), (10, 0)) is True
