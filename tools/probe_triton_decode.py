"""GPU probe of the Triton backend at decode sizes: every candidate config of each kernel, against the
CUDA module and torch, timed the same way.

    python tools/probe_triton_decode.py                       # fp16: [N,K], int8, [K,N]; M = 1, 8
    python tools/probe_triton_decode.py --dtypes fp16,bf16 --ms 1,2,4,8 --json-out /tmp/tri.json
    python tools/probe_triton_decode.py --dtypes bf16 --layouts int8 --defaults-only   # the defaults alone

For each (dtype, layout, K x N, M) it prints: the CUDA module's vector_matmul (µs), torch (F.linear for
[N,K], torch.matmul for [K,N], the dequantized fp16/bf16 weight for int8), the Triton op with its
default config, the best candidate of each Triton kernel (`ops.candidates`: the pointer kernel, the
GEMV kernel, the slices kernel), and tuned/CUDA: the best candidate's time
over the CUDA module's (the goal: <= 1.1). Timing is `dsinf.triton.ops._graph_bench`, what the
autotuner uses (CUDA-graph replays over weight copies past the L2), for every column, so the columns
compare. The best candidate per problem is also what `autotune_matmul` would record (it re-times its
top three; this probe reports the single pass).

Not a test (pytest does not collect tools/); parity of every kernel is in tests/test_triton_kernels.py.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SHAPES = [(4096, 4096), (4096, 12288), (4096, 14336), (14336, 4096), (8192, 8192)]


def log(*a) -> None:
    print(*a, flush=True)


def family(cfg: dict, names: dict) -> str:
    return names[cfg.get("KERNEL", 0)]


def describe(cfg: dict, names: dict) -> str:
    """A config as one line: kernel family, tile, split-K, warps, stages, K-slices."""
    return (f"{family(cfg, names)} {cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']} s{cfg['SPLIT_K']}"
            f" w{cfg['num_warps']} st{cfg['num_stages']} slices{cfg.get('SLICES', 1)}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtypes", default="fp16")
    p.add_argument("--layouts", default="nk,int8,kn")
    p.add_argument("--ms", default="1,8")
    p.add_argument("--shapes", default="", help="KxN[,KxN...] (default: the five LLM decode shapes)")
    p.add_argument("--top", type=int, default=0, help="also print the N fastest candidates of each problem")
    p.add_argument("--no-asm-i8", action="store_true", help="int8 weights converted by Triton's plain cast")
    p.add_argument("--defaults-only", action="store_true",
                   help="time only the default config of each problem (no candidate race): a quick check of a change")
    p.add_argument("--json-out", default=None)
    args = p.parse_args()

    import torch
    import torch.nn.functional as F

    from dsinf.triton import ops
    from op_builder import InferenceBuilder

    InferenceBuilder().load("cuda")
    info = ops._device_info("cuda", torch.cuda.current_device())
    if args.no_asm_i8:
        ops.ASM_I8 = False
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",") if s] or SHAPES
    ms = [int(v) for v in args.ms.split(",")]
    log(f"device {torch.cuda.get_device_name()} ({info.sms} SMs), triton {ops.triton.__version__}, "
        f"int8 conversion: {'PTX byte tricks' if ops.ASM_I8 else 'plain cast'}")
    log("µs per call (CUDA-graph replays, weights rotated past L2); tuned/CUDA = best Triton candidate / CUDA module")
    families = ("pointer", "gemv", "gemv-slices")
    log(f"{'dtype':5s} {'layout':6s} {'K x N':>12s} {'M':>2s} {'cuda':>7s} {'torch':>7s} {'default':>8s} "
        + " ".join(f"{f:>11s}" for f in families) + f" {'tuned/cuda':>10s}  best config")
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for dname, layout, (K, N) in itertools.product(args.dtypes.split(","), args.layouts.split(","), shapes):
        dt = {"fp16": torch.float16, "bf16": torch.bfloat16}[dname]
        try:
            if layout == "int8":
                w0 = torch.randint(-127, 128, (N, K), dtype=torch.int8, device="cuda", generator=gen)
                scale = (torch.rand(N, device="cuda", generator=gen) * 0.01 + 0.001)
                deq = (w0.float() * scale[:, None]).to(dt)
            else:
                w0 = (torch.randn((N, K) if layout == "nk" else (K, N), device="cuda", generator=gen)
                      / math.sqrt(K)).to(dt)
                scale = deq = None
            copies = max(2, math.ceil(3 * info.l2 / (w0.numel() * w0.element_size())))
            ws = [w0] + [w0.clone() for _ in range(copies - 1)]
            tcopies = max(2, math.ceil(3 * info.l2 / (N * K * dt.itemsize)))
            tws = ([deq] + [deq.clone() for _ in range(tcopies - 1)]) if deq is not None else ws
            reps = copies * math.ceil(20 / copies)
            bench = lambda fn: ops._graph_bench(fn, reps=reps)  # noqa: E731
            mod_op = getattr(torch.ops.dsinf, f"vector_matmul_{dname}")
            nk = layout != "kn"
            for M in ms:
                what = f"{dname} {layout} {K}x{N} M={M}"
                try:
                    x = torch.randn(1, M, K, device="cuda", dtype=dt, generator=gen)
                    x2 = x.view(M, K)
                    it = itertools.cycle(ws)
                    tit = itertools.cycle(tws)
                    if layout == "int8":
                        t_cuda = bench(lambda: mod_op(x, next(it), False, scale, True, False)) * 1e3
                        t_torch = bench(lambda: F.linear(x, next(tit))) * 1e3
                    elif layout == "nk":
                        t_cuda = bench(lambda: mod_op(x, next(it), False, None, False, True)) * 1e3
                        t_torch = bench(lambda: F.linear(x, next(it))) * 1e3
                    else:
                        t_cuda = bench(lambda: mod_op(x, next(it), False, None, False, False)) * 1e3
                        t_torch = bench(lambda: torch.matmul(x, next(it))) * 1e3
                    tma = ops.tma_eligible(info, layout, dt.itemsize, N, K)
                    bf16 = dt == torch.bfloat16
                    cfg0 = ops.default_config(M, N, K, layout, info.sms, tma, bf16)
                    cands = [cfg0] if args.defaults_only else ops.candidates(M, N, K, layout, dt.itemsize, info.sms,
                                                                            info.smem, tma, bf16)
                    times = []
                    for cfg in cands:
                        try:
                            ms_ = bench(lambda cfg=cfg: ops._launch_matmul(cfg, x2, next(it), None, scale, nk, M, N, K, dt))
                            times.append((ms_ * 1e3, cfg))
                        except Exception as exc:  # noqa: BLE001 - a config that cannot run
                            log(f"  {what} {cfg}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
                    t_default = next((t for t, c in times if c == {**ops.OPTIONAL_KEYS, **cfg0}), float("nan"))
                    best = {f: min((t for t, c in times if family(c, ops.KERNEL_NAMES) == f), default=float("nan"))
                            for f in families}
                    t_best, c_best = min(times, key=lambda tc: tc[0])
                    row = dict(dtype=dname, layout=layout, K=K, N=N, M=M, cuda_us=t_cuda, torch_us=t_torch,
                               default_us=t_default, best_us=t_best, best_config=c_best,
                               **{f"best_{f}_us": v for f, v in best.items()}, tuned_over_cuda=t_best / t_cuda,
                               candidates=len(times))
                    rows.append(row)
                    for t, c in sorted(times, key=lambda tc: tc[0])[:args.top]:
                        log(f"    {t:7.1f} us  {describe(c, ops.KERNEL_NAMES)}")
                    log(f"{dname:5s} {layout:6s} {f'{K}x{N}':>12s} {M:2d} {t_cuda:7.1f} {t_torch:7.1f} {t_default:8.1f} "
                        + " ".join(f"{best[f]:11.1f}" for f in families) + f" {t_best / t_cuda:9.2f}x  "
                        + describe(c_best, ops.KERNEL_NAMES))
                except Exception as exc:  # noqa: BLE001
                    log(f"  {what}: {type(exc).__name__}: {exc}")
                    traceback.print_exc()
            ws = tws = deq = None
            torch.cuda.empty_cache()
        except Exception as exc:  # noqa: BLE001
            log(f"  {dname} {layout} {K}x{N} setup: {type(exc).__name__}: {exc}")
    if rows:
        log("\nworst tuned/CUDA per layout (goal <= 1.10):")
        for key in sorted({(r["dtype"], r["layout"]) for r in rows}):
            sel = [r for r in rows if (r["dtype"], r["layout"]) == key]
            w = max(sel, key=lambda r: r["tuned_over_cuda"])
            log(f"  {key[0]} {key[1]:4s}: {w['tuned_over_cuda']:.2f}x ({w['K']}x{w['N']} M={w['M']})")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(dict(when=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
