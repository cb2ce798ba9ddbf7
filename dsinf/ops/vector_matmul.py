"""`VectorMatMulOp`: DeepSpeed's `vector_matmul` op - `out = x @ W`, float or int8 weight-only.

    out[b,s,n] = sum_k x[b,s,k] * W(k,n)                                     -> [B, S, N]
    int8 (config.dtype == torch.int8): W(k,n) = w_int8[n,k] * weight.scale[n // (N/G)]

Semantics are `dsinf.reference.vector_matmul`'s. Unlike DeepSpeed, an int8 weight without `.scale`
is an error naming 'weight', never an unquantized matmul on the raw int8 values. `async_op` is a hint:
work always runs on the caller's current stream.
"""
from __future__ import annotations

import importlib

import torch

from ..checks import check_vector_matmul
from .base import InferenceOp


class VectorMatMulOp(InferenceOp):
    OP = "vector_matmul"

    def forward(self, input: torch.Tensor, weight: torch.Tensor, async_op: bool = False) -> torch.Tensor:
        cfg = self.config
        q_scale = self._q_scale(weight)
        args = (input, weight, bool(async_op), q_scale, q_scale is not None, cfg.transposed_mode)
        check_vector_matmul(type(self).__name__, *args, act_dtype=cfg.activation_dtype)
        return self._impl_for(input)(*args)

    @staticmethod
    def _triton_autotune(min_seqlen: int, max_seqlen: int, hidden_size: int, dtype: torch.dtype = torch.float16,
                         **kwargs):
        """Warm the persisted Triton autotune table for [hidden] -> [hidden] (needs CUDA and triton).
        `dtype` is the weight dtype (torch.int8: weight-only); keywords go to
        `dsinf.triton.autotune_vector_matmul` (transposed_mode, act_dtype, out_features, ...)."""
        return importlib.import_module("dsinf.triton").autotune_vector_matmul(min_seqlen, max_seqlen, hidden_size,
                                                                              dtype, **kwargs)
