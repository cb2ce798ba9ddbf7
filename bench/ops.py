"""The ops sections: our ops against torch on this machine's CPU, or on the GPU, one table per part.

Every table: case, ours µs, torch µs (the peer named in the title), ratio = torch / ours, GB/s and %
of the measured copy bandwidth, TFLOP/s, then per extra implementation its µs and its time / ours.
"""
from __future__ import annotations

import platform
from pathlib import Path

from . import routes_step
from .cases import Case, cpu_cases, cuda_cases
from .context import Context, out
from .env import Env
from .goals import TORCH_PEERS, fastest
from .impls import run_case
from .results import Row
from .tables import Column, Table, fmt_num, fmt_pct, fmt_us, fmt_x
from .timing import CudaTimer, cpu_l3_bytes, time_cpu

#: (section, part) -> (title: what "torch" is, extra implementations shown beside it)
PART_TABLES: dict[tuple[str, str], tuple[str, tuple[str, ...]]] = {
    ("cpu", "int8"): ("int8 weight-only (per-channel). torch: aten._weight_int8pack_mm with bf16 activations "
                      "(its fast path); fp32 rows: dense fp32 matmul. dense: matmul on the dequantized weight",
                      ("dense",)),
    ("cpu", "decode"): ("decode vector_matmul. torch: F.linear ([N,K]) / torch.matmul ([K,N]); onednn (fp32): "
                        "torch's oneDNN GEMM (mkldnn::_linear_pointwise)", ("onednn",)),
    ("cpu", "qkv"): ("fused QKV + RoPE (rotate_half, rotary_dim=D=128). torch: the eager chain (addmm: MKL); "
                     "onednn: the same chain on torch's oneDNN GEMM", ("onednn",)),
    ("cpu", "prefill"): ("prefill linear + bias. torch: torch.addmm (MKL); onednn (fp32): torch's oneDNN GEMM",
                         ("onednn",)),
    ("cuda", "decode"): ("decode vector_matmul, routed (gemv: our GEMV where the route picks cuBLAS). torch: "
                         "F.linear ([N,K]) / torch.matmul ([K,N])", ("gemv", "triton")),
    ("cuda", "int8"): ("int8 weight-only (per-channel), fp16 activations, routed. torch: F.linear fp16 on the "
                       "dequantized [N,K] weight; torch_kn: matmul [K,N]; aten_int8: aten._weight_int8pack_mm",
                       ("torch_kn", "aten_int8", "gemv", "triton")),
    ("cuda", "int8prefill"): ("int8 weight-only (per-channel) at prompt lengths, routed (the int8 GEMM or "
                              "dequantize + cuBLAS). torch: F.linear on the weight cast per call, then * scale "
                              "(eager int8 weight-only); gemm / deq: our two "
                              "paths, each forced; float_w: cuBLAS on 16-bit weights (no int8: not a peer)",
                              ("aten_int8", "gemm", "deq", "float_w")),
    ("cuda", "prefill"): ("prefill linear + bias. torch: torch.addmm (cuBLAS)", ("triton",)),
    ("cuda", "qkv"): ("fused QKV + RoPE (rotate_half, rotary_dim=D=128). torch: the eager chain", ("triton",)),
    ("cuda", "mlp"): ("fused gated MLP (residual + RMSNorm + gate|up + SiLU*up + down), MLPGemmOp. torch: HF's "
                      "eager chain (3 GEMMs); torch_2gemm: two cuBLAS GEMMs + torch ops", ("torch_2gemm",)),
    ("cuda", "rmsnorm"): ("PreRMSNormOp (residual add + RMSNorm). torch: the eager add + RMSNorm", ()),
}

#: torch's own times on an H100 (torch 2.11) for the timer check: if these disagree, distrust the run
#: (a throttled card, a timer problem), not our kernels.
CUDA_REFERENCE_POINTS = {
    "copy_GBs": 3000.0,
    "torch fp16 M=1 4096x4096 [N,K] us": 21.0,
    "torch fp16 M=1 8192x8192 [N,K] us": 58.0,
    "torch fp16 M=2048 K=4096 N=12288 [K,N] us": 270.0,
}

#: Ceiling measurements on the GPU: a 1 GiB fp16 copy (read + write) and an fp16 GEMM of this size.
CUDA_COPY_ELEMS = 1 << 29
CUDA_MM_SIZE = 8192


def part_table(section: str, part: str) -> tuple[Table, tuple[str, ...]]:
    title, extras = PART_TABLES[(section, part)]
    cols = [Column("case", 46, left=True), Column("ours us", 8), Column("torch us", 8), Column("ratio", 6),
            Column("GB/s", 6), Column("%bw", 4), Column("TFLOP/s", 7)]
    for e in extras:
        cols += [Column(f"{e} us", 8), Column(f"{e}/ours", 8)]
    return Table(title, cols), extras


