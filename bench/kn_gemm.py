"""The CPU module's [K, N] GEMM against the library's, through the op: `python -m bench.kn_gemm`.

The measurement behind the binding's rule for float [K, N] weights past the GEMV (cpu_binding_ops.cpp,
kn_gemm): per shape and M, vector_matmul_<dtype> forced onto our GEMM (gemm_kn.cpp) and onto the library's
(oneDNN's on an AMD host, MKL's elsewhere: routes.fp32_gemm picks), timed in interleaved rounds
(bench.timing.time_cpu), each checked against dsinf.reference first. Prints library time / ours (> 1: ours
faster), and what the host's rule picks; with --gemv also ours / our GEMV forced at that M (> 1: the GEMV
faster), the measurement behind the [K, N] GEMV crossover where ours runs past it.

    python -m bench.kn_gemm                                  # the shapes and Ms of docs/PERFORMANCE.md
    python -m bench.kn_gemm --shapes 4096x12288 --m 64,128 --min-time 2
    python -m bench.kn_gemm --gemv --m 8,16,24,32
    python -m bench.kn_gemm --dtype fp16
"""
from __future__ import annotations

import argparse

SHAPES = ("4096x4096", "4096x12288", "4096x11008", "11008x4096", "4096x14336", "14336x4096", "1024x4096",
          "4096x1024", "4096x2048", "4096x8192", "8192x8192", "2048x2048")
MS = (16, 32, 64, 128, 256, 512)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.kn_gemm", description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=",".join(SHAPES), help="KxN[,KxN...] (default: %(default)s)")
    p.add_argument("--m", default=",".join(map(str, MS)), help="rows M = B*S (default: %(default)s)")
    p.add_argument("--min-time", type=float, default=1.0, help="seconds of timing per implementation and case")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"),
                   help="the weight's and the activations' dtype (16-bit: ours widens the weight in its panels, the "
                        "library's path widens it into blocks first; bf16 with torch's native bf16 GEMM off)")
    p.add_argument("--gemv", action="store_true",
                   help="also time our GEMV forced at each M, and print ours / GEMV (> 1: the GEMV faster)")
    args = p.parse_args(argv)

    import torch

    from bench.timing import time_cpu
    from dsinf import reference, routes
    from op_builder import InferenceBuilder

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    vm = getattr(InferenceBuilder().load(), f"vector_matmul_{args.dtype}")
    binding = routes.binding("cpu")
    library = "oneDNN" if binding.onednn_fp32_gemm() else "MKL"
    rule = "ours where it ran faster" if binding.kn_gemm() else library
    print(f"{args.dtype} [K, N] past the GEMV: ours / {library} (ratio = {library} time / ours; threads "
          f"{torch.get_num_threads()}; the host's rule: {rule})")
    gen = torch.Generator().manual_seed(0)
    for shape in args.shapes.split(","):
        K, N = (int(v) for v in shape.lower().split("x"))
        w = (torch.randn(K, N, generator=gen) * K ** -0.5).to(dtype)
        cells = []
        for M in (int(v) for v in args.m.split(",")):
            x = torch.randn(1, M, K, generator=gen).to(dtype)
            want = reference.vector_matmul(x, w, False, None, False, False)

            key = routes.RouteKey(args.dtype, "kn", K, N)

            def run(path: str):  # "ours" / "lib": past the GEMV on that GEMM; "gemv": on the GEMV
                with routes.forced("cpu", [key], max_m=None if path == "gemv" else 0), routes.kn_gemm(path == "ours"), \
                        routes.bf16_gemm(False):
                    return vm(x, w, False, None, False, False)

            paths = ("ours", "lib", "gemv") if args.gemv else ("ours", "lib")
            for path in paths:
                err = ((run(path) - want).abs().max() / want.abs().max()).item()
                if err > {"fp32": 2e-5, "fp16": 2e-3, "bf16": 1.6e-2}[args.dtype]:
                    raise SystemExit(f"{shape} M={M}: {library if path == 'lib' else path} is off the reference by "
                                     f"{err:.3g}")
            t = time_cpu({path: (lambda i, path=path: run(path), 1) for path in paths}, args.min_time)
            flops = 2 * M * K * N / (t["ours"].us * 1e-6) / 1e9
            cells.append(f"M={M} {t['lib'].us / t['ours'].us:.2f}x ({flops:.0f} GF/s)"
                         + (f" gemv {t['ours'].us / t['gemv'].us:.2f}" if args.gemv else ""))
        print(f"  {shape:>11}  " + "  ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
