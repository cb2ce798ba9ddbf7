"""GPU parity of the decode GEMV's k-loop structure (csrc/inference/cuda/gemv_mma.cu, gemv_stream.cu).

[N, K] weights, fp16/bf16 and int8, take the streaming kernel (gemv_stream.cu: a thread-private cp.async ring
of 64-byte k-steps in 2-step warp units; a 16-byte chunk holds 8 k of fp16/bf16, 16 of int8). SHAPES give a
warp zero, one, several, an odd number and a fractional number of units, with and without a K split, at
M = 1, 3, 8 (one n-tile of tokens) for 16-bit weights, and M = 1, 3, 8, 16 (two token tiles) for int8 with
fp16 and bf16 activations (bf16 takes the fp32 -> high-half int8 conversion, fp16 the half-magic one).
STREAM_SHAPES are the streaming kernel's own cases, for both weight types: row tiles of 16 (N % 16 != 0),
several tiles per CTA with the ring running across tile boundaries (N above 16 x the resident CTAs), partial
k-steps (K % 64 != 0, K below one unit), a K split over a cluster, 16-warp CTAs and int8 1-step units, every
M 1..8 and the two-token-tile M 9..16; an output the kernel fails to write reads as NaN. STREAM_PATHS check
which of those instantiations a call launched (the profiler's kernel names). Every call is routed to our
GEMV (`routes.forced`) and checked to have run there: the compiled crossover alone sends fp16/bf16 M > 8 to
cuBLAS.
tools/probe_gemv.py runs the same kind of check against a build with other compile-time knobs; the last
test does so for the tuning variants (the PDL modes of every kernel, DSINF_GEMV_MIN_CTAS, the ring shapes
of both weight types, the 32-row-tile thresholds, activations loaded per unit, which [K, N] shapes take the
cp.async ring, the streaming kernel's 8-warp 2-step units where the defaults take 16 warps or 1-step units).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from dsinf import reference, routes
from dsinf.library import has_kernel

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
RTOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}
# K x N for the streaming kernel's k loop. A warp unit is 64 k of fp16/bf16 and 128 of int8, so 8 warps take
# 512 / 1024 k per round; split = the K split over a cluster on sm_90 (elsewhere 1).
SHAPES = [
    (3584, 8192),  # 512 16-row tiles, no split: 7 units per warp (16-bit), 3 or 4 (int8: a partial round)
    (3072, 4096),  # 256 tiles, no split: 6 / 3 units per warp
    (6144, 1024),  # 64 tiles, split 4 (1536 k per CTA): 3 / 1.5 units per warp
    (192, 4096),  # less than one round: 3 warps (16-bit) or 1.5 (int8) have a unit, the rest none
    (8192, 264),  # 17 tiles, split 8, a partial last row tile
]


def _fn(suffix: str):
    name = f"vector_matmul_{suffix}"
    capability = torch.cuda.get_device_capability()
    if suffix == "bf16" and capability < (8, 0):  # absent hardware; on an sm_80+ GPU a missing kernel fails
        pytest.skip(f"bf16 kernels need compute capability 8.0; this GPU has {capability}")
    assert has_kernel(name, "cuda"), f"{name} is missing from the CUDA build on a compute capability {capability} GPU"
    op = getattr(torch.ops.dsinf, name)

    def on_our_gemv(x, w, async_op, q_scale, q_int8, transposed_mode):
        # The kernels are what these tests check, so each call's shape is routed to our GEMV: the compiled
        # crossover sends 16-bit M > 8 to cuBLAS, and a persisted route table may send any M there.
        key = routes.key_of(x, w, q_int8, transposed_mode)
        with routes.forced("cuda", [key]) as b:
            out = op(x, w, async_op, q_scale, q_int8, transposed_mode)
            assert b.last() == "gemv", f"{key.text} M={x.numel() // x.shape[-1]} ran on {b.last()}, not our GEMV"
        return out

    return on_our_gemv


def _check(out: torch.Tensor, ref: torch.Tensor, dtype) -> None:
    assert out.dtype == dtype and out.shape == ref.shape
    assert torch.isfinite(out).all(), "non-finite output: an element was not written"
    o, r = out.double().cpu(), ref.double().cpu()
    err = ((o - r).norm() / r.norm().clamp_min(1e-30)).item()
    assert err <= RTOL[dtype], f"relative error {err:.3g} > {RTOL[dtype]:.1g}"


def _poisoned_then_checked(fn, x, w, nk: bool, extra_k: int) -> None:
    """Runs fn over all-inf weights with K + extra_k first (what a later call's shared-memory ring may
    inherit where it should hold zeros past K), then x @ w twice, the first output NaN-filled and freed (the
    allocator hands its block to the second, so an element the kernel fails to write reads as NaN); checks
    the second against dsinf.reference."""
    dtype, (M, K) = x.dtype, x.shape[-2:]
    kp = K + extra_k
    shape = (w.shape[0], kp) if nk else (kp, w.shape[1])
    fn(torch.ones(1, M, kp, dtype=dtype, device="cuda"), torch.full(shape, float("inf"), dtype=dtype, device="cuda"),
       False, None, False, nk)
    xd, wd = x.cuda(), w.cuda()
    first = fn(xd, wd, False, None, False, nk)
    first.fill_(float("nan"))
    del first
    got = fn(xd, wd, False, None, False, nk)
    _check(got, reference.vector_matmul(x, w, False, None, False, nk), dtype)


@pytest.mark.parametrize("suffix", list(DTYPES))
@pytest.mark.parametrize("K,N", SHAPES)
@pytest.mark.parametrize("M", [1, 3, 8])
def test_nk_float_batches(cuda_module, suffix, K, N, M):
    dtype = DTYPES[suffix]
    fn = _fn(suffix)
    gen = torch.Generator().manual_seed(K * 7 + N + M)
    x = torch.randn(1, M, K, generator=gen).to(dtype).cuda()
    w = (torch.randn(N, K, generator=gen) / K ** 0.5).to(dtype).cuda()
    out = fn(x, w, False, None, False, True)
    _check(out, reference.vector_matmul(x.cpu(), w.cpu(), False, None, False, True), dtype)


@pytest.mark.parametrize("suffix", list(DTYPES))
@pytest.mark.parametrize("K,N", SHAPES)
@pytest.mark.parametrize("M", [1, 3, 8, 16])
@pytest.mark.parametrize("groups", ["1", "8", "N"])
def test_nk_int8_batches(cuda_module, suffix, K, N, M, groups):
    dtype = DTYPES[suffix]
    fn = _fn(suffix)
    gen = torch.Generator().manual_seed(K * 5 + N + M)
    G = N if groups == "N" else int(groups)
    w = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=gen)  # -128 included
    scale = (torch.rand(G, generator=gen) + 0.5) / (127.0 * K ** 0.5)
    x = torch.randn(1, M, K, generator=gen).to(dtype)
    out = fn(x.cuda(), w.cuda(), False, scale.cuda(), True, False)
    _check(out, reference.vector_matmul(x, w, False, scale, True, False), dtype)


def test_int8_conversion_every_value(cuda_module):
    """Every int8 value through both activation dtypes' in-register conversion, one weight column each:
    x = one-hot rows, so out[m, n] is exactly w[n, k_m] * scale (no accumulation error to hide behind)."""
    K, N = 256, 256
    w = torch.arange(-128, 128, dtype=torch.int16).to(torch.int8).repeat(N, 1)  # w[n, k] = k - 128
    w = torch.roll(w, shifts=1, dims=1)
    w = torch.stack([torch.roll(w[n], n) for n in range(N)])
    scale = torch.ones(1)
    for suffix, dtype in DTYPES.items():
        fn = _fn(suffix)
        for k0 in (0, 64, 128, 192):
            x = torch.zeros(1, 8, K, dtype=dtype)
            for m in range(8):
                x[0, m, k0 + m * 8] = 1.0
            out = fn(x.cuda(), w.cuda(), False, scale.cuda(), True, False).cpu()
            want = torch.stack([w[:, k0 + m * 8] for m in range(8)]).to(dtype).unsqueeze(0)
            assert torch.equal(out, want), f"{suffix} k0={k0}: int8 conversion not exact"


# K x N for the streaming kernel. The H200/H100 fit 4 of its CTAs per SM (132 SMs: 528 resident CTAs; counts
# below for int8 at M <= 8; 3 at M 9..16 with 32-row tiles); a CTA tile is 32 rows when N / 32 gives every SM
# two (gemv_stream.cu), else 16. Tiles beyond the resident CTAs make CTAs of q = ceil(tiles / resident) tiles,
# the last CTA fewer. At M <= 8 on 16-row tiles, fewer than 2 per SM take 16-warp CTAs, and int8 from 3 per SM
# 1-step units (STREAM_PATHS below).
STREAM_SHAPES = [
    (4112, 12008),  # 32-row tiles (376), K % 64 == 16 (a partial k-step), N % 32 == 8 (rows 8.. of the last tile out)
    (1040, 14344),  # 449 32-row tiles (M > 8: 396 resident, so CTAs of 2, the last of 1), N % 16 == 8
    (272, 33800),  # 1057 32-row tiles (M <= 8: 353 CTAs of 3, the last two of 2; M > 8: CTAs of 3); N % 32 == 8
    (2064, 8200),  # 257 32-row tiles < 2 per SM: 513 16-row tiles (CTAs of 1; int8 1-step units), K % 64 == 16
    (4112, 3080),  # 193 16-row tiles: 16-warp CTAs, K % 64 == 16, N % 16 == 8
    (16, 4100),  # K = one int8 chunk (two 16-bit chunks): threads t < 1 (< 2) of warp 0 hold all of K; 16 warps
    (8192, 200),  # 13 tiles: K split over a cluster (sm_90), partial last tile
    (1216, 2064),  # 129 tiles (< 132 SMs: split 2 on sm_90; int8 640 + 576 of K, 16-bit 608 + 608)
]


@pytest.mark.parametrize("suffix", list(DTYPES))
@pytest.mark.parametrize("K,N", STREAM_SHAPES)
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 6, 7, 8, 9, 16])
@pytest.mark.parametrize("groups", ["1", "N"])
def test_int8_stream_shapes(cuda_module, suffix, K, N, M, groups):
    dtype = DTYPES[suffix]
    fn = _fn(suffix)
    gen = torch.Generator().manual_seed(K * 3 + N + M)
    G = N if groups == "N" else 1
    w = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=gen)
    scale = (torch.rand(G, generator=gen) + 0.5) / (127.0 * K ** 0.5)
    x = torch.randn(1, M, K, generator=gen).to(dtype)
    xd, wd, sd = x.cuda(), w.cuda(), scale.cuda()
    first = fn(xd, wd, False, sd, True, False)
    first.fill_(float("nan"))  # the caching allocator hands this block to the next output of the same size,
    del first  # so an element the kernel fails to write reads as NaN
    got = fn(xd, wd, False, sd, True, False)
    _check(got, reference.vector_matmul(x, w, False, scale, True, False), dtype)


@pytest.mark.parametrize("suffix", list(DTYPES))
@pytest.mark.parametrize("K,N", STREAM_SHAPES)
@pytest.mark.parametrize("M", [1, 2, 3, 5, 8, 9, 16])
def test_nk_16bit_stream_shapes(cuda_module, suffix, K, N, M):
    """fp16/bf16 [N, K] weights through the streaming kernel. A call over all-inf weights with a longer K runs
    first: where a ring slot of the next call is only ever meant to hold chunks past K (K = 16, 33800 x 272,
    the second split rank of 2064 x 1216), it then holds inf, and a missing zero-fill makes its row NaN
    (0 * inf). That relies on a launch finding the previous launch's shared-memory bytes, which the hardware
    does not promise; on the H200 it did (the planted bug failed here, PERFORMANCE.md run 25). In the other
    shapes earlier units leave finite bytes there. Unwritten outputs read as NaN."""
    dtype = DTYPES[suffix]
    fn = _fn(suffix)
    gen = torch.Generator().manual_seed(K * 11 + N + M)
    w = (torch.randn(N, K, generator=gen) / K ** 0.5).to(dtype)
    x = torch.randn(1, M, K, generator=gen).to(dtype)
    _poisoned_then_checked(fn, x, w, True, 1024)  # two rounds of 8 warp units (512 k each) past K


# Which instantiation of the streaming kernel a call takes at M <= 8 (stream_tokens in gemv_stream.cu), by 16-row
# tiles per SM: (weight, activations, tiles per SM x 2, expected (warps, unit steps; 0 = the configured)).
# Row tiles of 32 (N / 32 >= 2 per SM) are out of these shapes: tiles per SM < 4.
STREAM_PATHS = [
    ("nk", "fp16", 3, (16, 0)), ("nk", "bf16", 3, (16, 0)), ("int8", "fp16", 3, (16, 0)),
    ("int8", "bf16", 3, (16, 0)),
    ("nk", "fp16", 5, (8, 0)), ("int8", "fp16", 5, (8, 0)), ("int8", "bf16", 5, (8, 0)),  # 2.5 per SM
    ("nk", "bf16", 7, (8, 0)), ("int8", "fp16", 7, (8, 1)), ("int8", "bf16", 7, (8, 1)),  # 3.5 per SM
]


def _stream_kernels_launched(fn, x, w, int8: bool) -> list[str]:
    """The names of the streaming-kernel instantiations one call launched (the profiler's CUDA activity)."""
    from torch.profiler import ProfilerActivity, profile

    scale = torch.ones(1, device="cuda") if int8 else None
    fn(x, w, False, scale, int8, not int8)  # compiled and warm before the profiled call
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(x, w, False, scale, int8, not int8)
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if "gemv_stream_kernel" in e.name]


