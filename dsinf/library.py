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


# Dispatch keys of the tensor layouts no dsinf kernel takes (sparse, mkldnn, nested). A module function called
# directly with one (`mod.vector_matmul_fp32(x, w.to_sparse(), ...)`) failed in the dispatcher with torch's
# "Could not run ... with arguments from the 'SparseCPU' backend", naming no argument; these kernels name it.
_NOT_DENSE_KEYS = ("SparseCPU", "SparseCUDA", "SparseCsrCPU", "SparseCsrCUDA", "MkldnnCPU", "NestedTensorCPU",
                   "NestedTensorCUDA", "AutogradNestedTensor")  # nested tensors meet the last one first


def _not_dense_kernel(name: str, arguments: list[str]):
    def kernel(*args, **kwargs):
        from .checks import dense

        for arg, value in [*zip(arguments, args), *kwargs.items()]:
            if isinstance(value, torch.Tensor):
                dense(name, arg, value)
        raise TypeError(f"{name}: no kernel for these inputs (their layouts are not dense)")
    return kernel


def _define(lib: torch.library.Library, name: str, schema: str) -> None:
    lib.define(name + schema)
    arguments = [a.name for a in torch._C.parse_schema(f"{qualified(name)}{schema}").arguments]
    for key in _NOT_DENSE_KEYS:
        lib.impl(name, _not_dense_kernel(name, arguments), key)


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
                _define(lib, name, spec.schema)
                torch.library.register_fake(qualified(name), spec.fake_kernel(name, act_dtype), lib=lib)
            for name, act_dtype in spec.lean_functions().items():  # internal eager entries (OpSpec.lean)
                _define(lib, name, spec.lean.schema)
                torch.library.register_fake(qualified(name), spec.lean_fake_kernel(name, act_dtype), lib=lib)
        _lib = lib


def has_kernel(name: str, device_type: str) -> bool:
    """True when a compiled implementation of `name` is registered for `device_type` ('cpu'/'cuda')."""
    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    return torch._C._dispatch_has_kernel_for_dispatch_key(qualified(name), key)
