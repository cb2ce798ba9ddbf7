"""rms_norm / pre_rms_norm (dsinf/ops/rms_norm.py, pre_rms_norm.py): the reference against float64 written
out below, then every way into the ops against the reference - the op classes on the compiled CPU backend
(asserted to be what ran), the module functions (DeepSpeed's names and positional signatures), opcheck,
torch.compile - and one table of bad inputs run through Python and C++ with the same wording. GPU parity
tests carry the `gpu` marker (skipped without CUDA).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

from dsinf import PreRMSNormOp, RMSNormOp, reference
from dsinf.checks import InputError
from dsinf.config import InferenceConfig
from fixtures.profiled import dsinf_ops_run

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
# max |got - want| / max |want|. Kernel and reference both accumulate in fp32 and round once, so they differ
# by summation order (~1e-7 relative) plus, for 16-bit outputs, a one-ulp flip where the fp32 values straddle a
# rounding boundary: fp16 ulp <= 2^-10 of the value, bf16 <= 2^-7.
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# Reference vs float64: one rounding of a 16-bit output is <= 2^-11 (fp16) / 2^-8 (bf16) relative.
TOL64 = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
CUDA = pytest.mark.gpu


def rel_err(got, want) -> float:
    got, want = got.double(), want.double()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def randn(*shape, dtype=torch.float32, gen=None, scale=1.0, device="cpu"):
    """Random, never exactly zero (|v| >= 0.05 * scale)."""
    t = torch.randn(*shape, generator=gen, dtype=torch.float64)
    t = torch.where(t.abs() < 0.05, torch.full_like(t, 0.05).copysign(t), t)
    return (t * scale).to(device, dtype)


def rms64(x, g, eps):
    """Row by row, straight from the definition, in float64."""
    rows = x.double().reshape(-1, x.shape[-1]).cpu()
    out = torch.empty_like(rows)
    for r in range(rows.shape[0]):
        ms = sum(v * v for v in rows[r].tolist()) / rows.shape[1]
        out[r] = rows[r] / math.sqrt(ms + eps) * g.double().cpu()
    return out.reshape(x.shape)


def assert_close(got, want, dtype):
    assert got.shape == want.shape and got.dtype == want.dtype and got.device == want.device
    assert got.is_contiguous()
    err = rel_err(got, want)
    assert err <= TOL[dtype], f"relative error {err:.3g} > {TOL[dtype]:.1g}"


# --- the reference --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(1, 61), (2, 3, 130), (5, 4095)])
def test_reference_rms_norm_matches_float64(dtype, shape):
    gen = torch.Generator().manual_seed(sum(shape))
    x, g = randn(*shape, dtype=dtype, gen=gen, scale=4.0), randn(shape[-1], dtype=dtype, gen=gen)
    got = reference.rms_norm(x, g, 1e-5)
    assert got.dtype == dtype and got.shape == x.shape
    assert rel_err(got, rms64(x, g, 1e-5)) <= TOL64[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_reference_pre_rms_norm_normalises_the_rounded_sum(dtype):
    gen = torch.Generator().manual_seed(3)
    x, r = randn(2, 4, 77, dtype=dtype, gen=gen), randn(2, 4, 77, dtype=dtype, gen=gen, scale=3.0)
    g = randn(77, dtype=dtype, gen=gen)
    out, res = reference.pre_rms_norm(x, r, g, 1e-6)
    want_res = (x.double() + r.double()).to(dtype)  # exact sum, rounded once
    assert torch.equal(res, want_res)
    assert rel_err(out, rms64(want_res, g, 1e-6)) <= TOL64[dtype]


# --- the compiled CPU backend, through the op classes and the module functions ---------------------------

def _inputs(shape, dtype, gen, contiguous=True, device="cpu"):
    H = shape[-1]
    x, r = randn(*shape, dtype=dtype, gen=gen, scale=2.0, device=device), randn(*shape, dtype=dtype, gen=gen,
                                                                                device=device)
    g = randn(H, dtype=dtype, gen=gen, device=device)
    if not contiguous:  # strided activations and gamma: the bindings copy them
        x = randn(*shape[:-1], 2 * H, dtype=dtype, gen=gen, device=device)[..., ::2]
        r = randn(*shape[:-1], 2 * H, dtype=dtype, gen=gen, device=device)[..., 1::2]
        g = randn(2 * H, dtype=dtype, gen=gen, device=device)[1::2]
        assert not (x.is_contiguous() or r.is_contiguous() or g.is_contiguous())
    return x, r, g


SHAPES = [(1, 1, 61), (2, 3, 64), (3, 5, 4095), (1, 8, 130), (4, 1, 7)]


def _ops(monkeypatch, device="cpu"):
    monkeypatch.delenv("DSINF_BACKEND", raising=False)
    rms, pre = RMSNormOp(), PreRMSNormOp(InferenceConfig(dtype=torch.bfloat16))  # the config's dtype is not read
    for op in (rms, pre):
        op.resolve(device)
        assert op.backend == "compiled", op.decision.explain()  # a test of the compiled path fails without it
    return rms, pre


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("contiguous", [True, False], ids=["contig", "strided"])
def test_op_classes_on_the_compiled_backend(cpu_module, monkeypatch, dtype, shape, contiguous):
    gen = torch.Generator().manual_seed(sum(shape) + len(DTYPES))
    x, r, g = _inputs(shape, dtype, gen, contiguous)
    rms, pre = _ops(monkeypatch)
    got = []
    with torch.no_grad():
        ran = dsinf_ops_run(lambda: got.extend([rms(x, g, 1e-5), *pre(x, r, g, 1e-6)]))
    assert ran == ["dsinf::rms_norm", "dsinf::pre_rms_norm"]  # the compiled kernels ran, not the reference
    assert_close(got[0], reference.rms_norm(x, g, 1e-5), dtype)
    want_out, want_res = reference.pre_rms_norm(x, r, g, 1e-6)
    assert torch.equal(got[2], want_res)  # one fp32 add, rounded once: exact
    assert_close(got[1], want_out, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_epsilon_is_applied(cpu_module, monkeypatch, dtype):
    # Small activations (mean square ~1e-6) make epsilon = 1e-5 dominate: an epsilon lost or scaled shows.
    gen = torch.Generator().manual_seed(13)
    x, r, g = (t * 1e-3 if t.dim() > 1 else t for t in _inputs((3, 67), dtype, gen))
    rms, pre = _ops(monkeypatch)
    for eps in (1e-5, 1e-3):
        want = reference.rms_norm(x, g, eps)
        assert rel_err(reference.rms_norm(x, g, 2 * eps), want) > 10 * TOL[dtype]  # the check is sensitive
        assert_close(rms(x, g, eps), want, dtype)
        assert_close(pre(x, r, g, eps)[0], reference.pre_rms_norm(x, r, g, eps)[0], dtype)


@pytest.mark.parametrize("backend", ["torch", "compiled"])
def test_numpy_float_epsilon_is_taken_as_the_schema_takes_it(cpu_module, monkeypatch, backend):
    """An epsilon read from a config as a numpy float works as torch.ops.dsinf takes it (refused once: "expected
    a float, got float32"), with the same result as the Python float of the same value."""
    import numpy

    monkeypatch.setenv("DSINF_BACKEND", backend)
    gen = torch.Generator().manual_seed(17)
    x, r, g = _inputs((3, 67), torch.float32, gen)
    rms, pre = RMSNormOp(), PreRMSNormOp(InferenceConfig(dtype=torch.float32))
    for eps in (numpy.float32(1e-5), numpy.float64(1e-3)):
        assert torch.equal(rms(x, g, eps), rms(x, g, float(eps)))
        assert torch.equal(pre(x, r, g, eps)[0], pre(x, r, g, float(eps))[0])
        assert torch.equal(reference.rms_norm(x, g, eps), reference.rms_norm(x, g, float(eps)))
        if backend == "compiled":  # the op class takes it as the registered kernel itself does
            assert torch.equal(torch.ops.dsinf.rms_norm(x, g, eps), rms(x, g, float(eps)))


@pytest.mark.parametrize("shape", [(0, 3, 16), (2, 0, 16), (2, 3, 0)])
def test_empty_inputs_give_empty_outputs(cpu_module, monkeypatch, shape):
    rms, pre = _ops(monkeypatch)
    x = torch.ones(shape, dtype=torch.bfloat16)
    g = torch.ones(shape[-1], dtype=torch.bfloat16)
    out = rms(x, g, 1e-5)
    assert out.shape == shape and out.dtype == torch.bfloat16
    o, r = pre(x, x, g, 1e-5)
    assert o.shape == r.shape == shape
    ro, rr = reference.pre_rms_norm(x, x, g, 1e-5)
    assert ro.shape == rr.shape == shape


def test_module_functions_have_deepspeeds_names_and_signatures(cpu_module):
    gen = torch.Generator().manual_seed(5)
    for dtype in DTYPES:  # one function each: the dtype is the input's
        x, r, g = _inputs((2, 3, 96), dtype, gen)
        assert_close(cpu_module.rms_norm(x, g, 1e-5), reference.rms_norm(x, g, 1e-5), dtype)
        out, res = cpu_module.pre_rms_norm(x, r, g, 1e-5)
        want_out, want_res = reference.pre_rms_norm(x, r, g, 1e-5)
        assert_close(out, want_out, dtype)
        assert torch.equal(res, want_res)
    assert "rms_norm" in cpu_module.functions("cpu") and "rms_norm_fp16" not in dir(cpu_module)


def test_outputs_are_new_tensors_and_inputs_are_not_modified(cpu_module, monkeypatch):
    _, pre = _ops(monkeypatch)
    x, r, g = _inputs((2, 3, 64), torch.float16, torch.Generator().manual_seed(6))
    x0, r0 = x.clone(), r.clone()
    out, res = pre(x, r, g, 1e-5)
    assert torch.equal(x, x0) and torch.equal(r, r0)  # DeepSpeed writes the sum into residual; we do not
    ptrs = {t.untyped_storage().data_ptr() for t in (x, r, g)}
    assert not ptrs & {out.untyped_storage().data_ptr(), res.untyped_storage().data_ptr()}


def test_rms_norm_op_needs_no_config():
    assert RMSNormOp().config == InferenceConfig() and PreRMSNormOp().config == InferenceConfig()


def test_opcheck(cpu_module):
    gen = torch.Generator().manual_seed(7)
    for dtype in DTYPES:
        for shape in [(2, 3, 64), (1, 1, 61)]:
            x, r, g = _inputs(shape, dtype, gen)
            torch.library.opcheck(torch.ops.dsinf.rms_norm.default, (x, g, 1e-5))
            torch.library.opcheck(torch.ops.dsinf.pre_rms_norm.default, (x, r, g, 1e-6))


def test_torch_compile_fullgraph(cpu_module, monkeypatch):
    rms, pre = _ops(monkeypatch)
    x, r, g = _inputs((2, 3, 61), torch.float32, torch.Generator().manual_seed(8))

    def block(x, r):
        h, res = pre(x, r, g, 1e-5)
        return rms(h * 2, g, 1e-6), res

    eager = block(x, r)
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)(x, r)
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e)