@pytest.mark.parametrize("layout,suffix,halves,want", STREAM_PATHS)
def test_stream_path_by_tiles_per_sm(cuda_module, layout, suffix, halves, want):
    """The 16-warp CTAs and the int8 1-step units run where the dispatch rules say, and the 8-warp kernel
    elsewhere: the launched kernel's template arguments <T, WT, NT, RT, warps, steps>, read from its name."""
    dtype, fn = DTYPES[suffix], _fn(suffix)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    N, K = 16 * (halves * sms // 2), 1024
    gen = torch.Generator().manual_seed(N + halves)
    x = torch.randn(1, 1, K, generator=gen).to(dtype).cuda()
    int8 = layout == "int8"
    w = (torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=gen) if int8
         else (torch.randn(N, K, generator=gen) / K ** 0.5).to(dtype)).cuda()
    names = _stream_kernels_launched(fn, x, w, int8)
    assert len(names) == 1, f"{layout} {suffix} N={N}: expected one streaming-kernel launch, got {names}"
    found = re.search(r"gemv_stream_kernel<([^<>]*)>", names[0])
    assert found, f"no template arguments in the kernel's name: {names[0]}"
    args = [a.strip() for a in found.group(1).split(",")]
    assert (int(args[-2]), int(args[-1])) == want, f"{layout} {suffix} N={N} ({halves / 2} tiles per SM): {names[0]}"


