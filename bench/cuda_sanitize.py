"""Small sweep over every path of the CUDA inference module, for compute-sanitizer.

    compute-sanitizer --tool memcheck python bench/cuda_sanitize.py
    compute-sanitizer --tool racecheck python bench/cuda_sanitize.py --quick
    python bench/cuda_sanitize.py            # plain run: same checks, seconds

Covers both weight layouts, each dtype, int8 weights (several scale groups), the [N, K] streaming kernel's
16- and 32-row tiles, 16-warp CTAs and int8 1-step units (16-bit and int8 weights), the fused QKV split with
RoPE (both pair styles, rotary_dim < D) and GQA, small M (GEMV buckets up to 16, each shape routed to our
GEMV; split-K clusters, the scalar fallback for odd K / misaligned weights), the int8 GEMM (its two CTA tiles,
split K), dequantize + cuBLAS (the row and scalar dequantize kernels) and large M (cuBLAS + epilogue kernels).
Shapes are tiny so a memcheck run stays in minutes. Every result is compared with dsinf.reference (computed on
CPU copies); the script exits 1 on any mismatch, NaN or error, 0 otherwise.

The module comes from the lead's builder: op_builder.InferenceBuilder().load("cuda").
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from dsinf import reference, routes  # noqa: E402

RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}  # see tests/test_cuda_module.py
SUFFIX = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def rel_err(out, ref):
    o, r = out.double().cpu(), ref.double().cpu()
    return ((o - r).norm() / r.norm().clamp_min(1e-30)).item()


def weight(K, N, dtype, nk, misalign=False):
    shape = (N, K) if nk else (K, N)
    w = (torch.randn(shape) / max(K, 1) ** 0.5).to(dtype)
    if misalign:
        flat = torch.empty(w.numel() + 1, dtype=dtype, device="cuda")
        flat[1:].copy_(w.flatten())
        return flat[1:].view(shape)
    return w.cuda()


def int8_weight(K, N, G):
    w = torch.randint(-128, 128, (N, K), dtype=torch.int8)
    s = (torch.rand(G) + 0.5) / (127.0 * max(K, 1) ** 0.5)
    return w.cuda(), s.float().cuda()


def cases(quick: bool):
    """Yield (name, dtype, op, args, kwargs). op is 'linear_layer' or 'vector_matmul'."""
    dtypes = [torch.float16, torch.bfloat16, torch.float32]
    Ms = [(1, 1), (1, 3), (3, 4)] + ([] if quick else [(1, 16)])
    big_M = (2, 24)  # M = 48: cuBLAS path for every dtype
    # The streaming kernel ([N, K] weights, 16-bit and int8) takes 32-row CTA tiles when they give every SM
    # two. This N gives 5 x SMs + 1 of them: more than the 3-5 CTAs that fit an SM, so CTAs take two or three
    # tiles (the ring runs across a tile boundary), the last CTA fewer, and the last tile is partial.
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    row_tiles_n = 160 * sms + 24
    # 16-row tiles at M <= 8: fewer than 2 per SM take 16-warp CTAs, int8 from 3 per SM 1-step units; both
    # with a partial last tile.
    wide_n, short_n = 16 * (3 * sms // 2) + 8, 16 * (7 * sms // 2) + 8
    # [K, N]: 1.5 x SMs 64-column tiles, which kn_split (gemv_launch.cu) splits in two at M <= 8; the one-tile
    # "split" shape (K = 4096) takes a split of 5: cluster slices of unequal length.
    split2_n = 64 * (3 * sms // 2)
    for dt in dtypes:
        for nk in (False, True):
            lay = "NK" if nk else "KN"
            # K % 32 == 8: a partial 16-bit k-step
            rows = [(72, row_tiles_n, "rows"), (72, wide_n, "wide")] if nk else [(2048, split2_n, "split2")]
            for K, N, tag in [(256, 136, "tile"), (4096, 64, "split"), (67, 40, "oddK")] + rows:
                w = weight(K, N, dt, nk)
                b = torch.randn(N, dtype=dt, device="cuda")
                for B, S in Ms + [big_M]:
                    x = torch.randn(B, S, K, dtype=dt, device="cuda")
                    yield f"linear {lay} {tag} M={B * S}", dt, "linear_layer", (x, w, b, True, False, 1, nk), {}
                    if tag not in ("tile", "rows", "wide", "split2"):
                        continue
                    yield f"vmm {lay} {tag} M={B * S}", dt, "vector_matmul", (x, w, False, None, False, nk), {}
            w = weight(128, 96, dt, nk, misalign=True)
            x = torch.randn(2, 2, 128, dtype=dt, device="cuda")
            yield f"vmm {lay} misaligned", dt, "vector_matmul", (x, w, False, None, False, nk), {}
        # The last shapes: the streaming kernel's 32-row tiles (see row_tiles_n), 16-warp CTAs, 1-step units.
        for K, N, G in [(256, 96, 1), (512, 64, 4), (48, 40, 40), (64, row_tiles_n, 1), (208, wide_n, 1),
                        (208, short_n, 8)]:
            w, s = int8_weight(K, N, G)
            for B, S in Ms + [big_M]:
                x = torch.randn(B, S, K, dtype=dt, device="cuda")
                yield f"vmm int8 K={K} G={G} M={B * S}", dt, "vector_matmul", (x, w, False, s, True, False), {}
        # The int8 GEMM (M above the GEMV's range; `run` forces its route): both CTA tiles (64 and 128 tokens)
        # with M and N tails, a partial k-tile, K split over a cluster (few output tiles, long K).
        for K, N, G in [(48, 40, 40), (1040, 384, 2), (4096, 130, 1)]:
            w, s = int8_weight(K, N, G)
            for B, S in [(1, 17), (1, 65), (3, 43)]:
                x = torch.randn(B, S, K, dtype=dt, device="cuda")
                yield f"gemm int8 K={K} N={N} G={G} M={B * S}", dt, "vector_matmul", (x, w, False, s, True, False), {}
        # dequantize + cuBLAS (K % 16 != 0: the GEMM does not take it): the dequantize kernel's row path with one
        # chunk pass and more than one (K / 8 = 513), scale groups; the scalar kernel for a misaligned weight.
        for K, N, G, off in [(40, 96, 3, 0), (4104, 70, 7, 0), (1032, 33, 1, 2)]:
            w, s = int8_weight(K, N, G)
            if off:  # the same values `off` bytes into a larger buffer
                w = torch.cat([w.new_zeros(off), w.flatten()])[off:].view(N, K)
            x = torch.randn(1, 20, K, dtype=dt, device="cuda")
            yield f"dequant int8 K={K} N={N} G={G} offset={off}", dt, "vector_matmul", (x, w, False, s, True, False), {}
        # fused QKV + RoPE (+ GQA), small and large M, both layouts
        for heads, kv, D, rd, rh, off in [(4, -1, 32, 32, True, 3), (4, 2, 32, 16, False, 1000), (2, 1, 10, 6, True, 0)]:
            kvh = heads if kv == -1 else kv
            K, N = heads * D, (heads + 2 * kvh) * D
            for nk in (False, True):
                w = weight(K, N, dt, nk)
                b = torch.randn(N, dtype=dt, device="cuda")
                for B, S in [(1, 1), (2, 3), big_M]:
                    x = torch.randn(B, S, K, dtype=dt, device="cuda")
                    kw = dict(rope_theta=10000.0, rotary_dim=rd, rotate_half=rh, num_kv=kv, seq_offset=off)
                    yield (f"qkv H={heads} KV={kvh} D={D} rd={rd} {'NK' if nk else 'KN'} M={B * S}", dt,
                           "linear_layer", (x, w, b, True, True, heads, nk), kw)
        w, s = int8_weight(128, 3 * 128, 4)
        for B, S in [(1, 2), big_M]:
            x = torch.randn(B, S, 128, dtype=dt, device="cuda")
            yield (f"qkv int8 M={B * S}", dt, "linear_layer", (x, w, None, False, True, 4, False),
                   dict(rotary_dim=32, rotate_half=True, q_scale=s))


def to_cpu(v):
    return v.cpu() if isinstance(v, torch.Tensor) else v


def route_keys(op: str, args) -> list[routes.RouteKey]:
    """The case's matmul shape, which `run` routes to our GEMV so that memcheck covers it at every M the GEMV
    takes (the compiled crossover sends 16-bit M > 8 to cuBLAS; larger M still goes there), and an int8
    `vector_matmul` above the GEMV's range to the int8 GEMM (not to dequantize + cuBLAS) at every M."""
    x, w = args[0], args[1]
    transposed = args[5] if op == "vector_matmul" else args[6]  # linear_layer(x, w, b, add_bias, flash, heads, t)
    key = routes.key_of(x, w, w.dtype == torch.int8, bool(transposed))
    if op == "vector_matmul" and w.dtype == torch.int8:
        return [key, routes.RouteKey(key.dtype, routes.INT8_GEMM, key.K, key.N)]
    return [key]


