"""GPU tests of the int8-weight prefill GEMM (csrc/inference/cuda/gemm_int8.cu) through the compiled ops.

An int8 matmul above the GEMV's range (or routed off it) runs on the GEMM, which reads the int8 weights once,
up to the M its route says (the compiled rule, by kernel and weight size: see
test_compiled_rule_and_routes_pick_the_path; an int8-gemm key of the route table overrides it, which the parity
tests use to run the GEMM at every M), and on dequantize + cuBLAS above; shapes or dtypes the GEMM does not take
(fp32 activations, K % 16, unaligned weights) always dequantize. The GEMM has two kernels: warpgroup MMA where
sm_90a code runs on a compute-capability-9.0 device, mma.sync elsewhere; the parity tests run the one the device
takes (test_the_kernel_for_the_device_is_what_runs checks which), and a child process builds the mma.sync one
for a Hopper machine too. Every case checks the path that ran (the
binding's last route: "int8-gemm" or "aten"), so a test of the GEMM fails when the GEMM is not what ran, and
compares with `dsinf.reference` on CPU in fp32 by max error over max |ref| (tolerances as
tests/test_cuda_module.py). Shapes cover: M tails of both CTA tiles (64 rows up to M = 64, 128 above), N
tails of the 128-row weight tile, K of one partial k-tile (16, 48), K not a multiple of the 64-wide k-tile,
K split over a cluster (few output tiles, long K), 1 / a few / N scale groups, bias.
Outputs are checked for NaN after the allocator was filled with NaN bytes (`poison`).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from test_cuda_module import DTYPES, _fn, assert_close, make_int8, poison, ref_linear, ref_vm

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

HALF = ["fp16", "bf16"]


def gemm_for_every_m(suffix, K, N):
    """The int8 GEMM for every M of this shape while the block runs (its int8-gemm key forced)."""
    from dsinf import routes

    return routes.forced("cuda", [routes.RouteKey(suffix, routes.INT8_GEMM, K, N)])


def misaligned(w):
    """The same int8 weight 2 bytes into a larger buffer (a view no 16- or 8-byte kernel path may take)."""
    return torch.cat([w.new_zeros(2), w.flatten()])[2:].view_as(w)


@pytest.fixture
def route():
    """The CUDA module's route table (restored after the test) and its last-route probe."""
    from dsinf import routes

    b = routes.binding("cuda")
    saved = dict(b.applied)
    yield b
    b.set(saved)


# K x N: one partial k-tile; K not a multiple of 64; N tails of the 128-row tile; a split K (2 tiles, long K);
# Llama-like rows.
SHAPES = [(16, 40), (48, 130), (80, 257), (272, 1), (1040, 384), (8192, 200), (4096, 1024)]
MS = [17, 33, 64, 65, 128, 129, 300]


@pytest.mark.parametrize("suffix", HALF)
@pytest.mark.parametrize("K,N", SHAPES)
@pytest.mark.parametrize("M", MS)
def test_vector_matmul_int8_gemm(cuda_module, route, suffix, K, N, M):
    dtype = DTYPES[suffix]
    fn = _fn(cuda_module, "vector_matmul", suffix)
    w, scale = make_int8(K, N, 1 if N == 1 else (N if N % 2 else 2))
    x = torch.randn(1, M, K, dtype=dtype, device="cuda")
    poison()
    with gemm_for_every_m(suffix, K, N):
        out = fn(x, w, False, scale, True, True)
        assert route.last() == "int8-gemm", f"M={M} {K}x{N} ran on {route.last()}"
    assert_close(out, ref_vm(x, w, scale, True, True), dtype)


@pytest.mark.parametrize("suffix", HALF)
@pytest.mark.parametrize("groups", ["1", "4", "N"])
@pytest.mark.parametrize("B,S", [(2, 40), (3, 100)])
def test_linear_int8_gemm_bias_groups(cuda_module, route, suffix, groups, B, S):
    dtype = DTYPES[suffix]
    fn = _fn(cuda_module, "linear_layer", suffix)
    K, N = 512, 320
    w, scale = make_int8(K, N, N if groups == "N" else int(groups))
    x = torch.randn(B, S, K, dtype=dtype, device="cuda")
    b = torch.randn(N, dtype=dtype, device="cuda")
    poison()
    with gemm_for_every_m(suffix, K, N):
        outs = fn(x, w, b, True, False, 1, False, q_scale=scale)
        assert route.last() == "int8-gemm"
    [ref] = ref_linear(x, w, b, True, False, 1, q_scale=scale)
    assert_close(outs[0], ref, dtype)


