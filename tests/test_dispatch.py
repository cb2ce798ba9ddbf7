"""The backend resolver with fake builders, modules and Triton: no compiler, GPU or triton needed."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from dsinf import dispatch
from dsinf.config import InferenceConfig
from dsinf.dispatch import BackendUnavailableError, Environment, Probe, Request, Skip, choose, resolve
from dsinf.ops import LinearOp, VectorMatMulOp
from op_builder.errors import IncompatibleError
from op_builder.knobs import KnobError


# --- fakes ----------------------------------------------------------------------------------------------

@dataclass
class FakeCompat:
    ok: bool
    reasons: tuple[str, ...] = ()


class FakeModule:
    def __init__(self, functions):
        for name in functions:
            setattr(self, name, self._impl(name))

    @staticmethod
    def _impl(name):
        def impl(*args):
            return ("compiled", name, args)
        return impl


@dataclass
class FakeBuilder:
    """`InferenceBuilder`-like: counts its calls; `load_error` makes the build fail."""
    compat: FakeCompat = field(default_factory=lambda: FakeCompat(True))
    load_error: Exception | None = None
    functions: tuple[str, ...] = ("linear_layer_fp32", "linear_layer_fp16", "linear_layer_bf16",
                                  "vector_matmul_fp32", "vector_matmul_fp16", "vector_matmul_bf16")
    compatible_calls: int = 0
    load_calls: int = 0

    def compatible(self, device_type):
        self.compatible_calls += 1
        return self.compat

    def load(self, device_type):
        """As OpBuilder's: where this machine cannot build, an installed or cached binary still loads; the
        fake has none, so it raises the compatibility reasons."""
        self.load_calls += 1
        if self.load_error is not None:
            raise self.load_error
        compat = self.compatible(device_type)  # the real load checks it too, before any build
        if not compat.ok:
            raise IncompatibleError(f"transformer_inference[{device_type}]", compat.reasons)
        return FakeModule(self.functions)


def fake_triton(supported=(torch.float16, torch.bfloat16, torch.int8), devices=("cuda",)):
    """dsinf.triton-like: supports(dtype, device_type, capability=None) -> (ok, reason)."""
    ops = types.SimpleNamespace(asked=[])

    def supports(dtype, device_type, capability=None):
        ops.asked.append((dtype, device_type, capability))
        ok = dtype in supported and device_type in devices
        return ok, ("fake kernels" if ok else f"fake has no {dtype} on {device_type}")

    ops.supports = supports
    ops.linear_layer = lambda *args: ("triton", "linear_layer", args)
    ops.vector_matmul = lambda *args: ("triton", "vector_matmul", args)
    return ops


def make_env(builder=None, kernels=None, triton_installed=True, triton=None):
    """An Environment over fakes. `kernels`: set of (function, device_type) with a registered kernel
    (default: every function the builder's module has, on cpu and cuda)."""
    builder = builder or FakeBuilder()
    triton = triton or fake_triton()
    imported = []
    if kernels is None:
        kernels = {(f, d) for f in builder.functions for d in ("cpu", "cuda")}

    def triton_ops():
        imported.append("dsinf.triton")
        return triton

    env = Environment(builder=lambda: builder, has_kernel=lambda name, dev: (name, dev) in kernels,
                      compiled_op=lambda module, name: getattr(module, name, None), find_spec=lambda name: object() if triton_installed else None, triton_ops=triton_ops,
                      cuda_capability=lambda: (9, 0))
    object.__setattr__(env, "imported", imported)  # a test-only note on a frozen dataclass
    return env


@pytest.fixture(autouse=True)
def clean_knobs_and_log(monkeypatch):
    monkeypatch.delenv("DSINF_BACKEND", raising=False)
    monkeypatch.delenv("DS_KI_FALLBACK", raising=False)
    dispatch._logged.clear()
    yield
    dispatch._logged.clear()


def req(op="linear_layer", device_type="cpu", act_dtype=torch.float16, int8=False, use_triton=False):
    return Request(op=op, device_type=device_type, act_dtype=act_dtype, int8=int8, use_triton=use_triton)


# --- the resolver ---------------------------------------------------------------------------------------

def test_request_function_names():
    assert req().function == "linear_layer_fp16"
    assert req(op="vector_matmul", act_dtype=torch.bfloat16).function == "vector_matmul_bf16"
    assert req(act_dtype=torch.float32, int8=True).function == "linear_layer_fp32"  # int8 uses the act function
    assert req(int8=True).function == "linear_layer_fp16"


def test_compiled_chosen_when_available():
    d = resolve(req(), make_env())
    assert d.backend == "compiled" and d.skipped == () and d.fallbacks == () and not d.forced
    assert d.impl("x")[:2] == ("compiled", "linear_layer_fp16")


def test_no_compiled_module_falls_back_to_torch():
    builder = FakeBuilder(compat=FakeCompat(False, ("ninja is not installed", "no C++ compiler found")))
    d = resolve(req(), make_env(builder))
    assert d.backend == "torch"
    assert d.skipped[0].backend == "compiled" and "ninja is not installed; no C++ compiler found" in d.skipped[0].reason
    assert d.skipped[1] == Skip("triton", "Triton is used only for CUDA tensors (got cpu)")
    assert [s.backend for s in d.fallbacks] == ["compiled"]  # triton on CPU is not a fallback
    assert builder.load_calls == 1  # asked once: a binary built before would load without the build tools


def test_build_failure_is_a_reason_with_its_compiler_errors_and_log():
    """A failed build's reason is its whole BuildError: the op, the first compiler errors, the log - in the
    fallback warning and in the error DS_KI_FALLBACK=0 raises (its first line alone left the user nothing)."""
    from op_builder.errors import BuildError

    err = BuildError("transformer_inference[cpu]", ["x.cpp:1: error: boom"], "missing header", "/tmp/build.log")
    d = resolve(req(), make_env(FakeBuilder(load_error=err)))
    assert d.backend == "torch"
    reason = d.skipped[0].reason
    assert "BuildError: building transformer_inference[cpu] failed: missing header" in reason
    assert "x.cpp:1: error: boom" in reason and "full log: /tmp/build.log" in reason
    with pytest.raises(BackendUnavailableError, match="(?s)error: boom.*full log: /tmp/build.log"):
        resolve(req(), make_env(FakeBuilder(load_error=err)), allow_fallback=False)


def test_unexpected_exception_in_build_is_also_a_reason():
    d = resolve(req(), make_env(FakeBuilder(load_error=OSError("disk full\nmore"))))
    assert d.backend == "torch" and d.skipped[0].reason.endswith("OSError: disk full")


def test_knob_error_in_build_propagates():
    with pytest.raises(KnobError):
        resolve(req(), make_env(FakeBuilder(load_error=KnobError("MAX_JOBS='x' is not an integer"))))


def test_missing_bf16_kernel():
    builder = FakeBuilder(functions=("linear_layer_fp16", "linear_layer_fp32"))
    env = make_env(builder)
    assert resolve(req(act_dtype=torch.float16), env).backend == "compiled"
    d = resolve(req(act_dtype=torch.bfloat16), env)
    assert d.backend == "torch" and "no linear_layer_bf16 kernel" in d.skipped[0].reason


def test_kernel_registered_but_not_exposed():
    env = make_env(FakeBuilder(functions=()), kernels={("linear_layer_fp16", "cpu")})
    d = resolve(req(), env)
    assert d.backend == "torch" and "does not expose linear_layer_fp16" in d.skipped[0].reason


def test_unknown_device_type_has_no_compiled_module_and_is_not_a_fallback():
    builder = FakeBuilder()
    d = resolve(req(device_type="meta"), make_env(builder), allow_fallback=False)
    assert d.backend == "torch" and d.fallbacks == () and builder.compatible_calls == 0


def test_triton_on_cuda_when_compiled_missing():
    env = make_env(FakeBuilder(functions=()), kernels=set())
    d = resolve(req(device_type="cuda", use_triton=True), env)
    assert d.backend == "triton" and d.impl()[0] == "triton"
    assert [s.backend for s in d.skipped] == ["compiled"]


def test_compiled_beats_triton():
    env = make_env()
    d = resolve(req(device_type="cuda", use_triton=True), env)
    assert d.backend == "compiled" and env.imported == []  # triton never looked at


def test_triton_not_installed():
    env = make_env(FakeBuilder(functions=()), kernels=set(), triton_installed=False)
    d = resolve(req(device_type="cuda", use_triton=True), env)
    assert d.backend == "torch"
    assert ("triton", "triton is not installed") in d.fallbacks
    assert env.imported == []  # find_spec said no: dsinf.triton is not imported


def test_use_triton_false_on_cuda_is_policy_not_fallback():
    env = make_env(FakeBuilder(functions=()), kernels=set())
    d = resolve(req(device_type="cuda", use_triton=False), env)
    assert d.backend == "torch" and ("triton", "config.use_triton is False") in d.skipped
    assert [s.backend for s in d.fallbacks] == ["compiled"] and env.imported == []


def test_use_triton_with_cpu_tensors_never_imports_triton():
    env = make_env(FakeBuilder(functions=()), kernels=set())
    d = resolve(req(device_type="cpu", use_triton=True), env)
    assert d.backend == "torch" and env.imported == []
    assert d.skipped[1] == Skip("triton", "Triton is used only for CUDA tensors (got cpu)")


def test_triton_unsupported_dtype_and_int8_asks_both():
    triton = fake_triton(supported=(torch.float16,))
    env = make_env(FakeBuilder(functions=()), kernels=set(), triton=triton)
    d = resolve(req(device_type="cuda", use_triton=True, int8=True), env)
    assert d.backend == "torch"
    assert d.skipped[1].reason == "dsinf.triton does not support int8 on cuda: fake has no torch.int8 on cuda"
    assert triton.asked == [(torch.float16, "cuda", (9, 0)), (torch.int8, "cuda", (9, 0))]
    d = resolve(req(device_type="cuda", use_triton=True, act_dtype=torch.float32), env)
    assert "does not support float32 on cuda" in d.skipped[1].reason


def test_triton_supports_answer_is_read_not_truth_tested():
    # dsinf.triton.supports returns (ok, reason): a (False, ...) tuple is truthy and must still mean no.
    triton = types.SimpleNamespace(supports=lambda dtype, dev, capability=None: (False, "sm_75 < 8.0"),
                                   linear_layer=lambda *a: None)
    d = resolve(req(device_type="cuda", use_triton=True), make_env(FakeBuilder(functions=()), kernels=set(),
                                                                   triton=triton))
    assert d.backend == "torch" and d.skipped[1].reason.endswith(": sm_75 < 8.0")
    # a plain bool answer works too
    triton.supports = lambda dtype, dev, capability=None: True
    d = resolve(req(device_type="cuda", use_triton=True), make_env(FakeBuilder(functions=()), kernels=set(),
                                                                   triton=triton))
    assert d.backend == "triton"


def test_triton_import_failure_is_a_reason():
    env = make_env(FakeBuilder(functions=()), kernels=set())

    def broken():
        raise ImportError("triton 2.0 is too old\ndetails")
    env = Environment(builder=env.builder, has_kernel=env.has_kernel, compiled_op=env.compiled_op,
                      find_spec=env.find_spec, triton_ops=broken)
    d = resolve(req(device_type="cuda", use_triton=True), env)
    assert d.backend == "torch" and "dsinf.triton failed to import: ImportError: triton 2.0 is too old" == \
        d.skipped[1].reason


# --- knobs ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("forced", ["torch", "compiled", "triton"])
def test_forced_backend(monkeypatch, forced):
    monkeypatch.setenv("DSINF_BACKEND", forced)
    builder = FakeBuilder()
    triton = fake_triton(devices=("cuda", "cpu"))  # e.g. the interpreter
    d = resolve(req(device_type="cpu"), make_env(builder, triton=triton))
    assert d.backend == forced and d.forced
    assert {s.backend for s in d.skipped} == set(dispatch.BACKENDS) - {forced}
    assert all(s.reason == f"DSINF_BACKEND={forced}" for s in d.skipped)
    assert builder.load_calls == (1 if forced == "compiled" else 0)  # forcing torch/triton builds nothing


def test_forced_unavailable_raises_with_reason(monkeypatch):
    monkeypatch.setenv("DSINF_BACKEND", "compiled")
    with pytest.raises(BackendUnavailableError, match="DSINF_BACKEND=compiled.*no C\\+\\+ compiler"):
        resolve(req(), make_env(FakeBuilder(compat=FakeCompat(False, ("no C++ compiler found",)))))
    monkeypatch.setenv("DSINF_BACKEND", "triton")
    with pytest.raises(BackendUnavailableError, match="triton is not installed"):
        resolve(req(device_type="cuda"), make_env(triton_installed=False))


def test_forced_raises_even_with_fallback_allowed(monkeypatch):
    monkeypatch.setenv("DSINF_BACKEND", "triton")
    monkeypatch.setenv("DS_KI_FALLBACK", "true")
    with pytest.raises(BackendUnavailableError, match="does not support float16 on cpu"):
        resolve(req(device_type="cpu"), make_env())


def test_bad_backend_knob(monkeypatch):
    monkeypatch.setenv("DSINF_BACKEND", "cuda")
    with pytest.raises(KnobError, match="DSINF_BACKEND"):
        resolve(req(), make_env())


def test_ds_ki_fallback_false_raises_listing_reasons(monkeypatch):
    monkeypatch.setenv("DS_KI_FALLBACK", "False")
    env = make_env(FakeBuilder(load_error=RuntimeError("compiler exploded")))
    with pytest.raises(BackendUnavailableError) as info:
        resolve(req(), env, owner="LinearOp")
    message = str(info.value)
    assert "LinearOp" in message and "DS_KI_FALLBACK=False" in message and "compiler exploded" in message
    # with the compiled kernel present it does not raise: skipping triton on CPU is not a fallback
    assert resolve(req(), make_env()).backend == "compiled"


def test_ds_ki_fallback_true_is_default(monkeypatch):
    assert resolve(req(), make_env(FakeBuilder(load_error=RuntimeError("x")))).backend == "torch"


# --- choose() is pure and lazy --------------------------------------------------------------------------

def test_choose_consumes_probes_lazily():
    seen = []

    def probes():
        for p in (Probe("compiled", reason="nope"), Probe("triton", impl=len), Probe("torch", impl=len)):
            seen.append(p.backend)
            yield p
    d = choose(req(), probes())
    assert d.backend == "triton" and seen == ["compiled", "triton"]


def test_choose_with_nothing_ok_raises():
    with pytest.raises(BackendUnavailableError, match="no backend can run"):
        choose(req(), [Probe("compiled", reason="a"), Probe("torch", reason="b")])


def test_decision_is_frozen_data():
    d = resolve(req(), make_env())
    with pytest.raises(AttributeError):
        d.backend = "torch"
    assert "linear_layer on cpu (float16) -> compiled" == d.explain()
    assert d == resolve(req(), make_env())  # impl does not take part in equality


# --- through the op classes -----------------------------------------------------------------------------

def test_op_decision_is_cached_per_instance_and_key():
    builder = FakeBuilder()
    op = VectorMatMulOp(InferenceConfig(dtype=torch.float32), environment=make_env(builder))
    x, w = torch.randn(1, 2, 4), torch.randn(4, 3)
    for _ in range(5):
        assert op(x, w)[0] == "compiled"
    assert builder.compatible_calls == 1 and builder.load_calls == 1
    assert op.backend == "compiled" and op.decision.request.function == "vector_matmul_fp32"
    op.config.dtype = torch.float16  # a new (device, dtype) key: resolved once more
    op(x.half(), w.half())
    assert builder.load_calls == 2 and op.decision.request.act_dtype is torch.float16


def test_op_resolves_again_after_a_config_change():
    # config.version's promise: a changed field is seen by the next decision. use_triton is not part of the
    # cache key (device type, dtype, activation dtype); the decision must still follow it.
    op = LinearOp(InferenceConfig(), device="cuda",
                  environment=make_env(FakeBuilder(functions=()), kernels=set()))
    assert op.backend == "torch" and Skip("triton", "config.use_triton is False") in op.decision.skipped
    op.config.use_triton = True
    assert op.backend == "triton" and op.decision.request.use_triton  # .decision follows the config
    op.config.use_triton = False
    assert op.resolve("cuda").backend == "torch"  # as does resolve(), which the first call of a device makes


def test_op_call_after_a_config_change_resolves_again_then_binds_once():
    builder = FakeBuilder()
    op = VectorMatMulOp(InferenceConfig(dtype=torch.float32), environment=make_env(builder))
    x, w = torch.randn(1, 2, 4), torch.randn(4, 3)
    op(x, w)
    op.config.use_triton = True  # same cache key (cpu, float32, float32)
    for _ in range(3):
        assert op(x, w)[0] == "compiled"
    assert builder.compatible_calls == 2  # decided again once, on the first call after the change
    assert op.decision.request.use_triton


def test_op_resolves_at_construction_with_device():
    builder = FakeBuilder()
    op = LinearOp(InferenceConfig(), device="cpu", environment=make_env(builder))
    assert builder.load_calls == 1 and op.backend == "compiled"


def test_op_construction_without_device_probes_nothing():
    builder = FakeBuilder()
    LinearOp(InferenceConfig(), environment=make_env(builder))
    assert builder.compatible_calls == 0


def test_op_passes_deepspeed_positional_order_plus_extensions():
    cfg = InferenceConfig(dtype=torch.float32, transposed_mode=True, rope_theta=5e5, rotary_dim=4, rotate_half=True,
                          num_kv=1)
    op = LinearOp(cfg, environment=make_env())
    x, w, b = torch.randn(1, 2, 8), torch.randn(16, 8), torch.randn(16)
    backend, name, args = op(x, w, b, True, True, 2, None, None, seq_offset=3)
    assert (backend, name) == ("compiled", "linear_layer_fp32")
    assert args[0] is x and args[1] is w and args[2] is b
    assert args[3:] == (True, True, 2, True, 5e5, 4, True, 1, 3)  # q_scale: the default

    q = __import__("dsinf").quantize_int8(torch.randn(8, 6))
    vm = VectorMatMulOp(InferenceConfig(dtype=torch.int8, act_dtype=torch.float32), environment=make_env())
    backend, name, args = vm(x, q, True)
    # the fast path calls through the lean entry's arguments (VectorMatMulOp SPEC.lean): async_op, a hint
    # every backend ignores, is not passed
    assert name == "vector_matmul_fp32" and args[1] is q and args[2:] == (False, q.scale, True, False)


def test_fallback_logged_once_per_op_class_and_reason(caplog):
    caplog.set_level(logging.WARNING, logger="dsinf")
    env = make_env(FakeBuilder(compat=FakeCompat(False, ("no C++ compiler found",))))
    x, w = torch.randn(1, 1, 4), torch.randn(4, 4)
    for _ in range(3):
        VectorMatMulOp(InferenceConfig(dtype=torch.float32), environment=env)(x, w)
    LinearOp(InferenceConfig(dtype=torch.float32), environment=env)(x, w, None, False, False, None)
    records = [r for r in caplog.records if r.name == "dsinf"]
    assert [r.getMessage().split(":")[0] for r in records] == ["VectorMatMulOp", "LinearOp"]
    assert "no C++ compiler found" in records[0].getMessage() and records[0].levelno == logging.WARNING


def test_no_log_without_fallback(caplog):
    caplog.set_level(logging.DEBUG, logger="dsinf")
    VectorMatMulOp(InferenceConfig(dtype=torch.float32), environment=make_env())(torch.randn(1, 1, 4),
                                                                                 torch.randn(4, 4))
    assert not [r for r in caplog.records if r.name == "dsinf"]


def test_op_ds_ki_fallback_false_raises_on_first_call(monkeypatch):
    monkeypatch.setenv("DS_KI_FALLBACK", "0")
    op = VectorMatMulOp(InferenceConfig(dtype=torch.float32),
                        environment=make_env(FakeBuilder(compat=FakeCompat(False, ("no ninja",)))))
    with pytest.raises(BackendUnavailableError, match="VectorMatMulOp.*no ninja"):
        op(torch.randn(1, 1, 4), torch.randn(4, 4))


def _fake_autotune(monkeypatch):
    calls = []
    fake = types.SimpleNamespace(autotune_linear=lambda *a, **kw: calls.append(("linear", a, kw)) or "L",
                                 autotune_vector_matmul=lambda *a, **kw: calls.append(("vm", a, kw)) or "V")
    monkeypatch.setitem(sys.modules, "dsinf.triton", fake)
    return calls


def test_triton_autotune_runs_when_triton_is_chosen_for_layer_0(monkeypatch):
    calls = _fake_autotune(monkeypatch)
    env = make_env(FakeBuilder(functions=()), kernels=set())
    cfg = InferenceConfig(use_triton=True, triton_autotune=True, layer_id=0, hidden_size=64, max_out_tokens=128)
    LinearOp(cfg, device="cuda", environment=env)
    VectorMatMulOp(cfg, device="cuda", environment=env)
    assert calls == [("linear", (2, 128, 64, torch.float16), {"transposed_mode": False}),
                     ("vm", (2, 128, 64, torch.float16), {"transposed_mode": False})]
    LinearOp(InferenceConfig(use_triton=True, triton_autotune=True, layer_id=1, hidden_size=64), device="cuda",
             environment=env)
    LinearOp(InferenceConfig(use_triton=True, layer_id=0, hidden_size=64), device="cuda", environment=env)
    assert len(calls) == 2  # only layer 0 with triton_autotune warms the table, as in DeepSpeed


def test_triton_autotune_tunes_the_configs_key(monkeypatch):
    # The table is keyed by weight dtype, layout and shape: warm what the op will actually run.
    calls = _fake_autotune(monkeypatch)
    cfg = InferenceConfig(use_triton=True, triton_autotune=True, layer_id=0, hidden_size=64, heads=4, num_kv=1,
                          dtype=torch.int8, act_dtype=torch.bfloat16, transposed_mode=True)
    LinearOp(cfg, device="cuda", environment=make_env(FakeBuilder(functions=()), kernels=set()))
    assert calls == [("linear", (2, 1024, 64, torch.int8),
                      {"transposed_mode": True, "act_dtype": torch.bfloat16, "out_features": (4 + 2) * 16})]


def test_triton_autotune_static_methods_delegate(monkeypatch):
    calls = _fake_autotune(monkeypatch)
    assert LinearOp._triton_autotune(2, 64, 32, torch.bfloat16) == "L"
    assert VectorMatMulOp._triton_autotune(1, 8, 16, transposed_mode=True) == "V"
    assert calls == [("linear", (2, 64, 32, torch.bfloat16), {}),
                     ("vm", (1, 8, 16, torch.float16), {"transposed_mode": True})]


# --- the real machine -----------------------------------------------------------------------------------

def test_real_environment_resolves_compiled_on_cpu():
    # The test machine has a C++ compiler: the real dispatch must find the compiled kernel, not fall back
    # (every op and dtype: tests/test_compiled_path.py).
    d = resolve(req(act_dtype=torch.float32))
    assert d.backend == "compiled" and d.fallbacks == (), d.explain()


def test_real_forced_torch(monkeypatch):
    monkeypatch.setenv("DSINF_BACKEND", "torch")
    from dsinf import reference
    assert resolve(req()).impl is reference.linear_layer


def test_op_without_triton_is_not_applicable_never_a_fallback(monkeypatch):
    # An op whose spec has no Triton implementation: use_triton=True on CUDA skips Triton as "not
    # applicable" - no WARNING, and DS_KI_FALLBACK=False does not raise.
    from dataclasses import replace

    from dsinf.ops import spec

    no_triton = replace(spec.get("vector_matmul"), triton=None)
    monkeypatch.setitem(spec.specs(), "vector_matmul", no_triton)
    builder = FakeBuilder(compat=FakeCompat(False, ("no compiler",)))
    d = resolve(req(op="vector_matmul", device_type="cuda", use_triton=True), make_env(builder))
    assert Skip("triton", "vector_matmul has no Triton implementation") in d.skipped
    assert [s.backend for s in d.fallbacks] == ["compiled"]
    d = resolve(req(op="vector_matmul", device_type="cuda", use_triton=True), make_env(), allow_fallback=False)
    assert d.backend == "compiled"
    with pytest.raises(BackendUnavailableError, match="no Triton implementation"):
        resolve(req(op="vector_matmul", device_type="cuda"), make_env(), backend="triton")


# A triton that is installed but cannot be imported (a missing libtriton.so, a wheel for another Python):
# find_spec finds it, and the first import raises. A real package in a child process, first on the path.
BROKEN_TRITON_CHILD = r"""
import json, os, types, torch
import dsinf
from dsinf.dispatch import BackendUnavailableError, Environment, Request, resolve

# Only what this machine lacks is stood in for: a CUDA build and a GPU's capability. dsinf.triton, the
# import of triton and the probes are the real ones.
no_cuda_build = types.SimpleNamespace(compatible=lambda dev: types.SimpleNamespace(ok=False, reasons=("no GPU",)))
env = Environment(builder=lambda: no_cuda_build, cuda_capability=lambda: (9, 0))
request = Request(op="linear_layer", device_type="cuda", act_dtype=torch.float16, use_triton=True)
out = {}
d = resolve(request, env, backend="auto", allow_fallback=True)
out["auto"] = [d.backend, dict(d.fallbacks).get("triton")]
for name, kw in (("forced", {"backend": "triton"}), ("no_fallback", {"backend": "auto", "allow_fallback": False})):
    try:
        out[name] = "resolved to " + resolve(request, env, **kw).backend
    except BackendUnavailableError as exc:
        out[name] = "BackendUnavailableError: " + str(exc)
# An op on CPU tensors with DSINF_BACKEND=triton under the interpreter: the real environment end to end.
os.environ["DSINF_BACKEND"] = "triton"
try:
    dsinf.VectorMatMulOp(dsinf.InferenceConfig(dtype=torch.float32))(torch.randn(1, 1, 8), torch.randn(8, 4))
    out["op"] = "ran"
except BackendUnavailableError as exc:
    out["op"] = "BackendUnavailableError: " + str(exc)
print(json.dumps(out))
"""


def test_broken_triton_install_is_a_fallback_reason(tmp_path):
    broken = tmp_path / "site" / "triton"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text('raise ImportError("libtriton.so: cannot open shared object file")\n')
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(broken.parent), str(root)]), TRITON_INTERPRET="1")
    for name in ("DSINF_BACKEND", "DS_KI_FALLBACK"):
        env.pop(name, None)
    proc = subprocess.run([sys.executable, "-c", BROKEN_TRITON_CHILD], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    reason = "dsinf.triton failed to import: ImportError: libtriton.so: cannot open shared object file"
    assert out["auto"] == ["torch", reason], out
    assert out["forced"].startswith("BackendUnavailableError: DSINF_BACKEND=triton") and reason in out["forced"], out
    assert "DS_KI_FALLBACK=False" in out["no_fallback"] and reason in out["no_fallback"], out
    assert out["op"].startswith("BackendUnavailableError: VectorMatMulOp: DSINF_BACKEND=triton"), out
    assert reason in out["op"], out


NO_NINJA_OP = """
import sys
sys.modules["ninja"] = None  # the ninja wheel gone too
import torch, dsinf
op = dsinf.VectorMatMulOp(dsinf.InferenceConfig(dtype=torch.float32))
x, w = torch.randn(1, 2, 8), torch.randn(8, 4)
torch.testing.assert_close(op(x, w), x @ w)
print(op.backend)
"""


def test_an_op_runs_the_cached_module_without_the_build_tools(cpu_module, tmp_path):
    """The op classes asked whether this machine could build the module before loading it: with ninja gone
    the module already built (cached) was passed over for torch ('cannot be built here')."""
    from fixtures.procs import REPO, path_without_ninja, run

    env = {**os.environ, "PATH": str(path_without_ninja(tmp_path)), "PYTHONPATH": str(REPO)}
    r = run([sys.executable, "-c", NO_NINJA_OP], env, timeout=300)
    assert r.rc == 0 and r.stdout.strip().splitlines()[-1] == "compiled", r
