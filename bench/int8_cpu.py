"""int8 weights with bf16 activations on the CPU, each path of the op against torch: `python -m bench.int8_cpu`.

The measurement behind the binding's int8 rules on hosts with bf16 dot products (cpu_binding_ops.cpp: amx_gemv,
native_bf16_gemv_max_m): per shape and M, vector_matmul_bf16 on an int8 weight forced onto each of its paths -
`amx` (the AMX tiles, gemv_amx.cpp, forced on: past M = 256 too, where the rule dequantizes; `amx -` where they do
not run: M = 1, or a host or build without them), `gemv` (the vdpbf16ps GEMV) and `deq` (dequantize + torch's
bf16 GEMM) - beside torch's two: `dense` (F.linear on the bf16 weight the int8 one stands for: what the model
runs without dsinf) and `int8pack` (aten._weight_int8pack_mm, torch's int8 fast path, whose scales are bf16).
Timed in interleaved rounds over rotating weight copies (bench.timing.time_cpu), each of ours checked against
dsinf.reference first. Prints microseconds per call and dense's time / each path's (> 1: faster than torch's
dense bf16), then the path the host's rule takes.

    python -m bench.int8_cpu                                  # the shapes and Ms of docs/PERFORMANCE.md
    python -m bench.int8_cpu --shapes 4096x14336 --m 2,8 --min-time 1
    python -m bench.int8_cpu --m 17,32,128,256,512,1024       # prefill: the tiles past M = 16
"""
from __future__ import annotations

import argparse

SHAPES = ("4096x4096", "4096x11008", "11008x4096", "4096x14336")
MS = (1, 2, 4, 8, 16)
COPIES = 3  # weight copies in rotation: 3 x 45 MB on 4096x11008, past the L2


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.int8_cpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=",".join(SHAPES), help="KxN[,KxN...] (default: %(default)s)")
    p.add_argument("--m", default=",".join(map(str, MS)), help="rows M = B*S (default: %(default)s)")
    p.add_argument("--min-time", type=float, default=0.6, help="seconds of timing per path and case")
    args = p.parse_args(argv)

    import torch

    from bench.timing import time_cpu
    from dsinf import reference, routes
    from op_builder import InferenceBuilder

    InferenceBuilder().load("cpu")
    vm = torch.ops.dsinf.vector_matmul_bf16.default
    binding = routes.binding("cpu")
    print(f"int8 x bf16: us per call (dense / path: > 1 faster than torch's bf16 F.linear; threads "
          f"{torch.get_num_threads()}; AMX tiles here: {'yes' if binding.amx_gemv() else 'no'})")
    gen = torch.Generator().manual_seed(0)
    for shape in args.shapes.split(","):
        K, N = (int(v) for v in shape.lower().split("x"))
        ws = [torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=gen) for _ in range(COPIES)]
        scale = torch.rand(N, generator=gen) * 0.01 + 0.001
        dense = [(w.float() * scale[:, None]).to(torch.bfloat16) for w in ws]
        packed_scale = scale.to(torch.bfloat16)
        key = routes.RouteKey("bf16", "int8", K, N)
        for M in (int(v) for v in args.m.split(",")):
            x = torch.randn(1, M, K, generator=gen).to(torch.bfloat16)

            def ours(path: str):
                def call(i: int):
                    with routes.forced("cpu", [key], max_m=0 if path == "deq" else None), \
                            routes.amx_gemv(path == "amx"):
                        return vm(x, ws[i], False, scale, True, True)
                return call

            tiles = binding.amx_gemv() and M >= 2  # forced "on" at M = 1 would time the GEMV again
            paths = {name: ours(name) for name in (("amx",) if tiles else ()) + ("gemv", "deq")}
            want = reference.vector_matmul(x, ws[0], False, scale, True, True).float()
            for name, call in paths.items():
                err = ((call(0).float() - want).abs().max() / want.abs().max()).item()
                if err > 1.6e-2:  # one bf16 rounding of the output
                    raise SystemExit(f"{shape} M={M}: {name} is off the reference by {err:.3g}")
            fns = {**{name: (call, COPIES) for name, call in paths.items()},
                   "dense": (lambda i: torch.nn.functional.linear(x, dense[i]), COPIES),
                   "int8pack": (lambda i: torch._weight_int8pack_mm(x[0], ws[i], packed_scale), COPIES)}
            t = time_cpu(fns, args.min_time)
            before = binding.amx_gemv_calls()
            vm(x, ws[0], False, scale, True, True)  # the host's own rule, no path forced
            rule = "amx" if binding.amx_gemv_calls() > before else {"gemv": "gemv", "aten": "deq"}[binding.last()]
            cells = [f"{n} {t[n].us:7.0f} ({t['dense'].us / t[n].us:4.2f}x)" for n in fns]
            print(f"  {shape:>11} M={M:<3}" + "  ".join(cells if tiles else ["amx       -        "] + cells)
                  + f"  rule: {rule}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