@pytest.mark.parametrize("suffix", HALF)
@pytest.mark.parametrize("M", [1, 3, 8, 16])
def test_decode_m_routed_off_the_gemv_takes_the_gemm(cuda_module, route, suffix, M):
    """A route that sends an int8 shape's small M off the GEMV (max_m 0) lands on the GEMM where the GEMM's
    route takes that M (forced here, whatever the compiled rule says)."""
    from dsinf.routes import RouteKey

    dtype = DTYPES[suffix]
    fn = _fn(cuda_module, "vector_matmul", suffix)
    K, N = 1024, 640
    w, scale = make_int8(K, N, N)
    route.set({**route.applied, RouteKey(suffix, "int8", K, N): 0})
    x = torch.randn(M, 1, K, dtype=dtype, device="cuda")
    poison()
    with gemm_for_every_m(suffix, K, N):
        out = fn(x, w, False, scale, True, True)
        assert route.last() == "int8-gemm"
    assert_close(out, ref_vm(x, w, scale, True, True), dtype)


@pytest.mark.parametrize("suffix", list(DTYPES))
def test_what_the_gemm_does_not_take_keeps_dequantize(cuda_module, route, suffix):
    """fp32 activations, K % 16 != 0 and a weight view that is not 16-byte aligned run dequantize + cuBLAS,
    correctly; a misaligned activation view is copied aligned by the binding, so it takes the GEMM."""
    dtype = DTYPES[suffix]
    fn = _fn(cuda_module, "vector_matmul", suffix)
    # (K, N, misaligned weight, misaligned activations, path)
    cases = [(1024, 96, False, False, "aten")] if suffix == "fp32" else [
        (40, 96, False, False, "aten"), (1024, 96, True, False, "aten"), (1024, 96, False, True, "int8-gemm")]
    for K, N, bad_w, bad_x, path in cases:
        w, scale = make_int8(K, N, 1)
        if bad_w:
            w = misaligned(w)
        x = torch.randn(1, 64 * K + 2, dtype=dtype, device="cuda")
        x = x[:, 2:].view(1, 64, K) if bad_x else x[:, : 64 * K].view(1, 64, K)
        poison()
        with gemm_for_every_m(suffix, K, N):
            out = fn(x, w, False, scale, True, True)
            assert route.last() == path, f"{suffix} K={K} weight/x misaligned {bad_w}/{bad_x} ran on {route.last()}"
        assert_close(out, ref_vm(x, w, scale, True, True), dtype)


@pytest.mark.parametrize("suffix", list(DTYPES))
def test_dequantize_covers_every_row_and_chunk(cuda_module, route, suffix):
    """dequantize + cuBLAS (the GEMM's route held at 0) on the dequantize kernel's edges: one 8-weight chunk per
    row, K % 16 == 8, rows of more chunks than one pass of the CTA's threads covers (513, 1025), more rows than
    the grid (each CTA takes several), scale groups, and a weight 2 bytes off alignment (the scalar kernel).
    Fresh allocations hold NaN bytes (`poison`), so a chunk or row the kernel skips shows in the output."""
    from dsinf import routes

    dtype = DTYPES[suffix]
    fn = _fn(cuda_module, "vector_matmul", suffix)
    rows = 16 * torch.cuda.get_device_properties(0).multi_processor_count + 8  # past one grid of CTAs
    for K, N, groups, bad_w in [(8, 40, 5, False), (40, 96, 1, False), (4104, 70, 7, False), (8200, 33, 1, False),
                                (1032, rows, 8, False), (1032, 96, 3, True)]:
        w, scale = make_int8(K, N, groups)
        if bad_w:
            w = misaligned(w)
        x = torch.randn(1, 20, K, dtype=dtype, device="cuda")
        poison()
        with routes.forced("cuda", [routes.RouteKey(suffix, routes.INT8_GEMM, K, N)], 0):
            out = fn(x, w, False, scale, True, True)
            assert route.last() == "aten", f"{suffix} {K}x{N} ran on {route.last()}"
        assert_close(out, ref_vm(x, w, scale, True, True), dtype)