# K x N for the [K, N] GEMV (64-column CTA tiles, 16-row k-steps in warp units of 8 x 16 rows).
# Which kernel and split each shape takes on an H200 (132 SMs): the cp.async ring up to 132 64-column tiles, the
# register batches above.
KN_SHAPES = [
    (4100, 12296),  # 193 tiles: register batches, split 2 (386 CTAs); K % 16 == 4 (a partial step), N % 64 == 8
    (4100, 8712),  # 137 tiles: register batches, split 3, cluster slices of 171 + 171 + 170 sums (M <= 8)
    (4100, 2568),  # 41 tiles: the ring, split 3 (1376 k per CTA, 1348 in the last), slices of 171 + 171 + 170
    (3080, 264),  # 5 tiles: the ring, split 4 (784 k per CTA, 728 in the last), K % 16 == 8
    (8192, 200),  # 4 tiles: the ring, the deepest split; N % 64 == 8
    (12, 520),  # K below one step: most warps have no unit
]


@pytest.mark.parametrize("suffix", list(DTYPES))
@pytest.mark.parametrize("K,N", KN_SHAPES)
@pytest.mark.parametrize("M", [1, 3, 8, 9, 16])
def test_kn_shapes(cuda_module, suffix, K, N, M):
    """fp16/bf16 [K, N] weights, both kernels (the cp.async ring and the register batches): odd K and N, K
    splits, both token tiles; unwritten outputs read as NaN, and ring slots past K or N left from a call
    over all-inf weights must be zero-filled."""
    dtype = DTYPES[suffix]
    fn = _fn(suffix)
    gen = torch.Generator().manual_seed(K * 13 + N + M)
    w = (torch.randn(K, N, generator=gen) / K ** 0.5).to(dtype)
    x = torch.randn(1, M, K, generator=gen).to(dtype)
    _poisoned_then_checked(fn, x, w, False, 512)


