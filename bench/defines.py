"""The CUDA inference module built with extra compile-time defines, for sweeps and A/B runs.

    load_cuda_with_defines(["DSINF_NK_STREAM_PDL=0"])

Each NAME=VALUE goes to nvcc (and the host compiler) as -DNAME=VALUE. The build key hashes the flags, so
every combination gets its own cache entry and never replaces the default build. Load it before anything
else loads the CUDA module: one process holds one build of it (the ops register once), so what runs
afterwards (the probe's ops, an injected model) runs this build.
"""
from __future__ import annotations

import dataclasses


def with_defines(builder, defines: list[str]):
    """`builder` (an InferenceBuilder) with `defines` added to its CUDA variant's compile flags; returns it."""
    if not defines:
        return builder
    base_spec = builder.spec

    def spec(variant, *, portable=False, archs=None):
        s = base_spec(variant, portable=portable, archs=archs)
        if variant != "cuda":
            return s
        flags = tuple(f"-D{d}" for d in defines)
        return dataclasses.replace(s, cuda_cflags=s.cuda_cflags + flags, cflags=s.cflags + flags)

    builder.spec = spec
    return builder


def load_cuda_with_defines(defines: list[str]):
    """Build (or load from the cache) and load the CUDA module with `defines`; returns the module."""
    from dsinf.builder import InferenceBuilder

    return with_defines(InferenceBuilder(), defines).load("cuda")
