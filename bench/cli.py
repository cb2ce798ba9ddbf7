"""`python -m bench`: argument parsing, section selection and the run."""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

from . import goals, sections
from .context import Context, first_line, out
from .ops import cpu_name
from .report import plan_lines, print_summary, write_json
from .results import Report
from .timing import machine_load

DESCRIPTION = ("The dsinf benchmark: our ops against torch (ratio = torch time / ours), bandwidth and FLOP "
               "rate, build times, per-call host cost, and a table of every goal (PASS / MISS / noisy / "
               "not measured).")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=DESCRIPTION)
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto",
                   help="auto: cuda if torch sees a GPU, else cpu")
    p.add_argument("--quick", action="store_true", help="few shapes, short timing, no cold build (smoke test)")
    p.add_argument("--json", metavar="PATH", help="write every measurement as JSON to PATH")
    p.add_argument("--only", metavar="SECTION[,SECTION]", default="",
                   help=f"run only these: {', '.join(sections.CHOICES)} (the names after 'e2e' are parts of the "
                        "ops sections)")
    bt = p.add_mutually_exclusive_group()
    bt.add_argument("--build-times", dest="build_times", action="store_true", default=None,
                    help="measure the cold builds too (default: on, off with --quick)")
    bt.add_argument("--no-build-times", dest="build_times", action="store_false", help="skip the build section")
    p.add_argument("--no-triton", action="store_true", help="skip the Triton column")
    p.add_argument("--budget", type=float, default=0.0, metavar="SECONDS",
                   help="skip the remaining cases once the run has taken this long (the summary and JSON are "
                        "still written); 0 = no limit")
    p.add_argument("--plan", action="store_true", help="print the cases with their bytes/FLOPs and exit")
    return p.parse_args(argv)


def git_commit() -> str:
    # A copy of the tree without .git (a lent GPU machine) names its commit in DSINF_BENCH_COMMIT.
    if os.environ.get("DSINF_BENCH_COMMIT"):
        return os.environ["DSINF_BENCH_COMMIT"]
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return "no-commit"
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_section(ctx: Context, name: str) -> None:
    """Run one section: it never takes the run down; it is timed; what we have is saved after it."""
    t0 = time.perf_counter()
    try:
        fn = sections.resolve(sections.BY_NAME[name])
        if isinstance(fn, str):
            ctx.note(f"{name}: {fn}")
            ctx.report.extra[name] = {"status": fn}
        else:
            result = fn(ctx)
            if result is not None and not isinstance(result, int):  # a section may return its own data
                ctx.report.extra[name] = result
    except Exception as exc:  # noqa: BLE001
        ctx.note(f"{name} section failed: {type(exc).__name__}: {first_line(exc)}")
        traceback.print_exc()
    finally:
        ctx.report.meta.setdefault("section_s", {})[name] = round(time.perf_counter() - t0, 1)
        out(f"  ({name}: {time.perf_counter() - t0:.0f} s)")
        ctx.report.goals = goals.evaluate(ctx.report, ctx.device, ctx.loaded)
        write_json(ctx)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen, parts = sections.select(only, device, args.build_times)
    except ValueError as exc:
        print(f"python -m bench: {exc}", file=sys.stderr)
        return 2
    if args.plan:
        for line in plan_lines(device, args.quick):
            out(line)
        return 0

    load, cores = machine_load()  # before our own children run
    ctx = Context(args=args, device=device, report=Report(args=vars(args)), parts=parts, load=load, cores=cores,
                  cold=args.build_times if args.build_times is not None else not args.quick)
    ctx.deadline = ctx.started + args.budget if args.budget > 0 else None
    ctx.report.meta.update(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), device=device,
        host=platform.node(), python=platform.python_version(), torch=torch.__version__,
        torch_cuda=torch.version.cuda, cpu_threads=torch.get_num_threads(), commit=git_commit(), quick=args.quick,
        device_name=f"{cpu_name()} x{cores}", loadavg_at_start=load, sections=chosen)
    out(f"python -m bench: device={device} {'quick' if args.quick else 'full'} | sections {', '.join(chosen)} | "
        f"torch {torch.__version__} | commit {ctx.report.meta['commit']} | load {load:.1f}/{cores} cores")

    # With a cold build, the build section runs first and the ops sections load that fresh cache (same
    # sources, same key: no second build). Without one (--quick) it runs last, so its warm-load
    # children find the module the ops sections loaded (or built).
    order = [s for s in chosen if s != "build"]
    if "build" in chosen:
        order = ["build"] + order if ctx.cold else order + ["build"]
    try:
        for name in order:
            run_section(ctx, name)
        if ctx.report.meta.get("gpu"):
            ctx.report.meta["device_name"] = ctx.report.meta["gpu"]
        ctx.report.meta["elapsed_s"] = time.perf_counter() - ctx.started
        ctx.report.goals = goals.evaluate(ctx.report, device, ctx.loaded)
        write_json(ctx)
        if args.json:
            out(f"\nfull results: {args.json}")
        print_summary(ctx)
    finally:
        for root in ctx.scratch:
            shutil.rmtree(root, ignore_errors=True)
    return 0
