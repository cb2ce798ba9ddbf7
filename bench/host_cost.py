"""Per-call host cost: 64x64 (so the kernel is negligible), one thread, for each way of calling our op
beside `F.linear`; the goal is at most F.linear + 2 µs.

Paired A/B (`timing.paired_blocks`): each call is timed in blocks back to back with its baseline, the
side that goes first alternating, over many rounds. A row's cost is its median block (its fastest block
beside it), its difference the median of the per-round differences to its baseline, with their
quartiles as the spread: pairing cancels what shifts both sides alike on a shared machine. The clock
depends on the device (`CLOCKS`)."""
from __future__ import annotations

import gc
import statistics
import time
from typing import Any, Callable

from . import adapter
from .context import Context, first_line, out
from .impls import TOLERANCE, rel_err
from .tables import Column, Table, fmt_num, fmt_us, fmt_x
from .timing import paired_blocks, spread

SIZE = 64

#: device -> (the clock's name in the output, the clock in ns).
CLOCKS: dict[str, tuple[str, Callable[[], int]]] = {
    # With one torch thread the whole call (Python, dispatcher, kernel) runs on the calling thread, so
    # its CPU time is the call's cost, and the time the OS gives other processes (a shared box) is not
    # counted in it: wall time on a loaded box put LinearOp anywhere in -1.5 .. +1.3 µs across runs.
    # `measure` reports the process's other threads' CPU time beside it, which should be ~0.
    "cpu": ("thread CPU time", time.thread_time_ns),
    # The call only enqueues the kernel: its cost is how long it holds the thread, waits in the driver
    # included (a full launch queue, a hidden device sync), and a waiting thread that yields spends no
    # CPU time, so thread CPU time could hide them. The GPU machine is lent whole: wall time is steady.
    "cuda": ("wall time", time.perf_counter_ns),
}


def calls(device: str) -> list[tuple[str, str, Any, Any]]:
    """(name, baseline name, fn or why-not string, the reference output) for each way of calling, on
    `device`: every call is checked against `dsinf.reference` before it is timed."""
    import torch
    import torch.nn.functional as F

    from dsinf import InferenceConfig, LinearOp, VectorMatMulOp, reference

    dt, dname = (torch.float32, "fp32") if device == "cpu" else (torch.float16, "fp16")
    x = torch.randn(1, 1, SIZE, device=device).to(dt)
    w = (torch.randn(SIZE, SIZE, device=device) / SIZE ** 0.5).to(dt)  # [N, K], nn.Linear layout
    b = torch.randn(SIZE, device=device).to(dt)
    cfg = InferenceConfig(dtype=dt, transposed_mode=True)
    vm, lin = VectorMatMulOp(cfg), LinearOp(cfg)
    plain = reference.vector_matmul(x, w, False, None, False, True)
    biased = reference.linear_layer(x, w, b, True, False, 1, True)[0]
    entries: list[tuple[str, str, Any, Any]] = [
        ("F.linear", "", lambda: F.linear(x, w), plain),
        ("F.linear + bias", "", lambda: F.linear(x, w, b), biased),
        (f"VectorMatMulOp [{vm.resolve(device).backend}]", "F.linear", lambda: vm(x, w), plain),
        (f"LinearOp + bias [{lin.resolve(device).backend}]", "F.linear + bias", lambda: lin(x, w, b, True, False, 1), biased),
    ]
    module, why = adapter.load_module(device)
    fname = f"vector_matmul_{dname}"
    f = adapter.module_function(module, fname, device) if module is not None else f"compiled module: {why}"
    if isinstance(f, str):
        entries += [(f"{fname} bound once", "F.linear", f, None), (f"mod.{fname} per call", "F.linear", f, None)]
    else:
        entries += [(f"{fname} bound once", "F.linear", lambda: f(x, w, False, None, False, True), plain),
                    (f"mod.{fname} per call", "F.linear",
                     lambda: getattr(module, fname)(x, w, False, None, False, True), plain)]
    return entries


def measure(device: str, n_calls: int, rounds: int) -> tuple[dict[str, dict[str, Any]], float]:
    """(name -> its row, the process's other threads' CPU time as a share of the timed thread's)."""
    return measure_entries(calls(device), device, n_calls, rounds)


