"""GPU probe of the int8-weight prefill product (vector_matmul with int8 weights above the GEMV's range): parity,
then time the int8 GEMM (csrc/inference/cuda/gemm_int8.cu) and dequantize + cuBLAS, each forced by its route
(the shape's int8-gemm key), against cuBLAS on the same weights in fp16/bf16 (what the 16-bit model runs).

    PYTHONPATH=$PWD python tools/probe_int8_prefill.py
    PYTHONPATH=$PWD python tools/probe_int8_prefill.py --dtypes fp16 --ms 64,128 --define DSINF_GEMM_I8_STAGES=3
    PYTHONPATH=$PWD python tools/probe_int8_prefill.py --no-timing --define DSINF_GEMM_I8_WGMMA=0  # parity only
    PYTHONPATH=$PWD python tools/probe_int8_prefill.py --define DSINF_GEMM_I8_WG_STAGES=6 --kernel-names
    PYTHONPATH=$PWD python tools/probe_int8_prefill.py --dtypes fp16 --ms 1024 --dequant-time  # the dequantize kernel

Default shapes: Llama-3-8B's four linears (qkv, o, gate|up, down); M over prefill lengths. Per row: the GEMM's
µs, dequantize + cuBLAS's, cuBLAS's on 16-bit weights, the GEMM's speedup over dequantize + cuBLAS and over
16-bit cuBLAS (> 1: the GEMM is faster), its TFLOP/s and the weights' share of the copy bandwidth at its time,
and the path the compiled rule takes (`rule`). Timing: CUDA-graph replays over rotating weight copies larger
than the L2 (probe_gemv.GraphTimer). Every forced path is checked to be the one that ran. Not a test.
"""
from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (ROOT, HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

from probe_gemv import GraphTimer, copies_for, copy_bandwidth, fail_line, log, start_cuda  # noqa: E402

SHAPES = "4096x6144,4096x4096,4096x28672,14336x4096"  # K x N
MS = "17,32,64,128,256,512,1024,2048,4096"
TOL = {"fp16": 4e-3, "bf16": 2.4e-2}  # max |err| / max |ref|, as tests/test_cuda_module.py


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=SHAPES, help="KxN,... (weights [N, K] int8)")
    p.add_argument("--ms", default=MS, help="M = tokens per call, comma-separated")
    p.add_argument("--dtypes", default="fp16,bf16")
    p.add_argument("--groups", type=int, default=0, help="scale groups (0: one per output row)")
    p.add_argument("--define", action="append", default=[], help="NAME=VALUE passed to nvcc as -D (one build)")
    p.add_argument("--no-timing", action="store_true", help="parity of both paths only (tests run variants so)")
    p.add_argument("--dequant-time", action="store_true",
                   help="log the dequantize kernel's own time and rate (profiler) beside dequantize + cuBLAS")
    p.add_argument("--kernel-names", action="store_true",
                   help="log the GEMM kernel each row launched (its template arguments: tile, warpgroups, stages)")
    args = p.parse_args()

    import torch

    if not start_cuda(torch, args.define):
        return 1
    from dsinf import routes
    from dsinf.quantize import quantize_int8

    timer = GraphTimer(torch, reps=5, min_calls=8)
    if not args.no_timing:
        bw = copy_bandwidth(torch)
        log(f"copy bandwidth {bw:.0f} GB/s")
    b = routes.binding("cuda")
    failures = 0
    log(f"{'dtype':5} {'K x N':>12} {'M':>5} {'GEMM us':>8} {'deq+cuBLAS us':>14} {'cuBLAS 16-bit us':>17} "
        f"{'x deq':>6} {'x 16-bit':>8} {'TFLOP/s':>8} {'% copy':>7} {'rule':>9}")
    for name in args.dtypes.split(","):
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[name]
        op = getattr(torch.ops.dsinf, f"vector_matmul_{name}")
        for shape in args.shapes.split(","):
            K, N = (int(v) for v in shape.split("x"))
            key = routes.RouteKey(name, routes.INT8_GEMM, K, N)
            w16 = torch.randn(N, K, device="cuda", dtype=dtype) / K ** 0.5
            q = quantize_int8(w16, args.groups or None, transposed_mode=True)
            scale = q.scale
            wq = q.contiguous()
            w32 = wq.float() * scale.repeat_interleave(N // scale.numel())[:, None]  # the reference's weight
            del w16
            n_int8, n_16 = (1, 1) if args.no_timing else (copies_for(N * K), copies_for(2 * N * K))
            ws8 = [wq.clone() for _ in range(n_int8)]
            ws16 = [w32.to(dtype) for _ in range(n_16)]
            for M in (int(m) for m in args.ms.split(",")):
                try:
                    x = torch.randn(1, M, K, device="cuda", dtype=dtype)
                    ref = x[0].float() @ w32.t()  # fp32 on the GPU (no TF32: torch's default)
                    op(x, wq, False, scale, True, True)
                    rule = b.last()
                    times = {}
                    for path, max_m in (("int8-gemm", None), ("aten", 0)):
                        with routes.forced("cuda", [key], max_m) as fb:
                            out = op(x, wq, False, scale, True, True)
                            if fb.last() != path:
                                raise RuntimeError(f"forced {path}, ran {fb.last()}")
                            err = ((out[0].float() - ref).abs().max() / ref.abs().max()).item()
                            if not err <= TOL[name]:
                                failures += 1
                                log(f"  PARITY FAIL {name} {K}x{N} M={M} {path}: max err {err:.2e} (tol {TOL[name]})")
                            elif args.no_timing:
                                log(f"  parity ok {name} {K}x{N} M={M} {path}: max err {err:.2e}")
                            if args.kernel_names and path == "int8-gemm":
                                log(f"  kernel {name} {K}x{N} M={M}: {' | '.join(_gemm_kernels(torch, op, x, wq, scale))}")
                            if args.no_timing:
                                continue
                            times[path] = timer.time_many(
                                {path: (lambda i: op(x, ws8[i], False, scale, True, True), n_int8)})[path]
                            if args.dequant_time and path == "aten":
                                us = _kernel_us(torch, lambda i: op(x, ws8[i], False, scale, True, True), n_int8,
                                                "dequant")
                                moved = N * K * (1 + x.element_size())  # int8 read, 16-bit write
                                log(f"  dequantize {name} {K}x{N}: {us:.1f} us, {moved / us / 1e3:.0f} GB/s")
                    if args.no_timing:
                        continue
                    times["cublas"] = timer.time_many({"cublas": (lambda i: torch.mm(x[0], ws16[i].t()), n_16)})["cublas"]
                    g = times["int8-gemm"]
                    log(f"{name:5} {f'{K}x{N}':>12} {M:>5} {g:>8.1f} {times['aten']:>14.1f} {times['cublas']:>17.1f} "
                        f"{times['aten'] / g:>6.2f} {times['cublas'] / g:>8.2f} {2.0 * M * N * K / g / 1e6:>8.0f} "
                        f"{100 * N * K / (g * 1e3) / bw:>6.0f}% {rule:>9}")
                except Exception as exc:  # noqa: BLE001
                    failures += 1
                    fail_line(f"{name} {K}x{N} M={M}", exc)
            del ws8, ws16, w32
            torch.cuda.empty_cache()
    return 1 if failures else 0


def _kernel_us(torch, fn, copies: int, needle: str) -> float:
    """Mean device time (µs) per call of the kernels named with `needle` over 4 rounds of fn(i)."""
    from torch.profiler import ProfilerActivity, profile

    for i in range(copies):
        fn(i)
    torch.cuda.synchronize()
    calls = 4 * copies
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for j in range(calls):
            fn(j % copies)
        torch.cuda.synchronize()
    total = 0.0
    for e in prof.key_averages():
        if needle in e.key:
            total += getattr(e, "device_time_total", None) or e.cuda_time_total
    if not total:
        raise RuntimeError(f"no kernel named {needle!r} ran")
    return total / calls


def _gemm_kernels(torch, op, x, w, scale) -> list[str]:
    """The int8-GEMM kernels one call launched, by name (the profiler's CUDA activity)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        op(x, w, False, scale, True, True)
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if "gemm_int8" in e.name]


if __name__ == "__main__":
    sys.exit(main())
