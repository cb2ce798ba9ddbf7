"""The Triton kernels of the Triton backend (launchers: `dsinf.triton.ops`).

The kernels, each stating its math and layout:

`_matmul_kernel`        out[m, n] = sum_k x[m, k] * W(k, n) * scale(n) (+ bias[n]), fp32 accumulate.
                        W(k, n) is read through two strides: [K, N] weights (stride_wk=N,
                        stride_wn=1) load [BLOCK_K, BLOCK_N] tiles; [N, K] weights (W_NK, nn.Linear
                        and int8) load [BLOCK_N, BLOCK_K] tiles in memory order and tl.trans them.
                        int8 weights ([N, K] only) are converted to the activation dtype in registers
                        (exact: |w| <= 128 fits fp16 and bf16), and the per-row-block scale
                        q_scale[n // rows_per_group] multiplies the fp32 accumulator once per tile,
                        which is the same sum as dequantizing every element first.
                        SPLIT_K > 1 (small M: the decode/GEMV path) splits the K loop over
                        program_id(1) (split s takes K-tiles s, s+SPLIT_K, ...) and writes fp32
                        partials [SPLIT_K, M, N]; `_splitk_reduce_kernel` or `_qkv_rope_kernel`
                        sums them. With BLOCK_M >= M there is a single M-tile, so each weight
                        element is loaded exactly once: the weight is streamed once.
`_gemv_kernel`          the same math for [N, K] weights (nn.Linear and int8) at decode sizes, computed
                        transposed: out^T[n, m] = W[n, :] . x[m, :]. The weight tile [BLOCK_N,
                        BLOCK_K] is loaded in memory order and is the dot's left operand as it stands
                        (`_matmul_kernel` must transpose it to make it the right one), and x^T
                        [BLOCK_K, BLOCK_M] the right; the fp32 [BLOCK_N, BLOCK_M] tile is stored
                        transposed. Split-K, the int8 scale, the bias and the fp32 partials are as
                        in `_matmul_kernel`, so the reduce and QKV epilogues read its partials
                        unchanged. (Measured on H200 and dropped: an FMA path for M <= 2 without
                        tensor cores, a broadcast multiply summed over the tile's K axis, 1.2-1.6x
                        slower than the dot on every decode shape.) Any M works (the grid
                        covers the M-tiles), but the weight is streamed once only with one M-tile.
`_gemv_slices_kernel`   the GEMV kernel with K split over the warps of one program: the weight tile is
                        [SLICES, BLOCK_N, BLOCK_K], SLICES consecutive K-slices of the same rows, and
                        the product a batched tl.dot (Triton gives each warp its own batch entries), so
                        every warp streams its own slices of the rows, as the CUDA module's streaming
                        kernel splits K. The SLICES partial tiles are summed once after the loop: no
                        second launch, no atomics. SPLIT_K > 1 splits the K loop over program_id(1)
                        as in `_gemv_kernel` (split s takes chunks of SLICES * BLOCK_K elements s,
                        s + SPLIT_K, ...) and writes the same fp32 partials.
`_matmul_tma_kernel`    the same math for fp16/bf16 (fp32 under the interpreter) weights, SPLIT_K = 1,
                        no int8: x, W and out are read and written through host-built TMA
                        descriptors (sm_90+), so the copy engine moves whole tiles into swizzled
                        shared memory, zero-filling past M, N and K (no masks), and stores the tile
                        back the same way. [N, K] weights load [BLOCK_N, BLOCK_K] boxes and feed
                        their transposed view to tl.dot; [K, N] weights load [BLOCK_K, BLOCK_N].
                        The bias is added in fp32 before the single rounding to the output dtype.
                        NUM_SMS = 0: one program per output tile, grouped like `_matmul_kernel`;
                        else persistent: min(NUM_SMS, tiles) programs loop over the tiles, the tile
                        and K loops flattened into one pipeline. EPILOGUE_SUBTILE stores each tile
                        as two halves, halving the staging buffer the epilogue holds beside the
                        pipeline's.
                        The launcher uses these only for operands a TMA descriptor can describe
                        (16-byte aligned base and row strides, contiguous rows): see
                        `ops._tma_operands`.
`_splitk_reduce_kernel` out[m, n] = sum_s part[s, m, n] (+ bias[n]), cast to the output dtype.
                        A second launch instead of fp32 atomics: no zero-fill, no fixup counter,
                        and the result is bitwise deterministic.
`_qkv_rope_kernel`      the fused-QKV epilogue. Reads the matmul's [M, N] rows once (or its fp32
                        split-K partials, adding the bias), splits row n = [Q | K | V] per head,
                        applies RoPE to q and k, and writes head-major q [B, H, S, D] and
                        k, v [B, KV, S, D] (three views of one [3, B, H, S, D] tensor when KV == H).
                        A follow-up kernel rather than the matmul's store: RoPE pairs (i, i + rd/2)
                        straddle N-tiles, and any head size / rotary_dim works. Measured on H100:
                        +2 us at decode, +27 us (~15%) at M=2048, N=6144.

RoPE (as `dsinf.reference`): position p = seq_offset + s, f_i = theta^(-2i/rd);
rotate_half pairs (i, i + rd/2), else GPT-J pairs (2i, 2i+1); (a, b) -> (a cos - b sin, b cos + a sin).
The angle p * f_i and its reduction modulo 2*pi are computed in fp64 (a few fp64 ops per element of
an epilogue that is memory-bound), then cos/sin in fp32: outputs match the fp64 reference at any
position, where an fp32 angle (DeepSpeed's, HF's) is off by up to p * 2^-24 rad.

PDL (`_matmul_kernel`, the GEMV kernels, `_splitk_reduce_kernel`; the launchers set it for decode sizes on
sm_90+): the kernel is launched with programmatic dependent launch, so it may be scheduled while the previous
kernel on the stream finishes. It waits for that kernel (gdc_wait) before its first load, so every operand
is read in stream order; the matmuls then let the next kernel be scheduled once their K loop is done
(gdc_launch_dependents), the split-K reduce waits for the matmul like any other.

Constraints: every block size is a power of two >= 16 for tl.dot operands (BLOCK_M >= 16 even when
M == 1; padded rows are masked). No K % 8 requirement for `_matmul_kernel` and the GEMV kernels: the K
tail is masked unless EVEN_K. The TMA kernels need K and N multiples of 16 bytes and blocks <= 256 (a
TMA box). The interpreter (TRITON_INTERPRET=1) runs these kernels on CPU tensors; it is correct for fp32
and fp16 but computes bf16 wrongly, so bf16 is tested on the GPU only.
"""
from __future__ import annotations