def _chain(fn, x, ws, nk: bool) -> list[torch.Tensor]:
    """x, then each output fed to the next call as its activations: y[i + 1] = y[i] @ ws[i] (a (w, scale) pair:
    int8 weights [N, K])."""
    ys = [x]
    for w in ws:
        w, scale = w if isinstance(w, tuple) else (w, None)
        ys.append(fn(ys[-1], w, False, scale, scale is not None, nk and scale is None))
    return ys


def _check_chain(ys, ws, nk: bool) -> None:
    for i, w in enumerate(ws):  # each link against the reference on the activations it was given
        w, scale = (t.cpu() for t in w) if isinstance(w, tuple) else (w.cpu(), None)
        want = reference.vector_matmul(ys[i].cpu(), w, False, scale, scale is not None, nk and scale is None)
        _check(ys[i + 1], want, ys[i].dtype)


# The kernels launched with programmatic dependent launch, as chains: (layout, sizes), link i maps sizes[i]
# features to sizes[i + 1]. H200: the [K, N] ring (4096: 64 tiles split 2; 1032: 17 tiles, no split) and the
# streaming [N, K] kernel's 16-bit weights (4096: 256 row tiles, one per CTA; 1032: 65, K split over a
# cluster; 20000 outputs: 625 tiles of 32 rows, more than the resident CTAs, so a CTA's trigger comes after
# its last tile's k loop); and int8 weights on the streaming kernel's wide CTAs (DSINF_I8_WIDE_PDL: 4096 outputs,
# 256 16-row tiles, fewer than 2 per SM), alone and between links of 6000 outputs, launched without PDL
# (DSINF_I8_PDL).
PDL_CHAINS = [("kn", [4096] * 7), ("kn", [1032] * 7), ("nk", [4096] * 7), ("nk", [1032] * 7),
              ("nk", [1032, 20000] * 3 + [1032]), ("int8", [4096] * 7),
              ("int8", [4096, 4096, 6000, 4096, 6000, 4096, 4096])]


