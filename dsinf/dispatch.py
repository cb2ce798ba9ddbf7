"""Which backend runs an op: resolution as data.

A `Request` (op, device type, activation dtype, int8 weights?, use_triton) is checked against the
backends in priority order; each check is a `Probe` (ok, or a reason). The first that is ok wins:

    1. compiled  the op_builder module for the device type ('cpu' | 'cuda') has a registered kernel for
                 the op spec's function (`<op>_<act dtype>`; int8 weights use the activation dtype's
                 function, with q_scale). Asking builds the module if needed (JIT) - the cost of the first
                 call. The kernel is asked about once, and bound as its `torch.ops.dsinf.<fn>.default`.
    2. triton    the op has a Triton implementation (its spec's `triton`; None: not applicable), CUDA
                 tensors, config.use_triton, triton installed (`find_spec`, not imported here), and
                 `dsinf.triton.supports(dtype, device_type, capability)` -> (ok, reason) for the activation
                 dtype and, for int8 weights, for torch.int8 too; then the op's function, whose first
                 access imports triton (a broken install, say a missing libtriton.so, is a fallback reason).
    3. torch     the spec's reference (`dsinf.reference.<op>`): always available.

The result is a frozen `BackendDecision`: the chosen backend and its callable, plus `skipped`, a tuple of
`(backend, reason)` for every better backend that was not used. A skip is either *not applicable* (the
user did not ask for it: use_triton off, CPU tensors for Triton, a forced backend) or a *fallback* (it
applies but cannot run here: build failed, kernel not compiled for this dtype, triton missing). Only
fallbacks are logged (once per op class and reason, logger "dsinf") and only they are refused by
`DS_KI_FALLBACK=False`, which raises `BackendUnavailableError` listing them.

`DSINF_BACKEND=compiled|triton|torch` forces one backend (no other is probed, so forcing `torch` never
builds anything); if it cannot run, `BackendUnavailableError` says why. A forced `triton` skips the two
policy rules (CUDA tensors, use_triton) and asks only whether triton can run the op on that device
(e.g. the interpreter on CPU under TRITON_INTERPRET=1, if `dsinf.triton.supports` says so).

`choose` is the pure part (probes in, decision out); `resolve` reads the knobs and runs the probes of
an `Environment`, whose defaults look at the real machine and which tests replace with fakes.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, NamedTuple

import torch

from op_builder import knobs
from op_builder.errors import IncompatibleError, OpBuilderError

from .checks import dtype_name

__all__ = ["BACKENDS", "BackendDecision", "BackendUnavailableError", "Environment", "Probe", "Request", "Skip",
           "choose", "log_fallbacks", "probe_compiled", "probe_torch", "probe_triton", "resolve"]

BACKENDS = ("compiled", "triton", "torch")
COMPILED_DEVICE_TYPES = ("cpu", "cuda")

logger = logging.getLogger("dsinf")


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run, or DS_KI_FALLBACK=False forbids the fallback that would be needed."""


@dataclass(frozen=True)
class Request:
    """What an op needs: one per (op instance, device type, dtype)."""
    op: str  # an op spec's name, e.g. "linear_layer"
    device_type: str  # torch.device.type of the input
    act_dtype: torch.dtype  # activation dtype (float32 | float16 | bfloat16)
    int8: bool = False  # int8 weights (with q_scale)
    use_triton: bool = False  # config.use_triton

    @property
    def function(self) -> str:
        """Name of the module function / dsinf:: op, e.g. 'linear_layer_fp16'."""
        from .ops import spec

        return spec.get(self.op).function(self.act_dtype)

    def describe(self) -> str:
        weights = ", int8 weights" if self.int8 else ""
        return f"{self.op} on {self.device_type} ({dtype_name(self.act_dtype)}{weights})"


class Skip(NamedTuple):
    backend: str
    reason: str


@dataclass(frozen=True)
class Probe:
    """Whether one backend can serve a request: `impl` when it can, else `reason`."""
    backend: str
    impl: Callable[..., Any] | None = field(default=None, compare=False)
    reason: str = ""
    fallback: bool = True  # when not ok: True = applies but cannot run here; False = not applicable

    @property
    def ok(self) -> bool:
        return self.impl is not None


@dataclass(frozen=True)
class BackendDecision:
    """The backend chosen for a request, and why each better one was skipped."""
    request: Request
    backend: str
    skipped: tuple[Skip, ...] = ()
    fallbacks: tuple[Skip, ...] = ()  # the subset of `skipped` that applied but could not run
    forced: bool = False  # chosen by DSINF_BACKEND
    impl: Callable[..., Any] | None = field(default=None, compare=False, repr=False)

    def explain(self) -> str:
        """The choice and each skip's reason; for the compiled backend, the measured per-shape routes
        between its GEMV and ATen in force (dsinf.routes)."""
        head = f"{self.request.describe()} -> {self.backend}" + (" (forced by DSINF_BACKEND)" if self.forced else "")
        parts = [head] + [f"{b}: {r}" for b, r in self.skipped]
        if self.backend == "compiled":
            from .routes import describe

            parts.append(describe(self.request.device_type, self.request.act_dtype, self.request.int8,
                                  gated=self.request.op == "rms_mlp_gemm"))
        return "; ".join(p for p in parts if p)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


