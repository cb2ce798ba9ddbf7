"""dsinf: fast transformer-inference ops for PyTorch with DeepSpeed's names and signatures.

    import dsinf
    cfg = dsinf.InferenceConfig(dtype=torch.bfloat16, transposed_mode=True)   # = DeepSpeedInferenceConfig
    out = dsinf.VectorMatMulOp(cfg)(x, w)
    [qkv] = dsinf.LinearOp(cfg)(x, w, b, add_bias=True, do_flash_attn=True, num_heads=32)
    q = dsinf.quantize_int8(w_float, groups=8)      # int8 [N, K] with q.scale

Importing is cheap: no compile, no CUDA init, no triton, no op_builder probing. Every name below is
loaded on first access (PEP 562 module `__getattr__`); the first op call picks (and if needed builds)
its backend - see `dsinf.dispatch`. The op classes (`LinearOp`, `VectorMatMulOp`, ...) come from the op
specs (`dsinf.ops.spec`), so `__all__` is computed on first access too. Submodules: `reference` (the
pure-torch semantics), `checks`, `config`, `quantize`, `dispatch`, `ops`, `library`, `builder`, `triton`.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "InferenceConfig": "config",
    "DeepSpeedInferenceConfig": "config",
    "ConfigError": "config",
    "quantize_int8": "quantize",
    "dequantize_int8": "quantize",
    "InputError": "checks",
    "BackendUnavailableError": "dispatch",
    "BackendDecision": "dispatch",
    "init_inference": "inject",
    "injection_summary": "inject",
}
# `inject` is the package, which is callable: `dsinf.inject(model)` and `dsinf.inject.InjectedLinear` both work.
_SUBMODULES = ("builder", "checks", "config", "dispatch", "inject", "library", "ops", "quantize", "reference",
               "routes", "triton")

if TYPE_CHECKING:  # for type checkers and IDEs only; nothing is imported at run time
    from . import reference
    from .checks import InputError
    from .config import ConfigError, DeepSpeedInferenceConfig, InferenceConfig
    from .dispatch import BackendDecision, BackendUnavailableError
    from .inject import init_inference, inject, injection_summary
    from .ops.linear import LinearOp
    from .ops.vector_matmul import VectorMatMulOp
    from .quantize import dequantize_int8, quantize_int8


def _op_classes() -> list[str]:
    from .ops import spec

    return [s.op_class for s in spec.specs().values()]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    elif name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    elif name == "__all__":
        value = sorted([*_EXPORTS, *_op_classes(), "inject", "reference"])
    elif name.endswith("Op") and name in _op_classes():
        from .ops import spec

        value = spec.op_class(name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS) | set(_SUBMODULES) | set(_op_classes()))
