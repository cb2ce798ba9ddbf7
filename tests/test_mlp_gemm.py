"""rms_mlp_gemm / MLPGemmOp (dsinf/ops/mlp_gemm.py): the reference against float64 written out below, then
every way into the op against the reference - `MLPGemmOp` on the compiled CPU backend (asserted to be what
ran), the module functions `rms_mlp_gemm_{fp32,fp16,bf16}` (DeepSpeed's positional signature), opcheck,
torch.compile - the config rules, and one table of bad inputs run through Python and C++ with the same
wording. GPU parity tests carry the `gpu` marker (skipped without CUDA).

M = B*S walks both paths of each binding: the gated GEMV (decode: CPU up to its GEMV crossover, 16-32;
CUDA up to 8) and the GEMM + gated epilogue (M = 40, 72 on CPU; 17, 64 on CUDA).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

from dsinf import MLPGemmOp, reference
from dsinf.checks import InputError
from dsinf.config import ActivationFuncType, InferenceConfig, NormType
from dsinf.ops import spec as op_spec
from dsinf.quantize import quantize_int8
from fixtures.profiled import dsinf_ops_run
from test_rms_norm import randn, rel_err

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
SUFFIX = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
GELU, SILU = int(ActivationFuncType.GATED_GELU), int(ActivationFuncType.GATED_SILU)
# max |got - want| / max |want|. Kernels and reference round h, a and the output to the dtype at the same
# places; they differ by fp32 summation order, and a one-ulp flip of h or a (fp16 2^-10, bf16 2^-7 of the
# value) moves the output by about that much again through the second GEMM.
TOL = {torch.float32: 5e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
# Reference vs float64 (which rounds only where the reference documents it): three roundings stacked.
TOL64 = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
CUDA = pytest.mark.gpu


def make_case(B, S, K, I, dtype, layout, groups=None, gen=None, device="cpu", contiguous=True):
    """(input, residual, W_interm, W_out, gamma, q_scale, q_scale1) in `layout` 'kn' | 'nk' | 'int8'.
    int8 weights carry `.scale` too (the op class reads it)."""
    x = randn(B, S, K, dtype=dtype, gen=gen, device=device)
    r = randn(B, S, K, dtype=dtype, gen=gen, scale=2.0, device=device)
    if not contiguous:
        x = randn(B, S, 2 * K, dtype=dtype, gen=gen, device=device)[..., ::2]
        r = randn(B, S, 2 * K, dtype=dtype, gen=gen, scale=2.0, device=device)[..., 1::2]
    g = randn(K, dtype=dtype, gen=gen, device=device)
    w1 = randn(2 * I, K, gen=gen, scale=K ** -0.5)  # [up; gate] rows, nn.Linear layout
    w2 = randn(K, I, gen=gen, scale=I ** -0.5)
    if layout == "int8":
        q1 = quantize_int8(w1, groups, transposed_mode=True)
        q2 = quantize_int8(w2, None, transposed_mode=True)
        out = []
        for q in (q1, q2):
            moved = q.to(device)
            moved.scale = q.scale.to(device)
            out.append(moved)
        return x, r, out[0], out[1], g, out[0].scale, out[1].scale
    if layout == "nk":
        return x, r, w1.to(device, dtype), w2.to(device, dtype), g, None, None
    return x, r, w1.t().contiguous().to(device, dtype), w2.t().contiguous().to(device, dtype), g, None, None


def config(dtype, layout, activation=SILU, **extra) -> InferenceConfig:
    int8 = layout == "int8"
    return InferenceConfig(dtype=torch.int8 if int8 else dtype, act_dtype=dtype if int8 else None,
                           transposed_mode=layout == "nk", norm_type=NormType.RMSNorm, mlp_act_func_type=activation,
                           layer_norm_eps=1e-5, **extra)


def ref_args(case, layout, activation):
    x, r, w1, w2, g, s1, s2 = case
    return (x, r, w1, w2, g, 1e-5, s1, s2, layout == "int8", activation, layout == "nk")


def assert_close(got, want, dtype):
    assert isinstance(got, list) and len(got) == 2
    out, res = got
    assert out.shape == want[0].shape and out.dtype == want[0].dtype and out.device == want[0].device
    assert out.is_contiguous() and res.is_contiguous()
    assert torch.equal(res, want[1])  # one fp32 add, rounded once: exact
    err = rel_err(out, want[0])
    assert err <= TOL[dtype], f"relative error {err:.3g} > {TOL[dtype]:.1g}"


# --- the reference --------------------------------------------------------------------------------------

def mlp64(x, resid, w1, w2, g, eps, s1, s2, q_int8, act, transposed):
    """float64 from the definition, rounding only where the reference documents it (r, h, a, output)."""
    dtype = x.dtype
    res = (x.double() + resid.double()).to(dtype)
    rows = res.double()
    h = (rows / torch.sqrt(rows.pow(2).mean(-1, keepdim=True) + eps) * g.double()).to(dtype).double()

    def as_kn(w, s):
        if q_int8:
            return (w.double() * s.double().repeat_interleave(w.shape[0] // s.shape[0])[:, None]).t()
        return w.double().t() if transposed else w.double()

    t = h @ as_kn(w1, s1)
    I = t.shape[-1] // 2
    up, gate = t[..., :I], t[..., I:]
    if act == SILU:
        a = gate / (1 + torch.exp(-gate)) * up
    else:
        a = 0.5 * gate * (1 + torch.special.erf(gate / math.sqrt(2))) * up
    return (a.to(dtype).double() @ as_kn(w2, s2)).to(dtype), res


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", ["kn", "nk", "int8"])
@pytest.mark.parametrize("activation", [GELU, SILU], ids=["gelu", "silu"])
@pytest.mark.parametrize("B,S", [(1, 1), (2, 3), (0, 4)])
def test_reference_matches_float64(dtype, layout, activation, B, S):
    gen = torch.Generator().manual_seed(B + S + activation)
    args = ref_args(make_case(B, S, 67, 45, dtype, layout, 9 if layout == "int8" else None, gen), layout, activation)
    out, res = reference.rms_mlp_gemm(*args)
    assert out.shape == res.shape == args[0].shape and out.dtype == dtype
    if B:
        want_out, want_res = mlp64(*args)
        assert torch.equal(res, want_res)
        assert rel_err(out, want_out) <= TOL64[dtype]


# --- the compiled CPU backend -----------------------------------------------------------------------------

def make_op(cfg, device="cpu", monkeypatch=None):
    if monkeypatch is not None:
        monkeypatch.delenv("DSINF_BACKEND", raising=False)
    op = MLPGemmOp(cfg)
    op.resolve(device)
    assert op.backend == "compiled", op.decision.explain()  # a test of the compiled path fails without it
    return op


def run_op(op, case):
    x, r, w1, w2, g, _, _ = case
    with torch.no_grad():
        return op(x, r, w1, w2, None, None, g)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", ["kn", "nk", "int8"])
@pytest.mark.parametrize("B,S,K,I", [(1, 1, 61, 45), (2, 3, 64, 96), (1, 5, 4095, 33), (4, 10, 130, 77),
                                     (8, 9, 96, 40)])
def test_op_on_the_compiled_backend(cpu_module, monkeypatch, dtype, layout, B, S, K, I):
    gen = torch.Generator().manual_seed(B * S + K + I)
    case = make_case(B, S, K, I, dtype, layout, 2 if layout == "int8" else None, gen)
    op = make_op(config(dtype, layout), monkeypatch=monkeypatch)
    got = []
    ran = dsinf_ops_run(lambda: got.append(run_op(op, case)))
    assert ran == [f"dsinf::{op_spec.get('rms_mlp_gemm').function(dtype)}"]  # the compiled kernel, not the reference
    assert_close(got[0], reference.rms_mlp_gemm(*ref_args(case, layout, SILU)), dtype)


@pytest.mark.parametrize("native", [False, True])
def test_bf16_gate_up_past_the_gemv_on_either_gemm(cpu_module, monkeypatch, native):
    """The bf16 cases above past the gated GEMV take the host's GEMM (torch's native bf16 GEMM with
    avx512_bf16, else the fp32 GEMM on widened weights); here each path, whatever the host."""
    from dsinf import routes

    with routes.bf16_gemm(native) as binding:
        for layout in ("kn", "nk", "int8"):
            test_op_on_the_compiled_backend(cpu_module, monkeypatch, torch.bfloat16, layout, 8, 9, 96, 40)
            assert binding.last_gated() == "matmul" and binding.last() == "aten"


@pytest.mark.parametrize("gated", [True, False], ids=["gated-kernel", "gemv+epilogue"])
def test_decode_gate_up_on_the_gated_kernel_and_on_the_gemv(cpu_module, monkeypatch, gated):
    """At decode M the gate|up runs on the gated kernel or as our GEMV + the gated epilogue, by its gated key's
    crossover, which depends on the host and the build (bf16 on a vdpbf16ps build with the native bf16 GEMM
    never takes the gated kernel): here each, forced (the matmuls on our GEMV), for every dtype and layout."""
    from dsinf import routes

    for dtype, suffix in zip(DTYPES, DTYPE_IDS):
        for layout in ("kn", "nk", "int8"):
            for B, S, K, I in ((1, 1, 61, 45), (2, 3, 64, 96), (1, 5, 4095, 33), (1, 8, 130, 77)):
                key, down = routes.RouteKey(suffix, "gated-" + layout, K, 2 * I), routes.RouteKey(suffix, layout, I, K)
                with routes.forced("cpu", [key.plain, down]), \
                        routes.forced("cpu", [key], None if gated else 0) as binding:
                    test_op_on_the_compiled_backend(cpu_module, monkeypatch, dtype, layout, B, S, K, I)
                    assert binding.last_gated() == ("gated" if gated else "matmul"), (dtype, layout, B * S)
                    assert binding.last() == "gemv", (dtype, layout, B * S)  # the down projection's


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("M", [1, 40])
def test_gated_gelu_and_strided_inputs(cpu_module, monkeypatch, dtype, M):
    gen = torch.Generator().manual_seed(M)
    for layout in ("kn", "nk", "int8"):
        case = make_case(1, M, 61, 21, dtype, layout, 7 if layout == "int8" else None, gen, contiguous=False)
        assert not case[0].is_contiguous() and not case[1].is_contiguous()
        op = make_op(config(dtype, layout, GELU), monkeypatch=monkeypatch)
        assert_close(run_op(op, case), reference.rms_mlp_gemm(*ref_args(case, layout, GELU)), dtype)


@pytest.mark.parametrize("shape", [(0, 3), (2, 0)])
def test_empty_inputs_give_empty_outputs(cpu_module, monkeypatch, shape):
    case = make_case(*shape, 16, 8, torch.float16, "nk", gen=torch.Generator().manual_seed(1))
    out, res = run_op(make_op(config(torch.float16, "nk"), monkeypatch=monkeypatch), case)
    assert out.shape == res.shape == (*shape, 16) and out.dtype == torch.float16


def test_module_functions_have_deepspeeds_names_and_signature(cpu_module):
    gen = torch.Generator().manual_seed(2)
    for dtype in DTYPES:
        for layout, activation in (("kn", SILU), ("nk", GELU), ("int8", SILU)):
            case = make_case(2, 3, 64, 40, dtype, layout, 4 if layout == "int8" else None, gen)
            args = ref_args(case, layout, activation)
            if layout != "int8":  # DeepSpeed passes torch.empty(1) for the unused scales
                args = args[:6] + (torch.empty(1), torch.empty(1)) + args[8:]
            fn = getattr(cpu_module, f"rms_mlp_gemm_{SUFFIX[dtype]}")
            assert_close(fn(*args), reference.rms_mlp_gemm(*args), dtype)


def test_outputs_are_new_tensors_and_inputs_are_not_modified(cpu_module, monkeypatch):
    case = make_case(2, 3, 32, 16, torch.float16, "nk", gen=torch.Generator().manual_seed(3))
    x0, r0 = case[0].clone(), case[1].clone()
    out, res = run_op(make_op(config(torch.float16, "nk"), monkeypatch=monkeypatch), case)
    assert torch.equal(case[0], x0) and torch.equal(case[1], r0)  # DeepSpeed writes residual in place; we do not
    ptrs = {t.untyped_storage().data_ptr() for t in case[:5]}
    assert not ptrs & {out.untyped_storage().data_ptr(), res.untyped_storage().data_ptr()}


def test_input_bias_is_added_first(cpu_module, monkeypatch):
    case = make_case(2, 3, 32, 16, torch.float32, "kn", gen=torch.Generator().manual_seed(4))
    x, r, w1, w2, g, _, _ = case
    b = randn(32, gen=torch.Generator().manual_seed(5))
    op = make_op(config(torch.float32, "kn"), monkeypatch=monkeypatch)
    assert_close(op(x, r, w1, w2, b, None, g), reference.rms_mlp_gemm(x + b, r, w1, w2, g, 1e-5), torch.float32)


def test_opcheck(cpu_module):
    gen = torch.Generator().manual_seed(6)
    for dtype in DTYPES:
        fn = getattr(torch.ops.dsinf, f"rms_mlp_gemm_{SUFFIX[dtype]}").default
        for layout, M in (("kn", 1), ("nk", 40), ("int8", 3)):
            case = make_case(1, M, 32, 24, dtype, layout, 2 if layout == "int8" else None, gen)
            torch.library.opcheck(fn, ref_args(case, layout, SILU))


def test_torch_compile_fullgraph(cpu_module, monkeypatch):
    case = make_case(2, 3, 40, 24, torch.float32, "nk", gen=torch.Generator().manual_seed(7))
    x, r, w1, w2, g, _, _ = case
    op = make_op(config(torch.float32, "nk"), monkeypatch=monkeypatch)

    def block(x, r):
        out, res = op(x, r, w1, w2, None, None, g)
        return out * 2, res

    eager = block(x, r)
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)(x, r)
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e)


# --- the config and the op class's own rules ---------------------------------------------------------------

def test_config_rules():
    with pytest.raises(NotImplementedError, match="'norm_type': LayerNorm"):
        MLPGemmOp(InferenceConfig())  # DeepSpeed's default norm_type: its mlp_gemm is not implemented
    with pytest.raises(NotImplementedError, match="'mlp_act_func_type': GELU"):
        MLPGemmOp(InferenceConfig(norm_type=NormType.RMSNorm))  # the default activation is not gated
    op = MLPGemmOp(config(torch.float32, "kn"))
    op.config.norm_type = NormType.LayerNorm  # a later change is seen on the next call
    case = make_case(1, 1, 8, 4, torch.float32, "kn", gen=torch.Generator().manual_seed(8))
    with pytest.raises(NotImplementedError, match="norm_type"):
        run_op(op, case)


OP_ONLY = [  # (config layout, weight layout, change, argument named)
    ("kn", "kn", dict(bias=torch.ones(8)), "bias"),
    ("kn", "kn", dict(beta=torch.ones(8)), "beta"),
    ("kn", "kn", dict(input_bias=torch.ones(7)), "input_bias"),
    ("kn", "kn", dict(gamma=None), "gamma"),
    ("int8", "kn", {}, "weight_interm"),  # config int8, float weights
    ("kn", "int8", {}, "weight_interm"),  # float config, int8 weights
    ("int8", "int8", dict(strip_scale="weight_out"), "weight_out"),  # int8 weight without .scale
    ("kn", "kn", dict(input=torch.ones(1, 1, 8, dtype=torch.float16)), "input"),  # not the config's dtype
]


@pytest.mark.parametrize("backend", ["torch", "compiled"])
@pytest.mark.parametrize("cfg_layout,w_layout,change,arg", OP_ONLY)
def test_op_class_rules(cpu_module, monkeypatch, backend, cfg_layout, w_layout, change, arg):
    monkeypatch.setenv("DSINF_BACKEND", backend)
    x, r, w1, w2, g, _, _ = make_case(1, 1, 8, 4, torch.float32, w_layout, gen=torch.Generator().manual_seed(9))
    kw = dict(input=x, residual=r, weight_interm=w1, weight_out=w2, gamma=g)
    change = dict(change)
    if change.pop("strip_scale", None):
        kw["weight_out"] = w2.view_as(w2)  # a fresh tensor object: no .scale
    kw.update(change)
    with pytest.raises(ValueError, match=f"argument '{arg}'") as info:
        MLPGemmOp(config(torch.float32, cfg_layout))(**kw)
    if backend == "torch" or arg != "input":  # the op class's own rules; the input dtype is C++'s to name
        assert isinstance(info.value, InputError) and info.value.arg == arg
    with torch.no_grad(), pytest.raises(ValueError, match=f"argument '{arg}'"):  # the fast path too
        MLPGemmOp(config(torch.float32, cfg_layout))(**kw)


@pytest.mark.parametrize("backend", ["torch", "compiled"])
def test_inference_only(cpu_module, monkeypatch, backend):
    monkeypatch.setenv("DSINF_BACKEND", backend)
    x, r, w1, w2, g, _, _ = make_case(1, 2, 8, 4, torch.float32, "kn", gen=torch.Generator().manual_seed(10))
    op = MLPGemmOp(config(torch.float32, "kn"))
    with pytest.raises(InputError, match="inference-only") as info:
        op(x, r, w1.clone().requires_grad_(True), w2, None, None, g)
    assert info.value.arg == "weight_interm" and op.backend == backend
    with pytest.raises(InputError, match="inference-only") as info:  # added to the input first: named itself
        op(x, r, w1, w2, torch.randn(8, requires_grad=True), None, g)
    assert info.value.arg == "input_bias"


# --- bad inputs: one table, Python and C++ ---------------------------------------------------------------

K, I = 8, 4


def mlp_args(**changes) -> dict:
    gen = torch.Generator().manual_seed(11)
    x = randn(1, 2, K, gen=gen)
    args = dict(input=x, residual=randn(1, 2, K, gen=gen), weight_interm=randn(K, 2 * I, gen=gen),
                weight_out=randn(I, K, gen=gen), gamma=randn(K, gen=gen), epsilon=1e-5, q_scale=None, q_scale1=None,
                q_int8=False, activation_type=SILU, transposed_mode=False)
    args.update(changes)
    return args


def int8_args(**changes) -> dict:
    return mlp_args(**{**dict(q_int8=True, weight_interm=torch.ones(2 * I, K, dtype=torch.int8),
                              weight_out=torch.ones(K, I, dtype=torch.int8), q_scale=torch.ones(2),
                              q_scale1=torch.ones(K)), **changes})


@dataclass
class Case:
    id: str
    arg: str
    make: Callable[[], dict]
    compiled: bool = True  # expressible through the typed schema


CASES = [
    Case("input-float64", "input", lambda: mlp_args(input=torch.ones(1, 2, K, dtype=torch.float64))),
    Case("input-not-tensor", "input", lambda: mlp_args(input=[1.0]), compiled=False),
    Case("residual-shape", "residual", lambda: mlp_args(residual=torch.ones(1, 3, K))),
    Case("residual-dtype", "residual", lambda: mlp_args(residual=torch.ones(1, 2, K, dtype=torch.float16))),
    Case("residual-other-device", "residual", lambda: mlp_args(residual=torch.ones(1, 2, K, device="meta"))),
    Case("gamma-shape", "gamma", lambda: mlp_args(gamma=torch.ones(K - 1))),
    Case("gamma-none", "gamma", lambda: mlp_args(gamma=None)),
    Case("gamma-dtype", "gamma", lambda: mlp_args(gamma=torch.ones(K, dtype=torch.bfloat16))),
    Case("epsilon-zero", "epsilon", lambda: mlp_args(epsilon=0.0)),
    Case("epsilon-nan", "epsilon", lambda: mlp_args(epsilon=float("nan"))),
    Case("epsilon-negative", "epsilon", lambda: mlp_args(epsilon=-1e-5)),
    Case("activation-gelu", "activation_type", lambda: mlp_args(activation_type=1)),
    Case("activation-7", "activation_type", lambda: mlp_args(activation_type=7)),
    Case("weight-interm-K", "weight_interm", lambda: mlp_args(weight_interm=torch.ones(K + 1, 2 * I))),
    Case("weight-interm-odd-N", "weight_interm", lambda: mlp_args(weight_interm=torch.ones(K, 7))),
    Case("weight-interm-dtype", "weight_interm", lambda: mlp_args(weight_interm=torch.ones(K, 2 * I,
                                                                                          dtype=torch.float16))),
    Case("weight-interm-int8-no-q_int8", "weight_interm",
         lambda: mlp_args(weight_interm=torch.ones(2 * I, K, dtype=torch.int8))),
    Case("weight-interm-noncontiguous", "weight_interm", lambda: mlp_args(weight_interm=torch.ones(2 * I, K).t())),
    Case("weight-interm-3d", "weight_interm", lambda: mlp_args(weight_interm=torch.ones(1, K, 2 * I))),
    Case("weight-interm-other-device", "weight_interm",
         lambda: mlp_args(weight_interm=torch.ones(K, 2 * I, device="meta"))),
    Case("weight-out-shape", "weight_out", lambda: mlp_args(weight_out=torch.ones(K, I))),
    Case("weight-out-transposed", "weight_out", lambda: mlp_args(transposed_mode=True,
                                                                 weight_interm=torch.ones(2 * I, K))),
    Case("q_int8-float-weight", "weight_interm", lambda: mlp_args(q_int8=True)),
    Case("scale-missing", "q_scale", lambda: int8_args(q_scale=None)),
    Case("scale-groups", "q_scale", lambda: int8_args(q_scale=torch.ones(3))),
    Case("scale-2d", "q_scale", lambda: int8_args(q_scale=torch.ones(1, 2))),
    Case("scale1-dtype", "q_scale1", lambda: int8_args(q_scale1=torch.ones(K, dtype=torch.float16))),
    Case("scale1-groups", "q_scale1", lambda: int8_args(q_scale1=torch.ones(3))),
    Case("scale1-noncontiguous", "q_scale1", lambda: int8_args(q_scale1=torch.ones(K, 2)[:, 0])),
    Case("scale1-other-device", "q_scale1", lambda: int8_args(q_scale1=torch.ones(K, device="meta"))),
    Case("weight-out-int8-in-float", "weight_out", lambda: mlp_args(weight_out=torch.ones(K, I, dtype=torch.int8))),
]
VALID = [Case("valid", "", mlp_args), Case("valid-int8", "", int8_args),
         Case("valid-nk", "", lambda: mlp_args(transposed_mode=True, weight_interm=torch.ones(2 * I, K),
                                               weight_out=torch.ones(K, I)))]


def run_reference(case):
    return reference.rms_mlp_gemm(**case.make())


def run_compiled(case):
    return torch.ops.dsinf.rms_mlp_gemm_fp32(*case.make().values())


def _expect(run, case, python: bool) -> str:
    with pytest.raises(ValueError, match=f"argument '{case.arg}'") as info:
        run(case)
    if python:
        assert isinstance(info.value, InputError) and info.value.arg == case.arg
    return str(info.value).split(": argument ", 1)[1]  # without the op name, which differs by design


@pytest.mark.parametrize("case", VALID, ids=[c.id for c in VALID])
def test_valid_baselines_pass(case, cpu_module):
    run_reference(case)
    run_compiled(case)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_reference_rejects(case):
    _expect(run_reference, case, python=True)


# The compiled function is per activation dtype ("expected dtype float32"); the reference takes any of the
# three ("dtype float64 is not supported"): a different rule, not a different wording.
SAME_RULE = [c for c in CASES if c.compiled and c.id != "input-float64"]


@pytest.mark.parametrize("case", [c for c in CASES if c.compiled], ids=[c.id for c in CASES if c.compiled])
def test_cpp_rejects(case, cpu_module):
    message = _expect(run_compiled, case, python=False)
    if case in SAME_RULE:
        assert message == _expect(run_reference, case, python=True)


# --- GPU parity (run on the device) ----------------------------------------------------------------------

# (K, I) -> gated GEMV path for M <= 8 (fp16/bf16 [N, K] and int8 take the tensor-core kernel when K % 8 == 0,
# int8 when K % 16 == 0): (61, 45) and (130, 77) the scalar fallback; (80, 40) a partial last k-step (80 % 32)
# and a partial last tile (40 % 16); (64, 96) one k-step; (8192, 24) two tiles, so K is split over a cluster
# (sm_90); the last two whole tiles and many k-steps per warp.
GPU_SHAPES = [(61, 45), (64, 96), (130, 77), (80, 40), (8192, 24), (4096, 1024), (1024, 14336 // 4)]


@CUDA
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", ["kn", "nk", "int8"])
@pytest.mark.parametrize("M", [1, 2, 3, 5, 8, 17, 64])
@pytest.mark.parametrize("K,I", GPU_SHAPES, ids=lambda v: str(v))
def test_gpu_parity(cuda_module, monkeypatch, dtype, layout, M, K, I):
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("bf16 needs sm_80+")
    gen = torch.Generator().manual_seed(M + K + I)
    case = make_case(1, M, K, I, dtype, layout, 2 if layout == "int8" else None, gen, device="cuda")
    op = make_op(config(dtype, layout), "cuda", monkeypatch)
    assert_close(run_op(op, case), reference.rms_mlp_gemm(*ref_args(case, layout, SILU)), dtype)


@CUDA
@pytest.mark.parametrize("layout", ["kn", "nk", "int8"])
@pytest.mark.parametrize("M", [1, 8, 40])
def test_gpu_gelu_strided_and_llama_shape(cuda_module, monkeypatch, layout, M):
    gen = torch.Generator().manual_seed(M)
    case = make_case(1, M, 4096, 14336, torch.float16, layout, 16 if layout == "int8" else None, gen,
                     device="cuda", contiguous=False)
    op = make_op(config(torch.float16, layout, GELU), "cuda", monkeypatch)
    assert_close(run_op(op, case), reference.rms_mlp_gemm(*ref_args(case, layout, GELU)), torch.float16)


# gate|up weights of at least 80 MiB (16-bit, either layout) or 160 MiB (int8) take the matmul + gated epilogue
# (the binding's DSINF_GATED_VIA_GEMV_MIN_MIB and _INT8_MIN_MIB); smaller ones the gated kernel. One shape
# well inside each side, sized 2 I K x bytes per weight.
GATE_UP_SIDES = [("nk", 2048, 5632, "gated_tc_kernel"),     # 44 MiB
                 ("nk", 4096, 11008, "gated_act_kernel"),   # 172 MiB
                 ("kn", 2048, 5632, "gated_kn_kernel"),     # 44 MiB
                 ("kn", 4096, 11008, "gated_act_kernel"),   # 172 MiB
                 ("int8", 4096, 14336, "gated_tc_kernel"),  # 112 MiB (Llama-3-8B)
                 ("int8", 8192, 28672, "gated_act_kernel")]  # 448 MiB (Llama-3-70B)
GATE_UP_IDS = ["44MiB", "172MiB", "kn-44MiB", "kn-172MiB", "int8-112MiB", "int8-448MiB"]
GATED_KERNELS = {"gated_tc_kernel", "gated_kn_kernel", "gated_nk_kernel", "gated_scalar_kernel", "gated_act_kernel"}


def device_weight(rows, cols, layout, dtype, gen):
    """A random [rows, cols] weight made on the GPU (hundreds of millions of values take seconds on the
    host): 16-bit ('nk', or its [cols, rows] transpose for 'kn'), or int8 (never 0) with float32 scales for
    8 row groups as `.scale`."""
    if layout == "nk":
        return torch.randn(rows, cols, generator=gen, device="cuda").mul_(cols ** -0.5).to(dtype)
    if layout == "kn":  # the [in, out] transpose of an [out, in] weight
        return torch.randn(cols, rows, generator=gen, device="cuda").mul_(cols ** -0.5).to(dtype)
    q = torch.randint(-127, 128, (rows, cols), generator=gen, device="cuda", dtype=torch.int8)
    q[q == 0] = 1
    q.scale = torch.rand(8, generator=gen, device="cuda").mul_(0.02 * cols ** -0.5).add_(1e-4)
    return q


@CUDA
@pytest.mark.parametrize("dtype", DTYPES[1:], ids=DTYPE_IDS[1:])
@pytest.mark.parametrize("M", [1, 8])
@pytest.mark.parametrize("layout,K,I,kernel", GATE_UP_SIDES, ids=GATE_UP_IDS)
def test_gpu_gate_up_path_by_weight_size(cuda_module, monkeypatch, dtype, M, layout, K, I, kernel):
    """The kernels the profiler saw are the path the size rule names, and the result is the reference's."""
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("bf16 needs sm_80+")
    if layout == "kn" and M > 2:  # the [K, N] gated kernel takes M <= 2 only, whatever the size
        kernel = "gated_act_kernel"
    gen = torch.Generator("cuda").manual_seed(M + K)
    x, r = (torch.randn(1, M, K, generator=gen, device="cuda").mul_(s).to(dtype) for s in (1.0, 2.0))
    w1 = device_weight(2 * I, K, layout, dtype, gen)  # [up; gate] rows
    w2 = device_weight(K, I, layout, dtype, gen)
    int8 = layout == "int8"
    case = (x, r, w1, w2, torch.randn(K, generator=gen, device="cuda").to(dtype),
            w1.scale if int8 else None, w2.scale if int8 else None)
    op = make_op(config(dtype, layout), "cuda", monkeypatch)
    run_op(op, case)  # warm: the first call's one-time work stays out of the profile
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        got = run_op(op, case)
        torch.cuda.synchronize()
    names = " ".join(e.name for e in prof.events())
    others = sorted(k for k in GATED_KERNELS - {kernel} if k in names)
    assert kernel in names and not others, f"expected {kernel}, not {others}; the profile saw: {names[:600]}"
    assert_close(got, reference.rms_mlp_gemm(*ref_args(case, layout, SILU)), dtype)


@CUDA
def test_gpu_opcheck_compile_and_empty(cuda_module, monkeypatch):
    case = make_case(2, 3, 64, 48, torch.float16, "nk", gen=torch.Generator().manual_seed(12), device="cuda")
    fn = torch.ops.dsinf.rms_mlp_gemm_fp16.default
    torch.library.opcheck(fn, ref_args(case, "nk", SILU))
    qcase = make_case(1, 3, 64, 48, torch.float16, "int8", 4, torch.Generator().manual_seed(13), device="cuda")
    torch.library.opcheck(fn, ref_args(qcase, "int8", GELU))
    op = make_op(config(torch.float16, "nk"), "cuda", monkeypatch)
    x, r, w1, w2, g, _, _ = case
    f = lambda x, r: op(x, r, w1, w2, None, None, g)  # noqa: E731
    torch._dynamo.reset()
    for got, want in zip(torch.compile(f, fullgraph=True)(x, r), f(x, r)):
        torch.testing.assert_close(got, want)
    e = x[:0]
    assert [t.shape for t in op(e, e, w1, w2, None, None, g)] == [e.shape, e.shape]
