"""dsinf.reference (the oracle of every backend) against an independent float64 formulation.

The independent side (`_dsinf_oracle`) uses einsum in float64, loops per scale group and per head, and
RoPE from the complex formula; its RoPE is itself pinned to hand-computed values below.
"""
from __future__ import annotations

import math

import pytest
import torch

import _dsinf_oracle as oracle
from dsinf import reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]


# --- the oracle's own RoPE, pinned by hand -------------------------------------------------------------

def test_oracle_rope_matches_hand_values():
    # D = rotary_dim = 2, one pair with f_0 = theta^0 = 1: position p rotates (a, b) by p radians.
    x = torch.tensor([1.0, 0.0], dtype=torch.float64).reshape(1, 1, 1, 2)
    for p in (0, 1, 3):
        out = oracle.rope(x, 2, 10000.0, False, seq_offset=p)
        assert out.flatten().tolist() == pytest.approx([math.cos(p), math.sin(p)])
    # D = 4, rotate_half pairs (0, 2) and (1, 3); f_1 = theta^(-2/4) = 1/sqrt(theta) = 0.01 for theta = 1e4.
    x = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64).reshape(1, 1, 1, 4)
    out = oracle.rope(x, 4, 10000.0, True, seq_offset=1).flatten().tolist()
    c0, s0, c1, s1 = math.cos(1), math.sin(1), math.cos(0.01), math.sin(0.01)
    assert out == pytest.approx([1 * c0 - 3 * s0, 2 * c1 - 4 * s1, 3 * c0 + 1 * s0, 4 * c1 + 2 * s1])
    # Same x, GPT-J pairs (0, 1) and (2, 3).
    out = oracle.rope(x, 4, 10000.0, False, seq_offset=1).flatten().tolist()
    assert out == pytest.approx([1 * c0 - 2 * s0, 2 * c0 + 1 * s0, 3 * c1 - 4 * s1, 4 * c1 + 3 * s1])


def test_oracle_split_heads_by_hand():
    # One token, H = 2, KV = 1, D = 2: row = [q0 q0 | q1 q1 | k0 k0 | v0 v0].
    row = torch.arange(8, dtype=torch.float64).reshape(1, 1, 8)
    q, k, v = oracle.split_heads(row, 2, 1, 2)
    assert q[0, :, 0].tolist() == [[0, 1], [2, 3]]
    assert k[0, :, 0].tolist() == [[4, 5]]
    assert v[0, :, 0].tolist() == [[6, 7]]


# --- linear_layer --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("transposed_mode", [False, True])
@pytest.mark.parametrize("add_bias", [False, True])
@pytest.mark.parametrize("B,S,K,N", [(1, 1, 13, 7), (3, 5, 37, 24)])
def test_linear_plain(dtype, transposed_mode, add_bias, B, S, K, N):
    x, w, b, _ = oracle.random_inputs(B, S, K, N, dtype, transposed_mode=transposed_mode)
    [out] = reference.linear_layer(x, w, b, add_bias, False, 1, transposed_mode)
    assert out.shape == (B, S, N) and out.dtype == dtype
    [expected] = oracle.linear_layer(x, w, b, add_bias, False, 1, transposed_mode)
    oracle.assert_close(out, expected, dtype)


