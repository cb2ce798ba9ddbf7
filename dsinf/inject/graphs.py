"""Decode steps on CUDA graphs: a static-cache decode step of an injected model replays one captured graph.

Why: HF's `generate(cache_implementation="static")` compiles the decode step (inductor with CUDA graph
trees). On an H200 with the Llama-3-8B architecture, that step's host cost - dynamo guards, the graph
tree's bookkeeping over every parameter input, inductor's wrapper - was 2-3 ms per token, about as long as
the GPU work itself, so faster kernels barely showed. A graph we capture ourselves replays for the price
of two small copies and one launch.

What is graphed: a call of the model's forward with one new token per row (`input_ids` `[B, 1]`) over a
static cache (every layer an initialised `StaticLayer`: see _GRAPHABLE_LAYERS), without grad, outside
torch.compile tracing and outside someone else's capture. A static cache keeps its keys, values and
lengths in device tensors at fixed addresses, updated in place by the step itself, so a replay advances
it exactly as an eager call would. Everything else - prefill, DynamicCache, CPU, other keyword tensors -
calls the model's own forward.

How: graphs are keyed by the call's shapes, dtypes and non-tensor arguments and by the shapes of the
cache's tensors. The first decode call of a new key runs eagerly (it warms lazy initialisation, cuBLAS and
autotuning and advances the cache normally); the second captures (capture records, it does not execute:
the cache is untouched) and replays at once. A graph keeps the cache tensors it was captured on; HF's
generate makes a new StaticCache per call, and at its first decode step that cache adopts the graph's
tensors (its contents copied in, its layers pointed at them), so one graph serves every generate call.
Per call: copy `input_ids` and the mask (and positions when passed) into the graph's buffers, replay,
return the outputs cloned (the graph overwrites its buffers on the next replay). At most `MAX_GRAPHS`
graphs are kept (least recently used dropped).

Consequences: a cache that adopted a graph's tensors shares them with every earlier cache that did - an
old cache (say, kept from an earlier generate's output) must not be resumed after a newer one ran. Every
graph is dropped when a weight moves - `invalidate()`, called by the injected modules when they re-bind
or a weight is reassigned, and by the model's `.to()` / `.cuda()` / `.half()`.
"""
from __future__ import annotations

import inspect
import logging
import weakref
from collections import OrderedDict

import torch

logger = logging.getLogger("dsinf")

MAX_GRAPHS = 8
_COPIED = ("input_ids", "attention_mask", "position_ids", "cache_position")  # per-step tensors copied in
_CACHE_STATE = ("keys", "values", "cumulative_length")  # a static cache layer's tensors (HF 5.x)
_weights_version = 0  # bumped whenever an injected weight may have moved: every graph is then stale


def invalidate() -> None:
    """Drop every captured graph (lazily, at each wrapper's next call): a weight may have moved."""
    global _weights_version
    _weights_version += 1


class _Graph:
    """One captured decode step. It keeps the cache tensors it was captured on (`state`, alive with it)."""

    def __init__(self, forward, tensors: dict[str, torch.Tensor], others: dict):
        self.state = _cache_tensors(others["past_key_values"])
        self._adopted = weakref.ref(others["past_key_values"])
        self.inputs = {k: t.clone() for k, t in tensors.items()}
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = forward(**self.inputs, **others)

    def adopt(self, cache) -> bool:
        """Make `cache` use this graph's cache tensors (its contents copied in first); False when it already
        does. HF's generate makes a new StaticCache per call: this keeps one graph for all of them."""
        if self._adopted() is cache:  # every step after the first: nothing to check
            return False
        self._adopted = weakref.ref(cache)
        moved = False
        for (layer, name, mine), (_, _, theirs) in zip(self.state, _cache_tensors(cache)):
            if theirs is not mine:
                mine.copy_(theirs)
                setattr(cache.layers[layer], name, mine)
                moved = True
        return moved

    def run(self, tensors: dict[str, torch.Tensor]):
        for name, t in tensors.items():
            self.inputs[name].copy_(t)
        self.graph.replay()
        out = self.out
        return type(out)(**{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in out.items()})


def _reason(exc: BaseException) -> str:
    """One line: the exception and, for dynamo's wrappers (BackendCompilerFailed, ...), the error it wraps."""
    def line(e):
        text = next((ln for ln in str(e).splitlines() if ln.strip()), "")
        return f"{type(e).__name__}: {text}" if text else type(e).__name__

    root = exc
    for _ in range(8):  # dynamo's wrappers keep the original in inner_exception or __cause__ (not
        inner = getattr(root, "inner_exception", None) or root.__cause__  # __context__: maybe long handled)
        if not isinstance(inner, BaseException) or inner is root:
            break
        root = inner
    return line(exc) if root is exc else f"{line(exc)} <- {line(root)}"


