"""dsinf/ops/_norm_mlp_reference.py: the RMSNorm / PreRMSNorm / gated-MLP reference against an independent
float64 computation written out below, plus its input checks (every rule names its argument)."""
from __future__ import annotations

import math

import pytest
import torch

from dsinf.checks import InputError
from dsinf import _norm_mlp_reference as ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# The reference rounds where the kernels store (see its docstring); float64 does not. One rounding of a
# 16-bit value is <= 2^-11 (fp16) / 2^-8 (bf16) relative; the MLP stacks three (h, a, output).
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
TOL_MLP = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def rel_err(got, want) -> float:
    got, want = got.double(), want.double()
    return ((got - want).abs().max() / want.abs().max()).item()


def randn(*shape, dtype, gen, scale=1.0):
    t = torch.randn(*shape, generator=gen, dtype=torch.float64)
    t = torch.where(t.abs() < 0.05, torch.full_like(t, 0.05).copysign(t), t)
    return (t * scale).to(dtype)


def rms64(x, g, eps):
    """Row by row, straight from the definition, in float64."""
    rows = x.double().reshape(-1, x.shape[-1])
    out = torch.empty_like(rows)
    for r in range(rows.shape[0]):
        ms = sum(v * v for v in rows[r].tolist()) / rows.shape[1]
        out[r] = rows[r] / math.sqrt(ms + eps) * g.double()
    return out.reshape(x.shape)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 61), (2, 3, 130), (5, 4095)])
def test_rms_norm_matches_float64(dtype, shape):
    gen = torch.Generator().manual_seed(sum(shape))
    x, g = randn(*shape, dtype=dtype, gen=gen, scale=4.0), randn(shape[-1], dtype=dtype, gen=gen)
    got = ref.rms_norm(x, g, 1e-5)
    assert got.dtype == dtype and got.shape == x.shape
    assert rel_err(got, rms64(x, g, 1e-5)) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_pre_rms_norm_normalises_the_rounded_sum(dtype):
    gen = torch.Generator().manual_seed(3)
    x, r = randn(2, 4, 77, dtype=dtype, gen=gen), randn(2, 4, 77, dtype=dtype, gen=gen, scale=3.0)
    g = randn(77, dtype=dtype, gen=gen)
    out, res = ref.pre_rms_norm(x, r, g, 1e-6)
    want_res = (x.double() + r.double()).to(dtype)  # exact sum, rounded once
    assert torch.equal(res, want_res)
    assert rel_err(out, rms64(want_res, g, 1e-6)) <= TOL[dtype]


def test_pre_rms_norm_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(4)
    x = randn(61, 3, dtype=torch.float32, gen=gen).t()  # [3, 61], strided
    r = randn(3, 61, dtype=torch.float32, gen=gen)
    g = randn(61, dtype=torch.float32, gen=gen)
    out, res = ref.pre_rms_norm(x, r, g, 1e-5)
    assert torch.equal(res, x + r)
    assert rel_err(out, rms64(x + r, g, 1e-5)) <= TOL[torch.float32]


