"""The compiled CPU inference module (csrc/inference/cpu + binding/cpu_binding*.cpp) vs dsinf.reference.

The module is reached through the `cpu_module` fixture (tests/conftest.py: built by op_builder into the
session's fresh cache). Shapes are picked to walk every kernel path of the binding, whatever the exact
crossovers are (today GEMV up to M = 4-24 fp32 and 24 int8, where the GEMM past it is oneDNN's 8 fp32 (16 for [K, N]
on our own GEMM) and 16 int8, 16-24 16-bit; bf16 on the native bf16 GEMM 4-16; a forced route covers the rest): M = B*S of 1, 3
and 5 (our GEMV; 5 is more than the register tile's rows and, with K > 512, takes the k-blocked branch), 24
(GEMV or GEMM, by the host), 40 (fp32 BLAS,
widened fp32 GEMM or the native bf16 GEMM for 16-bit) and 72 (every GEMM path), both
float layouts, K and N not multiples of the vector width, int8 scale groups G = 1, intermediate, N, and
the fused QKV epilogue with both RoPE styles, partial rotary_dim, seq_offset > 0 and GQA. Inputs are
random and never zero.
"""
from __future__ import annotations

import contextlib
import shutil
import subprocess

import pytest
import torch

from dsinf import reference

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Error metric: max |got - ref| / max |ref|. The kernels and the reference both accumulate in fp32 and
# round to the output dtype once, so they differ by fp32 summation order (~1e-7 relative per add) plus,
# for 16-bit outputs, an occasional one-ulp flip where the two fp32 values straddle a rounding boundary:
# fp16 keeps 11 significant bits (ulp <= 2^-10 ~ 1e-3 of the value), bf16 8 (ulp <= 2^-7 ~ 7.8e-3).
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.float(), want.float()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def assert_close(got, want, dtype):
    assert isinstance(got, list) == isinstance(want, list)
    if isinstance(want, list):
        assert len(got) == len(want)
    else:
        got, want = [got], [want]
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype and g.device == w.device
        assert g.is_contiguous()
        err = rel_err(g, w)
        assert err <= TOL[dtype], f"relative error {err:.3g} > {TOL[dtype]:.1g}"


def randn(*shape, dtype=torch.float32, gen=None, scale=1.0):
    """Random, never exactly zero (|v| >= 0.05 * scale)."""
    t = torch.randn(*shape, generator=gen)
    t = torch.where(t.abs() < 0.05, torch.full_like(t, 0.05).copysign(t), t)
    return (t * scale).to(dtype)


def int8_weight(N, K, groups, gen):
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=gen)
    w[w == 0] = 1
    scale = torch.rand(groups, generator=gen) * 0.02 + 0.002
    return w, scale


def float_weight(K, N, transposed_mode, dtype, gen):
    shape = (N, K) if transposed_mode else (K, N)
    return randn(*shape, dtype=dtype, gen=gen, scale=K ** -0.5)


def op(cpu_module, name):
    return getattr(cpu_module, name)


# (B, S, K, N): M = B*S over every path; K, N odd / not multiples of 8 or 16.
MATMUL_SHAPES = [
    (1, 1, 67, 33),
    (3, 1, 200, 257),
    (1, 5, 1100, 41),
    (2, 12, 67, 130),
    (4, 10, 96, 7),
    (8, 9, 130, 65),
]


@pytest.mark.parametrize("suffix", list(DTYPES))
@pytest.mark.parametrize("transposed_mode", [False, True])
@pytest.mark.parametrize("B,S,K,N", MATMUL_SHAPES)
def test_vector_matmul_float(cpu_module, suffix, transposed_mode, B, S, K, N):
    dtype, gen = DTYPES[suffix], torch.Generator().manual_seed(B * 1000 + S * 100 + K + N)
    x = randn(B, S, K, dtype=dtype, gen=gen)
    w = float_weight(K, N, transposed_mode, dtype, gen)
    got = op(cpu_module, f"vector_matmul_{suffix}")(x, w, False, None, False, transposed_mode)
    assert_close(got, reference.vector_matmul(x, w, False, None, False, transposed_mode), dtype)


@pytest.mark.parametrize("suffix", list(DTYPES))
@pytest.mark.parametrize("transposed_mode", [False, True])
@pytest.mark.parametrize("add_bias", [False, True])
@pytest.mark.parametrize("B,S,K,N", MATMUL_SHAPES)
def test_linear_layer_plain(cpu_module, suffix, transposed_mode, add_bias, B, S, K, N):
    dtype, gen = DTYPES[suffix], torch.Generator().manual_seed(B + S + K + N)
    x = randn(B, S, K, dtype=dtype, gen=gen)
    w = float_weight(K, N, transposed_mode, dtype, gen)
    b = randn(N, dtype=dtype, gen=gen)
    args = (x, w, b if add_bias else None, add_bias, False, 0, transposed_mode)
    assert_close(op(cpu_module, f"linear_layer_{suffix}")(*args), reference.linear_layer(*args), dtype)


