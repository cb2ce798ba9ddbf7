"""What is measured: one `Case` per problem, with the bytes and FLOPs it must move (pure, no torch).

`ratio` everywhere is torch time / our time (> 1: ours is faster). Bytes are the fewest the op must
move (weights, activations, outputs once each, plus bias and int8 scales); FLOPs are 2*M*N*K per GEMM.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}

#: Parts of the ops sections; `--only` takes them to run a part of the device's ops section.
OPS_PARTS = ("decode", "int8", "int8prefill", "prefill", "qkv", "mlp", "rmsnorm")

#: Llama-7B/8B/70B-sized decode weights, K x N.
CUDA_DECODE_SHAPES = ((4096, 4096), (4096, 12288), (8192, 8192), (4096, 14336), (14336, 4096))
#: Llama-7B's attention and MLP projections (the CPU int8 goal's shapes).
CPU_INT8_SHAPES = ((4096, 4096), (4096, 11008))
#: Llama-3-8B's four linears as a fused model runs them, K x N: q|k|v, o, gate|up, down (the int8 prefill rows).
LLAMA3_8B_LINEARS = ((4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096))
#: Llama-3-8B's MLP: hidden -> intermediate -> hidden (the fused gated MLP goal).
MLP_SHAPE = (4096, 14336)


@dataclass(frozen=True)
class Case:
    """One measured problem. `dtype` is the activation dtype; `layout` is the weight's: "kn" ([K, N],
    transposed_mode=False), "nk" ([N, K], nn.Linear) or "int8" (int8 [N, K] + fp32 scale[N]).

    op: "vector_matmul" | "linear" (matmul + bias) | "qkv" (linear, do_flash_attn, RoPE) |
        "mlp" (residual + RMSNorm + gate|up GEMM + SiLU*up + down GEMM; N is the intermediate size) |
        "pre_rms_norm" (residual add + RMSNorm; K = N = hidden).
    """

    section: str  # "cpu" | "cuda"
    part: str  # one of OPS_PARTS
    op: str
    dtype: str
    layout: str
    B: int
    S: int
    K: int
    N: int
    heads: int = 0
    rotary_dim: int = 0
    seq_offset: int = 0

    @property
    def M(self) -> int:
        return self.B * self.S

    @property
    def weight_bytes(self) -> int:
        """Bytes of the weights (what rotates to defeat the cache): for the norm, its inputs."""
        if self.op == "pre_rms_norm":
            return 2 * self.M * self.K * DTYPE_BYTES[self.dtype]
        per = 1 if self.layout == "int8" else DTYPE_BYTES[self.dtype]
        gemms = 3 if self.op == "mlp" else 1  # gate, up, down
        return gemms * self.K * self.N * per

    @property
    def bytes(self) -> int:
        """Fewest bytes the op moves."""
        act = DTYPE_BYTES[self.dtype]
        if self.op == "pre_rms_norm":  # read vals, residual, gamma; write normed, vals + residual
            return 4 * self.M * self.K * act + self.K * act
        if self.op == "mlp":  # weights; read input, residual, gamma; write output, residual sum
            return self.weight_bytes + 4 * self.M * self.K * act + self.K * act
        total = self.weight_bytes + self.M * self.K * act + self.M * self.N * act
        if self.op in ("linear", "qkv"):
            total += self.N * act
        if self.layout == "int8":
            total += self.N * 4
        return total

    @property
    def flops(self) -> int:
        if self.op == "pre_rms_norm":
            return 0
        if self.op == "mlp":
            return 2 * self.M * self.K * self.N * 3
        return 2 * self.M * self.N * self.K

    @property
    def label(self) -> str:
        lay = {"kn": "[K,N]", "nk": "[N,K]", "int8": "int8"}[self.layout]
        if self.op == "pre_rms_norm":
            return f"pre_rms_norm {self.dtype} M={self.M} hidden={self.K}"
        if self.op == "mlp":
            return f"gated mlp {self.dtype} M={self.M} {self.K}->{self.N}->{self.K} {lay}"
        what = {"vector_matmul": "vm", "linear": "linear+bias", "qkv": "qkv+rope"}[self.op]
        extra = f" H={self.heads}" if self.op == "qkv" else ""
        return f"{what} {self.dtype} M={self.M} {self.K}x{self.N} {lay}{extra}"


def copies_for(nbytes: int, cache_bytes: int, factor: float, lo: int, hi: int) -> int:
    """How many copies of an `nbytes` buffer to rotate so that the set is >= factor x the cache."""
    return max(lo, min(hi, math.ceil(factor * cache_bytes / max(1, nbytes))))


def cpu_cases(quick: bool) -> list[Case]:
    """The CPU plan. Both int8 goal shapes run also with --quick (the goal names them)."""
    c: list[Case] = []
    for K, N in CPU_INT8_SHAPES:  # bf16 activations: aten's fast path and the goal's peer
        c.append(Case("cpu", "int8", "vector_matmul", "bf16", "int8", 1, 1, K, N))
    if not quick:  # fp32 activations, vs torch's dense fp32 matmul (informative)
        for K, N in CPU_INT8_SHAPES:
            c.append(Case("cpu", "int8", "vector_matmul", "fp32", "int8", 1, 1, K, N))
    for dtype in ("bf16", "fp32"):
        for layout in (("kn",) if quick else ("kn", "nk")):
            c.append(Case("cpu", "decode", "vector_matmul", dtype, layout, 1, 1, 4096, 4096))
    if not quick:  # batch-8 decode (M = 8), nn.Linear's layout: the GEMV's multi-row tiles against torch's GEMM;
        # DeepSpeed's [K, N] layout on the wide MLP weight: the [K, N] GEMV's column stripes (narrow ones had
        # lost to MKL there, 0.8x)
        for dtype in ("bf16", "fp32"):
            c.append(Case("cpu", "decode", "vector_matmul", dtype, "nk", 8, 1, 4096, 4096))
            c.append(Case("cpu", "decode", "vector_matmul", dtype, "kn", 8, 1, *CPU_INT8_SHAPES[-1]))
        c.append(Case("cpu", "int8", "vector_matmul", "bf16", "int8", 8, 1, *CPU_INT8_SHAPES[-1]))
    hidden = 2048 if quick else 4096
    for M in (1, 16, 128):
        B, S, off = (1, 1, 37) if M == 1 else (1, M, 0)
        c.append(Case("cpu", "qkv", "qkv", "fp32", "kn", B, S, hidden, 3 * hidden, hidden // 128, 128, off))
    c.append(Case("cpu", "prefill", "linear", "fp32", "kn", 1, 512, 4096, 4096))
    if not quick:  # bf16 in nn.Linear's layout: torch's bf16 GEMM on both sides where the host has one
        c.append(Case("cpu", "prefill", "linear", "bf16", "nk", 1, 512, 4096, 4096))
    return c


def cuda_cases(quick: bool) -> list[Case]:
    """The CUDA plan: decode weights in both layouts, int8 weight-only at decode and at prompt lengths, the
    M=2048 prefill, fused QKV, the fused gated MLP and PreRMSNorm."""
    c: list[Case] = []
    shapes = ((4096, 4096), (4096, 12288)) if quick else CUDA_DECODE_SHAPES
    dtypes = ("fp16",) if quick else ("fp16", "bf16")
    for dtype in dtypes:
        for K, N in shapes:
            for M in ((1, 8) if quick else (1, 4, 8, 16)):
                for layout in ("kn", "nk"):
                    c.append(Case("cuda", "decode", "vector_matmul", dtype, layout, M, 1, K, N))
    for K, N in shapes:
        for M in ((1, 8) if quick else (1, 4, 8, 16)):
            c.append(Case("cuda", "int8", "vector_matmul", "fp16", "int8", M, 1, K, N))
        if not quick:  # bf16 activations: their own kernels' defaults (Triton's above all), never slower too
            for M in (1, 8):
                c.append(Case("cuda", "int8", "vector_matmul", "bf16", "int8", M, 1, K, N))
    for dtype in dtypes:  # int8 weights at prompt lengths: the int8 GEMM or dequantize + cuBLAS, as routed
        for K, N in (LLAMA3_8B_LINEARS[1:3] if quick else LLAMA3_8B_LINEARS):
            for M in ((128, 2048) if quick else (128, 512, 2048)):
                c.append(Case("cuda", "int8prefill", "vector_matmul", dtype, "int8", 1, M, K, N))
    for dtype in dtypes:
        for layout in ("kn", "nk"):
            c.append(Case("cuda", "prefill", "linear", dtype, layout, 1, 2048, 4096, 12288))
    for M in ((1, 2048) if quick else (1, 4, 8, 16, 2048)):
        B, S, off = (M, 1, 100) if M <= 16 else (1, M, 0)
        c.append(Case("cuda", "qkv", "qkv", "fp16", "kn", B, S, 4096, 3 * 4096, 32, 128, off))
    if not quick:
        c.append(Case("cuda", "qkv", "qkv", "bf16", "kn", 1, 2048, 4096, 3 * 4096, 32, 128, 0))
    K, N = MLP_SHAPE
    for M in (1, 8):
        c.append(Case("cuda", "mlp", "mlp", "fp16", "nk", M, 1, K, N))
    for hidden in (4096, 8192):
        for M in ((256,) if quick else (256, 2048)):
            c.append(Case("cuda", "rmsnorm", "pre_rms_norm", "fp16", "nk", 1, M, hidden, hidden))
    return c


def plan_cases(device: str, quick: bool) -> list[Case]:
    return cuda_cases(quick) if device == "cuda" else cpu_cases(quick)
