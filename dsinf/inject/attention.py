"""Decode attention without repeating the keys: SDPA's own grouped-query attention for one-token steps.

HF's sdpa attention, given a mask (a static cache always has one: it masks the unfilled slots), does not
ask SDPA for grouped-query attention (its rule: with a mask SDPA would fall back to its math kernel) and
repeats every key/value head `G = heads / kv_heads` times (`repeat_kv`): per layer and decode step it
writes and reads again G copies of the whole cache - at batch 8 with a 256-slot Llama-3-8B cache, 34 MB
per layer, a third of a decode step's non-GEMM time on an H200 in our profile.

With one query token per row, `decode_attention` calls SDPA with `enable_gqa=True` and the mask: exactly
HF's sums (no causal flag applies to one query token), with no copy of the cache. On the H200 (torch 2.11)
SDPA then runs cuDNN's flash kernel for that call, not the math kernel.

Why not fold the groups into the query length (query [B, KV*G, 1, D] -> [B, KV, G, D], what this module
did before, and still does on a torch without `enable_gqa`): cuDNN then picks its prefill tiling. H200,
int8 Llama-3-8B at batch 1 (`tools/profile_decode.py`, 160-slot static cache): 8.90 us per layer folded,
6.58 us with `enable_gqa` (0.074 ms of a 3.2-3.3 ms step); one call in a CUDA graph over 32 layers' caches,
Llama-3-8B heads, fp16, us folded -> `enable_gqa`: batch 1, 160 slots 14.3 -> 10.0, 4096 slots 88.9 -> 17.1;
batch 8, 160 slots 16.9 -> 11.6, 4096 slots 92.1 -> 44.0 (docs/PERFORMANCE.md, eighteenth round).
`decode_attention` returns None where this does not hold, and the caller runs HF's own interface.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

#: SDPA takes `enable_gqa` from torch 2.5.
_SDPA_GQA = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 5)


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
    if _SDPA_GQA:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=module.scaling,
                                             enable_gqa=True)
        return out.transpose(1, 2)  # [B, 1, H, D], as HF's interface returns it
    batch, heads, _, dim = query.shape
    folded = query.reshape(batch, key.shape[1], groups, dim)
    out = F.scaled_dot_product_attention(folded, key, value, attn_mask=attention_mask, scale=module.scaling)
    return out.reshape(batch, 1, heads, dim)
