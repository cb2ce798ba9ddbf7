"""Where an injected model's static decode (dsinf's CUDA graphs) parts from its eager decode, and why: per-step
logits of the two, the relative error between them, and at the first differing token both picks' margins.

    python tools/probe_static_tokens.py                                   # bench.e2e's model, its defaults
    python tools/probe_static_tokens.py dsinf-int8,dsinf-int8+eagergraph --prompt 128
    python tools/probe_static_tokens.py dsinf --device cpu --layers 2

The first argument names bench.e2e variants (default: dsinf-int8, and its graphs of the eager step and HF's
compile as controls, then dsinf); the rest are bench.e2e's options (the model, its dtype, the prompt). Each
variant decodes bench.e2e.AGREEMENT_TOKENS greedy tokens eagerly twice and statically three times (the first
static run captures, the others replay). A first difference whose logits stay within bench.e2e.NEAR_TIE_REL up
to it is a near-tie (bench.e2e.near_tie): the two modes round the same model differently.
"""
from __future__ import annotations

import gc
import sys
import time

import torch

from bench import e2e


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    named = argv[:1] if argv and not argv[0].startswith("-") else []
    variants = (named[0].split(",") if named
                else ["dsinf-int8", "dsinf-int8+eagergraph", "dsinf-int8+hfcompile", "dsinf"])
    args = e2e.parse_args(argv[len(named):])
    n = e2e.AGREEMENT_TOKENS
    for variant in variants:
        torch._dynamo.reset()
        t0 = time.time()
        model, note = e2e.make_variant(variant, args)
        if model is None:
            print(f"{variant}: {note}")
            continue
        ids = e2e.prompts(args, 1)
        eager = e2e.generate(model, ids, n, "eager", logits=True)
        again = e2e.generate(model, ids, n, "eager", logits=True)
        print(f"== {variant} ({time.time() - t0:.0f} s): eager twice agree {e2e.agreement(again, eager)}/{n}")
        for r in range(3):
            static = e2e.generate(model, ids, n, "static", logits=True)
            a = e2e.agreement(static, eager)
            rels = " ".join(f"{e2e.rel_err(static[1][i], eager[1][i]):.1e}" for i in range(min(a + 1, n, 12)))
            line = f"  static run {r}: agree {a}/{n}; per-step rel err vs eager {rels}"
            if a < n:
                tie = e2e.near_tie(static, eager)
                top = eager[1][a].topk(2).values
                line += (f"; at step {a}: eager's top-2 gap {float(top[0] - top[1]):.2e} (largest |logit| "
                         f"{float(eager[1][a].abs().max()):.2f}), " + (
                             f"a near-tie (margin {tie[1]:.2e}, largest logit difference {tie[2]:.2e})" if tie
                             else "not a near-tie"))
            print(line, flush=True)
        del model
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