def row_cells(row: Row, extras: tuple[str, ...], copy_gbs: float | None) -> list[str]:
    def cell(name: str) -> str:
        r = row.impls.get(name)
        if r is None:
            return "-"
        return fmt_us(r.us) if r.status == "ok" else r.status

    gbs = row.gbs()
    cells = [row.case.label, cell("ours"), cell("torch"), fmt_x(row.ratio("torch")), fmt_num(gbs),
             fmt_pct(gbs / copy_gbs * 100 if (gbs and copy_gbs) else None), fmt_num(row.tflops(), 2)]
    for e in extras:
        cells += [cell(e), fmt_x(row.ratio(e))]
    return cells


def problems(row: Row) -> str:
    bits = [f"{n}: {r.reason}" for n, r in row.impls.items() if r.status == "FAIL"]
    return "; ".join(bits + ([row.note] if row.note else []))


def run_parts(ctx: Context, env: Env, cases: list[Case], timer, copy_gbs: float | None) -> None:
    """One table per part; rows print as they are measured; n/a reasons once per section."""
    seen: set[str] = set()
    for part in dict.fromkeys(c.part for c in cases):
        sel = [c for c in cases if c.part == part]
        table, extras = part_table(sel[0].section, part)
        out()
        for line in table.header():
            out(line)
        prev = None
        for k, case in enumerate(sel):
            if ctx.budget_exhausted():
                ctx.note(f"--budget exhausted: {len(sel) - k} remaining {part} cases skipped")
                ctx.report.rows.extend(Row(c, note="skipped: --budget exhausted") for c in sel[k:])
                break
            if prev is not None and prev != (case.K, case.N):
                env.clear()
            prev = (case.K, case.N)
            row = run_case(case, env, timer)
            ctx.report.rows.append(row)
            peer = fastest(row, TORCH_PEERS)  # torch's fastest path measured on the row
            out(table.row(row_cells(row, extras, copy_gbs), [row.ratio(peer) if peer else None], case.label))
            if problems(row):
                out(f"      {problems(row)}")
            for name, r in row.impls.items():
                if r.status == "n/a" and r.reason not in seen:
                    seen.add(r.reason)
                    out(f"      ({name} n/a: {r.reason})")
        out(table.footer())
        env.clear()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def section_cpu(ctx: Context) -> None:
    import torch

    out(f"\n== cpu: ops on {cpu_name()} ({torch.get_num_threads()} threads, L3 {cpu_l3_bytes() >> 20} MiB) ==")
    if ctx.loaded:
        out(f"  WARNING: load average {ctx.load:.1f} on {ctx.cores} cores before the run: other processes compete "
            "for the cores; CPU verdicts read 'noisy' (compare ratios, rerun on a quiet machine)")
    env = Env("cpu")
    env.load_module(ctx.cold_build_failed.get("cpu"))
    out(f"  compiled module: {env.module_why}")
    ctx.report.meta["cpu_module"] = env.module_why
    a = torch.randn(64 << 20)  # 256 MiB: the ceiling, a large copy (read + write)
    b = torch.empty_like(a)
    t = time_cpu({"copy": (lambda i: b.copy_(a), 1)}, 0.3 if ctx.quick else 1.0)["copy"]
    copy_gbs = 2 * a.numel() * 4 / t.us / 1e3
    del a, b
    ctx.report.ceilings["cpu_copy_GBs"] = copy_gbs
    out(f"  copy bandwidth (256 MiB .copy_, read+write): {copy_gbs:.1f} GB/s")
    out("  ratio = torch time / ours (> 1: ours faster); GB/s, %bw and TFLOP/s are ours")
    min_time = 0.15 if ctx.quick else 0.5
    cases = [c for c in cpu_cases(ctx.quick) if c.part in ctx.parts]
    run_parts(ctx, env, cases, lambda fns: time_cpu(fns, min_time), copy_gbs)