@pytest.mark.parametrize("backend", ["torch", "compiled"])
def test_inference_only(cpu_module, monkeypatch, backend):
    monkeypatch.setenv("DSINF_BACKEND", backend)
    x, r, g = _inputs((2, 3, 16), torch.float32, torch.Generator().manual_seed(9))
    for which in ("vals", "gamma"):
        args = {"vals": x, "gamma": g}
        args[which] = args[which].clone().requires_grad_(True)
        op = RMSNormOp()
        with pytest.raises(InputError, match="inference-only") as info:
            op(args["vals"], args["gamma"], 1e-5)
        assert info.value.arg == which and op.backend == backend
        with torch.no_grad():
            torch.testing.assert_close(op(args["vals"], args["gamma"], 1e-5), reference.rms_norm(x, g, 1e-5))
    with pytest.raises(InputError, match="inference-only") as info:
        PreRMSNormOp()(x, r.clone().requires_grad_(True), g, 1e-5)
    assert info.value.arg == "residual"


# --- bad inputs: one table, Python and C++ ---------------------------------------------------------------

H = 8


def norm_args(**changes) -> dict:
    gen = torch.Generator().manual_seed(10)
    args = dict(vals=randn(2, 3, H, gen=gen), residual=randn(2, 3, H, gen=gen), gamma=randn(H, gen=gen),
                epsilon=1e-5)
    args.update(changes)
    return args