# --- where the probes look ------------------------------------------------------------------------

def _inference_builder():
    from op_builder import InferenceBuilder  # lazy: op_builder's build machinery is heavy

    return InferenceBuilder()


def _has_kernel(name: str, device_type: str) -> bool:
    from .library import has_kernel

    return has_kernel(name, device_type)


def _compiled_op(module: Any, name: str) -> Callable[..., Any]:
    # The registered op itself (its overload: no packet resolution per call), not the module view's
    # attribute, which would ask the dispatcher about the kernel a second time.
    return getattr(torch.ops.dsinf, name).default


def _find_spec(name: str):
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None


@dataclass(frozen=True)
class Environment:
    """Where the probes look. The defaults are the real machine; tests pass fakes.

    builder()              -> an `InferenceBuilder`-like object: `.compatible(device_type)` with `.ok` and
                              `.reasons`; `.load(device_type)` -> module (raises on a failed build)
    has_kernel(name, dev)  -> whether `dsinf::<name>` has a kernel registered for the device type
    compiled_op(module, name) -> the callable of a registered function (asked after has_kernel said yes)
    find_spec(name)        -> `importlib.util.find_spec` (None when not installed)
    triton_ops()           -> the `dsinf.triton` module (`supports(dtype, device_type, capability=None)`
                              -> (ok, reason); `linear_layer`, `vector_matmul` with the reference's signatures)
    cuda_capability()      -> (major, minor) of the current CUDA device (asked only for CUDA requests)
    reference()            -> the `dsinf.reference` module
    """
    builder: Callable[[], Any] = _inference_builder
    has_kernel: Callable[[str, str], bool] = _has_kernel
    compiled_op: Callable[[Any, str], Callable[..., Any]] = _compiled_op
    find_spec: Callable[[str], Any] = _find_spec
    triton_ops: Callable[[], Any] = lambda: importlib.import_module("dsinf.triton")
    cuda_capability: Callable[[], tuple[int, int] | None] = lambda: tuple(torch.cuda.get_device_capability())
    reference: Callable[[], Any] = lambda: importlib.import_module("dsinf.reference")


DEFAULT_ENVIRONMENT = Environment()


# --- probes: one per backend ----------------------------------------------------------------------

def probe_compiled(request: Request, env: Environment, forced: bool = False) -> Probe:
    dev = request.device_type
    if dev not in COMPILED_DEVICE_TYPES:
        return Probe("compiled", reason=f"no compiled module exists for device type '{dev}'", fallback=False)
    try:
        builder = env.builder()
    except knobs.KnobError:
        raise  # a misconfigured environment variable is the user's to fix, not a reason to fall back
    except Exception as exc:  # noqa: BLE001 - any failure here is a reason, never a crash
        return Probe("compiled", reason=f"op_builder unavailable: {_first_line(exc)}")
    try:
        # load() is asked even where this machine could not build the module: an installed or cached binary
        # loads without the build tools (ninja gone, say); it raises IncompatibleError when there is none.
        module = builder.load(dev)
    except knobs.KnobError:
        raise
    except IncompatibleError as exc:
        reasons = "; ".join(exc.reasons) or "no reason given"
        return Probe("compiled", reason=f"the {dev} module cannot be built here: {reasons}")
    except Exception as exc:  # noqa: BLE001 - BuildError, or anything else
        # op_builder's own errors in full: a failed build's names the op, its first compiler errors and its log
        why = f"{type(exc).__name__}: {exc}" if isinstance(exc, OpBuilderError) else _first_line(exc)
        return Probe("compiled", reason=f"building the {dev} module failed: {why}")
    name = request.function
    try:
        registered = env.has_kernel(name, dev)
    except Exception as exc:  # noqa: BLE001 - e.g. schema not defined
        return Probe("compiled", reason=f"cannot ask the dispatcher about dsinf::{name}: {_first_line(exc)}")
    if not registered:
        return Probe("compiled", reason=f"the {dev} module has no {name} kernel (not built for this dtype)")
    impl = env.compiled_op(module, name)
    if impl is None:
        return Probe("compiled", reason=f"the {dev} module does not expose {name}")
    return Probe("compiled", impl=impl)


