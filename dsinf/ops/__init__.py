"""The op classes, with DeepSpeed's names and forward signatures."""
from .base import InferenceOp
from .linear import LinearOp
from .vector_matmul import VectorMatMulOp

__all__ = ["InferenceOp", "LinearOp", "VectorMatMulOp"]
