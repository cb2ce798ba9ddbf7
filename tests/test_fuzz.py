"""Property tests over shapes, dtypes and flags: the op classes give the right answer (against the
independent float64 oracle) or a clean ValueError naming an argument / config field - never another
exception, never silent garbage.

Two properties per op: valid inputs must succeed and match; arbitrary (sometimes corrupted) inputs
must match or fail cleanly. Each runs on the automatic backend choice - which on CPU must be the
compiled module (checked on every call that succeeds: a dispatch that silently falls back to the
reference fails here) - and on the forced torch reference. Examples are bounded and the deadline is off (the first
call may build the compiled module).
"""
from __future__ import annotations

import contextlib
import os
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import _dsinf_oracle as oracle
from dsinf import LinearOp, VectorMatMulOp
from dsinf.config import InferenceConfig
from dsinf.quantize import quantize_int8

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CLEAN_ERROR = re.compile(r"argument '\w+'|field '\w+'")
# DSINF_BACKEND -> the backend that must run on CPU tensors: "auto" means the compiled module here.
BACKENDS = {"auto": "compiled", "torch": "torch"}


@contextlib.contextmanager
def backend_knob(value: str):
    # hypothesis reruns the test body many times per fixture, so no monkeypatch here
    old = os.environ.get("DSINF_BACKEND")
    os.environ["DSINF_BACKEND"] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("DSINF_BACKEND", None)
        else:
            os.environ["DSINF_BACKEND"] = old


def _divisors(n: int) -> list[int]:
    return [g for g in range(1, n + 1) if n % g == 0]


@st.composite
def linear_cases(draw, corrupt: bool):
    c = dict(
        dtype=draw(st.sampled_from(DTYPES)), int8=draw(st.booleans()), B=draw(st.integers(1, 3)),
        S=draw(st.integers(1, 4)), heads=draw(st.integers(1, 4)), D=draw(st.sampled_from([1, 2, 3, 4, 6])),
        flash=draw(st.booleans()), transposed=draw(st.booleans()), add_bias=draw(st.booleans()),
        rotate_half=draw(st.booleans()), rope_theta=draw(st.sampled_from([10000.0, 500000.0, 1.5])),
        seq_offset=draw(st.integers(0, 9)),
    )
    c["num_kv"] = draw(st.sampled_from([-1] + _divisors(c["heads"])))
    c["rotary_dim"] = draw(st.sampled_from([-1, 0] + [r for r in (2, 4, 6) if r <= c["D"]]))
    kv = c["heads"] if c["num_kv"] == -1 else c["num_kv"]
    c["K"] = c["heads"] * c["D"]
    c["N"] = (c["heads"] + 2 * kv) * c["D"] if c["flash"] else draw(st.integers(1, 13))
    c["groups"] = draw(st.sampled_from(_divisors(c["N"])))
    c["bias_len"] = c["N"]
    c["weight_K"] = c["K"]
    if corrupt:  # break (at most) one thing, sometimes nothing
        what = draw(st.sampled_from(["none", "weight_K", "bias_len", "groups", "num_kv", "rotary_dim", "seq_offset",
                                     "N", "heads"]))
        if what == "weight_K":
            c["weight_K"] += draw(st.sampled_from([-1, 1]))
        elif what == "bias_len":
            c["bias_len"] += 1
        elif what == "groups":
            c["groups"] = c["N"] + 1
        elif what == "num_kv":
            c["num_kv"] = draw(st.sampled_from([0, c["heads"] + 1, 3]))
        elif what == "rotary_dim":
            c["rotary_dim"] = draw(st.sampled_from([c["D"] + 2, 3, 5]))
        elif what == "seq_offset":
            c["seq_offset"] = -1
        elif what == "N":
            c["N"] += 1
        elif what == "heads":
            c["heads"] = draw(st.sampled_from([0, c["heads"] + 1]))
    if c["weight_K"] < 1:
        c["weight_K"] = c["K"] + 1
    return c


def _weight(c: dict, N: int, K: int) -> torch.Tensor:
    """A float weight in the config's layout, or int8 [N, K] with c["groups"] scales (a wrong count of
    them when c["groups"] does not divide N: the op must refuse it)."""
    g = torch.Generator().manual_seed(c["B"] * 100 + N * 10 + K)
    w_nk = torch.randn(N, K, generator=g) / K ** 0.5
    if c["int8"]:
        if N % c["groups"] == 0:
            return quantize_int8(w_nk, c["groups"], transposed_mode=True)
        q = quantize_int8(w_nk, transposed_mode=True)
        q.scale = torch.ones(c["groups"])
        return q
    w = w_nk if c["transposed"] else w_nk.t().contiguous()
    return w.to(c["dtype"])


