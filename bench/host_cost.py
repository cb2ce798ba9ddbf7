"""Per-call host cost: 64x64 (so the kernel is negligible), one thread, best of N loops, for each way
of calling our op beside `F.linear`; the goal is at most F.linear + 2 µs."""
from __future__ import annotations

from typing import Any, Callable

from . import adapter
from .context import Context, first_line, out
from .tables import Column, Table, fmt_num, fmt_us, fmt_x

SIZE = 64


def calls(device: str) -> list[tuple[str, str, Any]]:
    """(name, baseline name, fn or why-not string) for each way of calling, on `device`."""
    import torch
    import torch.nn.functional as F

    from dsinf import InferenceConfig, LinearOp, VectorMatMulOp

    dt, dname = (torch.float32, "fp32") if device == "cpu" else (torch.float16, "fp16")
    x = torch.randn(1, 1, SIZE, device=device).to(dt)
    w = (torch.randn(SIZE, SIZE, device=device) / SIZE ** 0.5).to(dt)  # [N, K], nn.Linear layout
    b = torch.randn(SIZE, device=device).to(dt)
    cfg = InferenceConfig(dtype=dt, transposed_mode=True)
    vm, lin = VectorMatMulOp(cfg), LinearOp(cfg)
    entries: list[tuple[str, str, Any]] = [
        ("F.linear", "", lambda: F.linear(x, w)),
        ("F.linear + bias", "", lambda: F.linear(x, w, b)),
        (f"VectorMatMulOp [{vm.resolve(device).backend}]", "F.linear", lambda: vm(x, w)),
        (f"LinearOp + bias [{lin.resolve(device).backend}]", "F.linear + bias", lambda: lin(x, w, b, True, False, 1)),
    ]
    module, why = adapter.load_module(device)
    fname = f"vector_matmul_{dname}"
    f = adapter.module_function(module, fname, device) if module is not None else f"compiled module: {why}"
    if isinstance(f, str):
        entries += [(f"{fname} bound once", "F.linear", f), (f"mod.{fname} per call", "F.linear", f)]
    else:
        entries += [(f"{fname} bound once", "F.linear", lambda: f(x, w, False, None, False, True)),
                    (f"mod.{fname} per call", "F.linear",
                     lambda: getattr(module, fname)(x, w, False, None, False, True))]
    return entries


def measure(device: str, n_calls: int, repeats: int) -> dict[str, dict[str, Any]]:
    import torch

    from .timing import best_of

    sync: Callable[[], None] = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    res: dict[str, dict[str, Any]] = {}
    for name, base, fn in calls(device):
        if isinstance(fn, str):
            res[name] = {"why": fn}
            continue
        try:
            t = best_of(fn, n_calls, repeats, sync)
        except Exception as exc:  # noqa: BLE001
            res[name] = {"why": f"{type(exc).__name__}: {first_line(exc)}"}
            continue
        d = {"us": t.us, "lo": t.lo, "hi": t.hi, "baseline": base}
        if base and "us" in res.get(base, {}):
            bt = res[base]
            d.update(baseline_us=bt["us"], diff_us=t.us - bt["us"], diff_lo=t.lo - bt["hi"],
                     diff_hi=t.hi - bt["lo"])
        res[name] = d
    return res


def section_host_cost(ctx: Context) -> None:
    import torch

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for device in devices:
            res = measure(device, 500 if ctx.quick else 2000, 5 if ctx.quick else 9)
            ctx.report.host_cost[device] = res
            table = Table(f"per-call host cost on {device}, {SIZE}x{SIZE}, 1 thread, best of loops (goal: "
                          f"<= baseline + 2 us)",
                          [Column("call", 34, left=True), Column("us", 6), Column("baseline", 16, left=True),
                           Column("baseline us", 6), Column("diff us", 7), Column("ratio", 6)])
            out(f"\n== host cost: {device} ==")
            for line in table.header():
                out(line)
            for name, d in res.items():
                if "why" in d:
                    out(table.row([name, "n/a", "", "", "", ""]) + f"  ({d['why']})")
                    continue
                ratio = d["baseline_us"] / d["us"] if "baseline_us" in d else None
                out(table.row([name, fmt_us(d["us"]), d["baseline"] or "-", fmt_us(d.get("baseline_us")),
                               fmt_num(d.get("diff_us"), 1), fmt_x(ratio)], [ratio]))
            out(table.footer())
    finally:
        torch.set_num_threads(threads)