@pytest.mark.parametrize("suffix", list(DTYPES))
@pytest.mark.parametrize("B,S,K,N", [(1, 1, 67, 36), (1, 5, 1100, 30), (2, 12, 200, 18), (8, 9, 70, 40)])
@pytest.mark.parametrize("groups", ["1", "mid", "N"])
def test_vector_matmul_int8(cpu_module, suffix, B, S, K, N, groups):
    dtype, gen = DTYPES[suffix], torch.Generator().manual_seed(K * N)
    G = {"1": 1, "mid": next(g for g in (3, 5, 2) if N % g == 0), "N": N}[groups]
    x = randn(B, S, K, dtype=dtype, gen=gen)
    w, scale = int8_weight(N, K, G, gen)
    for transposed_mode in (False, True):  # int8 is [N, K] whatever transposed_mode says
        got = op(cpu_module, f"vector_matmul_{suffix}")(x, w, False, scale, True, transposed_mode)
        assert_close(got, reference.vector_matmul(x, w, False, scale, True, transposed_mode), dtype)


@pytest.mark.parametrize("suffix", list(DTYPES))
@pytest.mark.parametrize("B,S", [(1, 1), (2, 3), (8, 9)])
def test_linear_layer_int8_with_bias(cpu_module, suffix, B, S):
    dtype, gen = DTYPES[suffix], torch.Generator().manual_seed(7 * B + S)
    K, N = 75, 42
    x = randn(B, S, K, dtype=dtype, gen=gen)
    w, scale = int8_weight(N, K, 6, gen)
    b = randn(N, dtype=dtype, gen=gen)
    args = (x, w, b, True, False, 0, False, 10000.0, -1, False, -1, 0, scale)
    assert_close(op(cpu_module, f"linear_layer_{suffix}")(*args), reference.linear_layer(*args), dtype)


@pytest.mark.parametrize("suffix", list(DTYPES))
@pytest.mark.parametrize("transposed_mode", [False, True])
def test_large_m_gemm_in_several_column_blocks(cpu_module, suffix, transposed_mode):
    """Large M runs one block of output columns per GEMM, straight into its slice of the result: ~16 MiB
    of fp32 weight in place on MKL (1984 columns here; an [N, K] weight, or a [K, N] one on an AMD host:
    elsewhere a [K, N] weight is one call), ~4 MiB for weights widened to fp32 first (384 columns), ~8 MiB
    for int8 weights widened to bf16 for the native bf16 GEMM (1920 columns). N here spans three blocks in
    place, eleven widened to fp32 and three to bf16, the last one ragged, bias included."""
    dtype, gen = DTYPES[suffix], torch.Generator().manual_seed(3)
    B, S, K, N = 2, 36, 2100, 4200
    x = randn(B, S, K, dtype=dtype, gen=gen)
    wf = float_weight(K, N, transposed_mode, dtype, gen)
    b = randn(N, dtype=dtype, gen=gen)
    args = (x, wf, b, True, False, 0, transposed_mode)
    assert_close(op(cpu_module, f"linear_layer_{suffix}")(*args), reference.linear_layer(*args), dtype)
    if transposed_mode:
        w, scale = int8_weight(N, K, 8, gen)
        got = op(cpu_module, f"vector_matmul_{suffix}")(x, w, False, scale, True, False)
        assert_close(got, reference.vector_matmul(x, w, False, scale, True, False), dtype)
        args = (x, w, b, True, False, 0, False, 10000.0, -1, False, -1, 0, scale)
        assert_close(op(cpu_module, f"linear_layer_{suffix}")(*args), reference.linear_layer(*args), dtype)


@pytest.mark.parametrize("K, N, blocks", [(2100, 4200, 11), (8200, 300, 3), (20000, 129, 2)])
def test_widened_blocks_are_multiples_of_128_columns(cpu_module, K, N, blocks):
    """Weights widened for the GEMM go in blocks of a multiple of 128 columns (at least 128) of about 4 MiB
    of fp32: oneDNN ran blocks of 64 or 192 columns up to 3x slower. K = 2100: 384 columns, 11 blocks (the
    last ragged); K = 8200 and 20000: 128 columns (4 MiB would be 127 and 52), 3 and 2 blocks. Forced onto
    oneDNN each block is one call, which is what this counts (a torch without oneDNN keeps MKL: no call);
    the result is checked against the reference."""
    from dsinf import routes

    ran = torch.backends.mkldnn.is_available()
    gen = torch.Generator().manual_seed(11)
    x = randn(2, 20, K, gen=gen)  # M = 40: past the int8 GEMV with fp32 activations
    w, scale = int8_weight(N, K, 1, gen)
    with routes.fp32_gemm(True) as binding:
        before = binding.onednn_calls()
        got = op(cpu_module, "vector_matmul_fp32")(x, w, False, scale, True, True)
        assert binding.last() == "aten"
        assert binding.onednn_calls() - before == (blocks if ran else 0)
    assert_close(got, reference.vector_matmul(x, w, False, scale, True, True), torch.float32)


