"""The `dsinf::` torch custom-op library: every schema, defined once, with its fake (meta) kernel.

Schemas live here, in Python, rather than in a `TORCH_LIBRARY` block of one binary: a namespace can
have only one `TORCH_LIBRARY`, and the CPU and CUDA binaries must load side by side. Each binary
only registers implementations (`TORCH_LIBRARY_IMPL(dsinf, CPU|CUDA, m)`), for the dtypes it was
built with. `op_builder` calls `define()` before `torch.ops.load_library`.

The fake kernels run the same validation as every backend (`dsinf.checks`), so shape errors surface
at trace time under `torch.compile` too.

Signatures keep DeepSpeed's positional order; everything after `rope_theta` is our extension, with
defaults that reproduce DeepSpeed's behaviour.
"""
from __future__ import annotations

import threading

import torch

from .checks import FLOAT_DTYPES, check_linear, check_vector_matmul, linear_output_shapes

NAMESPACE = "dsinf"

LINEAR_SCHEMA = (
    "(Tensor input, Tensor weight, Tensor? bias, bool add_bias, bool do_flash_attn, int num_heads, "
    "bool transposed_mode=False, float rope_theta=10000.0, int rotary_dim=-1, bool rotate_half=False, "
    "int num_kv=-1, int seq_offset=0, Tensor? q_scale=None) -> Tensor[]"
)
VECTOR_MATMUL_SCHEMA = (
    "(Tensor input, Tensor weight, bool async_op=False, Tensor? q_scale=None, bool q_int8=False, "
    "bool transposed_mode=False) -> Tensor"
)

#: Module function names, e.g. "linear_layer_bf16"; the order is the report's.
FUNCTIONS = tuple(f"{op}_{suffix}" for op in ("linear_layer", "vector_matmul") for suffix in FLOAT_DTYPES)

_lock = threading.Lock()
_lib: torch.library.Library | None = None


def qualified(name: str) -> str:
    return f"{NAMESPACE}::{name}"


def _linear_fake(name: str, act_dtype: torch.dtype):
    def fake(input, weight, bias, add_bias, do_flash_attn, num_heads, transposed_mode=False, rope_theta=10000.0,
             rotary_dim=-1, rotate_half=False, num_kv=-1, seq_offset=0, q_scale=None):
        shape, qkv = check_linear(name, input, weight, bias, add_bias, do_flash_attn, num_heads, transposed_mode,
                                  rope_theta, rotary_dim, rotate_half, num_kv, seq_offset, q_scale, act_dtype)
        return [input.new_empty(s) for s in linear_output_shapes(shape, qkv)]

    return fake


def _vector_matmul_fake(name: str, act_dtype: torch.dtype):
    def fake(input, weight, async_op=False, q_scale=None, q_int8=False, transposed_mode=False):
        shape = check_vector_matmul(name, input, weight, async_op, q_scale, q_int8, transposed_mode, act_dtype)
        return input.new_empty((shape.B, shape.S, shape.N))

    return fake


def define() -> None:
    """Define every dsinf schema and fake kernel in this process (idempotent, thread-safe)."""
    global _lib
    if _lib is not None:
        return
    with _lock:
        if _lib is not None:
            return
        lib = torch.library.Library(NAMESPACE, "FRAGMENT")
        for suffix, dtype in FLOAT_DTYPES.items():
            for op, schema, make_fake in (("linear_layer", LINEAR_SCHEMA, _linear_fake),
                                          ("vector_matmul", VECTOR_MATMUL_SCHEMA, _vector_matmul_fake)):
                name = f"{op}_{suffix}"
                lib.define(name + schema)
                torch.library.register_fake(qualified(name), make_fake(name, dtype), lib=lib)
        _lib = lib


def has_kernel(name: str, device_type: str) -> bool:
    """True when a compiled implementation of `name` is registered for `device_type` ('cpu'/'cuda')."""
    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    return torch._C._dispatch_has_kernel_for_dispatch_key(qualified(name), key)
