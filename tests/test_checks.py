"""One table of bad inputs, run against every way into the ops: `dsinf.reference`, the op classes
(`LinearOp` / `VectorMatMulOp`) and the compiled `torch.ops.dsinf.*` functions (through the `cpu_module`
fixture from tests/conftest.py: every CPU dtype's function must be compiled; one missing fails).

Each case starts from a valid call (checked to pass in every runner, so a case fails for its own
reason) and breaks one thing. Python raises `InputError` (a ValueError) with `.arg`; the C++ bindings
raise ValueError; both say "argument '<name>'". The "other device" is 'meta', so this runs on CPU-only
machines.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch

from dsinf import LinearOp, VectorMatMulOp, reference
from dsinf.checks import InputError
from dsinf.config import InferenceConfig
from dsinf.library import has_kernel
from dsinf.quantize import quantize_int8

B, S, H, D = 2, 3, 2, 4
K = H * D  # 8
N_QKV = 3 * K  # 24
N_VM = 6


def linear_args(**changes) -> dict:
    g = torch.Generator().manual_seed(0)
    args = dict(input=torch.randn(B, S, K, generator=g), weight=torch.randn(K, N_QKV, generator=g),
                bias=torch.randn(N_QKV, generator=g), add_bias=True, do_flash_attn=True, num_heads=H,
                transposed_mode=False, rope_theta=10000.0, rotary_dim=4, rotate_half=True, num_kv=-1,
                seq_offset=0, q_scale=None)
    args.update(changes)
    return args


def vm_args(**changes) -> dict:
    g = torch.Generator().manual_seed(1)
    args = dict(input=torch.randn(B, S, K, generator=g), weight=torch.randn(K, N_VM, generator=g), async_op=False,
                q_scale=None, q_int8=False, transposed_mode=False)
    args.update(changes)
    return args


def int8_weight(N: int, groups: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    q = quantize_int8(torch.randn(N, K, generator=torch.Generator().manual_seed(2)), groups, transposed_mode=True)
    return q.view_as(q), q.scale  # a fresh tensor object: no .scale attribute


def _int8(args: dict, N: int, groups=None, **changes) -> dict:
    w, s = int8_weight(N, groups)
    args.update(weight=w, q_scale=s)
    args.update(changes)
    if "q_int8" in args:
        args["q_int8"] = True
    return args


@dataclass
class Case:
    id: str
    op: str  # "linear" | "vm"
    arg: str  # the argument the error must name
    make: Callable[[], dict]
    op_arg: str | None = None  # the name the op classes report, when it differs (they read weight.scale)
    via_op: bool = True  # expressible through an op class (config values are validated earlier)
    compiled: bool = True  # expressible through the typed schema


LIN, VM = "linear", "vm"

CASES = [
    # input
    Case("input-float64", LIN, "input", lambda: linear_args(input=torch.randn(B, S, K, dtype=torch.float64))),
    Case("input-int32", VM, "input", lambda: vm_args(input=torch.ones(B, S, K, dtype=torch.int32))),
    Case("input-2d", LIN, "input", lambda: linear_args(input=torch.randn(S, K))),
    Case("input-4d", VM, "input", lambda: vm_args(input=torch.randn(1, B, S, K))),
    Case("input-not-tensor", VM, "input", lambda: vm_args(input=[[1.0] * K]), compiled=False),
    # not strided: the dispatcher sends these to dsinf.library's kernels for those layouts, which name them
    Case("input-sparse", VM, "input", lambda: vm_args(input=torch.randn(B, S, K).to_sparse())),
    Case("input-nested", LIN, "input", lambda: linear_args(
        input=torch.nested.nested_tensor([torch.randn(S, K), torch.randn(S + 1, K)]))),
    Case("weight-sparse-csr", LIN, "weight", lambda: linear_args(weight=torch.randn(K, N_QKV).to_sparse_csr())),
    Case("weight-mkldnn", VM, "weight", lambda: vm_args(weight=torch.randn(K, N_VM).to_mkldnn())),
    # weight
    Case("weight-other-device", LIN, "weight", lambda: linear_args(weight=torch.randn(K, N_QKV, device="meta"))),
    Case("weight-other-device", VM, "weight", lambda: vm_args(weight=torch.randn(K, N_VM, device="meta"))),
    Case("weight-dtype", VM, "weight", lambda: vm_args(weight=torch.randn(K, N_VM, dtype=torch.float16))),
    Case("weight-3d", VM, "weight", lambda: vm_args(weight=torch.randn(1, K, N_VM))),
    Case("weight-noncontiguous", LIN, "weight", lambda: linear_args(weight=torch.randn(N_QKV, K).t())),
    Case("weight-noncontiguous", VM, "weight", lambda: vm_args(weight=torch.randn(N_VM, K).t())),
    Case("weight-K-mismatch", LIN, "weight", lambda: linear_args(weight=torch.randn(K + 1, N_QKV))),
    Case("weight-K-mismatch-transposed", VM, "weight",
         lambda: vm_args(weight=torch.randn(K, N_VM), transposed_mode=True)),
    Case("weight-not-qkv-width", LIN, "weight", lambda: linear_args(weight=torch.randn(K, N_QKV + 2),
                                                                    bias=torch.randn(N_QKV + 2))),
    Case("weight-int8-in-KN-layout", VM, "weight",  # int8 is always [N, K]; [K, N] with N != K is a K mismatch
         lambda: _int8(vm_args(), N_VM, weight=torch.zeros(K, N_VM, dtype=torch.int8))),
    # bias
    Case("bias-missing", LIN, "bias", lambda: linear_args(bias=None)),
    Case("bias-shape", LIN, "bias", lambda: linear_args(bias=torch.randn(N_QKV - 1))),
    Case("bias-2d", LIN, "bias", lambda: linear_args(bias=torch.randn(1, N_QKV))),
    Case("bias-dtype", LIN, "bias", lambda: linear_args(bias=torch.randn(N_QKV, dtype=torch.float16))),
    Case("bias-other-device", LIN, "bias", lambda: linear_args(bias=torch.randn(N_QKV, device="meta"))),
    Case("bias-noncontiguous", LIN, "bias", lambda: linear_args(bias=torch.randn(N_QKV, 2)[:, 0])),
    Case("bias-sparse", LIN, "bias", lambda: linear_args(bias=torch.randn(N_QKV).to_sparse())),
    # heads / GQA
    Case("K-not-divisible-by-heads", LIN, "num_heads", lambda: linear_args(num_heads=3)),
    Case("num-heads-zero", LIN, "num_heads", lambda: linear_args(num_heads=0)),
    Case("num-kv-not-divisor", LIN, "num_kv", lambda: linear_args(num_heads=4, num_kv=3, rotary_dim=-1)),
    Case("num-kv-above-heads", LIN, "num_kv", lambda: linear_args(num_kv=4)),
    Case("num-kv-zero", LIN, "num_kv", lambda: linear_args(num_kv=0), via_op=False),  # config refuses 0
    # RoPE
    Case("rotary-dim-odd", LIN, "rotary_dim", lambda: linear_args(rotary_dim=3), via_op=False),
    Case("rotary-dim-above-D", LIN, "rotary_dim", lambda: linear_args(rotary_dim=D + 2)),
    Case("rope-theta-zero", LIN, "rope_theta", lambda: linear_args(rope_theta=0.0), via_op=False),
    Case("rope-theta-negative", LIN, "rope_theta", lambda: linear_args(rope_theta=-1.0), via_op=False),
    Case("seq-offset-negative", LIN, "seq_offset", lambda: linear_args(seq_offset=-1)),
    Case("seq-offset-near-2**63", LIN, "seq_offset", lambda: linear_args(seq_offset=2**63 - 2)),  # + S overflows
    Case("seq-offset-2**63", LIN, "seq_offset", lambda: linear_args(seq_offset=2**63), compiled=False),
    Case("seq-offset-float", LIN, "seq_offset", lambda: linear_args(seq_offset=1.5), compiled=False),
    # integers: type and range before any arithmetic
    Case("num-heads-above-K", LIN, "num_heads", lambda: linear_args(num_heads=K + 1)),
    Case("num-heads-huge", LIN, "num_heads", lambda: linear_args(num_heads=2**62)),
    Case("num-heads-str", LIN, "num_heads", lambda: linear_args(num_heads="4"), compiled=False),
    Case("num-heads-2**64", LIN, "num_heads", lambda: linear_args(num_heads=2**64), compiled=False),
    Case("num-heads-bool", LIN, "num_heads", lambda: linear_args(num_heads=True), compiled=False),
    # int8
    Case("int8-without-scale", VM, "q_scale", lambda: _int8(vm_args(), N_VM, q_scale=None), op_arg="weight"),
    Case("int8-without-scale", LIN, "q_scale", lambda: _int8(linear_args(), N_QKV, q_scale=None), op_arg="weight"),
    Case("scale-dtype", VM, "q_scale", lambda: _int8(vm_args(), N_VM, q_scale=torch.ones(N_VM, dtype=torch.float16))),
    Case("scale-2d", VM, "q_scale", lambda: _int8(vm_args(), N_VM, q_scale=torch.ones(1, N_VM))),
    Case("scale-empty", VM, "q_scale", lambda: _int8(vm_args(), N_VM, q_scale=torch.ones(0))),
    Case("scale-other-device", VM, "q_scale", lambda: _int8(vm_args(), N_VM, q_scale=torch.ones(N_VM, device="meta"))),
    Case("scale-noncontiguous", VM, "q_scale", lambda: _int8(vm_args(), N_VM, q_scale=torch.ones(N_VM, 2)[:, 0])),
    Case("N-not-divisible-by-G", VM, "q_scale", lambda: _int8(vm_args(), N_VM, q_scale=torch.ones(4))),
    Case("N-not-divisible-by-G", LIN, "q_scale", lambda: _int8(linear_args(), N_QKV, q_scale=torch.ones(5))),
    Case("q_int8-with-float-weight", VM, "weight", lambda: vm_args(q_int8=True, q_scale=torch.ones(N_VM)),
         via_op=False),
    Case("int8-weight-without-q_int8", VM, "weight", lambda: {**_int8(vm_args(), N_VM), "q_int8": False},
         via_op=False),
]

VALID = [Case("valid", LIN, "", linear_args), Case("valid-int8", LIN, "", lambda: _int8(linear_args(), N_QKV, 3)),
         Case("valid", VM, "", vm_args), Case("valid-int8", VM, "", lambda: _int8(vm_args(), N_VM, 2))]


def _ids(cases):
    return [f"{c.op}-{c.id}" for c in cases]


# --- runners ---------------------------------------------------------------------------------------------

def run_reference(case: Case):
    args = case.make()
    fn = reference.linear_layer if case.op == LIN else reference.vector_matmul
    return fn(**args)


def _config_for(args: dict) -> InferenceConfig:
    inp, weight = args["input"], args["weight"]
    act = inp.dtype if isinstance(inp, torch.Tensor) and inp.dtype in (
        torch.float32, torch.float16, torch.bfloat16) else torch.float32
    int8 = isinstance(weight, torch.Tensor) and weight.dtype == torch.int8
    extra = {}
    if "rotary_dim" in args:
        extra = dict(rope_theta=args["rope_theta"], rotary_dim=args["rotary_dim"], rotate_half=args["rotate_half"],
                     num_kv=args["num_kv"])
    return InferenceConfig(dtype=torch.int8 if int8 else act, act_dtype=act if int8 else None,
                           transposed_mode=args["transposed_mode"], **extra)


def run_op_class(case: Case):
    args = case.make()
    weight = args["weight"]
    if isinstance(weight, torch.Tensor) and weight.layout == torch.strided:
        weight = weight.view_as(weight)  # a fresh tensor object: no .scale unless we attach it
        if args["q_scale"] is not None:
            weight.scale = args["q_scale"]
    cfg = _config_for(args)
    if case.op == LIN:
        return LinearOp(cfg)(args["input"], weight, args["bias"], args["add_bias"], args["do_flash_attn"],
                             args["num_heads"], seq_offset=args["seq_offset"])
    return VectorMatMulOp(cfg)(args["input"], weight, args["async_op"])


def run_compiled(case: Case):
    args = case.make()
    inp = args["input"]
    suffix = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(inp.dtype, "fp32")
    name = f"{'linear_layer' if case.op == LIN else 'vector_matmul'}_{suffix}"
    assert has_kernel(name, "cpu"), f"the CPU module registers no {name} kernel"
    return getattr(torch.ops.dsinf, name)(*args.values())


@pytest.fixture
def torch_backend(monkeypatch):
    # Validation happens before dispatch; forcing the reference keeps a missed check from building anything.
    monkeypatch.setenv("DSINF_BACKEND", "torch")


def _expect(run, case: Case, arg: str, python: bool):
    with pytest.raises(ValueError, match=f"argument '{arg}'") as info:
        run(case)
    if python:
        assert isinstance(info.value, InputError) and info.value.arg == arg


# --- tests -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", VALID, ids=_ids(VALID))
def test_valid_baselines_pass(case, torch_backend):
    run_reference(case)
    run_op_class(case)


@pytest.mark.parametrize("case", VALID, ids=_ids(VALID))
def test_valid_baselines_pass_compiled(case, cpu_module):
    run_compiled(case)


@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_reference_rejects(case):
    _expect(run_reference, case, case.arg, python=True)


@pytest.mark.parametrize("case", [c for c in CASES if c.via_op], ids=_ids([c for c in CASES if c.via_op]))
def test_op_classes_reject(case, torch_backend):
    _expect(run_op_class, case, case.op_arg or case.arg, python=True)


@pytest.mark.parametrize("case", [c for c in CASES if c.compiled], ids=_ids([c for c in CASES if c.compiled]))
def test_compiled_rejects(case, cpu_module):
    _expect(run_compiled, case, case.arg, python=False)


def _message(run, case: Case) -> str:
    with pytest.raises(ValueError) as info:
        run(case)
    return str(info.value).split(": argument ", 1)[1]  # without the op name, which differs by design


# The compiled functions are per activation dtype ("expected dtype float32"); the reference takes any of the
# three ("dtype float64 is not supported"): a different rule, not a different wording.
SAME_RULE = [c for c in CASES if c.compiled and c.id not in ("input-float64", "input-int32")]


@pytest.mark.parametrize("case", SAME_RULE, ids=_ids(SAME_RULE))
def test_python_and_cpp_messages_are_the_same(case, cpu_module):
    # One wording (dtype names included: "float64", never "Double") whichever way the op was called.
    assert _message(run_compiled, case) == _message(run_reference, case)


@pytest.fixture
def compiled_backend(monkeypatch, cpu_module):
    monkeypatch.setenv("DSINF_BACKEND", "compiled")


@pytest.mark.parametrize("case", [c for c in CASES if c.via_op], ids=_ids([c for c in CASES if c.via_op]))
def test_op_classes_reject_on_the_compiled_backend(case, compiled_backend):
    # The compiled backend's own (C++) validation is the check on its fast path; what C++ cannot see
    # (Python ints beyond int64, a str, the config's int8 rule) is named by the Python checks.
    _expect(run_op_class, case, case.op_arg or case.arg, python=False)


# Op-class-only rules: the config and the weight must agree on int8; the input dtype must be the config's.
OP_ONLY = [
    pytest.param(lambda: VectorMatMulOp(InferenceConfig(dtype=torch.int8, act_dtype=torch.float32))(
        torch.randn(B, S, K), torch.randn(K, N_VM)), "weight", id="config-int8-float-weight"),
    pytest.param(lambda: LinearOp(InferenceConfig(dtype=torch.float32))(
        torch.randn(B, S, K), quantize_int8(torch.randn(K, N_QKV)), None, False, False, None), "weight",
        id="config-fp32-int8-weight"),
    pytest.param(lambda: VectorMatMulOp(InferenceConfig(dtype=torch.float16))(
        torch.randn(B, S, K), torch.randn(K, N_VM)), "input", id="input-not-config-dtype"),
    pytest.param(lambda: LinearOp(InferenceConfig(dtype=torch.int8, act_dtype=torch.bfloat16))(
        torch.randn(B, S, K, dtype=torch.float16), quantize_int8(torch.randn(K, N_QKV)), None, False, False, None),
        "input", id="input-not-config-act-dtype"),
    pytest.param(lambda: LinearOp(InferenceConfig(dtype=torch.float32))(
        torch.randn(B, S, K), torch.randn(K, N_QKV), None, False, True, None), "num_heads", id="num-heads-none"),
]


@pytest.mark.parametrize("call,arg", OP_ONLY)
def test_op_class_only_rules(call, arg, torch_backend):
    with pytest.raises(InputError, match=f"argument '{arg}'") as info:
        call()
    assert info.value.arg == arg


@pytest.mark.parametrize("backend", ["torch", "compiled"])
@pytest.mark.parametrize("which", ["input", "weight", "bias"])
def test_inference_only_on_every_backend(backend, which, monkeypatch, request):
    if backend == "compiled":
        request.getfixturevalue("cpu_module")
    monkeypatch.setenv("DSINF_BACKEND", backend)
    args = linear_args(do_flash_attn=False)
    args[which] = args[which].clone().requires_grad_(True)
    op = LinearOp(InferenceConfig(dtype=torch.float32))
    call = lambda: op(args["input"], args["weight"], args["bias"], True, False, H)  # noqa: E731
    with pytest.raises(InputError, match="inference-only") as info:
        call()
    assert info.value.arg == which and op.backend == backend
    want = reference.linear_layer(*[a.detach() if isinstance(a, torch.Tensor) else a
                                    for a in linear_args(do_flash_attn=False).values()])[0]
    with torch.no_grad():
        torch.testing.assert_close(call()[0], want)
    with torch.inference_mode():
        torch.testing.assert_close(call()[0], want)
    vm = VectorMatMulOp(InferenceConfig(dtype=torch.float32))
    x = torch.randn(B, S, K, requires_grad=True)
    with pytest.raises(InputError, match="inference-only"):
        vm(x, torch.randn(K, N_VM))


def test_int8_without_scale_is_never_a_raw_matmul(torch_backend):
    # DeepSpeed's VectorMatMulOp ran torch.matmul on the raw int8 values when the scale was missing.
    w, _ = int8_weight(N_VM)
    op = VectorMatMulOp(InferenceConfig(dtype=torch.int8, act_dtype=torch.float32, transposed_mode=True))
    with pytest.raises(InputError, match="scale"):
        op(torch.randn(B, S, K), w)


def test_message_names_op_and_argument():
    err = InputError("linear_layer_fp16", "weight", "must be contiguous")
    assert str(err) == "linear_layer_fp16: argument 'weight': must be contiguous"
    assert isinstance(err, ValueError) and err.op == "linear_layer_fp16"