@pytest.mark.parametrize("suffix", HALF)
def test_gemm_is_deterministic_and_graph_safe(cuda_module, route, suffix):
    """The split-K reduction (a cluster, no atomics) gives bit-identical results run to run, and the op
    captures into a CUDA graph whose replays match eager."""
    from dsinf import routes

    dtype = DTYPES[suffix]
    fn = _fn(cuda_module, "vector_matmul", suffix)
    K, N, M = 8192, 256, 100  # 2 x 1 tiles: K split over a cluster
    w, scale = make_int8(K, N, 4)
    x = torch.randn(1, M, K, dtype=dtype, device="cuda")
    route.set({**route.applied, routes.RouteKey(suffix, routes.INT8_GEMM, K, N): M})
    first = fn(x, w, False, scale, True, True)
    assert route.last() == "int8-gemm"
    for _ in range(3):
        assert torch.equal(fn(x, w, False, scale, True, True), first)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn(x, w, False, scale, True, True)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn(x, w, False, scale, True, True)
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, fn(x, w, False, scale, True, True))
    assert_close(out, ref_vm(x, w, scale, True, True), dtype)


def _wgmma_runs() -> bool:
    """Whether the GEMM runs its warpgroup-MMA kernel here: a compute-capability-9.0 device and a module built
    for sm_90a (the default there)."""
    from op_builder.builder import loaded_variants

    archs = loaded_variants()[("transformer_inference", "cuda")].manifest.get("archs", [])
    return torch.cuda.get_device_capability() == (9, 0) and "9.0a" in archs