@pytest.mark.parametrize("suffix", list(DTYPES))
@pytest.mark.parametrize("layout,sizes", PDL_CHAINS,
                         ids=lambda v: v if isinstance(v, str) else "x".join(map(str, sorted(set(v)))))
@pytest.mark.parametrize("M", [1, 8])
def test_pdl_back_to_back_dependent_calls(cuda_module, suffix, layout, sizes, M):
    """The [K, N] ring (DSINF_KN_RING_PDL) and the streaming [N, K] kernel (DSINF_NK_STREAM_PDL, int8 on wide
    CTAs DSINF_I8_WIDE_PDL) are launched with programmatic dependent launch: the next call's CTAs may start
    while this one finishes, and must wait (griddepcontrol.wait) before they read the activations this call
    writes. A chain of calls, each reading the previous one's output, in eager mode and replayed as a CUDA
    graph; the outputs land in NaN-filled freed blocks, so a read that ran ahead sees NaN or stale values."""
    dtype, nk = DTYPES[suffix], layout in ("nk", "int8")
    fn = _fn(suffix)
    gen = torch.Generator().manual_seed(sum(sizes) + M)
    shapes = [(n, k) if nk else (k, n) for k, n in zip(sizes, sizes[1:])]
    if layout == "int8":  # scales keep each link's output near unit size, as the 16-bit weights' 1 / sqrt(k)
        ws = [(torch.randint(-128, 128, shape, dtype=torch.int8, generator=gen).cuda(),
               ((torch.rand(shape[0], generator=gen) + 0.5) / (127.0 * k ** 0.5)).cuda())
              for shape, k in zip(shapes, sizes)]
    else:
        ws = [(torch.randn(*shape, generator=gen) / k ** 0.5).to(dtype).cuda() for shape, k in zip(shapes, sizes)]
    x = torch.randn(1, M, sizes[0], generator=gen).to(dtype).cuda()
    poison = [torch.full((1, M, n), float("nan"), dtype=dtype, device="cuda") for n in sizes[1:] * 2]
    del poison
    _check_chain(_chain(fn, x, ws, nk), ws, nk)

    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ys = _chain(fn, x, ws, nk)
    for _ in range(3):
        for y in ys[1:]:
            y.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        _check_chain(ys, ws, nk)