@pytest.mark.parametrize("native", [False, True])
def test_bf16_past_the_gemv_on_either_gemm(cpu_module, native):
    """bf16 past the GEMV runs torch's native bf16 GEMM on a host with avx512_bf16 and MKL's fp32 GEMM on
    widened weights elsewhere; the tests above take the host's choice, and this one runs their bf16 GEMM
    cases on each path (routes.bf16_gemm), whatever the host: several column blocks with bias, int8 with
    bias, M = 40 and 72 in both layouts, the fused QKV epilogue with both RoPE styles. Forced onto oneDNN, a
    torch without it runs MKL."""
    from dsinf import routes

    with routes.bf16_gemm(native) as binding:
        for transposed_mode in (False, True):
            test_large_m_gemm_in_several_column_blocks(cpu_module, "bf16", transposed_mode)
            assert binding.last() == "aten"
            for B, S, K, N in ((4, 10, 96, 7), (8, 9, 130, 65)):  # M = 40, 72
                test_linear_layer_plain(cpu_module, "bf16", transposed_mode, True, B, S, K, N)
            for case in QKV_CASES[-2:]:
                test_linear_layer_fused_qkv_rope(cpu_module, "bf16", transposed_mode, *case)
                assert binding.last() == "aten"
        test_linear_layer_int8_with_bias(cpu_module, "bf16", 8, 9)
        assert binding.last() == "aten"


@pytest.mark.parametrize("onednn", [False, True], ids=["mkl", "onednn"])
@pytest.mark.parametrize("suffix", ["fp32", "fp16"])
def test_fp32_gemm_past_the_gemv_on_either_library(cpu_module, suffix, onednn):
    """fp32 past the GEMV (fp32 weights in place, 16-bit and int8 weights widened to fp32) runs oneDNN's GEMM
    on an AMD host and MKL's elsewhere; the other tests take the host's choice, this one runs their GEMM cases
    on each (routes.fp32_gemm), whatever the host, and counts the oneDNN calls: several column blocks with
    bias, int8 with bias, M = 40 and 72 in both layouts, the fused QKV epilogue with both RoPE styles."""
    from dsinf import routes

    ran = onednn and torch.backends.mkldnn.is_available()  # a torch without oneDNN keeps MKL, even when forced
    # float [K, N] weights on the library too (the host may take them to ours: test_kn_gemm_on_either_gemm)
    with routes.fp32_gemm(onednn) as binding, routes.kn_gemm(False):
        assert binding.onednn_fp32_gemm() == ran
        for transposed_mode in (False, True):
            before = binding.onednn_calls()
            test_large_m_gemm_in_several_column_blocks(cpu_module, suffix, transposed_mode)
            assert binding.last() == "aten"
            assert (binding.onednn_calls() > before) == ran, (suffix, transposed_mode)
            for B, S, K, N in ((4, 10, 96, 7), (8, 9, 130, 65)):  # M = 40, 72
                test_linear_layer_plain(cpu_module, suffix, transposed_mode, True, B, S, K, N)
            for case in QKV_CASES[-2:]:
                before = binding.onednn_calls()
                test_linear_layer_fused_qkv_rope(cpu_module, suffix, transposed_mode, *case)
                assert binding.last() == "aten" and (binding.onednn_calls() > before) == ran
        before = binding.onednn_calls()
        test_linear_layer_int8_with_bias(cpu_module, suffix, 8, 9)
        assert binding.last() == "aten" and (binding.onednn_calls() > before) == ran


