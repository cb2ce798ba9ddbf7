"""generate's stop check one step behind on CUDA, for injected models.

Why: HF's decoding loop (`GenerationMixin._sample`) asks `bool(unfinished_sequences.max() == 0)` after
every token. That read waits for the device, so the GPU finishes step t and then idles while the host
runs the loop's Python (the stopping criteria, `prepare_inputs_for_generation`, the next step's launch).
With decode steps on dsinf's CUDA graphs, that idle time is what is left of the host cost: 0.8-1.3 ms of
a 4.1-4.6 ms int8 token on an H200 (docs/PERFORMANCE.md). transformers has the fix, `DeferredStopCheck`:
it copies the flag to pinned memory asynchronously and reads it one step later, so the host queues step
t+1 while step t runs. A stop found late costs one extra step, which generate undoes before it returns
(tokens trimmed; a returned cache cropped, which is why HF defers only when the cache is not returned or
can be cropped). HF turns it on for mps only ("we should enable it for cuda if we observe perf gains").
Deferred on CUDA, the same H200 measured +19-33% decode tok/s for int8 and +8-12% for fp16 (Llama-3-8B
shapes, static cache, batch 1).

What: while an injected model's `_sample` runs, HF's `DeferredStopCheck.is_supported` answers for a CUDA
device what it answers for mps: HF's own rule for the cache and for assisted generation, the device
excepted. Other models, other devices, other threads and every other generate loop get HF's answer
unchanged. A run that stops at max_new_tokens is decided on the host and takes no extra step.

How: `is_supported` is wrapped once, at the first install, by a function that asks HF's rule for mps
while a context variable says an injected model's `_sample` is running (in this thread or task).
`DeferredStop`, mixed in before the model's class, sets that variable around `_sample`. The class and the
loop are found through the model's own `GenerationMixin` (nothing here imports transformers); where they
are missing (a transformers without DeferredStopCheck), install returns False and nothing changes.
"""
from __future__ import annotations

import contextvars
import sys

import torch

_DEVICES = frozenset({"cuda"})  # where an injected model's generate defers its stop check
_RULE_DEVICE = torch.device("mps")  # the device HF's rule already defers for: asked in place of CUDA
_active = contextvars.ContextVar("dsinf_defer_stop", default=False)


def _checker(model_class: type) -> type | None:
    """HF's DeferredStopCheck, from the module of the model class's GenerationMixin, or None."""
    for cls in model_class.__mro__:
        if cls.__name__ == "GenerationMixin" and hasattr(cls, "_sample"):
            checker = getattr(sys.modules.get(cls.__module__), "DeferredStopCheck", None)
            rule = getattr(checker, "__dict__", {}).get("is_supported")
            return checker if isinstance(rule, staticmethod) else None
    return None


def _wrap(checker: type) -> None:
    """Replace checker.is_supported by HF's rule that also defers on CUDA while `_active` is set (once)."""
    rule = checker.__dict__["is_supported"].__func__
    if getattr(rule, "_dsinf_hf_rule", None) is not None:
        return

    def is_supported(device, *args, **kwargs):
        if _active.get() and torch.device(device).type in _DEVICES:
            device = _RULE_DEVICE
        return rule(device, *args, **kwargs)

    is_supported._dsinf_hf_rule = rule
    is_supported.__doc__ = rule.__doc__
    checker.is_supported = staticmethod(is_supported)


class DeferredStop:
    """Mixed in before a generative model's class by `install`: its `_sample` (greedy and sampling
    decoding) runs with the stop check deferred on CUDA (see the module doc)."""

    def _sample(self, *args, **kwargs):
        token = _active.set(True)
        try:
            return super()._sample(*args, **kwargs)
        finally:
            _active.reset(token)

    @staticmethod
    def _dsinf_class_made(cls) -> None:
        """Called once per class `swap_class` makes: a model unpickled in a fresh process defers like the one
        that was saved, so HF's rule is wrapped there too (install wraps it before any class is made)."""
        checker = _checker(cls)
        if checker is not None:
            _wrap(checker)


def install(model: torch.nn.Module, swap_class) -> bool:
    """Defer `model`'s generate stop check on CUDA; False (nothing done) for a model without HF's
    decoding loop or a transformers without DeferredStopCheck."""
    checker = _checker(type(model))
    if checker is None:
        return False
    _wrap(checker)
    swap_class(model, DeferredStop)
    return True


def describe() -> str:
    """The summary's line for the deferred stop check."""
    return ("generate on CUDA reads its stop flag one step late (HF's DeferredStopCheck, which HF enables on mps "
            "only): the host queues the next step while this one runs")