def measure_entries(entries: list[tuple[str, str, Any, Any]], device: str, n_calls: int,
                    rounds: int) -> tuple[dict[str, dict[str, Any]], float]:
    """`measure` of the given `calls` entries."""
    import torch

    clock_name, clock = CLOCKS[device]
    sync: Callable[[], None] = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    res: dict[str, dict[str, Any]] = {}
    fns: dict[str, Callable[[], Any]] = {}
    for name, _, fn, want in entries:
        if isinstance(fn, str):
            res[name] = {"why": fn}
            continue
        try:
            got = fn()
            err = rel_err(got[0] if isinstance(got, list) else got, want)  # LinearOp returns a list
        except Exception as exc:  # noqa: BLE001
            res[name] = {"why": f"{type(exc).__name__}: {first_line(exc)}"}
            continue
        tol = TOLERANCE["fp32" if device == "cpu" else "fp16"]
        if not err <= tol:  # NaN fails too: a wrong call is not timed
            res[name] = {"why": f"FAIL: rel err {err:.2e} > {tol:.0e} against dsinf.reference"}
            continue
        fns[name] = fn
        res[name] = {}
    pairs = [(name, base) for name, base, _, _ in entries if base and name in fns and base in fns]
    gc_was_enabled = gc.isenabled()
    gc.disable()  # as timeit does: a collection would land in one side's block
    t0, p0 = time.thread_time_ns(), time.process_time_ns()
    try:
        samples, diffs = paired_blocks(fns, pairs, n_calls, rounds, clock, sync)
    finally:
        if gc_was_enabled:
            gc.enable()
    thread_ns, process_ns = time.thread_time_ns() - t0, time.process_time_ns() - p0
    bases = dict(pairs)
    for name, s in samples.items():
        if not s:  # in no pair: its baseline failed above, or every call paired with it did
            res[name] = {"why": "not timed: nothing to pair it with"}
            continue
        lo, hi = spread(s)
        d = {"us": statistics.median(s), "min_us": min(s), "lo": lo, "hi": hi, "baseline": bases.get(name, ""),
             "samples": len(s), "calls": n_calls, "clock": clock_name}
        if name in diffs:
            diff_lo, diff_hi = spread(diffs[name])
            d.update(baseline_us=statistics.median(samples[bases[name]]), diff_us=statistics.median(diffs[name]),
                     diff_lo=diff_lo, diff_hi=diff_hi)
        res[name] = d
    return res, max(0.0, process_ns - thread_ns) / max(1, thread_ns)


def section_host_cost(ctx: Context) -> None:
    import torch

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    n_calls, rounds = (50, 15) if ctx.quick else (200, 61)
    try:
        for device in devices:
            res, other_threads = measure(device, n_calls, rounds)
            ctx.report.host_cost[device] = res
            clock_name = CLOCKS[device][0]
            table = Table(f"per-call host cost on {device}, {SIZE}x{SIZE}, 1 thread, {clock_name}; median of "
                          f"{rounds} paired rounds of {n_calls} calls beside the baseline (goal: <= baseline + 2 us)",
                          [Column("call", 34, left=True), Column("us", 6), Column("min us", 6),
                           Column("baseline", 16, left=True), Column("baseline us", 6), Column("diff us", 7),
                           Column("diff spread", 11), Column("ratio", 6)])
            out(f"\n== host cost: {device} ==")
            if device == "cpu":
                out(f"  clock: the calling thread's CPU time (other threads of the process: "
                    f"{100 * other_threads:.1f}% beside it)")
            for line in table.header():
                out(line)
            for name, d in res.items():
                if "why" in d:
                    out(table.row([name, "n/a", "", "", "", "", "", ""]) + f"  ({d['why']})")
                    continue
                ratio = d["baseline_us"] / d["us"] if "baseline_us" in d else None
                diff_spread = f"{d['diff_lo']:.1f}..{d['diff_hi']:.1f}" if "diff_lo" in d else ""
                out(table.row([name, fmt_us(d["us"]), fmt_us(d["min_us"]), d["baseline"] or "-",
                               fmt_us(d.get("baseline_us")), fmt_num(d.get("diff_us"), 1), diff_spread,
                               fmt_x(ratio)], [ratio]))
            out(table.footer())
    finally:
        torch.set_num_threads(threads)
