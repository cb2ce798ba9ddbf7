"""`InferenceOp`: what every op class shares - the config, the backend and the per-call path.

DeepSpeed's `BaseOp` loads one process-wide module in `__init__` and binds `module.<op>_<dtype>` by
attribute lookup, silently falling back on AttributeError. Here each op instance resolves its backend
through `dsinf.dispatch` once per device type (CUDA or not): at construction when `device=` is given,
otherwise on the first call, and again only after its config changes. `op.decision` / `op.backend`
show it.

The per-call path is bound once with the decision (`_calls`): a closure over the chosen function and the
config's values. Validation happens once per call: when the compiled backend runs, its C++ validation
is the check (tensors that require grad included), and Python looks only at what C++ cannot see (a bool
passed as an int, a float weight carrying `.scale` in an int8 config); a call C++ rejects, or anything unusual,
takes the slow path, which runs the full Python checks and names the bad argument. The Triton and
torch backends always get the Python checks.

In eager mode with no hooks (`eager_call`), the op classes' `__call__` skips `nn.Module.__call__` and
calls the compiled op's C++ entry (`_eager_calls`); hooks, `Module.compile()` and torch.compile go
through `nn.Module.__call__` and `forward`, which call the `OpOverload` (what Dynamo traces).

Inference-only: with grad mode on, an input or weight that requires grad raises `InputError` on every
backend (`dsinf.checks.no_backward`); the ops have no backward.
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar

import torch
from torch.nn.modules import module as _nn_module

from .. import dispatch
from ..checks import InputError, dtype_name
from ..config import InferenceConfig
from ..library import has_kernel
from . import spec as op_spec


# nn.Module.__call__'s global hook tables (dicts updated in place by the register_module_* functions).
_g_backward_pre_hooks, _g_backward_hooks = _nn_module._global_backward_pre_hooks, _nn_module._global_backward_hooks
_g_forward_hooks, _g_forward_pre_hooks = _nn_module._global_forward_hooks, _nn_module._global_forward_pre_hooks
# False in eager mode (a bare `return False`); Dynamo folds it to True while it traces. (torch.compiler's
# is_compiling also covers non-strict export, which runs the Python and records the C++ entry the same.)
_is_compiling = torch.compiler.is_dynamo_compiling

#: What the compiled op raises for an argument its C++ parser or validation rejects: the fast paths then
#: rerun the call through the Python checks, which name the argument in dsinf's wording (errors only).
CALL_ERRORS = (RuntimeError, TypeError, ValueError, AttributeError)


_FIRST_RESOLVE_REASON = ("dsinf: an op chooses its backend at its first call on a device type, which may load or "
                         "build the compiled module: call the op once outside torch.compile (or construct it with "
                         "device=...) before compiling with fullgraph=True")


def _first_resolve(op: InferenceOp, device) -> None:
    """Called while Dynamo traces an op that has no decision yet: choosing one runs code Dynamo cannot trace
    (locks, probes, a build), so it must run outside the graph (a graph break; under fullgraph=True an error
    that says why). Marked as `torch.compiler.disable` marks a function, without calling it: that imports
    torch._dynamo (and triton), which `import dsinf` and an op's construction must not. A torch that no
    longer reads the mark breaks the graph deeper, in the probes, as before."""
    op.resolve(device)


_first_resolve._torchdynamo_disable = True  # type: ignore[attr-defined]
_first_resolve._torchdynamo_disable_msg = _FIRST_RESOLVE_REASON  # type: ignore[attr-defined]


def eager_call(op: InferenceOp, input) -> Callable[..., Any] | None:
    """`op`'s bound call for `input` when `nn.Module.__call__` would do nothing but call `forward` (no hooks,
    no `Module.compile()`, not under torch.compile), else None: the op classes' `__call__` then skips
    nn.Module's hook checks and frames. (Under torch.jit.trace the op is recorded either way; only
    nn.Module's scope names are skipped.)

    A plain function reading the instance dict: nn.Module defines `__getattr__`, which keeps CPython from
    specializing `self.<attr>`, and this runs on every call (~0.17 us here against ~0.42 us as a method
    reading ten attributes). `Module.compile()` stores `_compiled_call_impl` in the instance dict."""
    d = op.__dict__
    if (d["_forward_hooks"] or d["_forward_pre_hooks"] or d["_backward_hooks"] or d["_backward_pre_hooks"]
            or "_compiled_call_impl" in d or _g_backward_pre_hooks or _g_backward_hooks or _g_forward_hooks
            or _g_forward_pre_hooks or _is_compiling()):
        return None
    try:
        call = d["_eager_calls"][input.is_cuda]
    except (KeyError, AttributeError):
        return op._dispatch
    return call if d["_config_version"] == d["config"]._version else op._dispatch


class InferenceOp(torch.nn.Module):
    #: Op family this class calls, e.g. "linear_layer" (its spec: `dsinf.ops.spec.get(OP)`).
    OP: ClassVar[str] = ""

    def __init__(self, config: InferenceConfig | dict | None = None, *, device: str | torch.device | None = None,
                 environment: dispatch.Environment | None = None):
        super().__init__()
        if config is None:
            config = InferenceConfig()
        elif isinstance(config, dict):
            config = InferenceConfig.from_dict(config)
        elif not isinstance(config, InferenceConfig):
            raise TypeError(f"{type(self).__name__}: config must be an InferenceConfig (or a dict), got "
                            f"{type(config).__name__}; for another library's config object use "
                            f"InferenceConfig.from_dict(vars(config), strict=False)")
        self.config = config
        self._environment = environment
        self._decisions: dict[tuple, dispatch.BackendDecision] = {}
        self._decisions_version = config._version  # the config version `_decisions` were made under
        self._last_decision: dispatch.BackendDecision | None = None
        self._calls: dict[bool, Callable[..., Any]] = {}  # input.is_cuda -> bound call (the per-call path)
        self._eager_calls: dict[bool, Callable[..., Any]] = {}  # the same, calling the compiled op's C++ entry
        self._config_version = config._version
        if device is not None:
            self.resolve(device)

    def __setattr__(self, name: str, value: Any) -> None:
        """A new config object (`op.config = InferenceConfig(...)`) is a config change: its version counter
        starts again, so without this the calls bound and decisions made for the old one would stay."""
        if name == "config" and "config" in self.__dict__ and value is not self.__dict__["config"]:
            if not isinstance(value, InferenceConfig):
                raise TypeError(f"{type(self).__name__}: config must be an InferenceConfig, got {type(value).__name__}")
            super().__setattr__(name, value)
            self._decisions.clear()
            self._calls.clear()
            self._eager_calls.clear()
            self._last_decision = None
            self._decisions_version = self._config_version = value._version
            return
        super().__setattr__(name, value)

    # --- backend ----------------------------------------------------------------------------------
    def _decision_key(self, device_type: str) -> tuple:
        cfg = self.config
        return device_type, cfg.dtype, cfg.activation_dtype

    def _decided(self, device_type: str) -> bool:
        """Whether `resolve` would answer `device_type` from its cache."""
        return self._decisions_version == self.config._version and self._decision_key(device_type) in self._decisions

    def resolve(self, device: str | torch.device) -> dispatch.BackendDecision:
        """The backend decision for inputs on `device` with the config's dtype (made once, then cached until
        the config changes)."""
        device_type = torch.device(device).type
        cfg = self.config
        if self._decisions_version != cfg._version:
            # Any field may change the decision (use_triton) or what resolving does (triton_autotune,
            # layer_id): decide again. Off the per-call path: calls reach here only through `_dispatch`.
            self._decisions.clear()
            self._decisions_version = cfg._version
        key = self._decision_key(device_type)
        decision = self._decisions.get(key)
        if decision is None:
            owner = type(self).__name__
            request = dispatch.Request(op=self.OP, device_type=device_type, act_dtype=cfg.activation_dtype,
                                       int8=cfg.quantized, use_triton=cfg.use_triton)
            decision = dispatch.resolve(request, self._environment, owner=owner)
            dispatch.log_fallbacks(decision, owner)
            if decision.backend == "triton":
                self._warm_triton()
            self._decisions[key] = decision
        self._last_decision = decision
        return decision

    def _dispatch(self, input, *args, **kwargs):
        """The first call for a device type (or after a config change): bind the call, then make it."""
        if self._config_version != self.config._version:
            self._calls.clear()
            self._eager_calls.clear()
            self._config_version = self.config._version
        is_cuda = isinstance(input, torch.Tensor) and input.is_cuda
        device = input.device if isinstance(input, torch.Tensor) else "cpu"  # a non-tensor fails the checks
        if _is_compiling() and not self._decided(torch.device(device).type):
            _first_resolve(self, device)
        decision = self.resolve(device)
        compiled = decision.backend == "compiled"
        call = self._bind(decision.impl, checked=not compiled)
        if isinstance(input, torch.Tensor) and input.device.type in ("cpu", "cuda"):
            self._calls[is_cuda] = call
            if not _is_compiling():  # Dynamo traces the OpOverload; a C++ entry stored here it cannot rebuild
                # Outside torch.compile the compiled op is called through its C++ entry (`OpOverload._op`):
                # the same dispatcher call without OpOverload.__call__'s Python frame (~0.35 us).
                entry = getattr(decision.impl, "_op", None) if compiled else None
                self._eager_calls[is_cuda] = call if entry is None else self._bind_eager(decision.impl, is_cuda)
        return call(input, *args, **kwargs)

    def _call(self, input) -> Callable[..., Any]:
        """The bound call for `input`'s device (one dict lookup), or `_dispatch` to bind it first. Keyed
        by `input.is_cuda` (a 40 ns attribute; `input.device` costs 300 ns): other device types are never
        cached and take `_dispatch` each time."""
        try:
            call = self._calls[input.is_cuda]
        except (KeyError, AttributeError):
            return self._dispatch
        return call if self._config_version == self.config._version else self._dispatch

    def _bind(self, impl: Callable[..., Any], checked: bool, lean: Callable[..., Any] | None = None
              ) -> Callable[..., Any]:
        """The per-call function for backend function `impl`; `checked`: run the Python checks on every
        call (the backend has no validation of its own). `lean` (passed only to the classes whose spec
        has a lean entry, `OpSpec.lean`): that entry's C++ entry, for the calls that fit it; None when
        the loaded binary does not have it, or outside eager mode."""
        raise NotImplementedError

    def _bind_eager(self, overload: torch._ops.OpOverload, is_cuda: bool) -> Callable[..., Any]:
        """The eager per-call function for the compiled op `overload`: `_bind` of its C++ entry, with the
        C++ entry of the op's lean entry for the same dtype when the spec has one and the loaded binary
        registers it for this device (a binary built before the entry existed does not)."""
        spec = op_spec.get(self.OP)
        if spec.lean is None:
            return self._bind(overload._op, checked=False)
        lean = spec.lean_function(overload._schema.name.split("::")[-1])
        entry = getattr(torch.ops.dsinf, lean).default._op if has_kernel(lean, "cuda" if is_cuda else "cpu") else None
        return self._bind(overload._op, checked=False, lean=entry)

    def _warm_triton(self) -> None:
        # DeepSpeed autotunes when layer 0 is built with triton_autotune; we do it when Triton is chosen,
        # for the config's weight dtype and layout (both are part of the table's key).
        cfg = self.config
        if cfg.triton_autotune and cfg.layer_id == 0 and cfg.hidden_size > 0:
            extra = {"act_dtype": cfg.activation_dtype} if cfg.quantized else {}
            out_features = self._autotune_out_features()
            if out_features:
                extra["out_features"] = out_features
            self._triton_autotune(2, cfg.max_out_tokens, cfg.hidden_size, cfg.dtype,
                                  transposed_mode=cfg.transposed_mode, **extra)

    def _autotune_out_features(self) -> int | None:
        """Output width to tune for when the config knows it better than the default."""
        return None

    @staticmethod
    def _triton_autotune(min_seqlen: int, max_seqlen: int, hidden_size: int, dtype=torch.float16, **kwargs):
        raise NotImplementedError

    @property
    def decision(self) -> dispatch.BackendDecision:
        """The decision made most recently; before any call, the one for CUDA if available, else CPU. After a
        config change, the decision for the same device type under the new config."""
        last = self._last_decision
        if last is None:
            self.resolve("cuda" if torch.cuda.is_available() else "cpu")
        elif self._decisions_version != self.config._version:
            self.resolve(last.request.device_type)
        return self._last_decision

    @property
    def backend(self) -> str:
        """Name of the chosen backend: 'compiled', 'triton' or 'torch'."""
        return self.decision.backend

    # --- inputs -----------------------------------------------------------------------------------
    def _q_scale(self, weight, name: str = "weight") -> torch.Tensor | None:
        """`weight.scale` for int8 configs (None otherwise), after checking weight and config agree; errors
        name the argument `name`."""
        if not isinstance(weight, torch.Tensor):
            return None  # the shared checks name 'weight'
        cfg = self.config
        if (weight.dtype == torch.int8) != cfg.quantized:
            if cfg.quantized:
                message = (f"config.dtype is int8 but the weight is {dtype_name(weight.dtype)}: quantize it with "
                           f"dsinf.quantize_int8(weight, transposed_mode=...)")
            else:
                message = (f"is int8 but config.dtype is {dtype_name(cfg.dtype)}: int8 weights need "
                           f"InferenceConfig(dtype=torch.int8)")
            raise InputError(type(self).__name__, name, message)
        if not cfg.quantized:
            return None
        scale = getattr(weight, "scale", None)
        if scale is None:
            raise InputError(type(self).__name__, name,
                             "is int8 but has no .scale (float32 [G] scales, alias q_scale): quantize with "
                             "dsinf.quantize_int8, and re-attach .scale after .to()/.cuda(), which drop it")
        return scale
