"""Shared fixtures.

Every test session gets a fresh, private cache (TORCH_EXTENSIONS_DIR / DSINF_CACHE_DIR point into a
temp dir before any test runs, so child processes inherit it too). The first use of `cpu_module`
therefore really compiles the CPU inference module from source: a broken build cannot pass CI.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import pytest
import torch

_SESSION_CACHE = tempfile.mkdtemp(prefix="dsinf-test-cache-")
os.environ["TORCH_EXTENSIONS_DIR"] = os.path.join(_SESSION_CACHE, "extensions")
os.environ["DSINF_CACHE_DIR"] = os.path.join(_SESSION_CACHE, "data")
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


@pytest.fixture(scope="session")
def cpu_module():
    """The compiled CPU inference module, built from source into the session's fresh cache."""
    from op_builder import InferenceBuilder

    return InferenceBuilder().load("cpu")


@pytest.fixture(scope="session")
def cuda_module():
    if not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    from op_builder import InferenceBuilder

    return InferenceBuilder().load("cuda")


@pytest.fixture
def seed():
    torch.manual_seed(1234)
    return 1234
