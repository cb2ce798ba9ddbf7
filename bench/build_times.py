"""The build section: cold JIT build per variant (a child on a fresh cache), `load()` of all variants at
once, warm loads, and the `import dsinf` overhead - in child processes, so nothing is cached in the
benchmark's own process. Times are reported beyond a child that only imports torch."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .adapter import IMPORT_CHILD, LOAD_CHILD, MARK, cached_build_missing
from .context import Context, out
from .tables import fmt_num

WARM_GOAL_S = 0.3  # a warm load's wall-clock differences scattering more than this say nothing


def _pythonpath() -> str:
    """PYTHONPATH for children: where dsinf and op_builder live, then the caller's."""
    paths = []
    for name in ("dsinf", "op_builder"):
        spec = importlib.util.find_spec(name)
        if spec and spec.origin:
            paths.append(str(Path(spec.origin).resolve().parent.parent))
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    return os.pathsep.join(dict.fromkeys(paths))


def child_env(**overrides: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = _pythonpath()
    for k, v in overrides.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def run_child(code: str, args: list[str], env: dict[str, str], timeout: float) -> dict[str, Any]:
    """Run `python -c code args...`; {"wall": s, "ok": bool, "data": the marker line's JSON, "error": tail}."""
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"wall": time.perf_counter() - t0, "ok": False, "error": f"timed out after {timeout:.0f} s"}
    wall = time.perf_counter() - t0
    data = None
    for line in p.stdout.splitlines():
        if line.startswith(MARK):
            data = json.loads(line[len(MARK):])
    if p.returncode != 0 or data is None:
        tail = "\n".join((p.stderr or p.stdout).strip().splitlines()[-8:])
        return {"wall": wall, "ok": False, "error": f"exit {p.returncode}: {tail}"}
    return {"wall": wall, "ok": True, "data": data}


def save_build_log(root: str, variant: str, json_path: str | None) -> dict[str, Any]:
    """Keep a failed build's log (its temp cache is deleted): its tail in the JSON, the whole log next
    to the --json file as <json>.<variant>-build.log."""
    logs = sorted(Path(root).rglob("build.log"), key=lambda q: q.stat().st_mtime)
    if not logs:
        return {}
    text = logs[-1].read_text(errors="replace")
    saved = None
    if json_path:
        try:
            saved = f"{json_path}.{variant}-build.log"
            Path(saved).parent.mkdir(parents=True, exist_ok=True)
            Path(saved).write_text(text)
            out(f"  [{variant}] build log saved to {saved}")
        except OSError:
            saved = None
    return {"log_tail": text.splitlines()[-80:], "log_saved": saved}


class _TorchBase:
    """Wall times of children that only `import torch` (what "beyond import torch" subtracts)."""

    def __init__(self, env: dict[str, str]):
        self.env, self.walls = env, []

    def run(self) -> float | None:
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-c", "import torch"], env=self.env, capture_output=True, timeout=300)
        if p.returncode != 0:
            return None
        self.walls.append(time.perf_counter() - t0)
        return self.walls[-1]

    @property
    def median(self) -> float | None:
        return statistics.median(self.walls) if self.walls else None


def _import_overhead(ctx: Context, env: dict[str, str], reps: int) -> None:
    b = ctx.report.build
    good = [r for r in (run_child(IMPORT_CHILD, [], env, 300) for _ in range(max(reps, 3))) if r["ok"]]
    if not good:
        b["import_dsinf_ms"] = {"error": "import child failed"}
        ctx.note("import dsinf child failed")
        return
    runs = [r["data"]["in_process"] * 1e3 for r in good]
    flags = {k: v for k, v in good[0]["data"].items() if k != "in_process"}
    b["import_dsinf_ms"] = {"median": statistics.median(runs), "lo": min(runs), "hi": max(runs), "runs": runs,
                            **flags}
    side = [k for k, v in flags.items() if v]
    out(f"  import dsinf beyond import torch: {statistics.median(runs):.1f} ms (timer in a child around "
        f"`import dsinf` after `import torch`, median of {len(runs)})  goal <= 50 ms"
        + (f"  WARNING: import did {', '.join(side)}" if side else ""))


def _cold_child(variant: str, timeout: float) -> tuple[str, dict[str, Any]]:
    """(the fresh cache root, `run_child`'s result) of a child that loads `variant` there, prebuilt off."""
    root = tempfile.mkdtemp(prefix=f"dsinf-bench-{variant}-")
    return root, run_child(LOAD_CHILD, [variant], child_env(TORCH_EXTENSIONS_DIR=root, DSINF_NO_PREBUILT="1"), timeout)