def mlp64(x, resid, w1, w2, g, eps, s1, s2, q_int8, act, transposed, dtype):
    """float64 from the definition, rounding only where the reference documents it."""
    res = (x.double() + resid.double()).to(dtype)
    h = rms64(res, g, eps).to(dtype).double()

    def as_kn(w, s):
        if q_int8:
            rpg = w.shape[0] // s.shape[0]
            return (w.double() * s.double().repeat_interleave(rpg)[:, None]).t()
        return w.double().t() if transposed else w.double()

    t = h @ as_kn(w1, s1)
    I = t.shape[-1] // 2
    up, gate = t[..., :I], t[..., I:]
    if act == ref.ActivationFuncType.GATED_SILU:
        a = gate / (1 + torch.exp(-gate)) * up
    else:
        a = 0.5 * gate * (1 + torch.special.erf(gate / math.sqrt(2))) * up
    a = a.to(dtype).double()
    return (a @ as_kn(w2, s2)).to(dtype), res


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["kn", "nk", "int8"])
@pytest.mark.parametrize("act", list(ref.GATED_ACTIVATIONS))
@pytest.mark.parametrize("B,S", [(1, 1), (2, 3), (0, 4)])
def test_rms_mlp_gemm_matches_float64(dtype, layout, act, B, S):
    K, I = 67, 45
    gen = torch.Generator().manual_seed(K + I + int(act))
    x, resid = randn(B, S, K, dtype=dtype, gen=gen), randn(B, S, K, dtype=dtype, gen=gen)
    g = randn(K, dtype=dtype, gen=gen)
    s1 = s2 = None
    if layout == "int8":
        w1 = torch.randint(-127, 128, (2 * I, K), dtype=torch.int8, generator=gen)
        w2 = torch.randint(-127, 128, (K, I), dtype=torch.int8, generator=gen)
        s1, s2 = torch.rand(9, generator=gen) * 0.02 + 0.002, torch.rand(K, generator=gen) * 0.02 + 0.002
    elif layout == "nk":
        w1, w2 = randn(2 * I, K, dtype=dtype, gen=gen, scale=K ** -0.5), randn(K, I, dtype=dtype, gen=gen, scale=I ** -0.5)
    else:
        w1, w2 = randn(K, 2 * I, dtype=dtype, gen=gen, scale=K ** -0.5), randn(I, K, dtype=dtype, gen=gen, scale=I ** -0.5)
    args = (x, resid, w1, w2, g, 1e-5, s1, s2, layout == "int8", int(act), layout == "nk")
    out, res = ref.rms_mlp_gemm(*args, act_dtype=dtype)
    assert out.shape == x.shape and res.shape == x.shape and out.dtype == dtype
    if B == 0:
        return
    want_out, want_res = mlp64(*args, dtype)
    assert torch.equal(res, want_res)
    assert rel_err(out, want_out) <= TOL_MLP[dtype]


# ------------------------------------------------------------------------------------------ checks

def _good(dtype=torch.float16, K=8, I=4):
    x = torch.ones(1, 2, K, dtype=dtype)
    return dict(input=x, residual=x.clone(), weight_interm=torch.ones(K, 2 * I, dtype=dtype),
                weight_out=torch.ones(I, K, dtype=dtype), gamma=torch.ones(K, dtype=dtype), epsilon=1e-5,
                q_scale=torch.empty(1), q_scale1=torch.empty(1), q_int8=False, activation_type=4,
                transposed_mode=False)


BAD_MLP = [  # (changes, argument named)
    (dict(input=torch.ones(1, 2, 8, dtype=torch.float64)), "input"),
    (dict(input=[1.0]), "input"),
    (dict(residual=torch.ones(1, 3, 8, dtype=torch.float16)), "residual"),
    (dict(residual=torch.ones(1, 2, 8, dtype=torch.float32)), "residual"),
    (dict(gamma=torch.ones(7, dtype=torch.float16)), "gamma"),
    (dict(gamma=torch.ones(8, dtype=torch.float32)), "gamma"),
    (dict(epsilon=0.0), "epsilon"),
    (dict(epsilon=float("nan")), "epsilon"),
    (dict(epsilon=-1e-5), "epsilon"),
    (dict(activation_type=1), "activation_type"),
    (dict(activation_type=7), "activation_type"),
    (dict(weight_interm=torch.ones(8, 7, dtype=torch.float16)), "weight_interm"),
    (dict(weight_interm=torch.ones(9, 8, dtype=torch.float16)), "weight_interm"),
    (dict(weight_interm=torch.ones(8, 8, dtype=torch.float32)), "weight_interm"),
    (dict(weight_interm=torch.ones(8, 16, dtype=torch.float16)[:, ::2]), "weight_interm"),
    (dict(weight_out=torch.ones(8, 4, dtype=torch.float16)), "weight_out"),
    (dict(weight_out=torch.ones(4, 8, dtype=torch.int8)), "weight_out"),
    (dict(q_int8=True), "weight_interm"),
    (dict(q_int8=True, weight_interm=torch.ones(8, 8, dtype=torch.int8), weight_out=torch.ones(8, 4, dtype=torch.int8),
          q_scale=torch.ones(3)), "q_scale"),
    (dict(q_int8=True, weight_interm=torch.ones(8, 8, dtype=torch.int8), weight_out=torch.ones(8, 4, dtype=torch.int8),
          q_scale=torch.ones(2), q_scale1=torch.ones(2, dtype=torch.float16)), "q_scale1"),
    (dict(q_int8=True, weight_interm=torch.ones(8, 8, dtype=torch.int8), weight_out=torch.ones(8, 4, dtype=torch.int8),
          q_scale=torch.ones(2), q_scale1=torch.ones(3)), "q_scale1"),
    (dict(transposed_mode=True), "weight_out"),  # [K, 2I] W_interm reads as [2I, K]; W_out [I, K] does not fit
]