@pytest.mark.parametrize("suffix", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("weights", ["nk", "kn", "int8"])
def test_gemv_at_every_m_a_route_may_give_it(cpu_module, suffix, weights):
    """A measured route may keep a shape on our GEMV up to any M, past the compiled crossover (for bf16 on
    the native bf16 GEMM that is 4-16, for fp32 on oneDNN 8, so the GEMV's wider tiles and k-blocked branch run
    there only through a route): M = 5, 9 and 24 forced onto the GEMV, checked to have run there."""
    from dsinf import routes

    dtype, gen = DTYPES[suffix], torch.Generator().manual_seed(11)
    K, N = 1100, 70
    with routes.forced("cpu", [routes.RouteKey(suffix, weights, K, N)]) as binding:
        for M in (5, 9, 24):
            x = randn(1, M, K, dtype=dtype, gen=gen)
            if weights == "int8":
                w, scale = int8_weight(N, K, 5, gen)
                args = (x, w, False, scale, True, False)
            else:
                args = (x, float_weight(K, N, weights == "nk", dtype, gen), False, None, False, weights == "nk")
            got = op(cpu_module, f"vector_matmul_{suffix}")(*args)
            assert binding.last() == "gemv", M
            assert_close(got, reference.vector_matmul(*args), dtype)


@pytest.mark.parametrize("suffix", list(DTYPES))
@pytest.mark.parametrize("M,K,N", [(1, 24, 33000), (5, 1100, 6601), (16, 300, 4200), (16, 40, 2049)])
def test_kn_gemv_in_several_equal_stripes(cpu_module, suffix, M, K, N):
    """The [K, N] GEMV splits N into stripes of equal whole-vector widths whose M x width fp32 accumulators fit
    its budget (32768 floats): whole rows up to 32768 columns at M = 1, so 33000 is 2 stripes; M = 5 and
    6601 columns 2 ragged ones; M = 16 (2048 columns at most) 3 and 2. Forced onto the GEMV, checked to
    have run there, against the reference, and the same bits with one thread as with several."""
    from dsinf import routes

    dtype, gen = DTYPES[suffix], torch.Generator().manual_seed(M + N)
    x = randn(1, M, K, dtype=dtype, gen=gen)
    w = float_weight(K, N, False, dtype, gen)
    vm = op(cpu_module, f"vector_matmul_{suffix}")
    threads = torch.get_num_threads()
    with routes.forced("cpu", [routes.RouteKey(suffix, "kn", K, N)]) as binding:
        got = vm(x, w, False, None, False, False)
        assert binding.last() == "gemv"
        try:
            torch.set_num_threads(1)
            alone = vm(x, w, False, None, False, False)
        finally:
            torch.set_num_threads(threads)
    assert_close(got, reference.vector_matmul(x, w, False, None, False, False), dtype)
    assert torch.equal(got, alone)


# (B, S, H, KV, D, rotary_dim, rotate_half, seq_offset)
QKV_CASES = [
    (1, 1, 4, -1, 16, 16, True, 0),
    (1, 1, 4, 2, 16, 16, False, 37),
    (2, 3, 4, 2, 16, 8, False, 5),
    (1, 7, 3, 1, 10, 6, True, 100),
    (2, 2, 2, -1, 12, 0, False, 0),
    (3, 1, 6, 3, 20, 20, True, 4095),
    (1, 33, 4, -1, 32, 32, False, 7),
    (2, 40, 8, 2, 64, 64, True, 1000),
    (1, 80, 4, 4, 24, 12, False, 3),
]


@pytest.mark.parametrize("suffix", list(DTYPES))
@pytest.mark.parametrize("transposed_mode", [False, True])
@pytest.mark.parametrize("B,S,H,KV,D,rd,rotate_half,seq_offset", QKV_CASES)
def test_linear_layer_fused_qkv_rope(cpu_module, suffix, transposed_mode, B, S, H, KV, D, rd, rotate_half,
                                     seq_offset):
    dtype, gen = DTYPES[suffix], torch.Generator().manual_seed(B * S * H * D + seq_offset)
    kv = H if KV == -1 else KV
    K, N = H * D, (H + 2 * kv) * D
    x = randn(B, S, K, dtype=dtype, gen=gen)
    w = float_weight(K, N, transposed_mode, dtype, gen)
    b = randn(N, dtype=dtype, gen=gen)
    args = (x, w, b, True, True, H, transposed_mode, 10000.0, rd, rotate_half, KV, seq_offset)
    got = op(cpu_module, f"linear_layer_{suffix}")(*args)
    want = reference.linear_layer(*args)
    assert len(got) == (3 if kv != H else 1)
    assert_close(got, want, dtype)


@pytest.mark.parametrize("suffix", list(DTYPES))
@pytest.mark.parametrize("B,S,KV", [(1, 1, -1), (2, 5, 2), (4, 20, 1)])
def test_linear_layer_fused_qkv_int8_no_bias(cpu_module, suffix, B, S, KV):
    dtype, gen = DTYPES[suffix], torch.Generator().manual_seed(B * 10 + S)
    H, D = 4, 18
    kv = H if KV == -1 else KV
    K, N = H * D, (H + 2 * kv) * D
    x = randn(B, S, K, dtype=dtype, gen=gen)
    w, scale = int8_weight(N, K, H + 2 * kv, gen)
    args = (x, w, None, False, True, H, False, 500000.0, 14, False, KV, 9, scale)
    assert_close(op(cpu_module, f"linear_layer_{suffix}")(*args), reference.linear_layer(*args), dtype)


@pytest.mark.parametrize("suffix", list(DTYPES))
def test_empty_batch_returns_shaped_outputs(cpu_module, suffix):
    dtype = DTYPES[suffix]
    x = torch.empty(0, 3, 64, dtype=dtype)
    w = randn(64, 3 * 64, dtype=dtype)
    [qkv] = op(cpu_module, f"linear_layer_{suffix}")(x, w, None, False, True, 4)
    assert qkv.shape == (3, 0, 4, 3, 16) and qkv.dtype == dtype
    q, k, v = op(cpu_module, f"linear_layer_{suffix}")(x, randn(64, 128, dtype=dtype), None, False, True, 4,
                                                        False, 10000.0, 16, True, 2)
    assert (q.shape, k.shape, v.shape) == ((0, 4, 3, 16), (0, 2, 3, 16), (0, 2, 3, 16))
    assert op(cpu_module, f"vector_matmul_{suffix}")(x, w).shape == (0, 3, 192)


@pytest.mark.parametrize("suffix", list(DTYPES))
def test_strided_input_is_accepted(cpu_module, suffix):
    dtype, gen = DTYPES[suffix], torch.Generator().manual_seed(11)
    x = randn(3, 2, 80, dtype=dtype, gen=gen)[:, :, ::2]  # non-contiguous [3, 2, 40]
    xt = randn(2, 3, 40, dtype=dtype, gen=gen).transpose(0, 1)  # non-contiguous [3, 2, 40]
    w = float_weight(40, 24, False, dtype, gen)
    for inp in (x, xt):
        got = op(cpu_module, f"vector_matmul_{suffix}")(inp, w)
        assert_close(got, reference.vector_matmul(inp, w), dtype)


def test_outputs_are_owned_and_not_overwritten(cpu_module):
    """DeepSpeed returns views of a shared workspace that the next call overwrites; ours are fresh
    tensors that share storage with nothing."""
    gen = torch.Generator().manual_seed(5)
    H, D = 4, 16
    w = randn(H * D, 3 * H * D, gen=gen)
    b = randn(3 * H * D, gen=gen)
    x1, x2 = randn(1, 1, H * D, gen=gen), randn(1, 1, H * D, gen=gen)
    [qkv1] = cpu_module.linear_layer_fp32(x1, w, b, True, True, H, False, 10000.0, D, True)
    keep = qkv1.clone()
    [qkv2] = cpu_module.linear_layer_fp32(x2, w, b, True, True, H, False, 10000.0, D, True)
    assert torch.equal(qkv1, keep)
    ptrs = {t.untyped_storage().data_ptr() for t in (qkv1, qkv2, x1, x2, w, b)}
    assert len(ptrs) == 6
    y1 = cpu_module.vector_matmul_fp32(x1, w)
    y2 = cpu_module.vector_matmul_fp32(x1, w)
    assert y1.untyped_storage().data_ptr() != y2.untyped_storage().data_ptr()


@pytest.mark.parametrize("suffix", list(DTYPES))
@pytest.mark.parametrize("S", [1, 50])
def test_every_output_element_is_written(cpu_module, suffix, S):
    """Poisoned allocator: fill and free blocks of the outputs' sizes with NaN first, so an element a
    kernel forgot to write would most likely read back as NaN (the CPU allocator reuses freed blocks)."""
    dtype, gen = DTYPES[suffix], torch.Generator().manual_seed(13)
    B, H, KV, D = 2, 6, 2, 20
    K = H * D
    x = randn(B, S, K, dtype=dtype, gen=gen)
    w_gqa = float_weight(K, (H + 2 * KV) * D, True, dtype, gen)
    w_mha = float_weight(K, 3 * K, False, dtype, gen)
    wi, scale = int8_weight(3 * K, K, 3 * K, gen)
    linear = op(cpu_module, f"linear_layer_{suffix}")
    vm = op(cpu_module, f"vector_matmul_{suffix}")
    calls = [
        lambda: linear(x, w_gqa, None, False, True, H, True, 10000.0, 10, False, KV),
        lambda: linear(x, w_mha, None, False, True, H, False, 10000.0, 10, True),
        lambda: linear(x, wi, None, False, True, H, False, 10000.0, 10, True, -1, 3, scale),
        lambda: [vm(x, w_mha, False, None, False, False)],
        lambda: [vm(x, wi, False, scale, True)],
    ]
    for call in calls:
        shapes = [t.shape for t in call()]
        for _ in range(3):
            poison = [torch.full(shape, float("nan"), dtype=dtype) for shape in shapes]
            del poison
            for t in call():
                assert torch.isfinite(t.float()).all()


@pytest.mark.parametrize("transposed_mode", [False, True])
def test_gemv_results_do_not_depend_on_thread_count(cpu_module, transposed_mode):
    """The GEMV splits work into a fixed set of tasks (not one per thread), so results are bitwise
    identical whatever torch.set_num_threads says."""
    gen = torch.Generator().manual_seed(17)
    x = randn(1, 3, 1100, gen=gen)
    w = float_weight(1100, 300, transposed_mode, torch.float32, gen)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            outs.append(cpu_module.vector_matmul_fp32(x, w, False, None, False, transposed_mode))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])