def run(mod, quick: bool = False, verbose: bool = False) -> int:
    """Run every case against `mod` (attributes = the dsinf ops); returns the number of failures."""
    torch.manual_seed(0)
    failures = total = 0
    for name, dt, op, args, kwargs in cases(quick):
        fname = f"{op}_{SUFFIX[dt]}"
        if not mod.has(fname, "cuda"):  # not compiled in this build
            continue
        total += 1
        try:
            with routes.forced("cuda", route_keys(op, args)):
                outs = getattr(mod, fname)(*args, **kwargs)
            torch.cuda.synchronize()
            ref_fn = getattr(reference, op)
            refs = ref_fn(*[to_cpu(a) for a in args], **{k: to_cpu(v) for k, v in kwargs.items()})
            outs = outs if isinstance(outs, (list, tuple)) else [outs]
            refs = refs if isinstance(refs, (list, tuple)) else [refs]
            problems = []
            for o, r in zip(outs, refs):
                if o.shape != r.shape or o.dtype != r.dtype:
                    problems.append(f"shape/dtype {tuple(o.shape)} {o.dtype} vs {tuple(r.shape)} {r.dtype}")
                elif torch.isnan(o).any():
                    problems.append("NaN in output")
                elif r.numel() and rel_err(o, r) > RTOL[dt]:
                    problems.append(f"rel err {rel_err(o, r):.3g} > {RTOL[dt]:.1g}")
            if len(outs) != len(refs):
                problems.append(f"{len(outs)} outputs, expected {len(refs)}")
        except Exception:  # noqa: BLE001 - report every failure, keep going
            problems = ["raised:\n" + traceback.format_exc()]
        if problems:
            failures += 1
            print(f"FAIL {fname:22s} {name}: {'; '.join(problems)}", flush=True)
        elif verbose:
            print(f"ok   {fname:22s} {name}", flush=True)
    print(f"{total - failures} passed, {failures} failed", flush=True)
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer M values (for slow tools: racecheck)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check", file=sys.stderr)
        return 1
    from op_builder import InferenceBuilder

    mod = InferenceBuilder().load("cuda")
    return 1 if run(mod, quick=args.quick, verbose=args.verbose) else 0


if __name__ == "__main__":
    sys.exit(main())