def _compile_errors() -> tuple[type, ...]:
    """The exceptions by which torch.compile says it could not compile (dynamo's backend wrapper, an
    unsupported construct, inductor's own error); a runtime error of the compiled step is none of them."""
    import torch._dynamo.exc as dynamo_exc

    names = [(dynamo_exc, "BackendCompilerFailed"), (dynamo_exc, "Unsupported")]
    try:
        import torch._inductor.exc as inductor_exc

        names.append((inductor_exc, "InductorError"))
    except ImportError:
        pass
    return tuple(getattr(module, name) for module, name in names if hasattr(module, name))


def _lengths(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(t, t.clone()) for _, name, t in _cache_tensors(cache) if name == "cumulative_length"]


def _restore_lengths(lengths) -> None:
    for tensor, saved in lengths:
        tensor.copy_(saved)


def _cache_tensors(cache) -> list[tuple[int, str, torch.Tensor]]:
    return [(i, name, t) for i, layer in enumerate(cache.layers) for name in _CACHE_STATE
            if isinstance(t := getattr(layer, name, None), torch.Tensor)]


# Cache layer classes (HF's cache_utils) whose whole state is the tensors of _CACHE_STATE, so a replay
# advances it and an adoption moves it. Not its subclasses: the sliding-window layer keeps a host int
# (`cumulative_length_int`) that the mask and the update read - a replay would freeze it - and the
# indexed layer keeps more tensors (its indexer) than an adoption would carry.
_GRAPHABLE_LAYERS = frozenset({"StaticLayer"})


def _plain_static(layer) -> bool:
    cls = type(layer)
    return cls.__name__ in _GRAPHABLE_LAYERS and cls.__module__.endswith("cache_utils")


def _cache_state(cache) -> tuple | None:
    """The shapes and dtypes of a ready static cache's tensors, or None (not static, not initialised, or a
    layer whose state a replay would not advance: see _GRAPHABLE_LAYERS)."""
    if cache is None or not getattr(cache, "is_compileable", False):
        return None
    layers = getattr(cache, "layers", None)
    if not layers or not all(_plain_static(layer) and getattr(layer, "is_initialized", False) for layer in layers):
        return None
    return tuple((name, tuple(t.shape), t.dtype, t.device) for _, name, t in _cache_tensors(cache))


class DecodeGraphs:
    """Per-model state: the captured graphs. `run(forward, args, kwargs)` is the model's forward with
    static-cache decode steps on CUDA graphs (see the module doc)."""

    def __init__(self, compiled: bool = False):
        self.compiled = compiled  # capture an inductor-compiled step (see `install`) instead of the eager one
        self._step = None  # that compiled step, made at the first graphable call
        self.backend = "inductor"  # torch.compile's backend for it
        self.graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self._warm: set[tuple] = set()
        self._version = _weights_version
        self._memo = None  # (weak cache, its state): computed once per cache, not per step
        self.replays = 0  # decode steps served from a graph
        self.captures = 0  # graphs captured
        self.adoptions = 0  # new caches moved onto a graph's cache tensors
        self.fallback = ""  # why a compiled step fell back to the eager one ('' when it did not)

    def _key(self, args, kwargs):
        """(key, tensors to copy, other arguments), or None when this call is not a graphable decode step."""
        ids = kwargs.get("input_ids")
        if (args or not isinstance(ids, torch.Tensor) or not ids.is_cuda or ids.dim() != 2 or ids.shape[1] != 1
                or torch.is_grad_enabled() or torch.compiler.is_compiling()
                or torch.cuda.is_current_stream_capturing()):
            return None
        cache = kwargs.get("past_key_values")
        memo = self._memo
        if memo is not None and memo[0]() is cache:  # the same cache as the last step: shapes cannot change
            cache_state = memo[1]
        else:
            cache_state = _cache_state(cache)
            if cache_state is None:
                return None
            self._memo = (weakref.ref(cache), cache_state)
        tensors, others, signature = {}, {}, []
        for name, value in kwargs.items():
            if isinstance(value, torch.Tensor):
                if name not in _COPIED or value.device != ids.device:
                    return None
                tensors[name] = value
                signature.append((name, tuple(value.shape), value.dtype))
            elif name == "past_key_values":
                others[name] = value
            elif value is None or isinstance(value, (bool, int, float, str)):
                others[name] = value
                signature.append((name, value))
            else:
                return None
        return (ids.device.index, tuple(sorted(signature, key=repr))), cache_state, tensors, others

    def run(self, forward, args, kwargs):
        found = self._key(args, kwargs)
        if found is None:
            return forward(*args, **kwargs)
        shapes, cache_state, tensors, others = found
        if self._version != _weights_version:  # weights moved: recapture after a fresh warm-up step (which,
            self.graphs.clear()                # compiled, recompiles for a new dtype outside any capture)
            self._warm.clear()
            self._version = _weights_version
        key = (shapes, cache_state)
        step = forward
        if self.compiled:
            if self._step is None:  # inductor without its own graphs: the step is captured into ours
                self._step = torch.compile(forward, dynamic=False, backend=self.backend)
            step = self._step
        graph = self.graphs.get(key)
        if graph is None:
            if shapes not in self._warm:  # warm-up (and, compiled, the compile itself): outside any capture
                self._warm.add(shapes)
                if step is forward:
                    return step(**kwargs)
                lengths = _lengths(others["past_key_values"])
                try:
                    return step(**kwargs)
                except Exception as exc:  # noqa: BLE001 - narrowed below (dynamo is imported only here)
                    if not isinstance(exc, _compile_errors()):
                        raise
                    # The compiler failed (not the step: an OOM or a bad input is raised as it is). The
                    # eager step is graphed instead, from now on. A frame compiled and run before the
                    # failing one may have advanced the cache's lengths: they are put back (the key/value
                    # slots it wrote are rewritten by the eager step).
                    _restore_lengths(lengths)
                    self.compiled, self._step = False, None
                    self.fallback = _reason(exc)
                    logger.warning("dsinf: the decode step could not be compiled (%s); its eager step is "
                                   "graphed instead", self.fallback)
                    summary = getattr(getattr(forward, "__self__", None), "_dsinf_injection", None)
                    if summary is not None:  # injection_summary says what runs now
                        summary.cuda_graph = describe(False, self.fallback)
                    return forward(**kwargs)
            graph = _Graph(step, tensors, others)
            self.captures += 1
            self.graphs[key] = graph
            while len(self.graphs) > MAX_GRAPHS:
                self.graphs.popitem(last=False)
        else:
            self.graphs.move_to_end(key)
            self.adoptions += graph.adopt(others["past_key_values"])
        self.replays += 1
        return graph.run(tensors)

    # Graphs hold this process's device addresses: a copy (deepcopy, pickle) starts with none.
    def __getstate__(self):
        return {"compiled": self.compiled}

    def __setstate__(self, state):
        self.__init__(**state)

    def __deepcopy__(self, memo):
        return DecodeGraphs(self.compiled)


