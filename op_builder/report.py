"""`python -m op_builder.report [--json] [--build]`: what is installed, cached, buildable, and why not.

Reads the same `System` and `Decision` objects the builders use, so the report cannot say OKAY for
something the builder will refuse. Every probe is guarded: on a broken machine the report shows the
error in place and keeps going. `--build` builds (or loads) every buildable variant and runs a small
numerical check against the pure-torch reference; the exit code is non-zero if any of them fails.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

from . import cache, knobs
from .archs import resolve_archs
from .registry import ALL_OPS
from .system import current_system


def _guard(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as exc:  # the report must survive a broken machine
        return f"error: {type(exc).__name__}: {exc}"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


CPU_ONLY = "not available in this torch (a CPU-only build), so no CUDA details follow"


def environment() -> dict[str, Any]:
    s = current_system()
    from . import __version__

    def gpus():
        g = s.gpus
        if isinstance(g, str):
            return g
        return [{"index": x.index, "name": x.name, "capability": f"{x.capability[0]}.{x.capability[1]}"} for x in g]

    def cuda_targets():
        r = resolve_archs(s, knobs.get("TORCH_CUDA_ARCH_LIST"))
        return {"archs": [str(a) for a in r.archs], "source": r.source, "problems": list(r.problems),
                "bf16": r.bf16}

    def cpu():
        c = s.cpu
        return {"brand": c.brand, "arch": c.arch, "isa": c.isa, "source": c.source}

    def nvcc():
        n = s.nvcc
        return None if n is None else {"path": n.path, "version": n.version_str}

    def cxx():
        c, v = s.cxx, s.cxx_version
        return None if c is None else {"path": c.path, "version": v.version if v else "?"}

    env: dict[str, Any] = {
        "op_builder": __version__,
        "python": sys.version.split()[0],
        "platform": _guard(lambda: s.platform),
        "torch": _guard(lambda: s.torch_version),
        "torch_cxx11_abi": _guard(lambda: s.torch_cxx11_abi),
    }
    torch_cuda = _guard(lambda: s.torch_cuda)
    if torch_cuda is None:  # nvcc, GPUs and arch targets cannot matter to a CPU-only torch
        env["cuda"] = CPU_ONLY
    else:
        env.update(torch_cuda=torch_cuda, cuda_home=_guard(lambda: s.cuda_home), nvcc=_guard(nvcc),
                   gpus=_guard(gpus), gpus_from=_guard(lambda: s.gpu_probe[1]), cuda_targets=_guard(cuda_targets))
    env.update({
        "cxx": _guard(cxx),
        "ninja": _guard(lambda: s.ninja),
        "triton": _version("triton"),
        "cpu": _guard(cpu),
        "cpu_count": _guard(lambda: s.cpu_count),
        "memory_available_gib": _guard(lambda: round((s.memory_available or 0) / 2**30, 1)),
        "cpu_pages": _guard(cpu_pages),
        "cache_root": _guard(lambda: str(cache.cache_root())),
        "knobs": knobs.snapshot(),
    })
    return env


THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def cpu_pages() -> str:
    """The pages torch's CPU tensors (the weights a CPU decode streams) get: Linux's transparent huge page
    mode and torch's THP_MEM_ALLOC_ENABLE (a knob: its meaning says what 2 MiB pages were measured to gain)."""
    try:
        with open(THP_ENABLED) as f:
            mode = f.read().split("[", 1)[1].split("]", 1)[0]
    except (OSError, IndexError):
        return "4 KiB (no transparent huge pages here)"
    if mode == "never":
        return "4 KiB (transparent huge pages: never)"
    if mode == "always" or knobs.get("THP_MEM_ALLOC_ENABLE") == "1":
        why = mode if mode == "always" else f"{mode}, THP_MEM_ALLOC_ENABLE=1"
        return f"2 MiB for tensors of 2 MiB and more (transparent huge pages: {why})"
    return ("4 KiB (transparent huge pages: madvise, and torch advises them only with THP_MEM_ALLOC_ENABLE=1 set "
            "before Python starts: see the knob)")


def _compiler_cannot_run() -> str | None:
    """Why the C++ compiler found cannot build anything: it was found without running it (a load must not
    run it, `system.Compiler`), but a build runs it first thing (torch's `--version` probe). The report
    runs it anyway (its version line), so it can say what the build would."""
    s = current_system()
    if s.cxx is not None and s.cxx_version is None:
        return f"the C++ compiler {s.cxx.path} does not run (`{s.cxx.path} --version` failed): set CXX to a working one"
    return None


def op_rows() -> list[dict[str, Any]]:
    rows = []
    for name, builder in ALL_OPS.items():
        for variant in builder.VARIANTS:
            row: dict[str, Any] = {"op": name, "variant": variant, "build_var": builder.BUILD_VAR}
            prebuilt = _guard(lambda: builder.prebuilt_problem(variant))
            row["installed"] = prebuilt is None
            row["installed_why_not"] = prebuilt
            note = _guard(lambda: builder.prebuilt_note(variant, cache.read_manifest(builder.prebuilt_dir(variant))
                                                        or {})) if prebuilt is None else None
            row["installed_note"] = note
            decision = _guard(lambda: builder.compatible(variant))
            if isinstance(decision, str):
                row.update(buildable=False, reasons=[decision], notes=[])
            else:
                # Notes say how a variant would be built: noise when it cannot be (e.g. the CUDA arch
                # targets on a CPU-only torch); the reasons say why not.
                row.update(buildable=decision.ok, reasons=list(decision.reasons),
                           notes=list(decision.notes) if decision.ok else [])
                broken = _guard(_compiler_cannot_run) if decision.ok else None
                if broken:
                    row.update(buildable=False, reasons=[broken], notes=[])
            cached = _guard(lambda: builder.cached_entry(variant))
            if isinstance(cached, str):
                row.update(cached=False, cached_why_not=cached)
            else:
                entry, why = cached
                row.update(cached=entry is not None, cached_why_not=why, cache_entry=str(entry) if entry else None)
            failed = _guard(lambda: builder.failed_build_log(variant)) if not row["cached"] else None
            row["failed_build_log"] = str(failed) if isinstance(failed, Path) else None
            rows.append(row)
    return rows