def _cold(ctx: Context, variant: str, base: _TorchBase, timeout: float) -> str | None:
    """Cold build of `variant` ("all": load() with no argument) in a fresh cache; returns the cache root."""
    entry = ctx.report.build.setdefault(variant, {})
    out(f"  [{variant}] cold build in a fresh cache ...")
    root, r = _cold_child(variant, timeout)
    if not r["ok"]:
        ctx.cold_build_failed[variant] = r["error"].splitlines()[-1][:200] if r["error"] else "failed"
        entry["cold"] = {"error": r["error"], "wall": r["wall"], **save_build_log(root, variant, ctx.args.json)}
        ctx.note(f"[{variant}] cold build failed after {r['wall']:.1f} s: {r['error']}")
        shutil.rmtree(root, ignore_errors=True)
        return None
    d = r["data"]
    beyond = r["wall"] - base.median if base.median else None
    entry["cold"] = {"wall": r["wall"], "beyond_torch": beyond, **d}
    out(f"  [{variant}] cold: {fmt_num(beyond, 1)} s beyond import torch (child {r['wall']:.1f} s; build "
        f"{fmt_num(d.get('build_seconds'), 1)} s in the manifest; how={d['how']}; variants {d.get('variants')}; "
        f"{'archs ' + ' '.join(d['archs']) if d.get('archs') else 'isa ' + str(d.get('isa'))})")
    return root


def _warm(ctx: Context, variant: str, env: dict[str, str], base: _TorchBase, reps: int, timeout: float) -> None:
    """Paired: an import-torch child next to each load child (alternating which goes first), so both see
    the same machine load; the value is the median of the paired differences."""
    entry = ctx.report.build.setdefault(variant, {})
    runs, diffs = [], []
    for k in range(reps):
        b0 = base.run() if k % 2 == 0 else None
        r = run_child(LOAD_CHILD, [variant], env, timeout)
        b0 = base.run() if k % 2 == 1 else b0
        runs.append(r)
        if r["ok"] and b0 is not None and r["data"]["how"] in ("cached", "prebuilt"):
            diffs.append(r["wall"] - b0)  # a child that had to build is not a warm load
    ok = [r for r in runs if r["ok"]]
    if not ok:
        entry["warm"] = {"error": runs[0]["error"]}
        ctx.note(f"[{variant}] warm load failed: {runs[0]['error']}")
        return
    inproc = [r["data"]["in_process"] for r in ok]
    beyond = statistics.median(diffs) if diffs else None
    # wall-clock differences that scatter more than the goal say nothing: the timer in the child is the value
    noisy = len(diffs) < 2 or max(diffs) - min(diffs) > WARM_GOAL_S or (beyond is not None and beyond < 0)
    value, lo, hi = ((statistics.median(inproc), min(inproc), max(inproc)) if noisy
                     else (beyond, min(diffs), max(diffs)))
    hows = sorted({r["data"]["how"] for r in ok})
    cuda_init = any(r["data"].get("cuda_initialized") for r in ok)  # CUDA's start-up is then in the time
    entry["warm"] = {"beyond_torch": beyond, "paired_diffs": diffs, "in_process": inproc, "how": ",".join(hows),
                     "value": value, "lo": lo, "hi": hi, "cuda_initialized": cuda_init,
                     "detail": "in-process load (wall diffs too noisy)" if noisy else "paired wall diff"}
    out(f"  [{variant}] warm: {fmt_num(beyond, 3)} s beyond import torch (paired child differences: "
        f"{', '.join(f'{d:+.2f}' for d in diffs)}); in-process load {statistics.median(inproc):.3f} s; "
        f"how={','.join(hows)}; CUDA initialised by the load: {'yes' if cuda_init else 'no'}  goal <= {WARM_GOAL_S:g} s"
        + ("\n    judged on the in-process time" if noisy else ""))


def section_build(ctx: Context) -> None:
    """Returns nothing; with cold builds, the first variant's fresh cache becomes the ops sections'
    TORCH_EXTENSIONS_DIR (same key: no second build) unless the caller set one."""
    out("\n== build: JIT build and load times (child processes) ==")
    reps = 1 if ctx.quick and not ctx.args.build_times else 3
    left = (ctx.deadline - time.perf_counter()) if ctx.deadline else 900.0
    timeout = max(60.0, min(900.0, left))
    env0 = child_env()
    base = _TorchBase(env0)
    for _ in range(reps):
        base.run()
    ctx.report.build["import_torch_s"] = {"median": base.median, "runs": base.walls}
    out(f"  import torch (child wall, median of {len(base.walls)}): {fmt_num(base.median, 2)} s")
    _import_overhead(ctx, env0, reps)
    variants = ["cuda", "cpu"] if ctx.device == "cuda" else ["cpu"]
    scratch: list[str] = []
    for variant in variants:
        if ctx.cold:
            root = _cold(ctx, variant, base, timeout)
            if root is None:
                continue
            scratch.append(root)
            warm_env = child_env(TORCH_EXTENSIONS_DIR=root, DSINF_NO_PREBUILT="1")
            if variant == variants[0] and "TORCH_EXTENSIONS_DIR" not in os.environ:
                os.environ["TORCH_EXTENSIONS_DIR"] = root  # the ops sections load this build
                ctx.report.meta["ops_cache"] = root
                scratch.pop()
                ctx.scratch.append(root)
        else:
            warm_env = env0
            why = cached_build_missing(variant)
            if why is not None:
                ctx.report.build.setdefault(variant, {})["warm"] = {"skipped": why}
                ctx.note(f"[{variant}] warm load skipped: no usable cache entry ({why}); cold build off (--quick)")
                continue
        _warm(ctx, variant, warm_env, base, reps, timeout)
    if ctx.cold and len(variants) > 1:
        _load_all(ctx, variants, base, timeout, scratch)
    for root in scratch:
        shutil.rmtree(root, ignore_errors=True)