class GraphedDecode:
    """Mixed in before a generative model's own class by `install`: its forward runs through the model's
    `DecodeGraphs` (`_dsinf_graphs`), and `.to()` / `.cuda()` / `.half()` drop the graphs."""

    def forward(self, *args, **kwargs):
        return self._dsinf_graphs.run(super().forward, args, kwargs)

    def _apply(self, fn, recurse=True):
        invalidate()
        return super()._apply(fn, recurse)

    @staticmethod
    def _dsinf_class_made(cls) -> None:
        """Called once per class `swap_class` makes (at inject, or when a pickled model is loaded in a fresh
        process): the forward under the model's own signature - HF reads its parameters (logits_to_keep)."""
        base_forward = cls.__bases__[1].forward  # swap_class's bases: (GraphedDecode, the model's class)

        def forward(self, *args, **kwargs):
            return GraphedDecode.forward(self, *args, **kwargs)
        forward.__signature__ = inspect.signature(base_forward)
        forward.__doc__ = GraphedDecode.forward.__doc__
        cls.forward = forward


def describe(compiled: bool, fallback: str = "") -> str:
    """The summary's line for the decode graphs."""
    step = "an inductor-compiled step" if compiled else "the eager step"
    why = (f" (inductor failed to compile a decode step: {fallback}; graphs captured before keep their "
           f"compiled step)") if fallback else ""
    return (f"static-cache decode steps on CUDA run from dsinf's CUDA graphs of {step}{why} (HF's compile of "
            f"the decode step is off: generation_config.disable_compile)")


def install(model: torch.nn.Module, swap_class, compiled: bool = False) -> DecodeGraphs | None:
    """Give a generative model (one with a `generation_config`) graphed decode steps, and turn HF's own
    compile of the decode step off (the graphs replace it). `swap_class(module, mixin)` makes the
    subclass. `compiled`: the captured step is the model's forward compiled by inductor (its small ops -
    rotary, mask, residual adds - fused, dsinf's ops called as they are), compiled at the first decode
    step; else the eager forward. Returns the model's DecodeGraphs, or None for other models."""
    config = getattr(model, "generation_config", None)
    if config is None:
        return None
    swap_class(model, GraphedDecode)  # its forward keeps the model's signature: GraphedDecode._dsinf_class_made
    model._dsinf_graphs = DecodeGraphs(compiled)
    config.disable_compile = True
    return model._dsinf_graphs