@pytest.mark.parametrize("suffix", HALF)
def test_compiled_rule_and_routes_pick_the_path(cuda_module, route, suffix):
    """Without a route, the GEMM up to an M that depends on its kernel and the weight's size (warpgroup MMA:
    128, and on weights of 48 MiB or more 512, bf16 256; mma.sync: 64, and 128 on 48 MiB or more), dequantize +
    cuBLAS above. An int8-gemm key moves the crossover either way (0: dequantize for every M). Each path is
    checked against the fp32 product on the GPU (the large weights are too large for a CPU reference per case)."""
    from dsinf import routes

    dtype = DTYPES[suffix]
    fn = _fn(cuda_module, "vector_matmul", suffix)
    wgmma = _wgmma_runs()

    def run(K, N, w, scale, M):
        x = torch.randn(1, M, K, dtype=dtype, device="cuda")
        out = fn(x, w, False, scale, True, True)
        ref = x[0].float() @ (w.float() * scale.repeat_interleave(N // scale.numel())[:, None]).t()
        assert_close(out[0], ref.to(torch.float64).cpu(), dtype)
        return route.last()

    def key(K, N):
        return routes.RouteKey(suffix, routes.INT8_GEMM, K, N)

    K, N = 1024, 640  # 0.6 MiB
    w, scale = make_int8(K, N, N)
    small = 128 if wgmma else 64
    assert route.default(key(K, N)) == small
    assert [run(K, N, w, scale, M) for M in (17, small, small + 1)] == ["int8-gemm", "int8-gemm", "aten"]
    route.set({**route.applied, key(K, N): 0})
    assert run(K, N, w, scale, 17) == "aten"
    route.set({**route.applied, key(K, N): 300})
    assert [run(K, N, w, scale, M) for M in (128, 300, 301)] == ["int8-gemm", "int8-gemm", "aten"]

    assert route.default(key(4096, 12272)) == small  # just under 48 MiB
    K, N = 4096, 12288  # 48 MiB
    big = (512 if suffix == "fp16" else 256) if wgmma else 128
    assert route.default(key(K, N)) == big
    w, scale = make_int8(K, N, 1)
    assert [run(K, N, w, scale, M) for M in (big, big + 1)] == ["int8-gemm", "aten"]
    assert route.default(routes.RouteKey("fp32", routes.INT8_GEMM, K, N)) == 0


def _gemm_kernels_launched(fn, x, w, scale) -> list[str]:
    """The names of the int8-GEMM kernels one call launched (the profiler's CUDA activity)."""
    from torch.profiler import ProfilerActivity, profile

    fn(x, w, False, scale, True, True)  # warm before the profiled call
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(x, w, False, scale, True, True)
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if "gemm_int8" in e.name]


@pytest.mark.parametrize("suffix", HALF)
def test_the_kernel_for_the_device_is_what_runs(cuda_module, route, suffix):
    """A compute-capability-9.0 device with a build for sm_90a (the default there) runs the warpgroup-MMA
    kernel, with two warpgroups and a ring of 4; other devices and builds the mma.sync one.
    Both token tiles (64 up to M = 64, 128 above), read from the launched kernel's template arguments."""
    hopper = _wgmma_runs()
    dtype = DTYPES[suffix]
    fn = _fn(cuda_module, "vector_matmul", suffix)
    K, N = 1040, 384
    w, scale = make_int8(K, N, 2)
    for M, tile in ((17, 64), (129, 128)):
        x = torch.randn(1, M, K, dtype=dtype, device="cuda")
        with gemm_for_every_m(suffix, K, N):
            names = _gemm_kernels_launched(fn, x, w, scale)
            assert route.last() == "int8-gemm"
        assert len(names) == 1, f"M={M}: expected one GEMM launch, got {names}"
        kernel, targs = _kernel_and_args(names[0])
        want = ("gemm_int8_wgmma_kernel", [tile, 2, 4]) if hopper else ("gemm_int8_kernel", [tile])
        assert (kernel, targs) == want, f"{suffix} M={M}: {names[0]}"


def _kernel_and_args(name: str) -> tuple[str, list[int]]:
    """The GEMM kernel's name and its integer template arguments (after the dtype), from the profiler's name:
    `gemm_int8_kernel<T, BM>` or `gemm_int8_wgmma_kernel<T, BT, warpgroups, stages>`."""
    found = re.search(r"(gemm_int8(?:_wgmma)?_kernel)<[^<>,]+((?:,\s*\d+)+)>", name)
    assert found, f"no template arguments in the kernel's name: {name}"
    return found.group(1), [int(v) for v in found.group(2).split(",")[1:]]


MMA_SYNC = "DSINF_GEMM_I8_WGMMA=0"  # the build define that leaves the mma.sync kernel to every device


def test_the_mma_sync_kernel_keeps_parity_where_wgmma_would_run():
    """The mma.sync kernel, which sm_80 / sm_89 devices and builds without sm_90a run, built with MMA_SYNC in a
    child process (its own module), so a Hopper machine checks it too: parity of the probe's forced GEMM on
    both token tiles, M and N tails of the 128-row weight tile, a partial k-tile and a K split, and the kernel
    each row launched (read from its template arguments), so a build that fell back to another kernel fails."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ms = (17, 64, 65, 129, 300)
    cmd = [sys.executable, os.path.join(root, "tools", "probe_int8_prefill.py"), "--no-timing", "--kernel-names",
           "--define", MMA_SYNC, "--shapes", "48x130,1040x384,8192x200", "--ms", ",".join(map(str, ms))]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=400, check=False, cwd=root)
    tail = (run.stdout + run.stderr)[-3000:]
    assert run.returncode == 0, tail
    assert "with " + MMA_SYNC in run.stdout, f"the variant was not what ran:\n{tail}"
    assert run.stdout.count("parity ok") == 2 * 3 * len(ms) * 2, tail  # dtypes x shapes x M x both paths
    kernels = re.findall(r"kernel (\w+) (\d+)x(\d+) M=(\d+): (.*)", run.stdout)
    assert len(kernels) == 2 * 3 * len(ms), tail
    for dtype, K, N, M, names in kernels:
        [name] = names.split(" | ")  # one launch: a K split is one cluster launch
        tile = 64 if int(M) <= 64 else 128
        assert _kernel_and_args(name) == ("gemm_int8_kernel", [tile]), f"{dtype} {K}x{N} M={M}: {name}"