@dataclass
class Case:
    id: str
    op: str  # "rms_norm" | "pre_rms_norm"
    arg: str
    make: Callable[[], dict]
    compiled: bool = True  # expressible through the typed schema


RMS, PRE = "rms_norm", "pre_rms_norm"
CASES = [
    Case("vals-float64", RMS, "vals", lambda: norm_args(vals=torch.randn(2, H, dtype=torch.float64))),
    Case("vals-int32", PRE, "vals", lambda: norm_args(vals=torch.ones(2, 3, H, dtype=torch.int32))),
    Case("vals-0d", RMS, "vals", lambda: norm_args(vals=torch.tensor(1.0), gamma=torch.ones(1))),
    Case("vals-not-tensor", RMS, "vals", lambda: norm_args(vals=[1.0] * H), compiled=False),
    Case("vals-sparse", RMS, "vals", lambda: norm_args(vals=torch.randn(2, H).to_sparse())),
    Case("residual-nested", PRE, "residual", lambda: norm_args(
        vals=torch.randn(2, 3, H), residual=torch.nested.nested_tensor([torch.randn(3, H), torch.randn(3, H)]))),
    Case("gamma-dtype", RMS, "gamma", lambda: norm_args(gamma=torch.ones(H, dtype=torch.float16))),
    Case("gamma-2d", PRE, "gamma", lambda: norm_args(gamma=torch.ones(1, H))),
    Case("gamma-wrong-H", RMS, "gamma", lambda: norm_args(gamma=torch.ones(H - 1))),
    Case("gamma-other-device", RMS, "gamma", lambda: norm_args(gamma=torch.ones(H, device="meta"))),
    Case("epsilon-zero", RMS, "epsilon", lambda: norm_args(epsilon=0.0)),
    Case("epsilon-negative", PRE, "epsilon", lambda: norm_args(epsilon=-1e-5)),
    Case("epsilon-nan", RMS, "epsilon", lambda: norm_args(epsilon=float("nan"))),
    Case("epsilon-inf", PRE, "epsilon", lambda: norm_args(epsilon=float("inf"))),
    Case("epsilon-bool", RMS, "epsilon", lambda: norm_args(epsilon=True), compiled=False),
    Case("epsilon-str", PRE, "epsilon", lambda: norm_args(epsilon="1e-5"), compiled=False),
    Case("residual-shape", PRE, "residual", lambda: norm_args(residual=torch.randn(2, 4, H))),
    Case("residual-dtype", PRE, "residual", lambda: norm_args(residual=torch.randn(2, 3, H, dtype=torch.bfloat16))),
    Case("residual-other-device", PRE, "residual", lambda: norm_args(residual=torch.randn(2, 3, H, device="meta"))),
    Case("residual-none", PRE, "residual", lambda: norm_args(residual=None)),
]
VALID = [Case("valid", RMS, "", norm_args), Case("valid", PRE, "", norm_args)]


