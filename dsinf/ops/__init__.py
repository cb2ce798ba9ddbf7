"""The op classes, with DeepSpeed's names and forward signatures: one module per op (`dsinf/ops/<op>.py`,
holding its `SPEC`, reference and class), found by `dsinf.ops.spec`. `dsinf.ops.LinearOp` etc. are loaded
on first access."""
from __future__ import annotations

import importlib


def __getattr__(name: str):
    if name == "InferenceOp":
        return importlib.import_module(f"{__name__}.base").InferenceOp
    if name.endswith("Op"):
        cls = importlib.import_module(f"{__name__}.spec").op_class(name)
        if cls is not None:
            return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    specs = importlib.import_module(f"{__name__}.spec").specs()
    return sorted({"InferenceOp", "spec", "base"} | {s.op_class for s in specs.values()})
