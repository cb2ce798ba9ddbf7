"""op_builder: build (or load prebuilt) C++/CUDA ops for torch, fast and without stale binaries.

    from op_builder import InferenceBuilder, ALL_OPS, get_builder
    mod = InferenceBuilder().load()     # prebuilt, else cached JIT, else build now

Importing this package does no work: no torch import, no compiler or GPU probe.
"""
from .builder import OpBuilder
from .compat import Decision
from .errors import BuildError, BuildTimeoutError, IncompatibleError, OpBuilderError
from .inference import InferenceBuilder, InferenceModule
from .registry import ALL_OPS, get_builder

__all__ = ["ALL_OPS", "BuildError", "BuildTimeoutError", "Decision", "IncompatibleError", "InferenceBuilder",
           "InferenceModule", "OpBuilder", "OpBuilderError", "get_builder"]
__version__ = "0.1.0"
