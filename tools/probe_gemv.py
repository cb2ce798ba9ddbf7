"""GPU probe of the decode GEMV kernels: parity of every path, then timing against torch.

    python tools/probe_gemv.py                 # parity + timing, about 1-2 minutes on an H200
    python tools/probe_gemv.py --no-timing     # parity only
    python tools/probe_gemv.py --quick --sweep DSINF_MMA_PIPELINE=0,1 --sweep DSINF_MMA_PIPELINE_UNROLL=1,2
    python tools/probe_gemv.py --quick --variant "DSINF_GEMV_PDL=0" --variant "DSINF_GEMV_PDL=1 DSINF_MMA_UNROLL=8"
    python tools/probe_gemv.py --quick --int8-only --variant "DSINF_I8_STAGES=5 DSINF_I8_UNIT_STEPS=1"
    python tools/probe_gemv.py --quick --layouts nk,int8 --variant "DSINF_STREAM_RT2_FILL=1" --variant "DSINF_STREAM_RT2_FILL=2"
    python tools/probe_gemv.py --layouts nk,int8 --ms 1,8 --shapes 4096x3072,4096x6144 --variant "DSINF_STREAM_WIDE_BELOW=3"
        # one child process per build variant (each combination of -D values: parity + timing), then
        # the min ratio and worst %bw per variant: for tuning the kernels' compile-time knobs
        # (csrc/inference/cuda/gemv_internal.cuh, gemv_mma.cu, gemv_stream.cu) on a new GPU. Each variant
        # is a cold build (~15 s) plus its run, so keep sweeps small or --quick.

What it prints:
  1. copy bandwidth (device-to-device `copy_` of 1 GiB, read + write bytes, after ~1 s of copies to
     bring the clocks up), the ceiling;
  2. parity of torch.ops.dsinf.vector_matmul_{fp16,bf16} against dsinf.reference on random inputs for
     M = 1..8 and 9..16 (each call routed to our GEMV, which it checks: the compiled crossover would send
     16-bit M > 8 to cuBLAS), both float layouts and int8 (groups 1, 8, N), plus shapes that route to the
     scalar fallback (K or N not a multiple of the vector width), and int8 shapes for the streaming kernel
     (several row tiles per CTA, N % 16 != 0, K % 64 != 0): max abs error and PASS/FAIL;
  3. per (dtype, layout, K x N, M in 1, 2, 4, 8): our µs (our GEMV, routed to it at every M), torch µs,
     ratio (torch / ours), GB/s and % of
     the copy bandwidth, timed as CUDA-graph replays over rotating weight copies (>= 4 x 60 MiB, so
     the weights come from HBM, not L2); torch is F.linear for [N, K] and torch.matmul for [K, N];
     int8 is compared with the faster of torch's two fp16/bf16 layouts on the dequantized weight; beside
     them, a device copy moving the same bytes timed the same way (copy µs, %copy): how much of the gap
     to the copy bandwidth is the per-call launch, ramp and tail that any kernel of that size pays;
  4. `min ratio` per table and the issue-12 goals with PASS/MISS.
--quick times fp16 [K,N]/[N,K] on 4096x4096 and 4096x12288, and int8 (fp16 and bf16) on the four LLM shapes
4096x4096, 4096x12288, 4096x14336, 14336x4096, M in 1 and 8; --int8-only drops the float layouts;
--layouts nk (or kn, int8, comma-separated) times just those layouts on all five shapes, fp16 and bf16.

Robust by design: every case runs in its own try block; a failure prints one line and the run goes on.
Not a test (pytest does not collect tools/); the GPU tests are tests/test_cuda_*.py.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SHAPES = [(4096, 4096), (4096, 12288), (4096, 14336), (14336, 4096), (8192, 8192)]
QUICK_INT8_SHAPES = SHAPES[:4]
MS = (1, 2, 4, 8)
ROTATE_BYTES = 4 * 60 << 20  # rotating weight set >= 4 x the H200's 60 MiB L2


def log(*a) -> None:
    print(*a, flush=True)


def fail_line(what: str, exc: BaseException) -> None:
    text = str(exc).strip().splitlines()
    log(f"  FAILED {what}: {type(exc).__name__}: {text[0][:200] if text else ''}")


# ------------------------------------------------------------------------------------------ build
def start_cuda(torch, defines: list[str]) -> bool:
    """Log the device and build/load the CUDA module with `defines`; False (logged) when either fails."""
    if not torch.cuda.is_available():
        log("no CUDA device: nothing to probe")
        return False
    props = torch.cuda.get_device_properties(0)
    log(f"device {props.name}, {props.multi_processor_count} SMs, L2 {props.L2_cache_size >> 20} MiB; "
        f"torch {torch.__version__}, CUDA {torch.version.cuda}")
    try:
        import dsinf.library  # noqa: F401 - the op schemas

        load_module(defines)
    except Exception as exc:  # noqa: BLE001
        fail_line("building/loading the CUDA module", exc)
        traceback.print_exc()
        return False
    return True


def load_module(defines: list[str]):
    """The CUDA inference module, built by op_builder; `defines` (NAME=VALUE) go to nvcc as -D."""
    from bench.defines import load_cuda_with_defines

    t0 = time.perf_counter()
    mod = load_cuda_with_defines(defines)
    log(f"CUDA module loaded in {time.perf_counter() - t0:.1f} s" + (f" with {' '.join(defines)}" if defines else ""))
    return mod


# ------------------------------------------------------------------------------------------ timing
class GraphTimer:
    """Per-call time of fn(i) (i over the rotating copies) from CUDA-graph replays."""

    def __init__(self, torch, reps: int = 7, min_calls: int = 48):
        self.torch, self.reps, self.min_calls = torch, reps, min_calls

    def graph(self, fn, copies: int):
        torch = self.torch
        calls = max(copies, math.ceil(self.min_calls / copies) * copies)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):  # warm up outside the graph (cuBLAS handles, workspaces)
            for i in range(copies):
                fn(i)
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for i in range(calls):
                fn(i % copies)
        g.replay()
        torch.cuda.synchronize()
        return g, calls

    def time_many(self, fns: dict) -> dict:
        """{name: (fn, copies)} -> {name: median µs per call}, replays interleaved between names."""
        torch = self.torch
        graphs = {n: self.graph(f, c) for n, (f, c) in fns.items()}
        samples = {n: [] for n in fns}
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(self.reps):
            for n, (g, calls) in graphs.items():
                start.record()
                g.replay()
                end.record()
                end.synchronize()
                samples[n].append(start.elapsed_time(end) * 1e3 / calls)
        return {n: statistics.median(v) for n, v in samples.items()}


def copy_bandwidth(torch) -> float:
    """GB/s of a device-to-device copy of 1 GiB (bytes read + written): the bench's ceiling, measured the
    same way (bench.ops.cuda_copy_bandwidth: eager, after 1 s of copies that bring the clocks up)."""
    from bench.ops import cuda_copy_bandwidth

    return cuda_copy_bandwidth()


# ------------------------------------------------------------------------------------------ parity
def on_our_gemv(op):
    """`op` with each call's shape routed to our GEMV (the compiled crossover sends 16-bit M > 8 to cuBLAS, a
    persisted route table may send any M there), raising if the call ran on ATen all the same."""
    from dsinf import routes

    def call(x, w, async_op, q_scale, q_int8, transposed_mode):
        key = routes.key_of(x, w, q_int8, transposed_mode)
        with routes.forced("cuda", [key]) as b:  # host-side: a graph captured here replays this route
            out = op(x, w, async_op, q_scale, q_int8, transposed_mode)
            if b.last() != "gemv":
                raise RuntimeError(f"{key.text}: ran on {b.last()}, not our GEMV")
        return out

    return call


def parity(torch, device: str = "cuda") -> int:
    """Checks every routing case against dsinf.reference; returns the number of failures."""
    from dsinf import reference
    from dsinf.quantize import quantize_int8

    gen = torch.Generator(device=device).manual_seed(0)
    failures = 0
    # (K, N, why): aligned shapes take the tensor-core paths; the others the scalar fallback.
    shapes = [(4096, 4096, "tensor core, split K"), (1024, 264, "tensor core, partial last tile"),
              (8192, 1000, "tensor core, N % 32 != 0"), (72, 40, "tensor core, K < one k-step"),
              (4100, 136, "K % 8 != 0: [N,K] and int8 scalar, [K,N] tensor core"), (67, 45, "scalar (odd K and N)"),
              (4112, 9000, "stream: 2 row tiles per CTA, N % 16 != 0, K % 64 != 0"),
              (48, 4104, "stream: K < one warp unit, most warps idle")]
    log("\nparity vs dsinf.reference (max abs error, tolerance = 1 ulp at max |ref| + fp32 accumulation slack)")
    for dtype_name in ("fp16", "bf16"):
        dt = getattr(torch, {"fp16": "float16", "bf16": "bfloat16"}[dtype_name])
        op = on_our_gemv(getattr(torch.ops.dsinf, f"vector_matmul_{dtype_name}"))
        eps = torch.finfo(dt).eps
        for K, N, why in shapes:
            for M in (1, 2, 3, 5, 8, 16):
                for kind in ("kn", "nk", "int8_g1", "int8_g8", "int8_gN"):
                    what = f"{dtype_name} {kind:8s} K={K:5d} N={N:5d} M={M:2d} ({why})"
                    try:
                        if kind.startswith("int8") and N % 8 and kind == "int8_g8":
                            continue
                        x = torch.randn(1, M, K, device=device, dtype=dt, generator=gen)
                        if kind.startswith("int8"):
                            G = {"int8_g1": 1, "int8_g8": 8, "int8_gN": N}[kind]
                            w = quantize_int8(torch.randn(N, K, device=device, generator=gen) / math.sqrt(K), G,
                                              transposed_mode=True)
                            got = op(x, w, False, w.scale, True, False)
                            ref = reference.vector_matmul(x, w, False, w.scale, True, False)
                        else:
                            nk = kind == "nk"
                            shape = (N, K) if nk else (K, N)
                            w = (torch.randn(*shape, device=device, generator=gen) / math.sqrt(K)).to(dt)
                            got = op(x, w, False, None, False, nk)
                            ref = reference.vector_matmul(x, w, False, None, False, nk)
                        err = (got.float() - ref.float()).abs().max().item()
                        scale = ref.float().abs().max().item()
                        tol = eps * scale + 1e-5 * math.sqrt(K) * scale
                        ok = err <= tol and bool(torch.isfinite(got).all())
                        if not ok:
                            failures += 1
                        if not ok or (M in (1, 8) and kind in ("kn", "nk", "int8_g8")):
                            log(f"  {'PASS' if ok else 'FAIL'} {what}: max err {err:.3g} (tol {tol:.3g})")
                    except Exception as exc:  # noqa: BLE001 - report and go on
                        failures += 1
                        fail_line(what, exc)
    log(f"parity: {failures} failure(s)")
    return failures


# ------------------------------------------------------------------------------------------ timing
def copies_for(nbytes: int) -> int:
    return max(2, min(16, math.ceil(ROTATE_BYTES / max(1, nbytes))))


def same_bytes_copy_us(torch, timer: GraphTimer, nbytes: int) -> float:
    """µs per call of a device copy that reads nbytes / 2 and writes nbytes / 2 (rotating buffers, past L2)."""
    half = max(1, nbytes // 2)
    n = copies_for(half)
    src = [torch.empty(half, dtype=torch.uint8, device="cuda") for _ in range(n)]
    dst = [torch.empty(half, dtype=torch.uint8, device="cuda") for _ in range(n)]
    t = timer.time_many({"copy": (lambda i: dst[i].copy_(src[i]), n)})["copy"]
    del src, dst
    return t


_READ_KERNEL = None


def _read_kernel():
    """A Triton kernel that reads n int32 words in contiguous per-program ranges (the L2-only `.cg` loads the
    GEMVs' weights take) and stores one sum per program: nothing but the reads. None without triton."""
    global _READ_KERNEL
    if _READ_KERNEL is None:
        try:
            import triton
            import triton.language as tl
        except ImportError:
            return None

        @triton.jit
        def read_words_kernel(p, out, n_words, per_prog, BLOCK: tl.constexpr):
            pid = tl.program_id(0)
            start = pid * per_prog
            acc = tl.zeros((BLOCK,), dtype=tl.int32)
            for off in range(start, start + per_prog, BLOCK):  # past n_words (the last range): masked
                idx = off + tl.arange(0, BLOCK)
                acc += tl.load(p + idx, mask=idx < n_words, other=0, cache_modifier=".cg")
            tl.store(out + pid, tl.sum(acc))

        _READ_KERNEL = read_words_kernel
    return _READ_KERNEL


#: (programs per SM, words per load block, warps) tried by same_bytes_read_us; on the H200 (2026-12-03) the
#: best for every size from 16 MiB to 1 GiB was (8, 2048, 8).
READ_CONFIGS = ((1, 1024, 4), (2, 2048, 8), (4, 2048, 8), (8, 2048, 8), (8, 4096, 8))


def read_words(buf, out, per_prog: int, block: int, warps: int) -> None:
    """One launch of the read kernel over `buf` (int32) in ranges of `per_prog` words; out[p] = range p's sum."""
    n = buf.numel()
    _read_kernel()[(-(-n // per_prog),)](buf, out, n, per_prog, BLOCK=block, num_warps=warps)


def same_bytes_read_us(torch, timer: GraphTimer, nbytes: int) -> float | None:
    """µs per call of the fastest READ_CONFIGS read of nbytes (rotating buffers, past L2), timed as the GEMVs
    are; None without triton. A GEMV cannot beat it: it reads the same bytes and does more."""
    if _read_kernel() is None:
        return None
    words = max(1, nbytes // 4)
    n = copies_for(nbytes)
    bufs = [torch.ones(words, dtype=torch.int32, device="cuda") for _ in range(n)]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    out = torch.empty(sms * max(c[0] for c in READ_CONFIGS) + 1, dtype=torch.int32, device="cuda")
    best = None
    for per_sm, block, warps in READ_CONFIGS:
        per_prog = -(-words // (sms * per_sm * block)) * block
        t = timer.time_many({"read": (lambda i: read_words(bufs[i], out, per_prog, block, warps), n)})["read"]
        best = t if best is None else min(best, t)
    del bufs
    return best


def timing(torch, copy_bw: float, shapes, ms, dtypes=("fp16", "bf16"), layouts=None) -> list[dict]:
    """`shapes`: (K, N) pairs, or (K, N, layouts) to time only those layouts on that shape; `layouts`
    (optional): dtype name -> the layouts to time for it (default: kn, nk, int8)."""
    import torch.nn.functional as F

    from dsinf.quantize import quantize_int8

    timer = GraphTimer(torch)
    rows: list[dict] = []
    gen = torch.Generator(device="cuda").manual_seed(1)
    log(f"\ntiming: CUDA-graph replays, rotating weights >= {ROTATE_BYTES >> 20} MiB; ratio = torch / ours;"
        f" %bw of copy {copy_bw:.0f} GB/s")
    log("copy µs: a device copy moving the same bytes (half read, half written), timed the same way - what a\n"
        "kernel of that size reaches with the launch, ramp and tail every call pays; %copy = copy µs / ours µs;\n"
        "read µs: a kernel that only reads the weight's bytes (none without triton); %read = read µs / ours µs")
    log(f"{'dtype':5s} {'layout':6s} {'K x N':>12s} {'M':>2s} {'ours µs':>8s} {'torch µs':>9s} {'ratio':>6s}"
        f" {'GB/s':>6s} {'%bw':>5s} {'copy µs':>8s} {'%copy':>6s} {'read µs':>8s} {'%read':>6s}")
    ceilings: dict[int, tuple] = {}  # weight bytes -> (copy µs, read µs): measured once per size
    for dtype_name in dtypes:
        dt = getattr(torch, {"fp16": "float16", "bf16": "bfloat16"}[dtype_name])
        op = on_our_gemv(getattr(torch.ops.dsinf, f"vector_matmul_{dtype_name}"))  # the kernel, at every M
        esz = torch.tensor([], dtype=dt).element_size()
        for shape in shapes:
            K, N = shape[:2]
            for layout in (layouts or {}).get(dtype_name, ("kn", "nk", "int8")):
                if len(shape) > 2 and layout not in shape[2]:
                    continue
                try:
                    base = torch.randn(N, K, device="cuda", generator=gen) / math.sqrt(K)
                    if layout == "int8":
                        q = quantize_int8(base, None, transposed_mode=True)
                        wbytes = q.numel() + q.scale.numel() * 4
                        n = copies_for(wbytes)
                        qs = [q] + [q.clone() for _ in range(n - 1)]
                        scales = [q.scale.clone() for _ in range(n)]
                        deq = (q.float() * q.scale[:, None]).to(dt)
                        tn = copies_for(deq.numel() * esz)
                        t_nk = [deq.contiguous()] + [deq.clone() for _ in range(tn - 1)]
                        t_kn = [w.t().contiguous() for w in t_nk]
                        del deq
                    else:
                        w0 = (base if layout == "nk" else base.t()).contiguous().to(dt)
                        wbytes = w0.numel() * esz
                        n = copies_for(wbytes)
                        ws = [w0] + [w0.clone() for _ in range(n - 1)]
                    del base
                    if wbytes not in ceilings:  # fp16 and bf16, and both float layouts, move the same bytes
                        ceilings[wbytes] = (same_bytes_copy_us(torch, timer, wbytes),
                                            same_bytes_read_us(torch, timer, wbytes))
                    t_copy, t_read = ceilings[wbytes]
                    for M in ms:
                        what = f"{dtype_name} {layout} {K}x{N} M={M}"
                        try:
                            xs = [torch.randn(1, M, K, device="cuda", dtype=dt, generator=gen) for _ in range(2)]
                            if layout == "int8":
                                fns = {"ours": (lambda i: op(xs[i % 2], qs[i], False, scales[i], True, False), n),
                                       "torch_nk": (lambda i: F.linear(xs[i % 2], t_nk[i]), tn),
                                       "torch_kn": (lambda i: torch.matmul(xs[i % 2], t_kn[i]), tn)}
                            elif layout == "nk":
                                fns = {"ours": (lambda i: op(xs[i % 2], ws[i], False, None, False, True), n),
                                       "torch": (lambda i: F.linear(xs[i % 2], ws[i]), n)}
                            else:
                                fns = {"ours": (lambda i: op(xs[i % 2], ws[i], False, None, False, False), n),
                                       "torch": (lambda i: torch.matmul(xs[i % 2], ws[i]), n)}
                            t = timer.time_many(fns)
                            t_torch = min(v for k, v in t.items() if k.startswith("torch"))
                            nbytes = wbytes + 2 * M * (K + N) * esz
                            gbs = nbytes / (t["ours"] * 1e-6) / 1e9
                            row = dict(dtype=dtype_name, layout=layout, K=K, N=N, M=M, ours_us=t["ours"],
                                       torch_us=t_torch, ratio=t_torch / t["ours"], gbs=gbs, pct_bw=100 * gbs / copy_bw,
                                       copy_us=t_copy, pct_copy=100 * t_copy / t["ours"], read_us=t_read,
                                       pct_read=100 * t_read / t["ours"] if t_read else None,
                                       read_pct_bw=100 * wbytes / t_read / 1e3 / copy_bw if t_read else None)
                            rows.append(row)
                            read = f" {t_read:8.1f} {row['pct_read']:5.0f}%" if t_read else f" {'-':>8s} {'-':>6s}"
                            log(f"{dtype_name:5s} {layout:6s} {f'{K}x{N}':>12s} {M:2d} {t['ours']:8.1f} {t_torch:9.1f}"
                                f" {row['ratio']:5.2f}x {gbs:6.0f} {row['pct_bw']:4.0f}%"
                                f" {t_copy:8.1f} {row['pct_copy']:5.0f}%" + read)
                        except Exception as exc:  # noqa: BLE001
                            fail_line(what, exc)
                    qs = scales = t_nk = t_kn = ws = None  # free this shape's weights before the next
                    torch.cuda.empty_cache()
                except Exception as exc:  # noqa: BLE001
                    fail_line(f"{dtype_name} {layout} {K}x{N} setup", exc)
                    torch.cuda.empty_cache()
    return rows


def summarize(rows: list[dict]) -> None:
    if not rows:
        log("\nno timing rows")
        return
    log("\nmin ratio (torch / ours) per table:")
    for key in sorted({(r["dtype"], r["layout"]) for r in rows}):
        sel = [r for r in rows if (r["dtype"], r["layout"]) == key]
        worst = min(sel, key=lambda r: r["ratio"])
        log(f"  {key[0]} {key[1]:4s}: min ratio {worst['ratio']:.2f}x ({worst['K']}x{worst['N']} M={worst['M']})")
    log(f"  overall min ratio {min(r['ratio'] for r in rows):.2f}x")

    def big(r):
        return r["K"] * r["N"] >= 4096 * 12288

    def goal(name, sel, key, target):
        if not sel:
            log(f"  n/a  {name}: no rows")
            return
        worst = min(sel, key=lambda r: r[key])
        ok = worst[key] >= target
        read = (f"; a read of its weight bytes alone reaches {worst['read_pct_bw']:.0f}% of the copy bandwidth, "
                f"ours {worst['pct_read']:.0f}% of that read's speed" if key == "pct_bw" and worst.get("read_pct_bw")
                else "")
        log(f"  {'PASS' if ok else 'MISS'} {name}: worst {worst[key]:.2f} (target {target}) at {worst['dtype']} "
            f"{worst['layout']} {worst['K']}x{worst['N']} M={worst['M']}{read}")

    log("\nissue-12 goals (decode M <= 8):")
    i8 = [r for r in rows if r["layout"] == "int8"]
    fl = [r for r in rows if r["layout"] != "int8"]
    goal("int8 %bw >= 85 on shapes >= 4096x12288", [r for r in i8 if big(r)], "pct_bw", 85)
    goal("int8 >= 1.8x torch on shapes >= 4096x12288", [r for r in i8 if big(r)], "ratio", 1.8)
    goal("int8 >= 1.6x torch on 4096x4096", [r for r in i8 if not big(r)], "ratio", 1.6)
    goal("fp16/bf16 %bw >= 90 on shapes >= 4096x12288", [r for r in fl if big(r)], "pct_bw", 90)
    goal("fp16/bf16 >= 1.25x torch on 4096x4096", [r for r in fl if not big(r)], "ratio", 1.25)
    goal("fp16/bf16 >= 1.0x torch everywhere", fl, "ratio", 1.0)


# ------------------------------------------------------------------------------------------ sweep
def variant_cmd(args, combo: tuple[str, ...]) -> list[str]:
    """The child command that builds and times one variant (`combo`: NAME=VALUE defines) with `args`' selection.
    It runs the parity section too (a variant is new code) unless --no-parity: a diagnostic define may compute
    wrong results on purpose."""
    cmd = [sys.executable, os.path.abspath(__file__), "--json-out", "-"]
    if args.no_parity:
        cmd.append("--no-parity")
    for d in combo:
        cmd += ["--define", d]
    if args.quick:
        cmd.append("--quick")
    if args.int8_only:
        cmd.append("--int8-only")
    if args.layouts:
        cmd += ["--layouts", args.layouts]
    if args.ms:
        cmd += ["--ms", args.ms]
    if args.shapes:
        cmd += ["--shapes", args.shapes]
    return cmd


def sweep(args) -> None:
    """Each combination of the --sweep values in a child process (a module holds one build)."""
    import itertools

    axes = []
    for spec in args.sweep:
        name, _, values = spec.partition("=")
        axes.append([f"{name}={v}" for v in values.split(",") if v])
    combos = [tuple(v.split()) for v in args.variant]  # explicit combinations first, in the order given
    if axes:
        combos += list(itertools.product(*axes))
    results = []
    for combo in combos:
        cmd = variant_cmd(args, combo)
        log(f"\n=== variant {' '.join(combo)}")
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.variant_timeout, check=False)
            sys.stdout.write(out.stdout)
            if out.returncode != 0:
                log(f"  variant failed (rc {out.returncode}): {out.stderr.strip()[-400:]}")
            rows = [json.loads(line[5:]) for line in out.stdout.splitlines() if line.startswith("JSON ")]
            results.append((combo, rows[-1] if rows else [], out.returncode))
        except Exception as exc:  # noqa: BLE001
            fail_line(" ".join(combo), exc)
    log("\nsweep summary (min ratio / worst %bw on shapes >= 4096x12288, per layout):")
    for combo, rows, rc in results:
        parts = []
        for dt, lay in sorted({(r["dtype"], r["layout"]) for r in rows}):
            sel = [r for r in rows if (r["dtype"], r["layout"]) == (dt, lay)]
            bigs = [r["pct_bw"] for r in sel if r["K"] * r["N"] >= 4096 * 12288]
            parts.append(f"{dt} {lay} {min(r['ratio'] for r in sel):.2f}x/{min(bigs) if bigs else 0:.0f}%")
        status = "ok" if rc == 0 else f"rc {rc} (parity failures or a crash: see above)"
        log(f"  {' '.join(combo):50s} {'  '.join(parts) if parts else 'no rows'}  [{status}]")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--no-parity", action="store_true", help="skip the parity checks (a sweep's children too)")
    p.add_argument("--no-timing", action="store_true", help="skip the timing")
    p.add_argument("--quick", action="store_true",
                   help="timing at M 1 and 8: fp16 float layouts on 4096x4096 and 4096x12288, int8 (fp16, bf16) on four shapes")
    p.add_argument("--int8-only", action="store_true", help="time only the int8 layout")
    p.add_argument("--layouts", default="", help="kn,nk,int8: time only these layouts, on all five shapes, fp16 and bf16")
    p.add_argument("--shapes", default="",
                   help="4096x6144,...: time these K x N instead of the five LLM shapes (not with --quick)")
    p.add_argument("--ms", default="", help="1,8,16: the M values to time (default 1,2,4,8; --quick 1,8)")
    p.add_argument("--define", action="append", default=[], help="NAME=VALUE passed to nvcc as -D (one build)")
    p.add_argument("--sweep", action="append", default=[], help="NAME=v1,v2,...: time each value in a child")
    p.add_argument("--variant", action="append", default=[],
                   help="'NAME=V NAME2=V2': one build variant (several -D at once) timed in a child; with --sweep too")
    p.add_argument("--variant-timeout", type=float, default=170.0, help="seconds per --sweep child")
    p.add_argument("--cpu-parity", action="store_true", help="run only the parity part on the CPU module")
    p.add_argument("--json-out", default=None, help="'-': print the timing rows as one 'JSON [...]' line")
    return p


def main() -> int:
    args = build_parser().parse_args()
    if args.sweep or args.variant:
        sweep(args)
        return 0

    import torch

    if args.cpu_parity:  # self-check of this script on a machine without a GPU (the CPU module's ops)
        from op_builder import InferenceBuilder

        InferenceBuilder().load("cpu")
        return 1 if parity(torch, "cpu") else 0
    t_start = time.perf_counter()
    if not start_cuda(torch, args.define):
        return 1
    bw = copy_bandwidth(torch)
    log(f"copy bandwidth {bw:.0f} GB/s")
    failures = 0 if args.no_parity else parity(torch)
    rows: list[dict] = []
    if not args.no_timing:
        ms = tuple(int(m) for m in args.ms.split(",")) if args.ms else ((1, 8) if args.quick else MS)
        dtypes = ("fp16", "bf16")
        all_shapes = [tuple(int(v) for v in kn.split("x")) for kn in args.shapes.split(",")] if args.shapes else SHAPES
        if args.layouts:  # the given layouts on every shape, fp16 and bf16
            want = tuple(x for x in ("kn", "nk", "int8") if x in args.layouts.split(","))
            shapes, layouts = [(K, N, want) for K, N in all_shapes], None
        elif args.quick:  # fp16 float layouts on two shapes; int8 on four, fp16 and bf16 (another conversion)
            float_shapes = [] if args.int8_only else [(K, N, ("kn", "nk")) for K, N in SHAPES[:2]]
            shapes = float_shapes + [(K, N, ("int8",)) for K, N in QUICK_INT8_SHAPES]
            layouts = {"bf16": ("int8",)}
        else:
            shapes = all_shapes
            layouts = {d: ("int8",) for d in dtypes} if args.int8_only else {}
        rows = timing(torch, bw, shapes, ms, dtypes, layouts)
        summarize(rows)
    if args.json_out == "-":
        log("JSON " + json.dumps(rows))
    log(f"\nprobe done in {time.perf_counter() - t_start:.0f} s; parity failures: {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
