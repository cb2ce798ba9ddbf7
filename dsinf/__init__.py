"""dsinf: fast transformer-inference ops for PyTorch with DeepSpeed's names and signatures.

    import dsinf
    cfg = dsinf.InferenceConfig(dtype=torch.bfloat16, transposed_mode=True)   # = DeepSpeedInferenceConfig
    out = dsinf.VectorMatMulOp(cfg)(x, w)
    [qkv] = dsinf.LinearOp(cfg)(x, w, b, add_bias=True, do_flash_attn=True, num_heads=32)
    q = dsinf.quantize_int8(w_float, groups=8)      # int8 [N, K] with q.scale

Importing is cheap: no compile, no CUDA init, no triton, no op_builder probing. Every name below is
loaded on first access (PEP 562 module `__getattr__`); the first op call picks (and if needed builds)
its backend - see `dsinf.dispatch`. Submodules: `reference` (the pure-torch semantics), `checks`,
`config`, `quantize`, `dispatch`, `ops`, `library`, `triton`.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "InferenceConfig": "config",
    "DeepSpeedInferenceConfig": "config",
    "ConfigError": "config",
    "LinearOp": "ops",
    "VectorMatMulOp": "ops",
    "quantize_int8": "quantize",
    "dequantize_int8": "quantize",
    "InputError": "checks",
    "BackendUnavailableError": "dispatch",
    "Decision": "dispatch",
}
_SUBMODULES = ("checks", "config", "dispatch", "library", "ops", "quantize", "reference", "triton")

__all__ = sorted([*_EXPORTS, "reference"])

if TYPE_CHECKING:  # for type checkers and IDEs only; nothing is imported at run time
    from . import reference
    from .checks import InputError
    from .config import ConfigError, DeepSpeedInferenceConfig, InferenceConfig
    from .dispatch import BackendUnavailableError, Decision
    from .ops import LinearOp, VectorMatMulOp
    from .quantize import dequantize_int8, quantize_int8


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value  # later lookups skip this function
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS) | set(_SUBMODULES))