def _ids(cases):
    return [f"{c.op}-{c.id}" for c in cases]


def _call(fn, case: Case, args: dict):
    if case.op == RMS:
        return fn(args["vals"], args["gamma"], args["epsilon"])
    return fn(args["vals"], args["residual"], args["gamma"], args["epsilon"])


def run_reference(case):
    return _call(getattr(reference, case.op), case, case.make())


def run_op_class(case):
    return _call(RMSNormOp() if case.op == RMS else PreRMSNormOp(), case, case.make())


def run_compiled(case):
    return _call(getattr(torch.ops.dsinf, case.op), case, case.make())


def _expect(run, case, python: bool):
    with pytest.raises(ValueError, match=f"argument '{case.arg}'") as info:
        run(case)
    if python:
        assert isinstance(info.value, InputError) and info.value.arg == case.arg
    return str(info.value).split(": argument ", 1)[1]  # without the op name, which differs by design


@pytest.mark.parametrize("case", VALID, ids=_ids(VALID))
def test_valid_baselines_pass(case, cpu_module):
    run_reference(case)
    run_op_class(case)
    run_compiled(case)


@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
@pytest.mark.parametrize("backend", ["torch", "compiled"])
def test_python_rejects(case, backend, monkeypatch, cpu_module):
    monkeypatch.setenv("DSINF_BACKEND", backend)
    _expect(run_reference, case, python=True)
    # On the compiled backend the op classes' fast path leaves the check to C++ (a ValueError, same words).
    _expect(run_op_class, case, python=backend == "torch" or not case.compiled)
    with torch.no_grad():  # the fast path skips the grad checks: a non-tensor reaches torch's parser first
        _expect(run_op_class, case, python=backend == "torch" or not case.compiled)