def probe_triton(request: Request, env: Environment, forced: bool = False) -> Probe:
    from .ops import spec

    dev = request.device_type
    function = spec.get(request.op).triton
    if function is None:
        return Probe("triton", reason=f"{request.op} has no Triton implementation", fallback=False)
    if not forced:
        if dev != "cuda":
            return Probe("triton", reason=f"Triton is used only for CUDA tensors (got {dev})", fallback=False)
        if not request.use_triton:
            return Probe("triton", reason="config.use_triton is False", fallback=False)
    if env.find_spec("triton") is None:
        return Probe("triton", reason="triton is not installed")
    try:
        ops = env.triton_ops()
    except Exception as exc:  # noqa: BLE001
        return Probe("triton", reason=f"dsinf.triton failed to import: {_first_line(exc)}")
    # supports() takes the weight dtype (torch.int8 = weight-only, default fp16 activations): ask for the
    # activation dtype, and for int8 too when the weights are quantized.
    dtypes = (request.act_dtype, torch.int8) if request.int8 else (request.act_dtype,)
    for dtype in dtypes:
        name = dtype_name(dtype)
        try:
            capability = env.cuda_capability() if dev == "cuda" else None
            result = ops.supports(dtype, dev, capability=capability)
        except Exception as exc:  # noqa: BLE001
            return Probe("triton", reason=f"dsinf.triton.supports({name}, {dev!r}) failed: {_first_line(exc)}")
        ok, why = result if isinstance(result, tuple) else (bool(result), "")
        if not ok:
            detail = f": {why}" if why else ""
            return Probe("triton", reason=f"dsinf.triton does not support {name} on {dev}{detail}")
    try:
        # The first access imports dsinf.triton.ops and with it triton itself (its compiled core, e.g.
        # libtriton.so): a broken install raises here, and getattr's default covers AttributeError only.
        impl = getattr(ops, function, None)
    except Exception as exc:  # noqa: BLE001 - a reason to fall back, never a crash
        return Probe("triton", reason=f"dsinf.triton failed to import: {_first_line(exc)}")
    if impl is None:
        return Probe("triton", reason=f"dsinf.triton has no {function}")
    return Probe("triton", impl=impl)


def probe_torch(request: Request, env: Environment, forced: bool = False) -> Probe:
    return Probe("torch", impl=getattr(env.reference(), request.op))  # the spec's reference, by name


PROBES: dict[str, Callable[[Request, Environment, bool], Probe]] = {
    "compiled": probe_compiled, "triton": probe_triton, "torch": probe_torch,
}


# --- the decision ---------------------------------------------------------------------------------

def choose(request: Request, probes: Iterable[Probe], *, allow_fallback: bool = True,
           owner: str = "") -> BackendDecision:
    """The first ok probe wins (probes are consumed lazily, in priority order).

    Raises `BackendUnavailableError` when none is ok, or when the winner needed a fallback and
    `allow_fallback` is False.
    """
    skipped: list[Probe] = []
    for probe in probes:
        if probe.ok:
            break
        skipped.append(probe)
    else:
        probe = None
    pairs = tuple(Skip(p.backend, p.reason) for p in skipped)
    fallbacks = tuple(Skip(p.backend, p.reason) for p in skipped if p.fallback)
    who = f"{owner}: " if owner else ""
    if probe is None:
        raise BackendUnavailableError(f"{who}no backend can run {request.describe()}: "
                                      + "; ".join(f"{b}: {r}" for b, r in pairs))
    if fallbacks and not allow_fallback:
        raise BackendUnavailableError(
            f"{who}DS_KI_FALLBACK=False forbids falling back to {probe.backend} for {request.describe()}: "
            + "; ".join(f"{b}: {r}" for b, r in fallbacks))
    return BackendDecision(request=request, backend=probe.backend, skipped=pairs, fallbacks=fallbacks, impl=probe.impl)


def resolve(request: Request, env: Environment | None = None, *, backend: str | None = None,
            allow_fallback: bool | None = None, owner: str = "") -> BackendDecision:
    """Decide the backend for `request`. `backend` / `allow_fallback` default to the knobs
    DSINF_BACKEND / DS_KI_FALLBACK."""
    env = env or DEFAULT_ENVIRONMENT
    backend = knobs.get("DSINF_BACKEND") if backend is None else backend
    allow_fallback = knobs.get("DS_KI_FALLBACK") if allow_fallback is None else allow_fallback
    if backend == "auto":
        probes = (PROBES[name](request, env, False) for name in BACKENDS)
        return choose(request, probes, allow_fallback=allow_fallback, owner=owner)
    if backend not in PROBES:
        raise ValueError(f"unknown backend {backend!r}: expected auto or one of {', '.join(BACKENDS)}")
    probe = PROBES[backend](request, env, True)
    if not probe.ok:
        who = f"{owner}: " if owner else ""
        raise BackendUnavailableError(f"{who}DSINF_BACKEND={backend}, but {backend} cannot run "
                                      f"{request.describe()}: {probe.reason}")
    skipped = tuple(Skip(name, f"DSINF_BACKEND={backend}") for name in BACKENDS if name != backend)
    return BackendDecision(request=request, backend=backend, skipped=skipped, forced=True, impl=probe.impl)


_logged: set[tuple[str, str]] = set()
_logged_lock = threading.Lock()


def log_fallbacks(decision: BackendDecision, owner: str) -> bool:
    """Log a decision's fallbacks at WARNING, once per (owner, reason) per process. True if it logged."""
    if not decision.fallbacks:
        return False
    keys = {(owner, reason) for _, reason in decision.fallbacks}
    with _logged_lock:
        if keys <= _logged:
            return False
        _logged.update(keys)
    logger.warning("%s: %s runs on the %s backend: %s", owner, decision.request.describe(), decision.backend,
                   "; ".join(f"{b}: {r}" for b, r in decision.fallbacks))
    return True
