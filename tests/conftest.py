"""Shared fixtures.

Every test session gets a fresh, private cache (TORCH_EXTENSIONS_DIR / DSINF_CACHE_DIR point into a
temp dir before any test runs, so child processes inherit it too) and ignores installed binaries
(DSINF_NO_PREBUILT=1: an `op_builder/prebuilt/` left in the checkout by a DS_BUILD_OPS=1 install holds
binaries of some older source). The first use of the CPU module therefore really compiles it from the
current sources: a broken build cannot pass CI, and neither can a stale binary - every variant a test
loads in this process is checked to come from a build of this source tree into this session's cache
(`assert_built_from_current_sources`), whichever test loaded it first (fixture or op dispatch).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

_SESSION_CACHE = tempfile.mkdtemp(prefix="dsinf-test-cache-")
os.environ["TORCH_EXTENSIONS_DIR"] = os.path.join(_SESSION_CACHE, "extensions")
os.environ["DSINF_CACHE_DIR"] = os.path.join(_SESSION_CACHE, "data")
os.environ["DSINF_NO_PREBUILT"] = "1"
os.environ.pop("DSINF_BACKEND", None)
os.environ.pop("DS_KI_FALLBACK", None)

HAS_CUDA = torch.cuda.is_available()


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_unconfigure(config):
    shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def session_cache_dir() -> str:
    return _SESSION_CACHE


def assert_built_from_current_sources(op: str, variant: str) -> None:
    """The loaded `op[variant]` was compiled in this session, from the sources as they are now.

    "built" (this process compiled it) or "cached" from this session's fresh cache (a child process of
    this session compiled it), never "prebuilt"; and its manifest's key - whose "sources" field hashes
    the sources and every project header they include - is the key the builder computes from the
    current tree. A stale or foreign binary fails here instead of being tested in place of the source.
    """
    from op_builder import cache, knobs
    from op_builder.builder import csrc_root, loaded_variants
    from op_builder.registry import get_builder

    loaded = loaded_variants()[(op, variant)]
    where = f"{op}[{variant}] was loaded {loaded.how} from {loaded.path}"
    assert loaded.how in ("built", "cached"), f"{where}: the suite tests binaries compiled from this source tree"
    assert loaded.path.resolve().is_relative_to(os.path.realpath(_SESSION_CACHE)), \
        f"{where}, outside this session's fresh cache {_SESSION_CACHE}"
    builder = get_builder(op)
    spec = builder.spec(variant)
    files = cache.source_closure([Path(p) for p in spec.sources], [Path(p) for p in spec.include_dirs])
    sources_now = cache.hash_files(files, csrc_root())
    built_from = loaded.manifest.get("key_fields", {}).get("sources")
    assert built_from == sources_now, f"{where}: built from sources {built_from}, the tree now hashes to {sources_now}"
    wanted_isa = knobs.get("DSINF_CPU_ISA")
    if variant == "cpu" and wanted_isa != "auto":  # a child of tests/test_isa_levels.py
        assert loaded.manifest.get("isa") == wanted_isa, f"{where}: built for {loaded.manifest.get('isa')}, " \
                                                         f"DSINF_CPU_ISA={wanted_isa}"
    key_now = builder.key(variant, spec).digest
    assert loaded.manifest.get("key") == key_now, f"{where}: manifest key {loaded.manifest.get('key')}, " \
                                                  f"the current sources, flags and toolchain give {key_now}"


_verified: set[tuple[str, str]] = set()


@pytest.fixture(autouse=True)
def _loaded_binaries_are_current():
    """Whatever loaded a compiled variant during a test (a fixture or an op's dispatch), check it once."""
    yield
    from op_builder.builder import loaded_variants

    for op, variant in set(loaded_variants()) - _verified:
        _verified.add((op, variant))  # checked once: a failure is reported by the test that loaded it
        assert_built_from_current_sources(op, variant)


@pytest.fixture(scope="session")
def cpu_module():
    """The compiled CPU inference module, built from the current sources into the session's fresh cache."""
    from op_builder import InferenceBuilder

    module = InferenceBuilder().load("cpu")
    assert_built_from_current_sources(InferenceBuilder.NAME, "cpu")
    return module


@pytest.fixture(scope="session")
def cuda_module():
    if not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    from op_builder import InferenceBuilder

    module = InferenceBuilder().load("cuda")
    assert_built_from_current_sources(InferenceBuilder.NAME, "cuda")
    return module


@pytest.fixture
def seed():
    torch.manual_seed(1234)
    return 1234