COMPILED = [c for c in CASES if c.compiled]


@pytest.mark.parametrize("case", COMPILED, ids=_ids(COMPILED))
def test_cpp_rejects_with_the_same_words(case, cpu_module):
    assert _expect(run_compiled, case, python=False) == _expect(run_reference, case, python=True)


# --- GPU parity (run on the device) ----------------------------------------------------------------------

@CUDA
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("rows", [1, 3, 8, 17, 64, 256])
@pytest.mark.parametrize("H", [61, 64, 4095, 4096, 8192, 14336, 20000])
def test_gpu_parity(cuda_module, monkeypatch, dtype, rows, H):
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("bf16 needs sm_80+")
    gen = torch.Generator().manual_seed(rows * 7 + H)
    x, r, g = _inputs((rows, H), dtype, gen, device="cuda")
    rms, pre = _ops(monkeypatch, "cuda")
    assert_close(rms(x, g, 1e-5), reference.rms_norm(x, g, 1e-5), dtype)
    out, res = pre(x, r, g, 1e-6)
    want_out, want_res = reference.pre_rms_norm(x, r, g, 1e-6)
    assert torch.equal(res, want_res)
    assert_close(out, want_out, dtype)


@CUDA
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_gpu_strided_and_misaligned(cuda_module, monkeypatch, dtype):
    gen = torch.Generator().manual_seed(11)
    x, r, g = _inputs((3, 5, 256), dtype, gen, contiguous=False, device="cuda")
    rms, pre = _ops(monkeypatch, "cuda")
    assert_close(rms(x, g, 1e-5), reference.rms_norm(x, g, 1e-5), dtype)
    base = randn(3 * 256 + 1, dtype=dtype, gen=gen, device="cuda")
    xm, gm = base[1:].view(3, 256), base[1:257]  # 2/4-byte offsets: not 16-byte aligned (scalar path)
    assert_close(cuda_module.rms_norm(xm, gm, 1e-5), reference.rms_norm(xm, gm, 1e-5), dtype)
    out, res = pre(xm, xm, gm, 1e-5)
    assert torch.equal(res, reference.pre_rms_norm(xm, xm, gm, 1e-5)[1])


@CUDA
def test_gpu_opcheck_compile_and_empty(cuda_module, monkeypatch):
    x, r, g = _inputs((2, 3, 64), torch.float16, torch.Generator().manual_seed(12), device="cuda")
    torch.library.opcheck(torch.ops.dsinf.rms_norm.default, (x, g, 1e-5))
    torch.library.opcheck(torch.ops.dsinf.pre_rms_norm.default, (x, r, g, 1e-5))
    rms, pre = _ops(monkeypatch, "cuda")
    f = lambda x, r: rms(pre(x, r, g, 1e-5)[0], g, 1e-5)  # noqa: E731
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x, r), f(x, r))
    e = torch.empty(0, 3, 64, dtype=torch.float16, device="cuda")
    assert rms(e, g, 1e-5).shape == e.shape and pre(e, e, g, 1e-5)[1].shape == e.shape