FLASH_CASES = [
    # heads, num_kv, head_dim, rotary_dim, rotate_half, seq_offset
    pytest.param(3, -1, 6, -1, False, 0, id="mha-norope"),
    pytest.param(3, -1, 6, 6, True, 0, id="mha-rope-half-full"),
    pytest.param(3, -1, 6, 4, False, 5, id="mha-rope-gptj-partial-offset"),
    pytest.param(4, 2, 6, 4, True, 7, id="gqa-rope-half-partial-offset"),
    pytest.param(4, 1, 4, 4, False, 0, id="mqa-rope-gptj"),
    pytest.param(2, 2, 8, 8, True, 3, id="kv-equals-heads"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("heads,num_kv,D,rotary_dim,rotate_half,seq_offset", FLASH_CASES)
def test_linear_flash(dtype, heads, num_kv, D, rotary_dim, rotate_half, seq_offset):
    B, S = 2, 3
    kv = heads if num_kv == -1 else num_kv
    K, N = heads * D, (heads + 2 * kv) * D
    x, w, b, _ = oracle.random_inputs(B, S, K, N, dtype, transposed_mode=True, seed=heads * 10 + D)
    args = (x, w, b, True, True, heads, True, 10000.0, rotary_dim, rotate_half, num_kv, seq_offset)
    out = reference.linear_layer(*args)
    expected = oracle.linear_layer(*args)
    assert len(out) == len(expected)
    for got, want in zip(out, expected):
        assert got.shape == want.shape and got.dtype == dtype
        oracle.assert_close(got, want, dtype)
    if kv == heads:
        assert out[0].shape == (3, B, heads, S, D)
    else:
        assert [t.shape for t in out] == [(B, heads, S, D), (B, kv, S, D), (B, kv, S, D)]


def test_linear_rope_theta_is_used():
    # DeepSpeed ignores rope_theta in linear_layer; here it must change q and k (and not v).
    x, w, b, _ = oracle.random_inputs(1, 4, 16, 48, torch.float32, transposed_mode=True)
    [a] = reference.linear_layer(x, w, b, True, True, 2, True, 10000.0, 8, True, -1, 1)
    [c] = reference.linear_layer(x, w, b, True, True, 2, True, 500000.0, 8, True, -1, 1)
    assert not torch.allclose(a[0], c[0]) and not torch.allclose(a[1], c[1])
    torch.testing.assert_close(a[2], c[2], atol=0, rtol=0)


def test_linear_pairings_differ_and_tail_passes_through():
    x, w, _, _ = oracle.random_inputs(2, 3, 12, 36, torch.float32, transposed_mode=True)
    common = (x, w, None, False, True, 2, True, 10000.0)
    [plain] = reference.linear_layer(*common, -1, False, -1, 2)
    [half] = reference.linear_layer(*common, 4, True, -1, 2)
    [gptj] = reference.linear_layer(*common, 4, False, -1, 2)
    assert not torch.allclose(half, gptj)
    # dims >= rotary_dim are untouched, and so is v.
    torch.testing.assert_close(half[..., 4:], plain[..., 4:], atol=0, rtol=0)
    torch.testing.assert_close(half[2], plain[2], atol=0, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("groups", [1, 3, 24])
@pytest.mark.parametrize("do_flash_attn", [False, True])
def test_linear_int8(dtype, groups, do_flash_attn):
    # K = 8 (2 heads of 4), N = 24 = 3 * K; int8 weights are [N, K] whatever transposed_mode says.
    x, q, b, scale = oracle.random_inputs(2, 3, 8, 24, dtype, int8_groups=groups)
    args = (x, q, b, True, do_flash_attn, 2, False, 10000.0, 4, True, -1, 1, scale)
    for got, want in zip(reference.linear_layer(*args), oracle.linear_layer(*args)):
        oracle.assert_close(got, want, dtype)


# --- vector_matmul -------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("transposed_mode", [False, True])
@pytest.mark.parametrize("B,S,K,N", [(1, 1, 13, 7), (2, 5, 40, 33)])
def test_vector_matmul(dtype, transposed_mode, B, S, K, N):
    x, w, _, _ = oracle.random_inputs(B, S, K, N, dtype, transposed_mode=transposed_mode)
    out = reference.vector_matmul(x, w, False, None, False, transposed_mode)
    assert out.shape == (B, S, N) and out.dtype == dtype
    oracle.assert_close(out, oracle.vector_matmul(x, w, False, None, False, transposed_mode), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("groups", [1, 2, 6])
@pytest.mark.parametrize("transposed_mode", [False, True])
def test_vector_matmul_int8(dtype, groups, transposed_mode):
    x, q, _, scale = oracle.random_inputs(3, 2, 11, 6, dtype, int8_groups=groups)
    out = reference.vector_matmul(x, q, False, scale, True, transposed_mode)
    oracle.assert_close(out, oracle.vector_matmul(x, q, False, scale, True), dtype)
    # and not the raw int8 product (DeepSpeed's silent fallback)
    raw = oracle.matmul(x, q.to(torch.float32), transposed_mode=True)
    assert not torch.allclose(out.to(torch.float64), raw, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("groups", [1, 2, 5, 10])
def test_dequantize_matches_group_loop(groups):
    g = torch.Generator().manual_seed(groups)
    q = torch.randint(-127, 128, (10, 7), generator=g, dtype=torch.int8)
    scale = torch.rand(groups, generator=g) + 0.1
    torch.testing.assert_close(reference.dequantize(q, scale).to(torch.float64), oracle.dequantize_loop(q, scale))


def test_outputs_are_fresh_tensors():
    # fp32 is where a `.to(dtype)` could hand back an input or an intermediate view.
    x, w, b, _ = oracle.random_inputs(1, 2, 8, 8, torch.float32, transposed_mode=True)
    out = reference.vector_matmul(x, w, False, None, False, True)
    [lin] = reference.linear_layer(x, w, b, False, False, 1, True)
    for t in (out, lin):
        assert t.data_ptr() not in (x.data_ptr(), w.data_ptr(), b.data_ptr())
    assert out.data_ptr() != lin.data_ptr()