def test_rounding_matches_torch_bit_for_bit(cpu_module):
    """The fp32 accumulator is rounded to 16 bits once, to nearest even, overflowing to inf and keeping
    NaN, exactly like the reference's `.to(dtype)`: out[n] = 1 * w[0, n] + 1 * w[1, n] is exact in fp32."""
    pairs = [(1.0, 2 ** -8), (1.0, 3 * 2 ** -8), (1.0, 2 ** -9), (1.0, 2 ** -11), (1.0, 3 * 2 ** -11),
             (-1.0, -3 * 2 ** -11), (65504.0, 16.0), (65504.0, 15.0), (3.0e38, 3.0e38), (2 ** -14, -2 ** -15),
             (float("inf"), float("-inf")), (1.5, -1.5)]
    for suffix, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        w = torch.tensor(pairs, dtype=torch.float32).t().contiguous().to(dtype)  # [K=2, N]
        x = torch.ones(1, 1, 2, dtype=dtype)
        for M in (1, 64):  # GEMV and GEMM paths
            xm = x.expand(1, M, 2).contiguous()
            got = op(cpu_module, f"vector_matmul_{suffix}")(xm, w)
            want = reference.vector_matmul(xm, w)
            torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


BAD_CALLS = {
    "input": lambda m: m.vector_matmul_fp32(torch.randn(2, 8), torch.randn(8, 4)),
    "input dtype": lambda m: m.vector_matmul_fp16(torch.randn(1, 2, 8), torch.randn(8, 4).half()),
    "weight dtype": lambda m: m.vector_matmul_fp32(torch.randn(1, 2, 8), torch.randn(8, 4).double()),
    "weight K": lambda m: m.vector_matmul_fp32(torch.randn(1, 2, 8), torch.randn(7, 4)),
    "weight contiguous": lambda m: m.vector_matmul_fp32(torch.randn(1, 2, 8), torch.randn(4, 8).t()),
    "q_scale missing": lambda m: m.vector_matmul_fp32(torch.randn(1, 2, 8), torch.ones(4, 8, dtype=torch.int8),
                                                      False, None, True),
    "q_scale groups": lambda m: m.vector_matmul_fp32(torch.randn(1, 2, 8), torch.ones(4, 8, dtype=torch.int8),
                                                     False, torch.ones(3), True),
    "q_int8 float weight": lambda m: m.vector_matmul_fp32(torch.randn(1, 2, 8), torch.randn(8, 4), False,
                                                          torch.ones(1), True),
    "bias missing": lambda m: m.linear_layer_fp32(torch.randn(1, 2, 8), torch.randn(8, 24), None, True, False, 2),
    "bias shape": lambda m: m.linear_layer_fp32(torch.randn(1, 2, 8), torch.randn(8, 24), torch.randn(23), True,
                                                False, 2),
    "num_heads": lambda m: m.linear_layer_fp32(torch.randn(1, 2, 8), torch.randn(8, 24), None, False, True, 3),
    "qkv width": lambda m: m.linear_layer_fp32(torch.randn(1, 2, 8), torch.randn(8, 20), None, False, True, 2),
    "num_kv": lambda m: m.linear_layer_fp32(torch.randn(1, 2, 8), torch.randn(8, 24), None, False, True, 2, False,
                                            10000.0, -1, False, 3),
    "rotary_dim": lambda m: m.linear_layer_fp32(torch.randn(1, 2, 8), torch.randn(8, 24), None, False, True, 2,
                                                False, 10000.0, 3),
    "seq_offset": lambda m: m.linear_layer_fp32(torch.randn(1, 2, 8), torch.randn(8, 24), None, False, True, 2,
                                                False, 10000.0, 4, False, -1, -1),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_input_raises_value_error(cpu_module, case):
    with pytest.raises(ValueError, match="argument '"):
        BAD_CALLS[case](cpu_module)


def _opcheck_args(name: str):
    dtype = DTYPES[name.rsplit("_", 1)[1]]
    gen = torch.Generator().manual_seed(0)
    x = randn(2, 3, 32, dtype=dtype, gen=gen)
    if name.startswith("linear_layer"):
        w = float_weight(32, 96, False, dtype, gen)
        b = randn(96, dtype=dtype, gen=gen)
        return [(x, w, b, True, True, 4, False, 10000.0, 8, True, -1, 2),
                (x, w, b, True, False, 4),
                (x, randn(64, 32, dtype=dtype, gen=gen), None, False, True, 4, True, 10000.0, 8, False, 2, 0)]
    w, scale = int8_weight(40, 32, 4, gen)
    return [(x, float_weight(32, 40, True, dtype, gen), False, None, False, True), (x, w, False, scale, True, False)]


@pytest.mark.parametrize("name", [f"{o}_{s}" for o in ("linear_layer", "vector_matmul") for s in DTYPES])
def test_opcheck(cpu_module, name):
    packet = getattr(torch.ops.dsinf, name)
    for args in _opcheck_args(name):
        torch.library.opcheck(packet.default, args)


def test_the_module_compiles_without_warnings(cpu_module):
    """Our sources build with -Wall: a warning in this session's fresh build (an unused helper, a sign mismatch)
    is a defect the user finds in the build log. Each ISA level's child session checks its own build."""
    from op_builder import InferenceBuilder
    from op_builder.builder import loaded_variants

    loaded = loaded_variants()[(InferenceBuilder.NAME, "cpu")]
    log = loaded.path.parent / "build.log"
    warnings = [line for line in log.read_text().splitlines() if "warning:" in line]
    assert not warnings, f"{len(warnings)} compiler warning(s) in {log}:\n" + "\n".join(warnings[:10])


def test_the_binding_exports_its_c_entry_points_and_no_cpp_entry(cpu_module):
    """The binding's two files share their op entries through dsinf::cpu_binding, a hidden namespace (cpu_ops.h):
    the module is loaded RTLD_GLOBAL beside the CUDA one, so an exported C++ entry could bind to another
    library's symbol of the same name. What it exports are its C entry points (dsinf_cpu_*)."""
    from op_builder import InferenceBuilder
    from op_builder.builder import loaded_variants

    nm = shutil.which("nm")
    assert nm, "nm (binutils, which the build's linker comes with) not found"
    loaded = loaded_variants()[(InferenceBuilder.NAME, "cpu")]
    symbols = subprocess.run([nm, "-D", "--defined-only", "-C", str(loaded.path)], capture_output=True, text=True,
                             check=True).stdout
    assert "dsinf_cpu_routes_set" in symbols and "dsinf_cpu_onednn_fp32_calls" in symbols, symbols[:2000]
    exported = [line for line in symbols.splitlines() if "cpu_binding::" in line]
    assert not exported, "\n".join(exported[:10])


# (M, K, N) for our fp32 [K, N] GEMM (gemm_kn.cpp: 6-row tiles, panels of 4 / 2 vectors, k in slices of 256,
# blocks of 256 columns): M below, at and past a tile, K within one slice and across three (ragged), N narrower
# than a panel, ragged panels and blocks, a whole block.
KN_GEMM_SHAPES = [(9, 67, 33), (40, 300, 7), (72, 520, 257), (13, 256, 256), (130, 700, 530), (6, 33, 1000)]


@pytest.mark.parametrize("ours", [False, True], ids=["library", "ours"])
@pytest.mark.parametrize("suffix", list(DTYPES))
@pytest.mark.parametrize("M,K,N", KN_GEMM_SHAPES)
def test_kn_gemm_on_either_gemm(cpu_module, M, K, N, suffix, ours):
    """Float [K, N] weights past the GEMV run our GEMM (no transpose of the weight; 16-bit weights widened in
    its panels) where the host takes it and the library's elsewhere; forced either way (routes.kn_gemm; bf16 off
    torch's native bf16 GEMM, which takes it first where the host has one) at every ISA level the host runs
    (tests/test_isa_levels.py), ours is checked against the reference, with and without bias, counted, and
    never taken by an [N, K] or an int8 weight."""
    from dsinf import routes

    dtype, gen = DTYPES[suffix], torch.Generator().manual_seed(M * K + N)
    x = randn(1, M, K, dtype=dtype, gen=gen)
    w = float_weight(K, N, False, dtype, gen)
    b = randn(N, dtype=dtype, gen=gen)
    vm, linear = op(cpu_module, f"vector_matmul_{suffix}"), op(cpu_module, f"linear_layer_{suffix}")
    keys = [routes.RouteKey(suffix, layout, K, N) for layout in ("kn", "nk", "int8")]
    with routes.forced("cpu", keys, max_m=0), routes.kn_gemm(ours) as binding, routes.bf16_gemm(False):
        before = binding.kn_gemm_calls()  # every call below runs past the GEMV
        got = vm(x, w, False, None, False, False)
        assert binding.last() == "aten" and binding.kn_gemm_calls() - before == int(ours)
        assert_close(got, reference.vector_matmul(x, w, False, None, False, False), dtype)
        args = (x, w, b, True, False, 0, False)
        assert_close(linear(*args), reference.linear_layer(*args), dtype)
        assert binding.kn_gemm_calls() - before == 2 * int(ours)
        before = binding.kn_gemm_calls()
        nk = w.t().contiguous()
        assert_close(vm(x, nk, False, None, False, True), reference.vector_matmul(x, nk, False, None, False, True),
                     dtype)
        assert binding.last() == "aten"
        q, scale = int8_weight(N, K, 1, gen)
        vm(x, q, False, scale, True, False)
        assert binding.last() == "aten" and binding.kn_gemm_calls() == before


# (M, K, N, groups) for int8 on AMX tiles (gemv_amx.cpp). Up to M = 16: blocks of 32 rows as two 16-row tiles, 64 k
# per step, M columns of one tile: M at both ends and between, K below one step, ragged and across many, N below
# one tile, between the two tiles of a block, ragged blocks, groups of rows. To 32, two 16-row chunks of x (one
# ragged). Past 32, panels: chunks in pairs (an odd last chunk alone, a ragged one), 256-k slices of the weight (one,
# several, a ragged last one, K below one 64-k line), and the binding's last M, 256.
AMX_SHAPES = [(2, 67, 33, 1), (3, 31, 7, 7), (8, 1100, 100, 4), (16, 130, 64, 64), (9, 4096, 48, 3), (5, 64, 1, 1),
              (17, 67, 33, 1), (32, 256, 64, 2), (33, 600, 100, 4), (50, 31, 7, 7), (97, 1100, 40, 1),
              (256, 520, 96, 3)]


@pytest.mark.parametrize("amx", [False, True], ids=["gemv", "amx"])
@pytest.mark.parametrize("M,K,N,groups", AMX_SHAPES)
def test_int8_bf16_on_amx_tiles_or_the_gemv(cpu_module, M, K, N, groups, amx):
    """int8 weights with bf16 activations at 2 <= M <= 256 run on AMX tiles where the host has them (an
    avx512_bf16 build on Linux, AMX-BF16, the tile state granted), on the vdpbf16ps GEMV or dequantize + GEMM
    otherwise; forced either way (routes.amx_gemv) on either side of the route, each is checked against the
    reference - bf16 out with and without bias, and fp32 out into the fused QKV epilogue - and the tiles' calls
    are counted: forced on, a build or host without them keeps the other paths (test_routes checks that an AMX
    host's own build has them). M = 1 never takes the tiles, M = 257 only forced on."""
    from dsinf import routes

    with routes.amx_gemv(amx) as binding:
        tiles = int(binding.amx_gemv())  # what "on" gets here
    gen = torch.Generator().manual_seed(M * K + N)
    x = randn(1, M, K, dtype=torch.bfloat16, gen=gen)
    w, scale = int8_weight(N, K, groups, gen)
    b = randn(N, dtype=torch.bfloat16, gen=gen)
    vm, linear = op(cpu_module, "vector_matmul_bf16"), op(cpu_module, "linear_layer_bf16")
    key = routes.RouteKey("bf16", "int8", K, N)
    for max_m, side in ((None, "gemv"), (0, "aten")):  # the GEMV's side of the route, forced, and the GEMM's
        with routes.forced("cpu", [key], max_m=max_m), routes.amx_gemv(amx) as binding:
            before = binding.amx_gemv_calls()
            assert_close(vm(x, w, False, scale, True, True),
                         reference.vector_matmul(x, w, False, scale, True, True), torch.bfloat16)
            assert binding.last() == side and binding.amx_gemv_calls() - before == tiles
            args = (x, w, b, True, False, 0, False, 10000.0, -1, False, -1, 0, scale)
            assert_close(linear(*args), reference.linear_layer(*args), torch.bfloat16)
            assert binding.amx_gemv_calls() - before == 2 * tiles
    # The tiles' ends on the GEMM's side of the route: M = 1 never takes them (there the GEMV would stream the weight
    # at memory speed); the host's own rule takes M up to 256 and dequantizes past it, where forced on they run too.
    ends = {rows: randn(1, rows, K, dtype=torch.bfloat16, gen=gen) for rows in (1, M, 256, 257)}
    host = routes.binding("cpu").amx_gemv()  # no override: the host's choice
    for mode, want in ((contextlib.nullcontext(), {1: 0, M: host, 256: host, 257: 0}),
                       (routes.amx_gemv(amx), {1: 0, M: tiles, 256: tiles, 257: tiles})):
        with routes.forced("cpu", [key], max_m=0), mode:
            for rows, xr in ends.items():
                before = routes.binding("cpu").amx_gemv_calls()
                assert_close(vm(xr, w, False, scale, True, True),
                             reference.vector_matmul(xr, w, False, scale, True, True), torch.bfloat16)
                assert routes.binding("cpu").amx_gemv_calls() - before == int(want[rows]), rows
    H, D, kv = 2, 16, 1  # fp32 out: the fused QKV epilogue reads the matmul before any rounding
    qkv, qscale = int8_weight((H + 2 * kv) * D, H * D, 1, gen)
    xq = randn(1, M, H * D, dtype=torch.bfloat16, gen=gen)
    args = (xq, qkv, None, False, True, H, False, 500000.0, 8, False, kv, 3, qscale)
    key = routes.RouteKey("bf16", "int8", H * D, (H + 2 * kv) * D)
    with routes.forced("cpu", [key], max_m=0), routes.amx_gemv(amx) as binding:
        before = binding.amx_gemv_calls()
        assert_close(linear(*args), reference.linear_layer(*args), torch.bfloat16)
        assert binding.amx_gemv_calls() - before == tiles


@pytest.mark.parametrize("case", QKV_CASES[-3:])
def test_fused_qkv_rope_on_the_kn_gemm(cpu_module, case):
    """The fused QKV epilogue over our [K, N] GEMM's output (both RoPE styles, GQA, partial rotary_dim), forced
    onto it."""
    from dsinf import routes

    with routes.kn_gemm(True) as binding:
        before = binding.kn_gemm_calls()
        test_linear_layer_fused_qkv_rope(cpu_module, "fp32", False, *case)
        assert binding.last() == "aten" and binding.kn_gemm_calls() > before  # M = 33..80: past any GEMV


def test_kn_gemm_host_rule_and_thread_count(cpu_module):
    """The host's choice: ours on float [K, N] weights of N >= 1024 up to M = 128, and up to 512 for N >= 2K,
    where the host takes it at all (an AVX-512 build where fp32 runs on oneDNN); else the library always.
    Ours splits by columns only and sums each output's k in order, so one thread and two give the same
    bits."""
    from dsinf import routes

    binding = routes.binding("cpu")
    gen = torch.Generator().manual_seed(5)
    f = op(cpu_module, "vector_matmul_fp32")
    for M, K, N, rule in ((128, 96, 1024, True), (129, 600, 1024, False), (129, 512, 1024, True),
                          (512, 64, 1024, True), (513, 64, 1024, False), (16, 64, 1000, False)):
        x, w = randn(1, M, K, gen=gen), float_weight(K, N, False, torch.float32, gen)
        before = binding.kn_gemm_calls()
        got = f(x, w, False, None, False, False)
        assert binding.last() == "aten"
        assert binding.kn_gemm_calls() - before == int(rule and binding.kn_gemm()), (M, K, N)
        assert_close(got, reference.vector_matmul(x, w, False, None, False, False), torch.float32)
    threads = torch.get_num_threads()
    with routes.kn_gemm(True):
        for N in (1100, 70):  # 18 column panels in units of 4; 2 one-panel units
            x, w = randn(1, 77, 700, gen=gen), float_weight(700, N, False, torch.float32, gen)
            try:
                torch.set_num_threads(1)
                one = f(x, w, False, None, False, False)
                torch.set_num_threads(max(2, threads))
                assert torch.equal(one, f(x, w, False, None, False, False)), N
            finally:
                torch.set_num_threads(threads)
