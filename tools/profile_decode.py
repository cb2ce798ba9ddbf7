"""GPU profile of static-cache decode: where a generated token's time goes, per variant and batch.

    PYTHONPATH=$PWD python tools/profile_decode.py hf:1,hf:8,dsinf:1,dsinf:8,dsinf-int8:1,dsinf+eagergraph:1
    PYTHONPATH=$PWD python tools/profile_decode.py dsinf:1 --layers 8 --new 16

Each item is `variant:batch`, a variant of `python -m bench.e2e` (hf, dsinf, dsinf-int8, dsinf+eagergraph,
dsinf+hfcompile, ...) on its Llama-3-8B-architecture model (random weights, prompt 128). Per item it prints:
  - wall ms/token: (time of generate(new) - time of generate(1)) / (new - 1), medians of 3 (not profiled);
  - kernels ms/token: the profiler's device time of the same difference, i.e. GPU work per decode step;
  - gap: wall - kernels, the GPU's idle time per token (the host's generate loop, which syncs every step,
    and the bubbles between a graph's dependent kernels);
  - the largest kernels (ms per token, launches per token, µs each) and the largest host ops.
The profiler slows the host, and its walls are not comparable with bench.e2e's; the split is the point.
For HF's compiled step, inductor's wrapper is itself listed as a kernel row, so its gap reads low.
Not a test (pytest does not collect tools/).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

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


def profile_item(model, args, name, batch):
    ids = e2e.prompts(args, batch)
    start = time.time()
    e2e.generate(model, ids, args.new, "static")  # warm-up: compiles, captures
    e2e.generate(model, ids, 1, "static")
    warm = time.time() - start
    one = e2e.timed(lambda: e2e.generate(model, ids, 1, "static"), "cuda", 3)
    full = e2e.timed(lambda: e2e.generate(model, ids, args.new, "static"), "cuda", 3)
    wall = (full - one) / (args.new - 1) * 1e3
    kernels_one, _ = device_time(lambda: e2e.generate(model, ids, 1, "static"))
    kernels_full, averages = device_time(lambda: e2e.generate(model, ids, args.new, "static"))
    kernels = (kernels_full - kernels_one) / (args.new - 1)
    print(f"== {name} batch {batch}: wall {wall:.3f} ms/token, kernels {kernels:.3f} ms/token, gap "
          f"{wall - kernels:.3f} ms (warm-up {warm:.0f} s)", flush=True)
    per_token = args.new  # the profiled call's kernels include the prefill: shares, not exact per-step sums
    by_device = sorted((e for e in averages if e.self_device_time_total > 0), key=lambda e: -e.self_device_time_total)
    for e in by_device[:TOP_KERNELS]:
        print(f"   kernel {e.self_device_time_total / 1e3 / per_token:8.3f} ms/token  {e.count / per_token:6.1f}/token  "
              f"{e.self_device_time_total / max(e.count, 1):8.2f} us each  {e.key[:100]}")
    for e in sorted(averages, key=lambda e: -e.self_cpu_time_total)[:TOP_HOST]:
        print(f"   host   {e.self_cpu_time_total / 1e3 / per_token:8.3f} ms/token  {e.count / per_token:6.1f}/token  "
              f"{e.key[:100]}")
    sys.stdout.flush()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python tools/profile_decode.py", description=__doc__.splitlines()[0])
    p.add_argument("items", help="comma-separated variant:batch, e.g. hf:1,dsinf:8")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--new", type=int, default=32, help="new tokens per generate (default 32)")
    opts = p.parse_args(argv)
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
        profile_item(current[1], args, name, batch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
