"""The CUDA decode rows as a user gets them: the measured routes (`dsinf.routes`) of their shapes first.

The compiled module runs a matmul on our GEMV up to a crossover M and on cuBLAS above it; `tune_routes`
measures that crossover per shape (and `dsinf.inject` does it for a model's linear shapes), so a shape
where our kernel loses to cuBLAS runs on cuBLAS. The bench tunes (or reuses the persisted) routes of
the decode and int8 shapes before it times them, so "ours" is the routed op and the "never slower than
torch" goal judges what a user runs. A row whose M the route sends to cuBLAS also times our GEMV with
the route forced to it (the "gemv" column), so the kernel's own number stays in the table; an int8 row at
a prompt's M times both of the paths its int8-gemm route chooses between ("gemm", "deq"). The gated MLP
rows' gate|up is tuned the same way (`tune_mlp_routes`: the gated kernel or the matmul + gated epilogue),
as `dsinf.inject` does for a model's fused MLPs.

DSINF_ROUTES=off (op_builder.knobs) skips the tuning: "ours" is then the compiled crossover, as for a
user who turned routes off.
"""
from __future__ import annotations

import time
from typing import Any, Callable

from .cases import Case
from .context import Context, first_line, out
from .env import torch_dtype

#: The parts whose rows are single matmuls the routes cover.
ROUTED_PARTS = ("decode", "int8", "int8prefill")


def tune(ctx: Context, cases: list[Case]) -> bool:
    """Tune the routes of the routed parts' shapes on the current CUDA device; print each decision.
    Returns whether routes are in force (False: DSINF_ROUTES=off, or the tuning failed)."""
    import torch

    from dsinf import routes
    from op_builder import knobs

    sel = [c for c in cases if (c.part in ROUTED_PARTS and c.op == "vector_matmul") or c.op == "mlp"]
    if not sel:
        return False
    if knobs.get("DSINF_ROUTES") == "off":
        out("  routes: DSINF_ROUTES=off - every row runs the compiled crossover")
        return False
    groups: dict[tuple[bool, str, str], list[tuple[int, int]]] = {}
    for c in sel:  # mlp rows: (hidden, intermediate)
        shapes = groups.setdefault((c.op == "mlp", c.dtype, c.layout), [])
        if (c.K, c.N) not in shapes:
            shapes.append((c.K, c.N))
    start = time.perf_counter()
    out("  routes (dsinf.routes.tune_routes / tune_mlp_routes; persisted, reused on the next run): where each "
        "shape runs")
    try:
        for (mlp, dtype, layout), shapes in groups.items():
            tune = routes.tune_mlp_routes if mlp else routes.tune_routes
            if layout == "int8":
                found = tune(shapes, torch.int8, "cuda", act_dtype=torch_dtype(dtype))
            else:
                found = tune(shapes, torch_dtype(dtype), "cuda", layout=layout)
            for r in found:
                out(f"    {r.explain()}")
    except Exception as exc:  # noqa: BLE001 - the rows still run, on the compiled crossovers
        ctx.note(f"routes: tuning failed ({type(exc).__name__}: {first_line(exc)}); rows use the compiled "
                 "crossovers")
        return False
    out(f"  routes: {time.perf_counter() - start:.1f} s")
    return True


def forced_gemv(case: Case, fn: Callable[..., Any]) -> Callable[..., Any] | None:
    """`fn` (the module's op) with this shape's route forced to our GEMV for the call, or None when the
    route in force already runs case.M on our GEMV (then "ours" is the kernel's number)."""
    from dsinf import routes

    if case.section != "cuda" or case.part not in ROUTED_PARTS:
        return None
    b = routes.binding("cuda")
    key = routes.RouteKey(case.dtype, case.layout, case.K, case.N)
    if b.runs_ours(key, case.M) or case.M > b.gemv_cap:
        return None

    return _forced(fn, key)


def _forced(fn: Callable[..., Any], key, max_m: int | None = None) -> Callable[..., Any]:
    """`fn` with `key`'s route forced (routes.forced) for each call. Host-side: inside graph capture the forced
    route is what the graph records."""
    from dsinf import routes

    def call(*args):
        with routes.forced("cuda", [key], max_m):
            return fn(*args)

    return call


def forced_int8_gemm(case: Case, fn: Callable[..., Any], max_m: int | None) -> Callable[..., Any]:
    """`fn` with this int8 shape's int8-gemm route forced: None, the int8 GEMM for every M; 0, dequantize +
    cuBLAS. For Ms past the int8 GEMV (the int8prefill rows)."""
    from dsinf import routes

    return _forced(fn, routes.RouteKey(case.dtype, routes.INT8_GEMM, case.K, case.N), max_m)
