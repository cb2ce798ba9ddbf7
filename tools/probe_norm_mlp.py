"""GPU probe of the RMSNorm / PreRMSNorm kernels and the fused gated MLP (rms_mlp_gemm): parity, then timing.

    PYTHONPATH=$PWD python tools/probe_norm_mlp.py               # parity + timing, about 1-2 minutes on an H200
    PYTHONPATH=$PWD python tools/probe_norm_mlp.py --no-timing   # parity only
    PYTHONPATH=$PWD python tools/probe_norm_mlp.py --define DSINF_GATED_PDL=0 --define DSINF_GATED_STAGES=3
    PYTHONPATH=$PWD python tools/probe_norm_mlp.py --no-parity --no-norms --mlp-shapes 2048:5632,4096:14336

What it prints:
  1. copy bandwidth after warming the clocks (tools/probe_gemv.py's measure: read + write bytes), the ceiling;
  2. parity against dsinf's pure-torch reference on random inputs: rms_norm / pre_rms_norm for M in 1, 3, 8,
     256 and hidden sizes incl. odd ones; rms_mlp_gemm_{fp16,bf16} ([N,K], int8, [K,N]) for M in 1, 3, 8, 256
     and shapes that take the tensor-core gated GEMV (partial tiles, split K) or the scalar fallback (odd K);
  3. PreRMSNorm / RMSNorm at hidden 4096, 8192, M in 256, 1024, 4096: µs, GB/s and % of the ceiling
     (bytes: read x (+ residual) + gamma, write the output(s)), and HF's torch ops for comparison;
  4. gated MLP K->I->K at M in 1, 2, 4, 8 (--mlp-cases of MLP_CASES; --mlp-shapes, default 4096:14336):
     ours, the HF eager chain, the two-cuBLAS chain, ratios and % of the ceiling (bytes: the weights);
  5. the issue-10 goals with PASS/MISS per row.
Timing: CUDA-graph replays over rotating input/weight copies larger than the L2 (probe_gemv.GraphTimer).
Robust: every case runs in its own try block; a failure prints one line and the run goes on. Exit code 1 on
any parity failure. Not a test (pytest does not collect tools/).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (ROOT, HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

from probe_gemv import GraphTimer, copies_for, copy_bandwidth, fail_line, log, start_cuda  # noqa: E402

GATED_SILU = 4
EPS = 1e-5
# --mlp-cases: name -> (activations, weights): [N, K] 16-bit (nn.Linear's layout), int8 (always [N, K]), or
# [K, N] 16-bit (DeepSpeed's default, transposed_mode=False)
MLP_CASES = {"fp16": ("fp16", "nk"), "bf16": ("bf16", "nk"), "int8": ("fp16", "int8"),
             "int8-bf16": ("bf16", "int8"), "fp16-kn": ("fp16", "kn"), "bf16-kn": ("bf16", "kn")}
TOL = {"fp32": 5e-5, "fp16": 4e-3, "bf16": 3e-2}  # max |err| / max |ref|, as tests/test_mlp_gemm.py


def dtypes(torch):
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def rel_err(got, want) -> float:
    got, want = got.double(), want.double()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


# ------------------------------------------------------------------------------------------ parity
def parity(torch) -> int:
    from dsinf import reference
    from dsinf.quantize import quantize_int8

    gen = torch.Generator(device="cuda").manual_seed(0)
    failures = 0

    def check(what, pairs, name):
        nonlocal failures
        errs = [rel_err(g, w) for g, w in pairs]
        ok = all(e <= TOL[name] for e in errs) and all(bool(torch.isfinite(g).all()) for g, _ in pairs)
        failures += not ok
        return ok, max(errs)

    log("\nparity vs dsinf.reference (max |err| / max |ref|)")
    norm_bad = 0
    for name, dt in dtypes(torch).items():
        for H in (61, 4095, 4096, 8192, 14336, 20000):
            for M in (1, 3, 8, 256):
                what = f"norm {name} H={H} M={M}"
                try:
                    x = torch.randn(M, H, device="cuda", dtype=dt, generator=gen)
                    r = 2 * torch.randn(M, H, device="cuda", dtype=dt, generator=gen)
                    g = torch.randn(H, device="cuda", dtype=dt, generator=gen)
                    out, res = torch.ops.dsinf.pre_rms_norm(x, r, g, EPS)
                    rout, rres = reference.pre_rms_norm(x, r, g, EPS)
                    ok, err = check(what, [(torch.ops.dsinf.rms_norm(x, g, EPS), reference.rms_norm(x, g, EPS)),
                                           (out, rout)], name)
                    if not torch.equal(res, rres):
                        ok = False
                        failures += 1
                    if not ok:
                        norm_bad += 1
                        log(f"  FAIL {what}: rel err {err:.3g} (residual exact: {torch.equal(res, rres)})")
                except Exception as exc:  # noqa: BLE001 - report and go on
                    failures += 1
                    norm_bad += 1
                    fail_line(what, exc)
    log(f"  rms_norm / pre_rms_norm: {norm_bad} failing case(s) of {3 * 6 * 4}")
    # (K, I, why)
    shapes = [(4096, 14336, "Llama-3-8B: tensor core, many tiles"), (80, 40, "partial k-step and tile"),
              (8192, 24, "two tiles: K split over a cluster"), (1024, 3584, "tensor core"),
              (130, 77, "K % 8 != 0: scalar fallback")]
    for name in ("fp16", "bf16"):
        dt = dtypes(torch)[name]
        op = getattr(torch.ops.dsinf, f"rms_mlp_gemm_{name}")
        for K, I, why in shapes:
            for layout in ("nk", "int8", "kn"):
                for M in (1, 3, 8, 256):
                    if M == 256 and K * I > 1024 * 3584:
                        continue
                    what = f"mlp {name} {layout:4s} K={K:5d} I={I:5d} M={M:3d} ({why})"
                    try:
                        x = torch.randn(1, M, K, device="cuda", dtype=dt, generator=gen)
                        r = 2 * torch.randn(1, M, K, device="cuda", dtype=dt, generator=gen)
                        g = torch.randn(K, device="cuda", dtype=dt, generator=gen)
                        w1 = torch.randn(2 * I, K, device="cuda", generator=gen) / math.sqrt(K)
                        w2 = torch.randn(K, I, device="cuda", generator=gen) / math.sqrt(I)
                        s1 = s2 = None
                        if layout == "int8":
                            w1 = quantize_int8(w1, 2, transposed_mode=True)
                            w2 = quantize_int8(w2, None, transposed_mode=True)
                            s1, s2 = w1.scale, w2.scale
                        elif layout == "nk":
                            w1, w2 = w1.to(dt), w2.to(dt)
                        else:
                            w1, w2 = w1.t().contiguous().to(dt), w2.t().contiguous().to(dt)
                        args = (x, r, w1, w2, g, EPS, s1, s2, layout == "int8", GATED_SILU, layout == "nk")
                        got, want = op(*args), reference.rms_mlp_gemm(*args)
                        ok, err = check(what, [(got[0], want[0])], name)
                        if not torch.equal(got[1], want[1]):
                            ok = False
                            failures += 1
                        if not ok or (M in (1, 8) and K == 4096):
                            log(f"  {'PASS' if ok else 'FAIL'} {what}: rel err {err:.3g} (tol {TOL[name]:.0e})")
                    except Exception as exc:  # noqa: BLE001
                        failures += 1
                        fail_line(what, exc)
    log(f"parity: {failures} failure(s)")
    return failures


# ------------------------------------------------------------------------------------------ timing
def time_norms(torch, bw: float, timer: GraphTimer) -> list[dict]:
    from bench.impls import torch_rms_norm

    rows = []
    log("\nPreRMSNorm / RMSNorm (µs per call; %bw of the copy ceiling; torch = HF's ops: x + r, LlamaRMSNorm)")
    log(f"  {'op':12s} {'dtype':5s} {'H':>5s} {'M':>5s} {'ours':>7s} {'torch':>7s} {'x':>5s} {'GB/s':>6s} {'%bw':>5s}")
    for name in ("fp16", "bf16"):
        dt = dtypes(torch)[name]
        for H in (4096, 8192):
            for M in (256, 1024, 4096):
                for pre in (True, False):
                    what = f"{'pre_rms_norm' if pre else 'rms_norm'} {name} H={H} M={M}"
                    try:
                        nbytes = (M * H * (4 if pre else 2) + H) * 2
                        n = copies_for(nbytes)
                        xs = [torch.randn(M, H, device="cuda", dtype=dt) for _ in range(n)]
                        rs = [torch.randn(M, H, device="cuda", dtype=dt) for _ in range(n)]
                        g = torch.randn(H, device="cuda", dtype=dt)
                        if pre:
                            ours = lambda i: torch.ops.dsinf.pre_rms_norm(xs[i], rs[i], g, EPS)  # noqa: E731
                            ref = lambda i: (lambda h: (torch_rms_norm(h, g, EPS), h))(xs[i] + rs[i])  # noqa: E731
                        else:
                            ours = lambda i: torch.ops.dsinf.rms_norm(xs[i], g, EPS)  # noqa: E731
                            ref = lambda i: torch_rms_norm(xs[i], g, EPS)  # noqa: E731
                        t = timer.time_many({"ours": (ours, n), "torch": (ref, n)})
                        gbs = nbytes / (t["ours"] * 1e-6) / 1e9
                        row = dict(op="pre" if pre else "rms", dtype=name, H=H, M=M, ours=t["ours"],
                                   torch=t["torch"], pct=100 * gbs / bw)
                        rows.append(row)
                        log(f"  {'pre_rms_norm' if pre else 'rms_norm':12s} {name:5s} {H:5d} {M:5d} {t['ours']:7.2f} "
                            f"{t['torch']:7.2f} {t['torch'] / t['ours']:5.1f} {gbs:6.0f} {row['pct']:5.0f}")
                        del xs, rs
                    except Exception as exc:  # noqa: BLE001
                        fail_line(what, exc)
    return rows


def time_mlp(torch, bw: float, timer: GraphTimer, K: int, I: int, cases) -> list[dict]:
    from bench.impls import torch_mlp_2gemm, torch_mlp_eager
    from dsinf.quantize import quantize_int8

    rows = []
    log(f"\ngated MLP {K}->{I}->{K} (µs per call; eager = HF LlamaMLP + residual add + RMSNorm in torch ops; "
        "2gemm = gate|up in one cuBLAS GEMM)")
    log(f"  {'case':12s} {'M':>2s} {'ours':>7s} {'eager':>7s} {'2gemm':>7s} {'x eager':>8s} {'x 2gemm':>8s} {'%bw':>5s}")
    for case in cases:
        act, weights = MLP_CASES[case]
        int8, kn = weights == "int8", weights == "kn"
        dt = torch.bfloat16 if act == "bf16" else torch.float16
        op = getattr(torch.ops.dsinf, f"rms_mlp_gemm_{act}")
        try:
            wbytes = (2 * I * K + K * I) * (1 if int8 else 2)
            n = copies_for(wbytes)
            w1s = [(torch.randn(2 * I, K, device="cuda", dtype=dt) / math.sqrt(K)) for _ in range(n)]
            w2s = [(torch.randn(K, I, device="cuda", dtype=dt) / math.sqrt(I)) for _ in range(n)]
            if int8:
                q1 = [quantize_int8(w, 8, transposed_mode=True) for w in w1s]
                q2 = [quantize_int8(w, 8, transposed_mode=True) for w in w2s]
            if kn:
                w1kn, w2kn = [w.t().contiguous() for w in w1s], [w.t().contiguous() for w in w2s]
            g = torch.randn(K, device="cuda", dtype=dt)
        except Exception as exc:  # noqa: BLE001
            fail_line(f"mlp {case} weights", exc)
            continue
        for M in (1, 2, 4, 8):
            what = f"mlp {case} M={M}"
            try:
                xs = [torch.randn(1, M, K, device="cuda", dtype=dt) for _ in range(n)]
                rs = [torch.randn(1, M, K, device="cuda", dtype=dt) for _ in range(n)]
                if int8:
                    ours = lambda i: op(xs[i], rs[i], q1[i], q2[i], g, EPS, q1[i].scale, q2[i].scale,  # noqa: E731
                                        True, GATED_SILU, True)
                elif kn:
                    ours = lambda i: op(xs[i], rs[i], w1kn[i], w2kn[i], g, EPS, None, None, False,  # noqa: E731
                                        GATED_SILU, False)
                else:
                    ours = lambda i: op(xs[i], rs[i], w1s[i], w2s[i], g, EPS, None, None, False,  # noqa: E731
                                        GATED_SILU, True)
                eager = lambda i: torch_mlp_eager(xs[i], rs[i], w1s[i][I:], w1s[i][:I], w2s[i], g, EPS)  # noqa: E731
                two = lambda i: torch_mlp_2gemm(xs[i], rs[i], w1s[i], w2s[i], g, EPS)  # noqa: E731
                t = timer.time_many({"ours": (ours, n), "eager": (eager, n), "2gemm": (two, n)})
                pct = 100 * wbytes / (t["ours"] * 1e-6) / 1e9 / bw
                row = dict(case=case, K=K, I=I, M=M, ours=t["ours"], eager=t["eager"], two=t["2gemm"],
                           x_eager=t["eager"] / t["ours"], x_two=t["2gemm"] / t["ours"], pct=pct)
                rows.append(row)
                log(f"  {case:12s} {M:2d} {t['ours']:7.1f} {t['eager']:7.1f} {t['2gemm']:7.1f} "
                    f"{row['x_eager']:7.2f}x {row['x_two']:7.2f}x {pct:5.0f}")
            except Exception as exc:  # noqa: BLE001
                fail_line(what, exc)
        del w1s, w2s
        if int8:
            del q1, q2
        if kn:
            del w1kn, w2kn
        torch.cuda.empty_cache()
    return rows


def goals(norm_rows: list[dict], mlp_rows: list[dict]) -> None:
    log("\nissue-10 goals")
    for r in norm_rows:
        log(f"  {'PASS' if r['pct'] >= 80 else 'MISS'} {r['op']}_rms_norm {r['dtype']} H={r['H']} M={r['M']}: "
            f"{r['pct']:.0f}% of copy bw (goal >= 80%)")
    for r in mlp_rows:
        if r["case"] == "fp16" and r["M"] in (1, 8) and (r["K"], r["I"]) == (4096, 14336):
            log(f"  {'PASS' if r['x_eager'] >= 1.3 else 'MISS'} gated MLP fp16 M={r['M']}: {r['ours']:.1f} µs, "
                f"{r['x_eager']:.2f}x the eager chain (goal >= 1.3x), {r['x_two']:.2f}x the two-cuBLAS chain")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--no-parity", action="store_true")
    p.add_argument("--no-timing", action="store_true")
    p.add_argument("--no-norms", action="store_true", help="time the gated MLP only")
    p.add_argument("--mlp-shapes", default="4096:14336", metavar="K:I,...",
                   help="gated MLP shapes hidden:intermediate (default 4096:14336, Llama-3-8B)")
    p.add_argument("--mlp-cases", default="fp16,bf16,int8", metavar="CASE,...", help=f"of {', '.join(MLP_CASES)}")
    p.add_argument("--define", action="append", default=[], help="NAME=VALUE passed to nvcc as -D (one build)")
    args = p.parse_args()
    try:
        shapes = [tuple(int(v) for v in item.split(":")) for item in args.mlp_shapes.split(",")]
        if any(len(sh) != 2 or min(sh) < 1 for sh in shapes):
            raise ValueError
    except ValueError:
        p.error(f"--mlp-shapes: {args.mlp_shapes!r} is not a list of K:I with positive integers")
    cases = args.mlp_cases.split(",")
    if not set(cases) <= set(MLP_CASES):
        p.error(f"--mlp-cases: {args.mlp_cases!r} names a case other than {', '.join(MLP_CASES)}")
    import torch

    t0 = time.perf_counter()
    if not start_cuda(torch, args.define):
        return 1
    failures = 0 if args.no_parity else parity(torch)
    if not args.no_timing:
        warm = time.perf_counter()  # ~1 s of copies so the clocks are up before the ceiling is measured
        a = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
        b = torch.empty_like(a)
        while time.perf_counter() - warm < 1.0:
            for _ in range(20):
                b.copy_(a)
            torch.cuda.synchronize()
        del a, b
        bw = copy_bandwidth(torch)
        log(f"\ncopy bandwidth {bw:.0f} GB/s (after warming the clocks)")
        timer = GraphTimer(torch)
        norm_rows = [] if args.no_norms else time_norms(torch, bw, timer)
        mlp_rows = [row for K, I in shapes for row in time_mlp(torch, bw, timer, K, I, cases)]
        goals(norm_rows, mlp_rows)
    log(f"\nprobe done in {time.perf_counter() - t0:.0f} s; parity failures: {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
