"""`LinearOp`: DeepSpeed's `linear_layer` op - `x @ W (+ bias)`, optionally split into per-head q, k, v.

    out[b,s,n] = sum_k x[b,s,k] * W(k,n) (+ bias[n])              -> [out]           ([B, S, N])
    do_flash_attn: row n = [Q | K | V], per head, RoPE on q and k  -> [qkv]           ([3, B, H, S, D])
                   with config.num_kv < num_heads (GQA)            -> [q, k, v]       (k, v [B, KV, S, D])

Semantics are `dsinf.reference.linear_layer`'s. From the config: `transposed_mode`, `rope_theta`,
`rotary_dim` (> 0 enables RoPE), `rotate_half` (NeoX pairs; else GPT-J pairs), `num_kv`, and `dtype`
(int8: weight is int8 `[N, K]` carrying `weight.scale`).
"""
from __future__ import annotations

import importlib

import torch

from ..checks import check_linear
from .base import InferenceOp


class LinearOp(InferenceOp):
    OP = "linear_layer"

    def forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, add_bias: bool,
                do_flash_attn: bool, num_heads: int, external_cache=None, num_layers=None, *,
                seq_offset: int = 0) -> list[torch.Tensor]:
        """DeepSpeed's signature. `external_cache` and `num_layers` are accepted and unused (as in
        DeepSpeed); `seq_offset` (ours) is the position of the first token for RoPE (decode step t: t)."""
        cfg = self.config
        q_scale = self._q_scale(weight)
        args = (input, weight, bias, bool(add_bias), bool(do_flash_attn), num_heads, cfg.transposed_mode,
                cfg.rope_theta, cfg.rotary_dim, cfg.rotate_half, cfg.num_kv, seq_offset, q_scale)
        check_linear(type(self).__name__, *args, act_dtype=cfg.activation_dtype)
        if num_heads is None:  # allowed without do_flash_attn; the compiled schema wants an int
            args = args[:5] + (0,) + args[6:]
        return self._impl_for(input)(*args)

    def _autotune_out_features(self) -> int | None:
        cfg = self.config  # GQA: q|k|v is (heads + 2*num_kv) * D wide, not the default 3 * hidden
        if cfg.num_kv > 0 and cfg.heads > 0 and cfg.hidden_size > 0:
            return (cfg.heads + 2 * cfg.num_kv) * (cfg.hidden_size // cfg.heads)
        return None

    @staticmethod
    def _triton_autotune(min_seqlen: int, max_seqlen: int, hidden_size: int, dtype: torch.dtype = torch.float16,
                         **kwargs):
        """Warm the persisted Triton autotune table for [hidden] -> [3 * hidden] (needs CUDA and triton).
        `dtype` is the weight dtype (torch.int8: weight-only); keywords go to `dsinf.triton.autotune_linear`
        (transposed_mode, act_dtype, out_features, ...)."""
        return importlib.import_module("dsinf.triton").autotune_linear(min_seqlen, max_seqlen, hidden_size, dtype,
                                                                       **kwargs)