import triton
import triton.language as tl

try:  # programmatic dependent launch (triton >= 3.4, sm_90+): see PDL below
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - an older triton: the launchers never set PDL (`HAS_GDC`)
    gdc_launch_dependents = gdc_wait = None
HAS_GDC = gdc_wait is not None


@triton.jit
def _grouped_tile(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of output tile `tile_id` in grouped order: GROUP_M consecutive M-tiles share each
    N-tile of the weight, so neighbouring programs reuse it from L2 (only matters with several M-tiles)."""
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (tile_id // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((tile_id % num_pid_in_group) % group_size_m)
    pid_n = (tile_id % num_pid_in_group) // group_size_m
    return pid_m, pid_n


# int8 -> fp16 / bf16 for four weights at a time, exact (|w| <= 128), as the CUDA module does it
# (csrc/inference/cuda/common.cuh, I8Pairs): a byte becomes the low mantissa of a 16-bit float whose exponent
# gives it unit steps, and one subtraction per pair leaves w.
# fp16: the bytes, made unsigned (xor 0x80), in 0x64XX read 1024 + XX, two per register from one PRMT, then
# one fp16x2 subtraction of 1152 per pair (5 instructions per 4 weights).
# bf16 has 7 mantissa bits, too few for one constant over 256 values, but enough for 128: a byte's low 7
# bits l in 0x43XX read 128 + l, its sign bit s in 0x43XX reads 128 + 128 s, and w = l - 128 s is their
# difference, an integer in [-128, 127], exact under any rounding (2 AND, 4 PRMT, 2 bf16x2 FMA by -1: FMA
# because sub.bf16x2 needs sm_90). The previous route through fp32 (2^23 + XX minus 2^23 + 128, then one PRMT
# per pair taking the high halves) took 11 per 4 weights; H200, the defaults, M = 1 / 4 / 8, us, that -> this:
# 4096x12288 17.1 / 18.2 / 18.1 -> 16.5 / 17.0 / 16.9, 4096x14336 21.1 / 21.6 / 21.4 -> 20.9 / 20.2 / 20.3,
# 4096x4096 and 14336x4096 within 0.5 either way. The plain `w.to(dtype)` is one integer-to-float conversion
# per weight. H200, int8 decode 4096x12288 M=1, fp16 activations: 16.6 us instead of 22.2.
_I8_TO_F16_ASM = tl.constexpr("""{
.reg .b32 a, hi, mg;
xor.b32 a, $2, 0x80808080;
mov.b32 hi, 0x64646464;
mov.b32 mg, 0x64806480;
prmt.b32 $0, a, hi, 0x4140;
prmt.b32 $1, a, hi, 0x4342;
sub.f16x2 $0, $0, mg;
sub.f16x2 $1, $1, mg;
}""")
_I8_TO_BF16_ASM = tl.constexpr("""{
.reg .b32 l, s, e, m1, a01, a23, s01, s23;
and.b32 l, $2, 0x7F7F7F7F;
and.b32 s, $2, 0x80808080;
mov.b32 e, 0x43434343;
mov.b32 m1, 0xBF80BF80;
prmt.b32 a01, l, e, 0x4140;
prmt.b32 a23, l, e, 0x4342;
prmt.b32 s01, s, e, 0x4140;
prmt.b32 s23, s, e, 0x4342;
fma.rn.bf16x2 $0, s01, m1, a01;
fma.rn.bf16x2 $1, s23, m1, a23;
}""")


@triton.jit
def _int8_to(w, dtype: tl.constexpr, ASM_I8: tl.constexpr):
    """int8 weights as `dtype`, exactly. ASM_I8 (compiled kernels only: the interpreter runs no PTX):
    the byte tricks above for fp16 and bf16; otherwise, and for fp32, a plain conversion."""
    if ASM_I8 and dtype == tl.float16:
        return tl.inline_asm_elementwise(_I8_TO_F16_ASM, "=r,=r,r", [w], dtype=tl.float16, is_pure=True, pack=4)
    elif ASM_I8 and dtype == tl.bfloat16:
        return tl.inline_asm_elementwise(_I8_TO_BF16_ASM, "=r,=r,r", [w], dtype=tl.bfloat16, is_pure=True, pack=4)
    else:
        return w.to(dtype)


@triton.jit
def _tile_ranges(pid_m, pid_n, pid_k, M, N,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Rows, columns and first K-slice of output tile (pid_m, pid_n) in split pid_k, with the row and
    column masks: (offs_m, offs_n, rk, offs_k, mask_m, mask_n)."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    return offs_m, offs_n, rk, pid_k * BLOCK_K + rk, offs_m < M, offs_n < N


@triton.jit
def _store_tile(acc, out_ptr, bias_ptr, scale_ptr, offs_m, offs_n, mask_m, mask_n, M, N, pid_k, rows_per_group,
                HAS_BIAS: tl.constexpr, W_INT8: tl.constexpr, SPLIT_K: tl.constexpr):
    """The fp32 [BLOCK_M, BLOCK_N] tile times the int8 scale of its rows of W, then either plus the bias
    and cast to the output dtype (SPLIT_K == 1), or stored as split pid_k's fp32 partial in
    [SPLIT_K, M, N], the bias left to the reducing kernel, which adds it once."""
    if W_INT8:
        acc = acc * tl.load(scale_ptr + offs_n // rows_per_group, mask=mask_n, other=0.0)[None, :]
    out_offs = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptr + pid_k.to(tl.int64) * M * N + out_offs, acc, mask=mask)


@triton.jit
def _matmul_kernel(
    x_ptr, w_ptr, bias_ptr, scale_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wk, stride_wn,
    rows_per_group,
    HAS_BIAS: tl.constexpr, W_NK: tl.constexpr, W_INT8: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr, ASM_I8: tl.constexpr, PDL: tl.constexpr,
):
    if PDL:
        gdc_wait()
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    pid_k = tl.program_id(1)
    offs_m, offs_n, rk, offs_k, mask_m, mask_n = _tile_ranges(pid_m, pid_n, pid_k, M, N, BLOCK_M, BLOCK_N, BLOCK_K)
    # 64-bit row/column bases: M*K, K*N or M*N may pass 2^31 elements; the loop only adds scalars.
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :] * stride_xk
    if W_NK:  # [N, K] weight: load [BLOCK_N, BLOCK_K] tiles in memory order, transpose in registers
        w_ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + offs_k[None, :] * stride_wk
    else:
        w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n.to(tl.int64)[None, :] * stride_wn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for it in range(0, tl.cdiv(K, BLOCK_K * SPLIT_K)):
        k_left = K - (it * SPLIT_K + pid_k) * BLOCK_K
        if EVEN_K:
            a = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
        else:
            a = tl.load(x_ptrs, mask=mask_m[:, None] & (rk[None, :] < k_left), other=0.0)
        if W_NK:
            if EVEN_K:
                b = tl.load(w_ptrs, mask=mask_n[:, None], other=0)
            else:
                b = tl.load(w_ptrs, mask=mask_n[:, None] & (rk[None, :] < k_left), other=0)
            if W_INT8:
                b = _int8_to(b, a.dtype, ASM_I8)
            b = tl.trans(b)
        else:
            if EVEN_K:
                b = tl.load(w_ptrs, mask=mask_n[None, :], other=0)
            else:
                b = tl.load(w_ptrs, mask=mask_n[None, :] & (rk[:, None] < k_left), other=0)
        acc = tl.dot(a, b, acc)
        x_ptrs += BLOCK_K * SPLIT_K * stride_xk
        w_ptrs += BLOCK_K * SPLIT_K * stride_wk
    if PDL:
        gdc_launch_dependents()
    _store_tile(acc, out_ptr, bias_ptr, scale_ptr, offs_m, offs_n, mask_m, mask_n, M, N, pid_k, rows_per_group,
                HAS_BIAS, W_INT8, SPLIT_K)


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, bias_ptr, scale_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk,
    rows_per_group,
    HAS_BIAS: tl.constexpr, W_INT8: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    ASM_I8: tl.constexpr, PDL: tl.constexpr,
):
    # out^T[n, m] = sum_k W[n, k] * x[m, k]: the [BLOCK_N, BLOCK_K] weight tile, loaded in memory order,
    # is the dot's left operand as it stands (no transpose of the big operand; int8 is converted in
    # registers on its way to the MMA) and the small x^T [BLOCK_K, BLOCK_M] tile is the right one.
    if PDL:
        gdc_wait()
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_n = tl.program_id(0) % num_pid_n
    pid_m = tl.program_id(0) // num_pid_n
    pid_k = tl.program_id(1)
    offs_m, offs_n, rk, offs_k, mask_m, mask_n = _tile_ranges(pid_m, pid_n, pid_k, M, N, BLOCK_M, BLOCK_N, BLOCK_K)
    w_ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + offs_k[None, :] * stride_wk
    xt_ptrs = x_ptr + offs_k[:, None] * stride_xk + offs_m.to(tl.int64)[None, :] * stride_xm

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for it in range(0, tl.cdiv(K, BLOCK_K * SPLIT_K)):
        k_left = K - (it * SPLIT_K + pid_k) * BLOCK_K
        if EVEN_K:
            xt = tl.load(xt_ptrs, mask=mask_m[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=mask_n[:, None], other=0)
        else:
            xt = tl.load(xt_ptrs, mask=mask_m[None, :] & (rk[:, None] < k_left), other=0.0)
            w = tl.load(w_ptrs, mask=mask_n[:, None] & (rk[None, :] < k_left), other=0)
        if W_INT8:
            w = _int8_to(w, xt.dtype, ASM_I8)
        acc = tl.dot(w, xt, acc)
        xt_ptrs += BLOCK_K * SPLIT_K * stride_xk
        w_ptrs += BLOCK_K * SPLIT_K * stride_wk
    if PDL:
        gdc_launch_dependents()
    _store_tile(tl.trans(acc), out_ptr, bias_ptr, scale_ptr, offs_m, offs_n, mask_m, mask_n, M, N, pid_k,
                rows_per_group, HAS_BIAS, W_INT8, SPLIT_K)


@triton.jit
def _gemv_slices_kernel(
    x_ptr, w_ptr, bias_ptr, scale_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk,
    rows_per_group,
    HAS_BIAS: tl.constexpr, W_INT8: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SLICES: tl.constexpr,
    SPLIT_K: tl.constexpr, ASM_I8: tl.constexpr, PDL: tl.constexpr,
):
    # out^T[n, m] = sum_s sum_k W[n, k] * x[m, k] over the SLICES K-slices of each chunk of SLICES * BLOCK_K:
    # acc[s] = W_s [BLOCK_N, BLOCK_K] @ x_s^T [BLOCK_K, BLOCK_M], one batched dot per chunk.
    if PDL:
        gdc_wait()
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_n = tl.program_id(0) % num_pid_n
    pid_m = tl.program_id(0) // num_pid_n
    pid_k = tl.program_id(1)
    CHUNK: tl.constexpr = SLICES * BLOCK_K
    offs_m, offs_n, rk, _, mask_m, mask_n = _tile_ranges(pid_m, pid_n, 0, M, N, BLOCK_M, BLOCK_N, BLOCK_K)
    kk = pid_k * CHUNK + tl.arange(0, SLICES)[:, None] * BLOCK_K + rk[None, :]  # [SLICES, BLOCK_K]: k in chunk 0
    w_ptrs = w_ptr + offs_n.to(tl.int64)[None, :, None] * stride_wn + kk[:, None, :] * stride_wk
    xt_ptrs = x_ptr + kk[:, :, None] * stride_xk + offs_m.to(tl.int64)[None, None, :] * stride_xm

    acc = tl.zeros((SLICES, BLOCK_N, BLOCK_M), dtype=tl.float32)
    for it in range(0, tl.cdiv(K, CHUNK * SPLIT_K)):
        k_left = K - it * CHUNK * SPLIT_K  # kk < k_left: inside K in this iteration
        if EVEN_K:
            xt = tl.load(xt_ptrs, mask=mask_m[None, None, :], other=0.0)
            w = tl.load(w_ptrs, mask=mask_n[None, :, None], other=0)
        else:
            xt = tl.load(xt_ptrs, mask=mask_m[None, None, :] & (kk < k_left)[:, :, None], other=0.0)
            w = tl.load(w_ptrs, mask=mask_n[None, :, None] & (kk < k_left)[:, None, :], other=0)
        if W_INT8:
            w = _int8_to(w, xt.dtype, ASM_I8)
        acc = tl.dot(w, xt, acc)
        xt_ptrs += CHUNK * SPLIT_K * stride_xk
        w_ptrs += CHUNK * SPLIT_K * stride_wk
    if PDL:
        gdc_launch_dependents()
    _store_tile(tl.trans(tl.sum(acc, axis=0)), out_ptr, bias_ptr, scale_ptr, offs_m, offs_n, mask_m, mask_n, M, N,
                pid_k, rows_per_group, HAS_BIAS, W_INT8, SPLIT_K)


@triton.jit
def _tma_tile(x_desc, w_desc, off_m, off_n, K, W_NK: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 x[off_m:+BLOCK_M, :] @ W[:, off_n:+BLOCK_N] through TMA descriptors. The copy engine
    zero-fills what lies past M, N or K, so no tail masks: a ragged last K-tile adds zeros."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(0, tl.cdiv(K, BLOCK_K)):
        a = x_desc.load([off_m, kt * BLOCK_K])
        if W_NK:  # [N, K]: a [BLOCK_N, BLOCK_K] box in memory order; .T is a view for the MMA
            b = w_desc.load([off_n, kt * BLOCK_K]).T
        else:
            b = w_desc.load([kt * BLOCK_K, off_n])
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _tma_epilogue(acc, out_desc, bias_ptr, off_m, off_n, N, HAS_BIAS: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EPILOGUE_SUBTILE: tl.constexpr):
    """acc (+ bias[n], in fp32) stored as one tile, or with EPILOGUE_SUBTILE as two [BLOCK_M, BLOCK_N/2]
    halves (half the shared-memory staging buffer, which a persistent kernel holds beside its pipeline).
    The store clips rows and columns past M and N."""
    if HAS_BIAS:
        offs_n = off_n + tl.arange(0, BLOCK_N)
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    if EPILOGUE_SUBTILE:
        halves = tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
        left, right = tl.split(halves)
        out_desc.store([off_m, off_n], left.to(out_desc.dtype))
        out_desc.store([off_m, off_n + BLOCK_N // 2], right.to(out_desc.dtype))
    else:
        out_desc.store([off_m, off_n], acc.to(out_desc.dtype))


@triton.jit
def _matmul_tma_kernel(
    x_desc, w_desc, out_desc, bias_ptr,
    M, N, K,
    HAS_BIAS: tl.constexpr, W_NK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, EPILOGUE_SUBTILE: tl.constexpr, NUM_SMS: tl.constexpr,
):
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    if NUM_SMS == 0:  # one program per output tile
        pid_m, pid_n = _grouped_tile(tl.program_id(0), num_pid_m, num_pid_n, GROUP_M)
        acc = _tma_tile(x_desc, w_desc, pid_m * BLOCK_M, pid_n * BLOCK_N, K, W_NK, BLOCK_M, BLOCK_N, BLOCK_K)
        _tma_epilogue(acc, out_desc, bias_ptr, pid_m * BLOCK_M, pid_n * BLOCK_N, N, HAS_BIAS, BLOCK_M, BLOCK_N,
                      EPILOGUE_SUBTILE)
    else:
        # Persistent: grid = (min(NUM_SMS, tiles),); program p takes tiles p, p + NUM_SMS, ... in grouped
        # order. flatten=True fuses the tile and K loops into one software-pipelined loop, so the loads
        # of the next tile are in flight while this one's epilogue runs. The epilogue derives its tile
        # from its own counter, not from the loop variable: a value used by both the loads (early
        # pipeline stages) and the store (the last) would be carried across stages.
        tile_out = tl.program_id(0) - NUM_SMS
        for tile in tl.range(tl.program_id(0), num_pid_m * num_pid_n, NUM_SMS, flatten=True):
            pid_m, pid_n = _grouped_tile(tile, num_pid_m, num_pid_n, GROUP_M)
            acc = _tma_tile(x_desc, w_desc, pid_m * BLOCK_M, pid_n * BLOCK_N, K, W_NK, BLOCK_M, BLOCK_N, BLOCK_K)
            tile_out += NUM_SMS
            pid_m, pid_n = _grouped_tile(tile_out, num_pid_m, num_pid_n, GROUP_M)
            _tma_epilogue(acc, out_desc, bias_ptr, pid_m * BLOCK_M, pid_n * BLOCK_N, N, HAS_BIAS, BLOCK_M,
                          BLOCK_N, EPILOGUE_SUBTILE)


@triton.jit
def _splitk_reduce_kernel(
    part_ptr, bias_ptr, out_ptr, MN, N,
    SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
):
    if PDL:
        gdc_wait()
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.load(part_ptr + offs, mask=mask, other=0.0)
    for s in tl.static_range(1, SPLIT_K):
        acc += tl.load(part_ptr + s * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_row_block(src_ptr, offs, mask, MN, SPLIT: tl.constexpr):
    """fp32 value of the matmul output at `offs`: the output itself, or the sum of its split-K partials."""
    x = tl.load(src_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    for s in tl.static_range(1, SPLIT):
        x += tl.load(src_ptr + s * MN + offs, mask=mask, other=0.0)
    return x


@triton.jit(do_not_specialize=["seq_offset"])
def _qkv_rope_kernel(
    src_ptr, bias_ptr, q_ptr, k_ptr, v_ptr,
    S, N, H, KV, seq_offset, freq_hi, freq_lo,
    SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr,
    D: tl.constexpr, ROT: tl.constexpr, ROTATE_HALF: tl.constexpr,
    HEADS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # grid = (cdiv(S, BLOCK_S), cdiv(H + 2*KV, HEADS), B). Head j of the fused row: q heads 0..H-1, then
    # k, then v; its columns are j*D .. j*D+D-1 in every case, since [Q | K | V] are head-major inside.
    # The cos/sin tile depends on (s, d) only: it is computed once and reused for HEADS heads.
    pid_s = tl.program_id(0)
    pid_h = tl.program_id(1)
    b = tl.program_id(2)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_sd = (offs_s < S)[:, None] & (offs_d < D)[None, :]
    MN = (tl.num_programs(2) * S).to(tl.int64) * N
    src_row = src_ptr + ((b * S + offs_s).to(tl.int64) * N)[:, None]

    if ROT > 0:
        if ROTATE_HALF:
            first = offs_d < ROT // 2
            partner = tl.where(first, offs_d + ROT // 2, offs_d - ROT // 2)
            pair = tl.where(first, offs_d, offs_d - ROT // 2)
        else:
            first = (offs_d % 2) == 0
            partner = tl.where(first, offs_d + 1, offs_d - 1)
            pair = offs_d // 2
        sign = tl.where(first, -1.0, 1.0)
        # f_i = theta^(-2i/rd) = 2^(i * c), c = -2*log2(theta)/rd passed as fp32 hi + lo (Python floats
        # reach a kernel as fp32). The angle p * f_i and its reduction modulo 2*pi are done in fp64,
        # so cos/sin see an angle accurate to fp32 rounding at any position: an fp32 angle would be
        # off by p * 2^-24 (2e-3 rad at p = 30000), which fp16 outputs already show.
        c = tl.full([], freq_hi, tl.float64) + tl.full([], freq_lo, tl.float64)
        inv_freq = tl.exp2(pair.to(tl.float64) * c)
        angle = (seq_offset + offs_s).to(tl.float64)[:, None] * inv_freq[None, :]
        turns = tl.floor(angle * tl.full([], 0.15915494309189535, tl.float64) + 0.5)
        r = (angle - turns * tl.full([], 6.283185307179586, tl.float64)).to(tl.float32)
        cos = tl.cos(r)
        sin = tl.sin(r) * sign[None, :]

    for hh in tl.static_range(HEADS):
        j = pid_h * HEADS + hh
        # Head validity as a tensor, not a scalar compare: the interpreter turns
        # `bool tensor & scalar compare` into an int mask it cannot load with.
        jv = offs_d * 0 + j
        head_ok = jv < H + 2 * KV
        mask = mask_sd & head_ok[None, :]
        col = j * D + offs_d
        x = _load_row_block(src_row, col[None, :], mask, MN, SPLIT)
        if HAS_BIAS:
            x += tl.load(bias_ptr + col, mask=(offs_d < D) & head_ok, other=0.0).to(tl.float32)[None, :]
        if ROT > 0:
            rotated = (offs_d < ROT) & (jv < H + KV)  # v heads and dims >= rotary_dim pass through
            rmask = mask & rotated[None, :]
            xp = _load_row_block(src_row, (j * D + partner)[None, :], rmask, MN, SPLIT)
            if HAS_BIAS:
                xp += tl.load(bias_ptr + j * D + partner, mask=rotated, other=0.0).to(tl.float32)[None, :]
            x = tl.where(rotated[None, :], x * cos + xp * sin, x)
        out = x.to(q_ptr.dtype.element_ty)
        if j < H:
            dst = q_ptr + ((b * H + j) * S).to(tl.int64) * D
        elif j < H + KV:
            dst = k_ptr + ((b * KV + (j - H)) * S).to(tl.int64) * D
        else:  # v, or a padding head past H + 2*KV (fully masked)
            dst = v_ptr + ((b * KV + (j - H - KV)) * S).to(tl.int64) * D
        tl.store(dst + offs_s[:, None] * D + offs_d[None, :], out, mask=mask)
