"""The Triton backend of dsinf: matmul + fused bias, a decode (small-M, split-K) path, int8 weight-only
with in-kernel dequantization, and the fused QKV split / RoPE epilogue, with a persisted autotune table.

Importing this package is cheap: it does not import triton. `supports()` / `available()` are the
decisions for the dispatcher; `available()` and `supports()` for CUDA never import triton, `supports()`
for CPU tensors asks triton whether its interpreter is on. The ops and the autotune entry points import
`ops` (and so triton) on first access.

    from dsinf import triton as dt
    ok, why = dt.supports(torch.bfloat16, "cuda")
    out = dt.vector_matmul(x, w)                           # same signature/semantics as dsinf.reference
    qkv = dt.linear_layer(x, w, b, True, True, num_heads=32, rotary_dim=128, rotate_half=True)
    dt.autotune_linear(1, 2048, hidden_size=4096, dtype=torch.float16)   # warm the persisted table

What it serves (decided here, as data):
- CUDA tensors: fp16 and bf16 activations with weights of the same dtype, or int8 weight-only
  ([N, K] + float32 q_scale[G]) with fp16/bf16 activations; compute capability >= 8.0 (Triton's own
  floor). Not fp32: tl.dot rounds fp32 operands to tf32, which does not match the fp32 reference;
  the compiled module and torch serve fp32.
- CPU tensors only under the Triton interpreter (TRITON_INTERPRET=1 before our kernels are imported,
  as triton itself reads it), for tests: fp32 and fp16 (int8 weights with those activations). Never
  bf16 there: the interpreter computes bf16 wrongly.
"""
from __future__ import annotations

import importlib.util
import sys

__all__ = ["available", "supports", "decide", "linear_layer", "vector_matmul", "autotune_linear",
           "autotune_vector_matmul", "autotune_matmul"]

_LAZY = {"linear_layer", "vector_matmul", "autotune_linear", "autotune_vector_matmul", "autotune_matmul"}


def available() -> tuple[bool, str]:
    """Whether triton can be imported here (without importing it)."""
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    return True, "triton is installed"


def _interpreter_probe():
    pass


def _interpreter() -> bool:
    """Whether our kernels run (or, imported now, would run) under Triton's interpreter: triton's answer.

    Triton makes each @triton.jit function interpreted or compiled when it is decorated, from its own
    reading of TRITON_INTERPRET, which is not ours ("t" and " 1" are not on for triton 3.x, anything but
    "1" was not for older ones): a parse of our own could pick Triton for CPU tensors that the kernels
    then cannot take. Once the kernels are imported their mode is fixed (`ops.INTERPRETED`); before, what
    `triton.jit` makes of a function now is what it will make of them."""
    interpreted = getattr(sys.modules.get(__name__ + ".ops"), "INTERPRETED", None)
    if interpreted is not None:
        return interpreted
    try:
        import triton
    except Exception:  # noqa: BLE001 - a broken install: the dispatcher's import of the kernels names the error
        from op_builder import knobs

        return bool(knobs.get("TRITON_INTERPRET"))
    return not isinstance(triton.jit(_interpreter_probe), triton.runtime.JITFunction)


def decide(dtype, device_type, *, interpreter: bool, act_dtype=None,
           capability: tuple[int, int] | None = None) -> tuple[bool, str]:
    """Pure decision: can the Triton kernels serve `dtype` on `device_type`?

    `dtype` is the weight dtype as in InferenceConfig.dtype (torch.int8 = int8 weight-only, then
    `act_dtype` is the activation dtype, default fp16). `capability` (major, minor) is checked when given.
    """
    import torch  # here, not at module level: the autotune table must stay importable without torch

    device_type = getattr(device_type, "type", device_type)
    int8 = dtype == torch.int8
    act = (act_dtype or torch.float16) if int8 else dtype
    what = f"int8 weights with {act} activations" if int8 else str(act)
    if device_type == "cuda":
        if capability is not None and tuple(capability) < (8, 0):
            return False, f"compute capability {capability[0]}.{capability[1]} < 8.0 (Triton needs sm_80+)"
        if act == torch.float32:
            return False, ("float32 is not served by the Triton backend on CUDA: tl.dot rounds fp32 to tf32, "
                           "which does not match the fp32 reference")
        if act not in (torch.float16, torch.bfloat16):
            return False, f"{what}: the Triton backend serves float16/bfloat16 activations (and int8 weights)"
        return True, f"Triton kernels for {what}"
    if device_type == "cpu":
        if not interpreter:
            return False, "Triton kernels need CUDA tensors (CPU tensors only under TRITON_INTERPRET=1, for tests)"
        if act == torch.bfloat16:
            return False, "the Triton interpreter computes bfloat16 wrongly (TRITON_INTERPRET=1 serves fp32/fp16)"
        if act not in (torch.float32, torch.float16):
            return False, f"{what}: the Triton interpreter path serves float32/float16 activations"
        return True, f"Triton interpreter for {what} (slow; for tests)"
    return False, f"device type {device_type!r}: the Triton backend serves CUDA tensors"


def supports(dtype, device_type, capability: tuple[int, int] | None = None) -> tuple[bool, str]:
    """(ok, reason) for the dispatcher; combine with `available()`. For CPU tensors it imports triton to
    ask whether its interpreter is on (only the interpreter serves them); for CUDA it does not."""
    device_type = getattr(device_type, "type", device_type)
    interpreter = device_type == "cpu" and _interpreter()
    return decide(dtype, device_type, interpreter=interpreter, capability=capability)


def __getattr__(name: str):
    if name in _LAZY:
        from . import ops

        value = getattr(ops, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