# The compile-time tuning variants: other code than the default build (see the test below).
TUNING_VARIANTS = [
    ("DSINF_GEMV_PDL=1", "DSINF_GEMV_PDL_PREFETCH_KB=64", "DSINF_KN_RING_PDL=1", "DSINF_NK_STREAM_PDL=1",
     "DSINF_I8_PDL=2", "DSINF_I8_WIDE_PDL=1", "DSINF_KN_RING_PDL_PREFETCH_UNITS=2"),
    ("DSINF_GEMV_PDL=2", "DSINF_GEMV_MIN_CTAS=2"),
    ("DSINF_I8_STAGES=5", "DSINF_I8_UNIT_STEPS=1"),  # the int8 ring's other shape
    ("DSINF_I8_X_AHEAD=1",),  # [N, K]: activations loaded per unit at M > 8
    ("DSINF_I8_ROW_TILES=1", "DSINF_I8_X_AHEAD=0"),  # [N, K]: 16-row tiles only; activations loaded per unit
    ("DSINF_NK_STREAM_STAGES=4", "DSINF_NK_STREAM_UNIT_STEPS=1"),  # fp16/bf16 [N, K]: the ring's other shape
    ("DSINF_STREAM_RT2_FILL=1", "DSINF_KN_SPLIT_ANY=0"),  # 32-row tiles from one per SM; [K, N] split a power of 2
    ("DSINF_STREAM_RT2_M16=0", "DSINF_KN_CTAS_PER_SM=1"),  # M 9..16 on 16-row tiles; [K, N] filled to 1 CTA/SM
    # [K, N]: register batches for every shape; [N, K] int8: the copies without the L2 policy, whole lines
    ("DSINF_KN_RING_STAGES=0", "DSINF_I8_EVICT_FIRST=0", "DSINF_I8_L2_PREFETCH=128"),
    ("DSINF_KN_RING_STAGES=4", "DSINF_KN_RING_UNIT=1", "DSINF_KN_RING_TILES_PER_SM=2",  # the ring's other shape,
     "DSINF_KN_RING_PDL_PREFETCH_UNITS=0"),  # without the L2 hint
    ("DSINF_STREAM_WIDE_BELOW=0", "DSINF_I8_SHORT_UNITS_FROM=0"),  # [N, K] 16-row tiles: 8 warps, configured units
]


def _probe_variant(defines: tuple[str, ...]):
    """Build `defines` in a child process (one module per process) and run the probe's parity section on it."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, os.path.join(root, "tools", "probe_gemv.py"), "--no-timing"]
    for d in defines:
        cmd += ["--define", d]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=580, check=False, cwd=root)


@pytest.fixture(scope="module")
def tuning_variant_runs(request):
    """Every selected tuning variant's child, submitted at once to a pool of cores / 4 (at most 4) workers.
    One after the other, the ten children (each a build of the module's nvcc units and a parity run) took
    about 10 minutes of a 16-core GPU machine, more than one call of it. The parity checks compare values
    only, so children sharing the GPU check the same thing."""
    selected = [item.callspec.params["defines"] for item in request.session.items
                if getattr(item, "originalname", None) == "test_tuning_variants_keep_parity"]
    pool = ThreadPoolExecutor(max_workers=max(1, min(4, (os.cpu_count() or 1) // 4)))
    runs = {d: pool.submit(_probe_variant, d) for d in selected}
    yield runs
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("defines", TUNING_VARIANTS)
def test_tuning_variants_keep_parity(defines, tuning_variant_runs):
    """The compile-time tuning variants (programmatic dependent launch + L2 prefetch, register cap, the ring
    shapes, 32-row tiles, the K split of [K, N], the [K, N] ring or none, the int8 copies without their L2
    hints) are other code than the default build: each is built in a child process and checked with the
    probe's parity section (every path, M 1..16, odd K/N, int8 groups 1/8/N, fp16 and bf16)."""
    out = tuning_variant_runs[defines].result()
    tail = (out.stdout + out.stderr)[-3000:]
    assert "with " + " ".join(defines) in out.stdout, f"the variant was not what ran:\n{tail}"
    assert out.returncode == 0 and "parity: 0 failure(s)" in out.stdout, tail
