"""The `dsinf::` torch custom-op library: every op spec's schemas, defined once, with their fake kernels.

Schemas live here, in Python, rather than in a `TORCH_LIBRARY` block of one binary: a namespace can
have only one `TORCH_LIBRARY`, and the CPU and CUDA binaries must load side by side. Each binary
only registers implementations (`TORCH_LIBRARY_IMPL(dsinf, CPU|CUDA, m)`), for the dtypes it was
built with. `op_builder` calls `define()` (the build spec's `pre_load`) before `torch.ops.load_library`.

What is defined comes from the op specs (`dsinf.ops.spec`): per spec, one function per activation
dtype (`linear_layer_fp16`, ...) or one dtype-generic function. The fake kernels run the spec's checks
(the same validation as every backend), so shape errors surface at trace time under `torch.compile` too.
"""
from __future__ import annotations

import threading

import torch

from .ops import spec as op_spec

NAMESPACE = "dsinf"

_lock = threading.Lock()
_lib: torch.library.Library | None = None


def qualified(name: str) -> str:
    return f"{NAMESPACE}::{name}"


def functions() -> tuple[str, ...]:
    """Every module function name (e.g. 'linear_layer_bf16'), in the report's order."""
    return op_spec.functions()


def define() -> None:
    """Define every dsinf schema and fake kernel in this process (idempotent, thread-safe)."""
    global _lib
    if _lib is not None:
        return
    with _lock:
        if _lib is not None:
            return
        lib = torch.library.Library(NAMESPACE, "FRAGMENT")
        for spec in op_spec.specs().values():
            for name, act_dtype in spec.functions().items():
                lib.define(name + spec.schema)
                torch.library.register_fake(qualified(name), spec.fake_kernel(name, act_dtype), lib=lib)
            for name, act_dtype in spec.lean_functions().items():  # internal eager entries (OpSpec.lean)
                lib.define(name + spec.lean.schema)
                torch.library.register_fake(qualified(name), spec.lean_fake_kernel(name, act_dtype), lib=lib)
        _lib = lib


def has_kernel(name: str, device_type: str) -> bool:
    """True when a compiled implementation of `name` is registered for `device_type` ('cpu'/'cuda')."""
    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    return torch._C._dispatch_has_kernel_for_dispatch_key(qualified(name), key)
