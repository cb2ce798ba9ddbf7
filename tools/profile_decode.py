"""GPU profile of static-cache decode: where a generated token's time goes, per variant and batch.

    PYTHONPATH=$PWD python tools/profile_decode.py hf:1,hf:8,dsinf:1,dsinf:8,dsinf-int8:1,dsinf+eagergraph:1
    PYTHONPATH=$PWD python tools/profile_decode.py dsinf:1 --layers 8 --new 16
    PYTHONPATH=$PWD python tools/profile_decode.py dsinf-int8:1 --first-token

Each item is `variant:batch`, a variant of `python -m bench.e2e` (hf, dsinf, dsinf-int8, dsinf+eagergraph,
dsinf+hfcompile, ...) on its Llama-3-8B-architecture model (random weights, prompt 128). Per item it prints:
  - wall ms/token: (time of generate(new) - time of generate(1)) / (new - 1), medians of 3 (not profiled);
  - kernels ms/token: the profiler's device time of the same difference, i.e. GPU work per decode step;
  - gap: wall - kernels, the GPU's idle time per token (the host's generate loop, which syncs every step,
    and the bubbles between a graph's dependent kernels);
  - the largest kernels (ms per token, launches per token, µs each) and the largest host ops, each row the
    same difference (generate(new) minus generate(1), over new - 1): the decode steps alone, without the
    prefill's kernels (a long-prompt GEMM once per layer would otherwise read like per-step work).
With --first-token it profiles generate(1) instead, in the static and the eager mode: the time to the first
token (prefill and one sampled token), its wall (median of 3), kernels, gap and largest rows, per call.
The profiler slows the host, and its walls are not comparable with bench.e2e's; the split is the point.
For HF's compiled step, inductor's wrapper is itself listed as a kernel row, so its gap reads low.
Not a test (pytest does not collect tools/).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import e2e  # noqa: E402

TOP_KERNELS = 22
TOP_HOST = 18


def device_time(fn):
    """(total self device ms, key averages) of one profiled call."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    averages = prof.key_averages()
    return sum(e.self_device_time_total for e in averages) / 1e3, averages


@dataclass
class StepRow:
    key: str
    device_ms: float  # per decode step
    host_ms: float
    count: float  # launches (or calls) per decode step

    @property
    def device_us_each(self) -> float:
        return self.device_ms * 1e3 / self.count if self.count > 0 else 0.0


def per_step(full, one, steps: int) -> list[StepRow]:
    """The profiler rows (`key_averages()`) of the decode steps alone: each key's totals in generate(new)
    (`full`) minus those in generate(1) (`one`: the prefill and the first token), over the `steps` = new - 1
    further steps. Host rows may read slightly negative: the two calls' host times differ by noise."""
    base = {e.key: e for e in one}
    rows = []
    for e in full:
        b = base.get(e.key)
        rows.append(StepRow(e.key, (e.self_device_time_total - (b.self_device_time_total if b else 0)) / 1e3 / steps,
                            (e.self_cpu_time_total - (b.self_cpu_time_total if b else 0)) / 1e3 / steps,
                            (e.count - (b.count if b else 0)) / steps))
    return rows


def median_s(fn, device: str = "cuda", repeats: int = 3) -> float:
    """The median wall seconds of `repeats` synchronized runs (bench.e2e.timed's median; it also returns the
    range)."""
    median, _fastest, _slowest = e2e.timed(fn, device, repeats)
    return median


def profile_item(model, args, name, batch):
    ids = e2e.prompts(args, batch)
    start = time.time()
    e2e.generate(model, ids, args.new, "static")  # warm-up: compiles, captures
    e2e.generate(model, ids, 1, "static")
    warm = time.time() - start
    one = median_s(lambda: e2e.generate(model, ids, 1, "static"))
    full = median_s(lambda: e2e.generate(model, ids, args.new, "static"))
    wall = (full - one) / (args.new - 1) * 1e3
    kernels_one, averages_one = device_time(lambda: e2e.generate(model, ids, 1, "static"))
    kernels_full, averages = device_time(lambda: e2e.generate(model, ids, args.new, "static"))
    kernels = (kernels_full - kernels_one) / (args.new - 1)
    print(f"== {name} batch {batch}: wall {wall:.3f} ms/token, kernels {kernels:.3f} ms/token, gap "
          f"{wall - kernels:.3f} ms (warm-up {warm:.0f} s)", flush=True)
    print_rows(per_step(averages, averages_one, args.new - 1), "/token")


def print_rows(rows: list[StepRow], per: str) -> None:
    """The largest kernel rows, then the largest host rows; `per` names the unit ("/token", "/call")."""
    for r in sorted((r for r in rows if r.device_ms > 0), key=lambda r: -r.device_ms)[:TOP_KERNELS]:
        print(f"   kernel {r.device_ms:8.3f} ms{per}  {r.count:6.1f}{per}  {r.device_us_each:8.2f} us each  "
              f"{r.key[:100]}")
    for r in sorted(rows, key=lambda r: -r.host_ms)[:TOP_HOST]:
        print(f"   host   {r.host_ms:8.3f} ms{per}  {r.count:6.1f}{per}  {r.key[:100]}")
    sys.stdout.flush()


def profile_first_token(model, args, name, batch):
    ids = e2e.prompts(args, batch)
    for mode in ("static", "eager"):
        start = time.time()
        e2e.generate(model, ids, args.new, mode)  # warm-up as bench.e2e's: builds, compiles, captures
        e2e.generate(model, ids, 1, mode)
        warm = time.time() - start
        wall = median_s(lambda: e2e.generate(model, ids, 1, mode)) * 1e3
        kernels, averages = device_time(lambda: e2e.generate(model, ids, 1, mode))
        print(f"== {name} batch {batch} first token, {mode}: wall {wall:.3f} ms, kernels {kernels:.3f} ms, gap "
              f"{wall - kernels:.3f} ms (warm-up {warm:.0f} s)", flush=True)
        print_rows(per_step(averages, [], 1), "/call")  # one call, nothing subtracted


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python tools/profile_decode.py", description=__doc__.splitlines()[0])
    p.add_argument("items", help="comma-separated variant:batch, e.g. hf:1,dsinf:8")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--new", type=int, default=32, help="new tokens per generate (default 32)")
    p.add_argument("--first-token", action="store_true",
                   help="profile generate(1), the time to the first token, in the static and the eager mode")
    opts = p.parse_args(argv)
    if opts.new < 2:
        p.error("--new must be at least 2: a decode step is what generate(new) adds to generate(1)")
    if not torch.cuda.is_available():
        print("profile_decode needs a CUDA GPU", file=sys.stderr)
        return 2
    args = e2e.parse_args(["--device", "cuda", "--layers", str(opts.layers), "--new", str(opts.new)])
    items = []
    for item in opts.items.split(","):
        name, _, batch = item.partition(":")
        items.append((name, int(batch or 1)))
    current = None
    for name, batch in items:
        if current is None or current[0] != name:
            current = None
            torch.cuda.empty_cache()
            torch._dynamo.reset()
            model, note = e2e.make_variant(name, args)
            if model is None:
                print(note)
                continue
            current = (name, model)
        (profile_first_token if opts.first_token else profile_item)(current[1], args, name, batch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
