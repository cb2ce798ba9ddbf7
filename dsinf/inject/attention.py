"""Decode attention without repeating the keys: grouped-query heads folded into the query length.

HF's sdpa attention, given a mask (a static cache always has one: it masks the unfilled slots), cannot
ask SDPA for grouped-query attention and repeats every key/value head `G = heads / kv_heads` times
(`repeat_kv`): per layer and decode step it writes and reads again G copies of the whole cache - at
batch 8 with a 256-slot Llama-3-8B cache, 34 MB per layer, a third of a decode step's non-GEMM time on
an H200 in our profile.

With one query token per row, the G query heads that share a key head also share its mask row, so they
are G query *positions* of one attention over that head's keys:

    query [B, KV*G, 1, D] -> [B, KV, G, D];  SDPA(query, key [B, KV, L, D], value, mask [B|1, 1, 1, L])
    -> [B, KV, G, D] -> [B, 1, KV*G, D]

exactly the same sums as HF's (no causal flag applies to one query token), with no copy of the cache.
`decode_attention` returns None where this does not hold, and the caller runs HF's own interface.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def decode_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float, kwargs: dict) -> torch.Tensor | None:
    """HF's `sdpa_attention_forward(module, query, key, value, attention_mask, ...)[0]` for a one-token
    decode step of a grouped-query attention, or None when the call is not one (see the module doc)."""
    groups = getattr(module, "num_key_value_groups", 1)
    if (groups <= 1 or query.shape[2] != 1 or dropout != 0.0 or module.config._attn_implementation != "sdpa"
            or kwargs.get("output_attentions") or kwargs.get("position_bias") is not None
            or key.shape[1] * groups != query.shape[1] or key.shape[-1] != value.shape[-1]):
        return None
    if attention_mask is not None and (attention_mask.dim() != 4 or attention_mask.shape[1] != 1
                                       or attention_mask.shape[2] != 1):
        return None
    batch, heads, _, dim = query.shape
    folded = query.reshape(batch, key.shape[1], groups, dim)
    out = F.scaled_dot_product_attention(folded, key, value, attn_mask=attention_mask, scale=module.scaling)
    return out.reshape(batch, 1, heads, dim)
