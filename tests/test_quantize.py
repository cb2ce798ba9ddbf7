"""quantize_int8 / dequantize_int8 against an independent per-group loop, plus their error contract."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dsinf
from dsinf.checks import InputError
from dsinf.quantize import dequantize_int8, quantize_int8


def quantize_loop(w_nk: torch.Tensor, groups: int):
    """Row block by row block in Python floats: scale = absmax/127 (1 when zero), q = round-half-even."""
    N, K = w_nk.shape
    rows = N // groups
    q = torch.empty(N, K, dtype=torch.int8)
    scales = []
    for g in range(groups):
        block = w_nk[g * rows:(g + 1) * rows].to(torch.float64)
        absmax = float(block.abs().max())
        scale = float(torch.tensor(absmax / 127.0 if absmax > 0 else 1.0, dtype=torch.float32))
        scales.append(scale)
        for i in range(rows):
            for k in range(K):
                v = round(float(block[i, k]) / scale)  # Python's round() is half-to-even too
                q[g * rows + i, k] = max(-127, min(127, v))
    return q, torch.tensor(scales, dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("groups", [None, 1, 2, 6])
@pytest.mark.parametrize("transposed_mode", [False, True])
def test_matches_loop(dtype, groups, transposed_mode):
    N, K = 6, 13
    w_nk = (torch.randn(N, K, generator=torch.Generator().manual_seed(3)) * 2).to(dtype)
    w = w_nk if transposed_mode else w_nk.t().contiguous()
    q = quantize_int8(w, groups, transposed_mode=transposed_mode)
    assert q.dtype == torch.int8 and q.shape == (N, K) and q.is_contiguous()
    assert q.scale.dtype == torch.float32 and q.scale.shape == ((groups or N),) and q.scale.is_contiguous()
    q_loop, scale_loop = quantize_loop(w_nk, groups or N)
    torch.testing.assert_close(q.scale, scale_loop, atol=0, rtol=0)
    assert torch.equal(q, q_loop)


def test_absmax_maps_to_127_and_sign_is_kept():
    w = torch.tensor([[0.5, -2.0, 1.0], [3.0, 0.0, -3.0]])  # [N, K]
    q = quantize_int8(w, transposed_mode=True)
    assert q.tolist() == [[32, -127, 64], [127, 0, -127]]
    torch.testing.assert_close(q.scale, torch.tensor([2.0 / 127, 3.0 / 127]))


def test_zero_safe():
    w = torch.zeros(4, 5)
    w[2:] = torch.randn(2, 5)
    q = quantize_int8(w, groups=2, transposed_mode=True)
    assert q[:2].abs().sum() == 0 and q.scale[0] == 1.0  # no 0/0
    assert torch.isfinite(dequantize_int8(q, transposed_mode=True)).all()
    assert dequantize_int8(q, transposed_mode=True)[:2].abs().sum() == 0


@settings(max_examples=40, deadline=None)
@given(N=st.integers(1, 12), K=st.integers(1, 9), div=st.integers(1, 12), transposed_mode=st.booleans(),
       seed=st.integers(0, 2**16), scale=st.sampled_from([1e-3, 1.0, 1e3]))
def test_roundtrip_error_is_at_most_half_a_step(N, K, div, transposed_mode, seed, scale):
    groups = max(g for g in range(1, N + 1) if N % g == 0 and g <= div)
    w_nk = torch.randn(N, K, generator=torch.Generator().manual_seed(seed)) * scale
    w = w_nk if transposed_mode else w_nk.t().contiguous()
    q = quantize_int8(w, groups, transposed_mode=transposed_mode)
    back = dequantize_int8(q, transposed_mode=transposed_mode)
    assert back.shape == w.shape and back.dtype == torch.float32
    step = q.scale.repeat_interleave(N // groups)[:, None].expand(N, K)
    step = step if transposed_mode else step.t()
    assert bool(((back - w).abs() <= step / 2 * (1 + 1e-6)).all())


def test_keeps_device_and_exports():
    assert dsinf.quantize_int8 is quantize_int8 and dsinf.dequantize_int8 is dequantize_int8
    q = quantize_int8(torch.randn(8, 4))
    assert q.device == q.scale.device


def test_dequantize_dtype_and_explicit_scale():
    q = quantize_int8(torch.randn(5, 3), transposed_mode=True)
    plain = q.view_as(q)  # no .scale attribute
    out = dequantize_int8(plain, q.scale, transposed_mode=True, dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16 and out.shape == (5, 3)


@pytest.mark.parametrize("call,arg", [
    pytest.param(lambda: quantize_int8(torch.randn(6, 4), groups=3), "groups", id="groups-not-divisor"),
    pytest.param(lambda: quantize_int8(torch.randn(6, 4), groups=0), "groups", id="groups-zero"),
    pytest.param(lambda: quantize_int8(torch.randn(6, 4), groups=2.0), "groups", id="groups-float"),
    pytest.param(lambda: quantize_int8(torch.ones(4, 4, dtype=torch.int8)), "weight", id="already-int8"),
    pytest.param(lambda: quantize_int8(torch.randn(4)), "weight", id="1d"),
    pytest.param(lambda: quantize_int8(torch.randn(0, 4)), "weight", id="empty"),
    pytest.param(lambda: quantize_int8(torch.tensor([[1.0, float("inf")]])), "weight", id="inf"),
    pytest.param(lambda: quantize_int8(torch.tensor([[1.0, float("nan")]])), "weight", id="nan"),
    pytest.param(lambda: quantize_int8([[1.0]]), "weight", id="not-tensor"),
    pytest.param(lambda: quantize_int8(torch.randn(4, 4, device="meta")), "weight", id="meta"),
    pytest.param(lambda: quantize_int8(torch.randn(4, 4), transposed_mode="yes"), "transposed_mode",
                 id="transposed-mode-not-bool"),
    pytest.param(lambda: dequantize_int8(torch.ones(4, 4)), "weight", id="dequant-float"),
    pytest.param(lambda: dequantize_int8(torch.ones(4, 4, dtype=torch.int8)), "scale", id="dequant-no-scale"),
    pytest.param(lambda: dequantize_int8(torch.ones(4, 4, dtype=torch.int8), torch.ones(3)), "scale",
                 id="dequant-G-not-divisor"),
    pytest.param(lambda: dequantize_int8(torch.ones(4, 4, dtype=torch.int8), torch.ones(4, dtype=torch.float16)),
                 "scale", id="dequant-scale-dtype"),
    pytest.param(lambda: dequantize_int8(torch.ones(4, 4, dtype=torch.int8), torch.ones(4, device="meta")),
                 "scale", id="dequant-scale-device"),
])
def test_errors_name_the_argument(call, arg):
    with pytest.raises(InputError, match=f"argument '{arg}'") as info:
        call()
    assert info.value.arg == arg


@pytest.mark.parametrize("value", [1e300, -1e41, 1e-300])
def test_float64_beyond_float32_scales_is_an_error_naming_weight(value):
    # Not inf scales and NaN weights: |w| / 127 must be a positive finite float32.
    w = torch.randn(8, 4, dtype=torch.float64)
    w[3, 1] = value
    if abs(value) < 1:
        w = torch.full((8, 4), value, dtype=torch.float64)
    with pytest.raises(InputError, match="float32 scales") as info:
        quantize_int8(w)
    assert info.value.arg == "weight"
