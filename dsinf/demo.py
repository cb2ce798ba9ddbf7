"""`python -m dsinf.demo`: the main job of the README.

Builds the inference module on first use (or loads it from the cache / the package), runs both ops
for every dtype on random inputs against the pure-torch reference, prints which backend each op
chose and why, a few timings against torch, and finally the op_builder report.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

import torch


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()


def _time_us(fn, device: str, min_seconds: float = 0.2) -> float:
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    runs, start = 0, time.perf_counter()
    while True:
        fn()
        runs += 1
        if device == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return elapsed / runs * 1e6


TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2, torch.int8: 5e-3}


def run(device: str) -> bool:
    import dsinf
    from dsinf import reference

    ok = True
    gen = torch.Generator().manual_seed(0)

    def rand(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    B, S, K, H = 2, 7, 1024, 8
    print(f"\nops on {device}: input [B={B}, S={S}, K={K}], {H} heads, RoPE on, GQA 8->2 for the last row")
    print(f"  {'op':<40} {'backend':<9} {'rel err':>9} {'ours us':>9} {'torch us':>9}")
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.int8):
        act = torch.float16 if dtype == torch.int8 else dtype
        cfg = dsinf.InferenceConfig(dtype=dtype, rotary_dim=64, rope_theta=10000.0, rotate_half=True)
        x = rand(B, S, K, dtype=act)
        w = rand(K, K, dtype=act) / K**0.5
        if dtype == torch.int8:
            w = dsinf.quantize_int8(w, groups=16)
        vmm = dsinf.VectorMatMulOp(cfg)
        cases = [("VectorMatMulOp", vmm, lambda: vmm(x, w),
                  lambda: reference.vector_matmul(x, w, q_scale=getattr(w, "scale", None),
                                                  q_int8=dtype == torch.int8))]
        wq = rand(K, 3 * K, dtype=act) / K**0.5
        bq = rand(3 * K, dtype=act)
        if dtype == torch.int8:
            wq = dsinf.quantize_int8(wq, groups=48)
        lin = dsinf.LinearOp(cfg)
        ref_kw = dict(rotary_dim=64, rotate_half=True, q_scale=getattr(wq, "scale", None))
        cases.append(("LinearOp fused QKV+RoPE", lin, lambda: lin(x, wq, bq, True, True, H)[0],
                      lambda: reference.linear_layer(x, wq, bq, True, True, H, **ref_kw)[0]))
        if dtype != torch.int8:
            gqa_cfg = dsinf.InferenceConfig(dtype=dtype, rotary_dim=64, rotate_half=False, num_kv=2)
            wg = rand(K, (H + 4) * (K // H), dtype=act) / K**0.5
            gqa = dsinf.LinearOp(gqa_cfg)
            cases.append(("LinearOp GQA q (every-two RoPE)", gqa, lambda: gqa(x, wg, None, False, True, H)[0],
                          lambda: reference.linear_layer(x, wg, None, False, True, H, rotary_dim=64, num_kv=2)[0]))
        for name, op, ours, ref in cases:
            got, want = ours(), ref()
            err = _rel_err(got, want)
            good = err < TOLERANCE[dtype]
            ok &= good
            t_ours = _time_us(ours, device)
            t_ref = _time_us(ref, device) if dtype != torch.int8 else float("nan")
            label = f"{name} {str(dtype).replace('torch.', '')}"
            print(f"  {label:<40} {op.backend:<9} {err:>9.1e} {t_ours:>9.1f} {t_ref:>9.1f}"
                  + ("" if good else "  MISMATCH"))
            skipped = [f"{b}: {why}" for b, why in op.decision.skipped]
            if skipped:
                print(f"      skipped: {'; '.join(skipped)}")
    print("  (torch us = the pure-torch reference path, fp32 accumulate; for int8 it dequantizes, not timed)")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dsinf.demo")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device

    from op_builder import InferenceBuilder
    from op_builder.report import environment, op_rows, render

    print(f"loading the {device} inference module (the first use on this machine compiles it)...")
    start = time.perf_counter()
    InferenceBuilder().load(device)
    from op_builder.builder import loaded_variants

    lv = loaded_variants()[("transformer_inference", device)]
    print(f"  {lv.how} in {time.perf_counter() - start:.2f} s: {lv.path}")
    ok = run(device)
    print()
    print(render(environment(), op_rows(), None, color=sys.stdout.isatty()))
    print("\nall ops match the reference" if ok else "\nSOME OPS DO NOT MATCH THE REFERENCE")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