def _config(c: dict) -> InferenceConfig:
    return InferenceConfig(dtype=torch.int8 if c["int8"] else c["dtype"], act_dtype=c["dtype"] if c["int8"] else None,
                           transposed_mode=c["transposed"], rotary_dim=c["rotary_dim"], rotate_half=c["rotate_half"],
                           num_kv=c["num_kv"], rope_theta=c["rope_theta"])


def run_linear(c: dict, backend: str):
    """(result, expected) or (None, None) after a clean error; the op ran on BACKENDS[backend]."""
    g = torch.Generator().manual_seed(c["S"] * 7 + c["D"])
    x = (torch.randn(c["B"], c["S"], c["K"], generator=g) + 0.01).to(c["dtype"])
    w = _weight(c, c["N"], c["weight_K"])
    b = torch.randn(c["bias_len"], generator=g).to(c["dtype"])
    try:
        op = LinearOp(_config(c))
        with backend_knob(backend):
            got = op(x, w, b, c["add_bias"], c["flash"], c["heads"], seq_offset=c["seq_offset"])
    except ValueError as exc:
        assert CLEAN_ERROR.search(str(exc)), f"unclear error: {exc}"
        return None, None
    assert op.backend == BACKENDS[backend], op.decision.explain()
    expected = oracle.linear_layer(x, w, b, c["add_bias"], c["flash"], c["heads"], c["transposed"], c["rope_theta"],
                                   c["rotary_dim"], c["rotate_half"], c["num_kv"], c["seq_offset"],
                                   w.scale if c["int8"] else None)
    return got, expected


def _check(got, expected, dtype):
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.shape == e.shape and g.dtype == dtype
        oracle.assert_close(g, e, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(c=linear_cases(corrupt=False))
def test_linear_valid_inputs_match(backend, c):
    got, expected = run_linear(c, backend)
    assert got is not None, "a valid call was refused"
    _check(got, expected, c["dtype"])


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(c=linear_cases(corrupt=True))
def test_linear_correct_or_clean_error(backend, c):
    got, expected = run_linear(c, backend)
    if got is not None:
        _check(got, expected, c["dtype"])


@st.composite
def vm_cases(draw, corrupt: bool):
    c = dict(dtype=draw(st.sampled_from(DTYPES)), int8=draw(st.booleans()), B=draw(st.integers(1, 3)),
             S=draw(st.integers(1, 4)), K=draw(st.integers(1, 40)), N=draw(st.integers(1, 20)),
             transposed=draw(st.booleans()), async_op=draw(st.booleans()))
    c["groups"] = draw(st.sampled_from(_divisors(c["N"])))
    c["weight_K"] = c["K"]
    c["scale"] = "ok"
    if corrupt:
        what = draw(st.sampled_from(["none", "weight_K", "groups", "no_scale", "scale_dtype", "noncontig",
                                     "input_dtype"]))
        c["corrupt"] = what
        if what == "weight_K":
            c["weight_K"] += 1
        elif what == "groups":
            c["groups"] = c["N"] + 1
        elif what in ("no_scale", "scale_dtype"):
            c["scale"] = what
    c.setdefault("corrupt", "none")
    return c


def run_vm(c: dict, backend: str):
    g = torch.Generator().manual_seed(c["K"] * 31 + c["N"])
    x = (torch.randn(c["B"], c["S"], c["K"], generator=g) + 0.01).to(c["dtype"])
    if c["corrupt"] == "input_dtype":
        x = x.to(torch.float64)
    w = _weight(c, c["N"], c["weight_K"])
    if c["int8"]:
        if c["scale"] == "no_scale":
            w = w.view_as(w)
        elif c["scale"] == "scale_dtype":
            w.scale = w.scale.half()
    if c["corrupt"] == "noncontig":
        w = torch.stack([w, w], -1)[..., 0]
    try:
        op = VectorMatMulOp(_config({**c, "rotary_dim": -1, "rotate_half": False, "num_kv": -1, "rope_theta": 1e4}))
        with backend_knob(backend):
            got = op(x, w, c["async_op"])
    except ValueError as exc:
        assert CLEAN_ERROR.search(str(exc)), f"unclear error: {exc}"
        return None, None
    assert op.backend == BACKENDS[backend], op.decision.explain()
    expected = oracle.vector_matmul(x, w, c["async_op"], getattr(w, "scale", None), c["int8"], c["transposed"])
    return got, expected


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(c=vm_cases(corrupt=False))
def test_vector_matmul_valid_inputs_match(backend, c):
    got, expected = run_vm(c, backend)
    assert got is not None, "a valid call was refused"
    _check([got], [expected], c["dtype"])


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(c=vm_cases(corrupt=True))
def test_vector_matmul_correct_or_clean_error(backend, c):
    got, expected = run_vm(c, backend)
    if got is not None:
        _check([got], [expected], c["dtype"])
