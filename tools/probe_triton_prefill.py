"""GPU probe of the Triton prefill matmul: each kernel kind against cuBLAS at M=2048, both weight layouts.

    python tools/probe_triton_prefill.py                    # fp16 + bf16, [N,K] + [K,N], 2048 x 4096 -> 12288
    python tools/probe_triton_prefill.py --dtypes fp16 --layouts nk --m 4096

For each (dtype, layout) it prints, timed as CUDA-graph replays over weight copies rotated past L2 (the
autotuner's own timing, `ops._graph_bench`):
  1. cuBLAS: F.linear(x, w, b) for [N, K], torch.addmm(b, x, w) for [K, N];
  2. the default config (what a call runs with no table entry) and the kernel it ran;
  3. `autotune_matmul` over every candidate of the M bucket (pointer, TMA, persistent TMA), from
     which the fastest config of each kernel kind with its ratio to cuBLAS (> 1 is faster than cuBLAS),
     and the table's pick;
  4. the public op after tuning (a table hit), checked against F.linear, its ratio, and the goal
     (Triton M=2048 [N,K] >= 0.9x cuBLAS) with PASS/MISS.
The autotune table goes to a temporary directory unless --keep-table (then the usual cache root), so a
run never reuses an earlier run's picks. Every problem runs in its own try block: a failure prints one
line and the run goes on. Not a test (pytest does not collect tools/); the GPU tests are
tests/test_triton_kernels.py -m gpu.
"""
from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
import tempfile
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

GOAL = 0.9  # the bench's goal: Triton M=2048 [N,K] >= 0.9x cuBLAS


def log(*a) -> None:
    print(*a, flush=True)


def label(cfg: dict) -> str:
    sub = " subtile" if cfg.get("EPILOGUE_SUBTILE") else ""
    return (f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']} w{cfg['num_warps']} s{cfg['num_stages']}"
            f" g{cfg['GROUP_M']}{sub}")


def probe(dtype_name: str, layout: str, M: int, K: int, N: int, summary: list) -> None:
    import torch
    import torch.nn.functional as F
    from dsinf.triton import ops

    dt = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name]
    nk = layout == "nk"
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn((1, M, K), generator=gen, device="cuda").to(dt)
    w = (torch.randn((N, K) if nk else (K, N), generator=gen, device="cuda") / math.sqrt(K)).to(dt)
    b = torch.randn(N, generator=gen, device="cuda").to(dt)
    info = ops._device_info("cuda", torch.cuda.current_device())
    copies = max(1, min(64, math.ceil(3 * info.l2 / (w.numel() * w.element_size()))))
    ws = [w] + [w.clone() for _ in range(copies - 1)]
    reps = copies * math.ceil(20 / copies)

    def timed(call) -> float:  # microseconds per call, the weight rotating through `ws`
        cyc = itertools.cycle(ws)
        return 1000.0 * ops._graph_bench(lambda: call(next(cyc)), reps=reps)

    x2 = x.view(M, K)
    t_cublas = timed((lambda w_: F.linear(x2, w_, b)) if nk else (lambda w_: torch.addmm(b, x2, w_)))
    eligible = ops.tma_eligible(info, layout, dt.itemsize, N, K)
    log(f"\n{dtype_name} [{'N,K' if nk else 'K,N'}] M={M} K={K} N={N}: cuBLAS {t_cublas:.1f} us "
        f"({info.name}, {info.sms} SMs, TMA {'yes' if eligible else 'no'})")

    def op(w_):
        return ops.linear_layer(x, w_, b, True, False, 1, nk)[0]

    default = ops.config_for(x.device, dt, layout, M, N, K)
    before = ops.launch_counts()
    t_default = timed(op)
    ran = sorted(k for k, v in ops.launch_counts().items() if v > before[k])
    log(f"  default   {label(default):<30} {t_default:8.1f} us  {t_cublas / t_default:.3f}x  ran {'+'.join(ran)}")

    cands = ops.candidates(autotune_bucket(M), N, K, layout, dt.itemsize, info.sms, info.smem, eligible)
    times: list[float] = []

    def do_bench(fn) -> float:
        try:
            ms = ops._graph_bench(fn, reps=reps)
        except Exception:  # e.g. out of shared memory: tune skips the candidate; keep `times` aligned
            times.append(math.inf)
            raise
        times.append(ms)
        return ms

    chosen = ops.autotune_matmul(M, M, K, N, dt, transposed_mode=nk, do_bench=do_bench, force=True)
    pick = chosen[autotune_bucket(M)]
    first = times[:len(cands)]  # tune times every candidate once, in order, then re-times the fastest
    for kernel, name in ops.KERNEL_NAMES.items():
        mine = [(t, c) for t, c in zip(first, cands) if c["KERNEL"] == kernel and math.isfinite(t)]
        if not mine:
            log(f"  {name:<14} no candidates" + ("" if kernel == 0 or eligible else " (problem not TMA-eligible)"))
            continue
        t, c = min(mine, key=lambda p: p[0])
        log(f"  {name:<14} best of {len(mine):2d}: {label(c):<30} {1000 * t:8.1f} us  {t_cublas / (1000 * t):.3f}x")
    log(f"  table pick: {ops.KERNEL_NAMES[pick['KERNEL']]} {label(pick)}")

    got = op(w)
    err = (got.float() - F.linear(x, w if nk else w.T, b).float()).abs().max().item()
    before = ops.launch_counts()
    t_tuned = timed(op)
    ran = sorted(k for k, v in ops.launch_counts().items() if v > before[k])
    ratio = t_cublas / t_tuned
    log(f"  tuned op  {label(pick):<30} {t_tuned:8.1f} us  {ratio:.3f}x  ran {'+'.join(ran)}  "
        f"max|err| vs F.linear {err:.3g}")
    summary.append((dtype_name, layout, t_cublas, t_default, t_tuned, ratio))


def autotune_bucket(m: int) -> int:
    from dsinf.triton import autotune

    return autotune.m_bucket(m)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtypes", default="fp16,bf16")
    p.add_argument("--layouts", default="nk,kn")
    p.add_argument("--m", type=int, default=2048)
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--n", type=int, default=12288)
    p.add_argument("--keep-table", action="store_true", help="tune into the usual cache root, not a temp dir")
    args = p.parse_args()
    tmp = None
    if not args.keep_table:
        tmp = tempfile.TemporaryDirectory(prefix="dsinf-probe-")
        os.environ["DSINF_CACHE_DIR"] = tmp.name
    import torch
    import triton

    if not torch.cuda.is_available():
        log("no CUDA device: this probe needs a GPU")
        return 2
    log(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}, "
        f"capability {torch.cuda.get_device_capability()}")
    summary: list = []
    for dtype_name in args.dtypes.split(","):
        for layout in args.layouts.split(","):
            try:
                probe(dtype_name, layout, args.m, args.k, args.n, summary)
            except Exception as exc:  # noqa: BLE001 - one line per failure, the run goes on
                log(f"  FAILED {dtype_name} {layout}: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")
                traceback.print_exc(limit=3)
    log("\nsummary (ratio = cuBLAS time / Triton time, tuned op)")
    for dtype_name, layout, t_cublas, t_default, t_tuned, ratio in summary:
        goal = ""
        if layout == "nk":
            goal = f"  goal >= {GOAL}x: {'PASS' if ratio >= GOAL else 'MISS'}"
        log(f"  {dtype_name} {layout}: cuBLAS {t_cublas:.1f} us, default {t_default:.1f} us "
            f"({t_cublas / t_default:.3f}x), tuned {t_tuned:.1f} us ({ratio:.3f}x){goal}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