def measured_rows() -> list[dict[str, Any]]:
    """Each op's persisted measurements (OpBuilder.measured): where the data its kernels are chosen by lives."""
    rows = []
    for name, builder in ALL_OPS.items():
        found = _guard(builder.measured)
        if isinstance(found, str):
            found = [{"what": "measurements", "path": "?", "tables": {"error": found}, "list": None}]
        rows += [{"op": name, **entry} for entry in found]
    return rows


def build_and_check(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Load every buildable (or installed) variant and run its sanity check."""
    results = []
    for row in rows:
        if not (row["buildable"] or row["installed"]):
            continue
        builder = ALL_OPS[row["op"]]
        result = {"op": row["op"], "variant": row["variant"]}
        try:
            loaded = builder.load_variant(row["variant"])
            result.update(how=loaded.how, seconds=round(loaded.seconds, 2), path=str(loaded.path))
            check = getattr(builder, "sanity_check", None)
            result["check"] = check(row["variant"]) if check else "no check defined"
            result["ok"] = True
        except Exception as exc:
            result.update(ok=False, error=f"{type(exc).__name__}: {exc}")
        results.append(result)
    return results


_G, _Y, _E = "\033[92m", "\033[93m", "\033[0m"  # ok, not ok (a warning: the report never fails), end


def _mark(ok: bool, yes: str, no: str, color: bool) -> str:
    text = f"[{yes if ok else no}]"
    return (f"{_G if ok else _Y}{text}{_E}") if color else text


def _fmt(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, list):
        return "; ".join(_fmt(v) for v in value) or "none"
    return str(value)


def render(env: dict[str, Any], rows: list[dict[str, Any]], built: list[dict[str, Any]] | None,
           color: bool, measured: list[dict[str, Any]] = ()) -> str:
    out = ["dsinf op_builder report", "=" * 60, "environment:"]
    for key, value in env.items():
        if key != "knobs":
            out.append(f"  {key:<22} {_fmt(value)}")
    out.append("knobs (value, source):")
    for k in env["knobs"]:
        out.append(f"  {k['name']:<22} {k['value']!s:<12} ({k['source']})")
    out.append("ops:")
    out.append(f"  {'op[variant]':<34} {'installed':<11} {'cached':<8} buildable")
    for r in rows:
        label = f"{r['op']}[{r['variant']}]"
        out.append(f"  {label:<34} {_mark(r['installed'], 'YES', 'NO', color):<11} "
                   f"{_mark(r['cached'], 'YES', 'NO', color):<8} {_mark(r['buildable'], 'OKAY', 'NO', color)}")
        for reason in r["reasons"]:
            out.append(f"      not buildable: {reason}")
        for note in r["notes"]:
            out.append(f"      note: {note}")
        if not r["installed"] and r["installed_why_not"] not in (None, "not installed"):
            out.append(f"      installed binary unusable: {r['installed_why_not']}")
        if r.get("installed_note"):
            out.append(f"      note: {r['installed_note']}")
        if r.get("failed_build_log"):
            out.append(f"      last build failed (the same sources and flags fail again): {r['failed_build_log']} "
                       "(--build shows its errors)")
        elif not r["cached"] and r["buildable"] and not r["installed"]:  # installed: the prebuilt binary loads
            out.append(f"      cache: {r['cached_why_not']} (built on first use; set {r['build_var']}=1 at install "
                       "to ship it prebuilt)")
    if measured:
        out.append("measured choices (persisted; a rebuilt module, another torch or device measures again):")
    for m in measured:
        tables = m["tables"]
        out.append(f"  {m['op']} {m['what']}: {m['path']}" + ("" if tables else ": nothing measured yet"))
        for table, n in tables.items():
            out.append(f"      {table}: {n}" + (" entries" if isinstance(n, int) else ""))
        if tables and m.get("list"):
            out.append(f"      listed by: {m['list']}")
    if built is not None:
        out.append("build + sanity check:")
        for b in built:
            status = _mark(b["ok"], "PASS", "FAIL", color)
            detail = b.get("check") if b["ok"] else b.get("error")
            how = f"{b.get('how', '')} {b.get('seconds', '')} s" if b["ok"] else ""
            out.append(f"  {b['op']}[{b['variant']}] {status} {how} {detail}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m op_builder.report", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="machine-readable output (for bug reports)")
    parser.add_argument("--build", action="store_true", help="build/load each buildable op and sanity-check it")
    parser.add_argument("--no-color", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        with cache.previewing():  # a look at the machine creates no cache directory
            env, rows, measured = environment(), op_rows(), measured_rows()
        built = build_and_check(rows) if args.build else None
    except Exception:  # last resort: still no bare traceback as the only output
        print("op_builder.report failed unexpectedly; please include this in a bug report:", file=sys.stderr)
        traceback.print_exc()
        return 2
    if args.json:
        text = json.dumps({"environment": env, "ops": rows, "measured": measured, "build": built}, indent=2,
                          default=str)
    else:
        text = render(env, rows, built, color=sys.stdout.isatty() and not args.no_color, measured=measured)
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:  # `report | head`: the reader has what it wanted
        # Point stdout at /dev/null so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    if built is not None and not all(b["ok"] for b in built):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