@pytest.mark.parametrize("changes,arg", BAD_MLP)
def test_rms_mlp_gemm_rejects_bad_input_naming_the_argument(changes, arg):
    kw = _good()
    kw.update(changes)
    with pytest.raises(InputError) as e:
        ref.rms_mlp_gemm(**kw)
    assert e.value.arg == arg and f"argument '{arg}'" in str(e.value)


def test_rms_mlp_gemm_act_dtype_is_enforced():
    with pytest.raises(InputError, match="argument 'input'.*bfloat16"):
        ref.rms_mlp_gemm(**_good(), act_dtype=torch.bfloat16)


def test_good_arguments_pass_every_layout():
    ref.rms_mlp_gemm(**_good())
    kw = _good()
    kw.update(transposed_mode=True, weight_interm=torch.ones(8, 8, dtype=torch.float16),
              weight_out=torch.ones(8, 4, dtype=torch.float16))
    ref.rms_mlp_gemm(**kw)
    kw.update(q_int8=True, weight_interm=torch.ones(8, 8, dtype=torch.int8), weight_out=torch.ones(8, 4, dtype=torch.int8),
              q_scale=torch.ones(2), q_scale1=torch.ones(8), transposed_mode=False)
    ref.rms_mlp_gemm(**kw)


@pytest.mark.parametrize("call,arg", [
    (lambda: ref.rms_norm(torch.ones(2, 8), torch.ones(8, dtype=torch.float16), 1e-5), "gamma"),
    (lambda: ref.rms_norm(torch.ones(2, 8), torch.ones(2, 8), 1e-5), "gamma"),
    (lambda: ref.rms_norm(torch.ones(2, 8, dtype=torch.int32), torch.ones(8), 1e-5), "vals"),
    (lambda: ref.rms_norm(torch.tensor(1.0), torch.ones(1), 1e-5), "vals"),
    (lambda: ref.rms_norm(torch.ones(2, 8), torch.ones(8), True), "epsilon"),
    (lambda: ref.rms_norm(torch.ones(2, 8), torch.ones(8), float("inf")), "epsilon"),
    (lambda: ref.pre_rms_norm(torch.ones(2, 8), torch.ones(2, 9), torch.ones(8), 1e-5), "residual"),
    (lambda: ref.pre_rms_norm(torch.ones(2, 8), torch.ones(2, 8, dtype=torch.bfloat16), torch.ones(8), 1e-5),
     "residual"),
    (lambda: ref.pre_rms_norm(torch.ones(2, 8), None, torch.ones(8), 1e-5), "residual"),
])
def test_norm_checks_name_the_argument(call, arg):
    with pytest.raises(InputError) as e:
        call()
    assert e.value.arg == arg


def test_empty_inputs_give_empty_outputs():
    out = ref.rms_norm(torch.ones(0, 3, 16, dtype=torch.bfloat16), torch.ones(16, dtype=torch.bfloat16), 1e-5)
    assert out.shape == (0, 3, 16) and out.dtype == torch.bfloat16
    o, r = ref.pre_rms_norm(torch.ones(2, 0, 16), torch.ones(2, 0, 16), torch.ones(16), 1e-5)
    assert o.shape == r.shape == (2, 0, 16)
