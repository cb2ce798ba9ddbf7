"""The end of a run: the goals table, the JSON file, and the --plan listing."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .cases import copies_for, plan_cases
from .context import Context, out
from .tables import Column, Table
from .timing import cpu_l3_bytes

VERDICT_ORDER = ("PASS", "MISS", "noisy", "not measured")


def fmt_value(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    if unit == "%":
        return f"{v:.0f}%"
    if unit in ("x", "s"):
        return f"{v:.2f}{unit}"
    return f"{v:.1f}{unit}"


def verdict_text(g: dict) -> str:
    m = f" {g['margin_text']}" if g.get("margin_text") else ""
    if g["status"] == "noisy":
        return f"noisy (leans {g['leans']}{m}: {g['why']})"
    if g["status"] == "not measured":
        return f"not measured ({g['why']})"
    return g["status"] + m


def goals_table(goals: list[dict]) -> list[str]:
    """One line per goal: goal, target, measured, verdict and where the worst case was."""
    t = Table("goals (ratio = torch time / ours; margin relative to the target)",
              [Column("goal", 54, left=True), Column("target", 9), Column("measured", 9),
               Column("verdict", 1, left=True)])
    lines = t.header()
    for g in goals:
        lines.append(t.row([g["goal"][:54], g["target"], fmt_value(g["value"], g["unit"]), verdict_text(g)],
                           [g["value"]] if g["unit"] == "x" and g["key"] == "never_slower" else []))
        if g.get("detail"):
            lines.append(f"      [{g['detail']}]")
    lines.append(t.footer())
    return lines


def print_summary(ctx: Context) -> None:
    rep = ctx.report
    out("\n== summary ==")
    c = rep.ceilings
    refs = [f"cpu copy {c['cpu_copy_GBs']:.1f} GB/s"] if "cpu_copy_GBs" in c else []
    if "cuda_copy_GBs" in c:
        refs += [f"cuda copy {c['cuda_copy_GBs']:.0f} GB/s", f"fp16 mm {c['cuda_fp16_mm_8192_TFLOPs']:.0f} TFLOP/s"]
    if refs:
        out("  ceilings: " + "; ".join(refs))
    if ctx.loaded:
        out(f"  machine loaded before the run (load average {ctx.load:.1f} on {ctx.cores} cores): host-side "
            "verdicts read 'noisy'")
    for line in goals_table(rep.goals):
        out(line)
    fails = [(r.case.label, n, i.reason) for r in rep.rows for n, i in r.impls.items() if i.status == "FAIL"]
    if fails:
        out(f"  CORRECTNESS FAILURES ({len(fails)}): " + "; ".join(f"{lb} [{n}] {why}" for lb, n, why in fails[:6]))
    counts = ", ".join(f"{sum(g['status'] == s for g in rep.goals)} {s}" for s in VERDICT_ORDER)
    m = rep.meta
    out(f"  {counts} | {m.get('device_name', '')} | torch {m.get('torch')} | commit {m.get('commit')} | "
        f"{m.get('elapsed_s', 0):.0f} s")


def write_json(ctx: Context) -> None:
    path = ctx.args.json
    if not path:
        return
    try:
        ctx.report.meta["elapsed_s"] = time.perf_counter() - ctx.started
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(path + ".tmp")
        tmp.write_text(json.dumps(ctx.report.to_json(), indent=1, default=str))
        os.replace(tmp, path)
    except OSError as exc:
        ctx.note(f"could not write {path}: {exc}")


def plan_lines(device: str, quick: bool) -> list[str]:
    """The cases with their bytes, FLOPs and rotating copies; no torch work."""
    cases = plan_cases(device, quick)
    cache = 50 << 20 if device == "cuda" else cpu_l3_bytes()
    factor, lo, hi = (4.0, 2, 16) if device == "cuda" else (2.0, 1, 8)
    t = Table(f"plan for {device} ({'quick' if quick else 'full'}): {len(cases)} cases; cache {cache >> 20} MiB",
              [Column("case", 48, left=True), Column("weight MB", 9), Column("bytes MB", 9), Column("GFLOP", 8),
               Column("copies", 6)])
    lines = t.header()
    for c in cases:
        lines.append(t.row([c.label, f"{c.weight_bytes / 1e6:.1f}", f"{c.bytes / 1e6:.2f}", f"{c.flops / 1e9:.3f}",
                            str(copies_for(c.weight_bytes, cache, factor, lo, hi))]))
    return lines
