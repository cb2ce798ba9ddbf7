"""op_builder: build (or load prebuilt) C++/CUDA ops for torch, fast and without stale binaries.

    from op_builder import InferenceBuilder, ALL_OPS, get_builder
    mod = InferenceBuilder().load()     # prebuilt, else cached JIT, else build now

Importing this package does no work: no torch import, no compiler or GPU probe. It is generic: the
builders of concrete ops live with their ops (`registry.BUILDERS`, "module:Class" strings) and are
imported on first access (`op_builder.InferenceBuilder` is `dsinf.builder.InferenceBuilder`).
"""
import sys

from .builder import OpBuilder
from .compat import BuildDecision
from .errors import BuildError, BuildTimeoutError, IncompatibleError, OpBuilderError
from .registry import ALL_OPS, builder_class, get_builder

# Builder classes re-exported by name for DeepSpeed users (`from op_builder import InferenceBuilder`).
_LAZY = {"InferenceBuilder": "transformer_inference"}

__all__ = ["ALL_OPS", "BuildDecision", "BuildError", "BuildTimeoutError", "IncompatibleError", "InferenceBuilder",
           "InferenceModule", "OpBuilder", "OpBuilderError", "get_builder"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _LAZY:
        return builder_class(_LAZY[name])
    if name == "InferenceModule":
        return sys.modules[builder_class("transformer_inference").__module__].InferenceModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
