"""The op classes' cheap eager path (no timing here: the bench's hostcost section measures it).

In eager mode with no hooks, `LinearOp` calls its lean entry (`dsinf::linear_layer_lean_<dtype>`: four
arguments, a Tensor result) for a plain matmul (+ bias), and `linear_layer_<dtype>` otherwise. These tests
check which entry ran (the profiler records every dispatcher op by name), that both give the reference's
result and errors naming the argument, and that hooks and torch.compile still take `forward`.
"""
from __future__ import annotations

import pytest
import torch

import _dsinf_oracle as oracle
from dsinf import InferenceConfig, LinearOp, VectorMatMulOp, reference
from dsinf.ops import spec as op_spec
from dsinf.ops.base import eager_call

SUFFIX = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
DTYPES = list(SUFFIX)


def _op(cls, cfg, monkeypatch):
    monkeypatch.setenv("DSINF_BACKEND", "compiled")
    op = cls(cfg, device="cpu")
    assert op.backend == "compiled"
    return op


def _dsinf_ops_run(fn) -> list[str]:
    """Names of the dsinf:: ops `fn` ran, in order."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return [e.name for e in prof.events() if e.name.startswith("dsinf::")]


@pytest.mark.parametrize("dtype", DTYPES, ids=list(SUFFIX.values()))
@pytest.mark.parametrize("transposed_mode", [False, True])
@pytest.mark.parametrize("add_bias", [True, False])
def test_linear_plain_call_runs_the_lean_entry(cpu_module, monkeypatch, dtype, transposed_mode, add_bias):
    lin = _op(LinearOp, InferenceConfig(dtype=dtype, transposed_mode=transposed_mode), monkeypatch)
    x, w, b, _ = oracle.random_inputs(2, 3, 13, 7, dtype, transposed_mode=transposed_mode)
    bias = b if add_bias else None
    got = lin(x, w, bias, add_bias, False, 1)  # warm: the first call binds
    ran = _dsinf_ops_run(lambda: got.extend(lin(x, w, bias, add_bias, False, 1)))
    assert ran == [f"dsinf::linear_layer_lean_{SUFFIX[dtype]}"]
    want = reference.linear_layer(x, w, b, add_bias, False, 1, transposed_mode)
    assert isinstance(got, list) and len(got) == 2
    for out in got:
        oracle.assert_close(out, want[0].to(torch.float64), dtype)


def test_linear_calls_the_lean_entry_does_not_fit_take_the_full_entry(cpu_module, monkeypatch):
    cfg = InferenceConfig(dtype=torch.float32, transposed_mode=True)
    lin = _op(LinearOp, cfg, monkeypatch)
    x, w, b, _ = oracle.random_inputs(1, 3, 8, 24, torch.float32, transposed_mode=True)
    lin(x, w, b, True, False, 1)
    # a bias with add_bias=False is ignored, as in DeepSpeed (by the full entry, which still checks its grad)
    assert _dsinf_ops_run(lambda: lin(x, w, b, False, False, 1)) == ["dsinf::linear_layer_fp32"]
    torch.testing.assert_close(lin(x, w, b, False, False, 1)[0], reference.linear_layer(x, w, None, False, False,
                                                                                            1, True)[0])
    assert _dsinf_ops_run(lambda: lin(x, w, b, True, True, 2)) == ["dsinf::linear_layer_fp32"]
    with pytest.raises(ValueError, match="'bias'"):  # add_bias=True without a bias: the full entry, then Python
        lin(x, w, None, True, False, 1)
    with pytest.raises(ValueError, match="'weight'"):  # the lean entry rejects it; the rerun names it
        lin(x, w[:, :5], b, True, False, 1)
    with pytest.raises(ValueError, match="'bias'.*grad"):
        lin(x, w, b.clone().requires_grad_(), False, False, 1)
    with pytest.raises(ValueError, match="'bias'.*grad"):
        lin(x, w, b.clone().requires_grad_(), True, False, 1)
    with pytest.raises(ValueError, match="num_heads"):  # a bool is not an int, on the lean path too
        lin(x, w, b, True, False, True)


@pytest.mark.parametrize("cls", [LinearOp, VectorMatMulOp])
def test_user_hooks_fire_on_the_op_classes(cpu_module, monkeypatch, cls):
    """Forward pre-hooks and hooks (the module's own and global ones) run, see the call's arguments and
    can replace them and the result; without hooks the call takes the fast path again."""
    op = _op(cls, InferenceConfig(dtype=torch.float32, transposed_mode=True), monkeypatch)
    x, w, b, _ = oracle.random_inputs(1, 2, 8, 16, torch.float32, transposed_mode=True)
    args = (x, w, b, True, False, 1) if cls is LinearOp else (x, w)
    op(*args)
    assert eager_call(op, x) is op._eager_calls[False]
    seen = []

    def pre(module, a):
        seen.append("pre")
        return (a[0] * 2,) + a[1:]  # replaces the input

    def post(module, a, out):
        seen.append("post")
        assert torch.equal(a[0], 2 * x)
        return out

    def global_post(module, a, out):
        seen.append("global")

    handles = [op.register_forward_pre_hook(pre), op.register_forward_hook(post),
               torch.nn.modules.module.register_module_forward_hook(global_post)]
    try:
        assert eager_call(op, x) is None
        doubled = op(*args)
    finally:
        for h in handles:
            h.remove()
    assert seen == ["pre", "global", "post"]
    first = (lambda r: r[0]) if cls is LinearOp else (lambda r: r)
    torch.testing.assert_close(first(doubled), first(op(2 * x, *args[1:])))
    assert eager_call(op, x) is op._eager_calls[False]


def test_lean_entry_matches_its_full_call(cpu_module):
    """opcheck of the lean functions (schema, fake kernel) and the same result as `lean.full_args`."""
    spec = op_spec.get("linear_layer")
    assert set(spec.lean_functions()) == {"linear_layer_lean_fp32", "linear_layer_lean_fp16",
                                          "linear_layer_lean_bf16"}
    for name, act in spec.lean_functions().items():
        x, w, b, _ = oracle.random_inputs(2, 3, 8, 24, act, transposed_mode=True)
        lean = getattr(torch.ops.dsinf, name).default
        full = getattr(torch.ops.dsinf, name.replace("_lean", "")).default
        for args in ((x, w, b, True), (x, w, None, True), (x, w.t().contiguous()), (x, w.t().contiguous(), b)):
            torch.library.opcheck(lean, args)
            assert torch.equal(lean(*args), full(*spec.lean.full_args(*args))[0])