# Cold load() of every variant against each variant alone, in rounds: on a 16-core H100 host one round read
# anywhere from 0.92x to 1.13x on the same tree (2026-12-06, seven cold builds of each), a spread wider than the
# 10% goal, so the goal reads the median of the rounds' ratios, with their spread. The ratio is of the children's
# own load() seconds (`LOAD_CHILD`'s in_process), not of their walls beyond a median `import torch`: a child's
# import torch itself varied 2.7-4.5 s there, all of it landing in a wall-based ratio. One H100 host, 2026-12-07:
# rounds of in-process load() read 1.03x and 1.03x (all 8.2 / 8.6 s, cuda alone 7.9 / 8.4 s), wall-based rounds
# on the same machine 1.21, 1.09 and 0.86x.
LOAD_ALL_ROUNDS = 3


def load_all_summary(rounds: list[dict[str, float]]) -> dict[str, Any]:
    """`rounds`: [{"all": s, <variant>: s, ...}], each a cold child's load() seconds -> the median
    of the rounds' ratios (all / the slower single variant of that round) and their spread."""
    slowest = [max(t for v, t in r.items() if v != "all") for r in rounds]
    ratios = [r["all"] / slow for r, slow in zip(rounds, slowest)]
    t_all, t_slow = statistics.median(r["all"] for r in rounds), statistics.median(slowest)
    return {"ratio": statistics.median(ratios), "lo": min(ratios), "hi": max(ratios), "ratios": ratios,
            "all_s": t_all, "slower_single_s": t_slow,
            "detail": f"median of {len(rounds)} round(s): all {t_all:.1f}s, slower single {t_slow:.1f}s"}


def _cold_seconds(variant: str, timeout: float) -> float | None:
    """One more cold build of `variant` in a fresh cache, deleted afterwards: the child's load() seconds, or
    None when it failed or did not build."""
    root, r = _cold_child(variant, timeout)
    shutil.rmtree(root, ignore_errors=True)
    if not r["ok"] or "built" not in r["data"]["how"]:
        return None
    return r["data"]["in_process"]


def _load_all(ctx: Context, variants: list[str], base: _TorchBase, timeout: float, scratch: list[str]) -> None:
    """`InferenceBuilder().load()` of every variant, cold, against the slower single-variant cold build, in
    LOAD_ALL_ROUNDS rounds: the first reuses the single variants' cold builds above, each later one builds
    all of them again in fresh caches, in a rotated order. Seconds are the children's load() calls."""
    singles = {v: ctx.report.build.get(v, {}).get("cold", {}).get("in_process") for v in variants}
    root = _cold(ctx, "all", base, timeout)
    if root is not None:
        scratch.append(root)
    t_all = ctx.report.build.get("all", {}).get("cold", {}).get("in_process")
    if t_all is None or None in singles.values():
        ctx.report.build["all"]["why"] = "a cold build failed"
        return
    rounds = [{"all": t_all, **singles}]
    names = ["all", *variants]
    for i in range(1, LOAD_ALL_ROUNDS):
        if ctx.deadline is not None and ctx.deadline - time.perf_counter() < 2 * sum(rounds[0].values()):
            ctx.note(f"load() of all variants: {len(rounds)} round(s) of {LOAD_ALL_ROUNDS}, the budget left no more")
            break
        order = names[i % len(names):] + names[:i % len(names)]
        times = {v: _cold_seconds(v, timeout) for v in order}
        if None in times.values():
            ctx.note(f"load() of all variants: round {i + 1} dropped, a cold build failed or did not build")
            continue
        rounds.append(times)
    summary = load_all_summary(rounds)
    ctx.report.build["all"].update(rounds=rounds, **summary)
    listed = ", ".join(f"{x:.2f}" for x in summary["ratios"])
    out(f"  load() of all variants: {summary['ratio']:.2f}x the slower single variant, median of "
        f"{len(rounds)} round(s) ({listed}; the children's load() took {summary['all_s']:.1f} s for all, "
        f"{summary['slower_single_s']:.1f} s for the slower single)  goal <= 1.10x")