def section_cuda(ctx: Context) -> None:
    import torch

    if not torch.cuda.is_available():
        ctx.note(f"cuda section skipped: torch.cuda.is_available() is False (torch {torch.__version__}, "
                 f"CUDA {torch.version.cuda})")
        return
    torch.set_float32_matmul_precision("highest")  # the fp32 reference must not run on TF32
    props = torch.cuda.get_device_properties(0)
    out(f"\n== cuda: ops on {props.name} ({props.multi_processor_count} SMs, "
        f"L2 {int(getattr(props, 'L2_cache_size', 0)) >> 20} MiB, cc {props.major}.{props.minor}) ==")
    ctx.report.meta["gpu"] = props.name
    env = Env("cuda")
    env.load_module(ctx.cold_build_failed.get("cuda"))
    env.load_triton(not ctx.args.no_triton)
    out(f"  compiled module: {env.module_why}; triton: {env.triton_why}")
    ctx.report.meta.update(cuda_module=env.module_why, triton=env.triton_why)
    timer = CudaTimer(batch_ms=0.5 if ctx.quick else 2.0, reps=5 if ctx.quick else 15)

    copy_gbs = cuda_copy_bandwidth()
    n = CUDA_MM_SIZE
    x = torch.randn(n, n, device="cuda", dtype=torch.float16)
    y = torch.randn(n, n, device="cuda", dtype=torch.float16)
    mm_tflops = 2 * n ** 3 / timer.measure({"mm": (lambda i: torch.mm(x, y), 1)})["mm"].us / 1e6
    del x, y
    torch.cuda.empty_cache()
    ctx.report.ceilings.update(cuda_copy_GBs=copy_gbs, cuda_fp16_mm_8192_TFLOPs=mm_tflops,
                               reference_points=CUDA_REFERENCE_POINTS)
    out(f"  copy bandwidth ({CUDA_COPY_ELEMS * 2 >> 20} MiB .copy_, read+write): {copy_gbs:.0f} GB/s   "
        f"(H100 reference {CUDA_REFERENCE_POINTS['copy_GBs']:.0f})")
    out(f"  torch fp16 mm {n}^3: {mm_tflops:.0f} TFLOP/s")
    out("  timing: CUDA graphs of back-to-back calls over weights rotating through > 4x L2; "
        "ratio = torch time / ours")
    cases = [c for c in cuda_cases(ctx.quick) if c.part in ctx.parts]
    if env.module is not None:
        routes_step.tune(ctx, cases)
    run_parts(ctx, env, cases, timer.measure, copy_gbs)
    again = cuda_copy_bandwidth()
    if again > copy_gbs * 1.02:  # the ceiling is the best copy seen (clocks and neighbours drift)
        out(f"  copy bandwidth measured again after the rows: {again:.0f} GB/s (the goals use this ceiling)")
        ctx.report.ceilings["cuda_copy_GBs"] = again
    for line in timer_checks(ctx.report.rows):
        out(line)


def cuda_copy_bandwidth() -> float:
    """Device-to-device copy GB/s (read + write bytes) of a 1 GiB fp16 tensor: the best of 10 eager batches
    of 4 copies timed with events, after 1 s of back-to-back copies (an idle GPU starts at a low SM clock,
    345 MHz on the H200). Timed eagerly, as tools/probe_gemv.py does: on an H200 this 1 GiB copy timed
    through the CUDA-graph timer read 2707 GB/s, on warm clocks too, where eager batches read 4155-4228,
    and a 0.5 ms copy has no launch cost for a graph to hide. A low ceiling showed decode rows at > 100%
    of "copy bandwidth"."""
    import time

    import torch

    a = torch.randn(CUDA_COPY_ELEMS, device="cuda", dtype=torch.float16)
    b = torch.empty_like(a)
    end_warm = time.perf_counter() + 1.0
    while time.perf_counter() < end_warm:
        for _ in range(8):
            b.copy_(a)
        torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best_ms = float("inf")
    for _ in range(10):
        start.record()
        for _ in range(4):
            b.copy_(a)
        stop.record()
        stop.synchronize()
        best_ms = min(best_ms, start.elapsed_time(stop) / 4)
    del a, b
    torch.cuda.empty_cache()
    return 2 * CUDA_COPY_ELEMS * 2 / (best_ms * 1e-3) / 1e9


def timer_checks(rows: list[Row]) -> list[str]:
    """torch's own times beside the reference points (validates the timer on this card)."""
    lines = []
    for r in rows:
        c = r.case
        lay = {"kn": "[K,N]", "nk": "[N,K]"}.get(c.layout, "")
        key = (f"torch {c.dtype} M={c.M} {c.K}x{c.N} {lay} us" if c.part == "decode"
               else f"torch {c.dtype} M={c.M} K={c.K} N={c.N} {lay} us")
        if c.section == "cuda" and key in CUDA_REFERENCE_POINTS:
            lines.append(f"  timer check: {key[:-3]}: {fmt_us(r.us('torch'))} us "
                         f"(H100 reference {CUDA_REFERENCE_POINTS[key]:.0f} us)")
    return lines
