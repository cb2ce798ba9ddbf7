"""An independent float64 formulation of the dsinf ops, for checking `dsinf.reference` and the backends.

Written differently from `dsinf/reference.py` on purpose, so one cannot share the other's mistake:
einsum in float64 instead of matmul in float32, a Python loop per scale group, a loop per head for the
q|k|v split and transpose, and RoPE straight from the complex-number formula

    z = a + i*b,   z' = z * exp(i * p * f_j),   f_j = theta ** (-2j / rotary_dim),   p = seq_offset + s

with (a, b) = (x[j], x[j + rotary_dim/2]) for rotate_half (NeoX) or (x[2j], x[2j+1]) for GPT-J.
"""
from __future__ import annotations

import cmath

import torch

# (atol, rtol) of a result in `dtype` against the float64 oracle. Inputs are random ~N(0, 1) and
# weights are scaled by 1/sqrt(K), so outputs are O(1).
TOLERANCE = {
    # fp32: accumulation order differs between backends; errors ~K * 2^-24.
    torch.float32: (1e-4, 1e-4),
    # fp16 (10-bit mantissa): the result is rounded once (half an ulp ~ 2.4e-4 relative) - twice where a
    # kernel rounds the GEMM output before the RoPE / bias epilogue.
    torch.float16: (2e-3, 2e-3),
    # bf16 (7-bit mantissa): an ulp is 2^-7 ~ 7.8e-3 relative; two roundings in fused epilogues.
    torch.bfloat16: (2e-2, 2e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, msg: str = ""):
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.to(torch.float64), expected.to(torch.float64), atol=atol, rtol=rtol,
                               msg=lambda m: f"{msg}\n{m}" if msg else m)


def dequantize_loop(weight_nk: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] * scale[g] for each row block g, one block at a time (float64)."""
    N = weight_nk.shape[0]
    G = scale.shape[0]
    assert scale.dim() == 1 and N % G == 0, f"oracle: {G} scale groups do not divide N={N}"
    rows = N // G
    out = torch.empty(weight_nk.shape, dtype=torch.float64)
    for g in range(G):
        out[g * rows:(g + 1) * rows] = weight_nk[g * rows:(g + 1) * rows].to(torch.float64) * float(scale[g])
    return out


def weight_kn(weight: torch.Tensor, transposed_mode: bool, q_scale=None) -> torch.Tensor:
    """Any weight as float64 [K, N]."""
    if weight.dtype == torch.int8:
        return dequantize_loop(weight.cpu(), q_scale.cpu()).t()
    w = weight.cpu().to(torch.float64)
    return w.t() if transposed_mode else w


def matmul(x, weight, transposed_mode=False, q_scale=None, bias=None) -> torch.Tensor:
    """float64 x @ W (+ bias). Refuses shapes the ops must refuse (no broadcasting), so an op that wrongly
    accepts a bad input cannot agree with it."""
    w = weight_kn(weight, transposed_mode, q_scale)
    assert x.dim() == 3 and w.shape[0] == x.shape[-1], f"oracle: x {tuple(x.shape)} @ W {tuple(w.shape)}"
    out = torch.einsum("bsk,kn->bsn", x.cpu().to(torch.float64), w)
    if bias is not None:
        assert tuple(bias.shape) == (w.shape[1],), f"oracle: bias {tuple(bias.shape)} for N={w.shape[1]}"
        out = out + bias.cpu().to(torch.float64)
    return out


def rope(x: torch.Tensor, rotary_dim: int, theta: float, rotate_half: bool, seq_offset: int) -> torch.Tensor:
    """RoPE on float64 [B, H, S, D] with complex arithmetic, element by element."""
    if rotary_dim <= 0:
        return x.clone()
    vals = x.tolist()  # nested lists: plain Python floats, indexed [b][h][s][d]
    B, H, S, D = x.shape
    half = rotary_dim // 2
    for s in range(S):
        p = seq_offset + s
        for j in range(half):
            rot = cmath.exp(1j * p * theta ** (-2.0 * j / rotary_dim))
            ia, ib = (j, j + half) if rotate_half else (2 * j, 2 * j + 1)
            for b in range(B):
                for h in range(H):
                    row = vals[b][h][s]
                    z = complex(row[ia], row[ib]) * rot
                    row[ia], row[ib] = z.real, z.imag
    return torch.tensor(vals, dtype=torch.float64)


def split_heads(out: torch.Tensor, heads: int, kv_heads: int, head_dim: int):
    """[B, S, (H + 2KV) * D] -> q [B, H, S, D], k, v [B, KV, S, D], with a loop over heads."""
    B, S, _ = out.shape
    q = torch.empty(B, heads, S, head_dim, dtype=out.dtype)
    k = torch.empty(B, kv_heads, S, head_dim, dtype=out.dtype)
    v = torch.empty(B, kv_heads, S, head_dim, dtype=out.dtype)
    for h in range(heads):
        q[:, h] = out[:, :, h * head_dim:(h + 1) * head_dim]
    base_k, base_v = heads * head_dim, (heads + kv_heads) * head_dim
    for h in range(kv_heads):
        k[:, h] = out[:, :, base_k + h * head_dim:base_k + (h + 1) * head_dim]
        v[:, h] = out[:, :, base_v + h * head_dim:base_v + (h + 1) * head_dim]
    return q, k, v


def linear_layer(input, weight, bias, add_bias, do_flash_attn, num_heads, transposed_mode=False,
                 rope_theta=10000.0, rotary_dim=-1, rotate_half=False, num_kv=-1, seq_offset=0, q_scale=None):
    """Float64 tensors in the shapes `linear_layer` returns."""
    out = matmul(input, weight, transposed_mode, q_scale, bias if add_bias else None)
    if not do_flash_attn:
        return [out]
    H = num_heads
    KV = H if num_kv in (-1, None) else num_kv
    D = input.shape[-1] // H
    assert input.shape[-1] == H * D and out.shape[-1] == (H + 2 * KV) * D and 0 <= seq_offset, "oracle: bad qkv"
    assert rotary_dim <= 0 or (rotary_dim % 2 == 0 and rotary_dim <= D and rope_theta > 0), "oracle: bad rope"
    q, k, v = split_heads(out, H, KV, D)
    q = rope(q, rotary_dim, rope_theta, rotate_half, seq_offset)
    k = rope(k, rotary_dim, rope_theta, rotate_half, seq_offset)
    if KV != H:
        return [q, k, v]
    return [torch.stack([q, k, v])]


def vector_matmul(input, weight, async_op=False, q_scale=None, q_int8=False, transposed_mode=False):
    return matmul(input, weight, transposed_mode, q_scale if q_int8 else None)


def random_inputs(B, S, K, N, dtype, *, transposed_mode=False, int8_groups=None, seed=0, bias=True):
    """Non-zero random x [B,S,K], weight (float in the given layout, or int8 [N,K] with scales), bias [N].

    Returns (x, weight, bias, q_scale); q_scale is None for float weights.
    """
    from dsinf.quantize import quantize_int8

    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, S, K, generator=g) + 0.01).to(dtype)
    w_nk = torch.randn(N, K, generator=g) / K ** 0.5
    b = (torch.randn(N, generator=g) * 0.5).to(dtype) if bias else None
    if int8_groups is not None:
        q = quantize_int8(w_nk, groups=int8_groups, transposed_mode=True)
        return x, q, b, q.scale
    w = w_nk if transposed_mode else w_nk.t().contiguous()
    return x, w.to(dtype), b, None
