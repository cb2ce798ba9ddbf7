"""The pure-torch reference: the definition of every op's semantics, and the helpers they share.

It is the last-resort backend and the oracle every other backend is tested against. It favours
clarity over speed: everything is computed in float32 and rounded to the activation dtype once,
at the end. Each op's reference function lives beside its spec (`dsinf/ops/<op>.py`) and is
reachable here by name: `dsinf.reference.linear_layer`, `dsinf.reference.vector_matmul`.

    linear_layer:  out[b,s,n] = sum_k x[b,s,k] * W(k,n) (+ bias[n])
                   with do_flash_attn: row n = [Q | K | V], split per head, RoPE on q and k,
                   transposed to [3, B, H, S, D] (or [q, k, v] for GQA).
    vector_matmul: out[b,s,n] = sum_k x[b,s,k] * W(k,n)
    int8 weights:  W(k,n) = w_int8[n,k] * q_scale[n // (N / G)]

RoPE (position p = seq_offset + s, pair frequency f_i = rope_theta ** (-2i / rotary_dim)):
    rotate_half=True  (NeoX/Llama): pairs (i, i + rotary_dim/2), i < rotary_dim/2
    rotate_half=False (GPT-J):      pairs (2i, 2i + 1),          i < rotary_dim/2
    (a, b) -> (a*cos(p*f_i) - b*sin(p*f_i), b*cos(p*f_i) + a*sin(p*f_i)); dims >= rotary_dim pass through.
"""
from __future__ import annotations

import torch

from .checks import MatmulShape, QKVLayout


def dequantize(weight: torch.Tensor, q_scale: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] + float32 [G] scales -> float32 [N, K]."""
    N = weight.shape[0]
    rows_per_group = N // q_scale.shape[0]
    scale = q_scale.to(torch.float32).repeat_interleave(rows_per_group)
    return weight.to(torch.float32) * scale[:, None]


def matmul_fp32(input: torch.Tensor, weight: torch.Tensor, shape: MatmulShape, q_scale=None) -> torch.Tensor:
    """x @ W in float32 -> [B, S, N] float32."""
    x = input.to(torch.float32)
    if shape.int8:
        w_nk = dequantize(weight, q_scale)
    else:
        w_nk = weight.to(torch.float32)
        if not shape.weight_nk:
            return x @ w_nk
    return x @ w_nk.t()


def rope_cos_sin(positions: torch.Tensor, rotary_dim: int, theta: float):
    """cos/sin tables [len(positions), rotary_dim/2] in float32 (computed in float64 for accuracy)."""
    i = torch.arange(rotary_dim // 2, dtype=torch.float64, device=positions.device)
    inv_freq = theta ** (-2.0 * i / rotary_dim)
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos().to(torch.float32), angles.sin().to(torch.float32)


def apply_rope(x: torch.Tensor, qkv: QKVLayout) -> torch.Tensor:
    """RoPE on a float32 [B, H, S, D] tensor (returns a new tensor)."""
    rd = qkv.rotary_dim
    if rd == 0:
        return x
    S = x.shape[2]
    positions = torch.arange(qkv.seq_offset, qkv.seq_offset + S, device=x.device)
    cos, sin = rope_cos_sin(positions, rd, qkv.rope_theta)  # [S, rd/2]
    out = x.clone()
    if qkv.rotate_half:
        a, b = x[..., : rd // 2], x[..., rd // 2 : rd]
        out[..., : rd // 2] = a * cos - b * sin
        out[..., rd // 2 : rd] = b * cos + a * sin
    else:
        a, b = x[..., 0:rd:2], x[..., 1:rd:2]
        out[..., 0:rd:2] = a * cos - b * sin
        out[..., 1:rd:2] = b * cos + a * sin
    return out


def split_qkv(out: torch.Tensor, qkv: QKVLayout, dtype: torch.dtype) -> list[torch.Tensor]:
    """float32 [B, S, N] fused rows -> RoPE'd, head-major q, k, v in `dtype`."""
    B, S, _ = out.shape
    H, KV, D = qkv.heads, qkv.kv_heads, qkv.head_dim
    q, k, v = out.split([H * D, KV * D, KV * D], dim=-1)
    q = q.reshape(B, S, H, D).transpose(1, 2)
    k = k.reshape(B, S, KV, D).transpose(1, 2)
    v = v.reshape(B, S, KV, D).transpose(1, 2)
    q, k = apply_rope(q, qkv), apply_rope(k, qkv)
    if qkv.gqa:
        return [t.to(dtype).contiguous() for t in (q, k, v)]
    return [torch.stack([q, k, v]).to(dtype).contiguous()]


def __getattr__(name: str):
    """Each op's reference (`linear_layer`, `vector_matmul`, ...) lives beside its spec in `dsinf/ops/<op>.py`;
    it is reachable here by name, as tests, users and the Triton backend call it."""
    if not name.startswith("_"):  # dunders (`__path__`, asked by every from-import) never load the specs
        from .ops import spec

        if name in spec.specs():
            return spec.get(name).reference
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
