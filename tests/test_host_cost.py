"""The op classes' cheap eager path (no timing here: the bench's hostcost section measures it).

In eager mode with no hooks, `LinearOp` calls its lean entry (`dsinf::linear_layer_lean_<dtype>`: four
arguments, a Tensor result) for a plain matmul (+ bias), and `linear_layer_<dtype>` otherwise;
`VectorMatMulOp` calls `dsinf::vector_matmul_lean_<dtype>` (input, weight, transposed_mode, q_scale) for
every call. These tests check which entry ran (the profiler records every dispatcher op by name), that
both give the reference's result and errors naming the argument, and that hooks, torch.compile and CUDA
graphs still work (torch.compile traces the op's own function, never a lean entry).
"""
from __future__ import annotations

import pytest
import torch

import _dsinf_oracle as oracle
from dsinf import InferenceConfig, LinearOp, VectorMatMulOp, reference
from dsinf.ops import spec as op_spec
from dsinf.ops.base import eager_call
from fixtures.profiled import dsinf_ops_run

SUFFIX = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
DTYPES = list(SUFFIX)


def _op(cls, cfg, monkeypatch):
    monkeypatch.setenv("DSINF_BACKEND", "compiled")
    op = cls(cfg, device="cpu")
    assert op.backend == "compiled"
    return op


@pytest.mark.parametrize("dtype", DTYPES, ids=list(SUFFIX.values()))
@pytest.mark.parametrize("transposed_mode", [False, True])
@pytest.mark.parametrize("add_bias", [True, False])
def test_linear_plain_call_runs_the_lean_entry(cpu_module, monkeypatch, dtype, transposed_mode, add_bias):
    lin = _op(LinearOp, InferenceConfig(dtype=dtype, transposed_mode=transposed_mode), monkeypatch)
    x, w, b, _ = oracle.random_inputs(2, 3, 13, 7, dtype, transposed_mode=transposed_mode)
    bias = b if add_bias else None
    got = lin(x, w, bias, add_bias, False, 1)  # warm: the first call binds
    ran = dsinf_ops_run(lambda: got.extend(lin(x, w, bias, add_bias, False, 1)))
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
    assert dsinf_ops_run(lambda: lin(x, w, b, False, False, 1)) == ["dsinf::linear_layer_fp32"]
    torch.testing.assert_close(lin(x, w, b, False, False, 1)[0], reference.linear_layer(x, w, None, False, False,
                                                                                            1, True)[0])
    assert dsinf_ops_run(lambda: lin(x, w, b, True, True, 2)) == ["dsinf::linear_layer_fp32"]
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


def _lean_samples(op: str, act: torch.dtype) -> list[tuple]:
    x, w, b, _ = oracle.random_inputs(2, 3, 8, 24, act, transposed_mode=True)
    if op == "linear_layer":
        return [(x, w, b, True), (x, w, None, True), (x, w.t().contiguous()), (x, w.t().contiguous(), b)]
    xq, q, _, scale = oracle.random_inputs(1, 2, 8, 16, act, int8_groups=4)
    return [(x, w, True), (x, w.t().contiguous()), (x, w.t().contiguous(), False, None), (xq, q, True, scale),
            (xq, q, False, scale)]


@pytest.mark.parametrize("op", ["linear_layer", "vector_matmul"])
def test_lean_entry_matches_its_full_call(cpu_module, op):
    """opcheck of the lean functions (schema, fake kernel) and the same result as `lean.full_args`."""
    spec = op_spec.get(op)
    assert set(spec.lean_functions()) == {f"{op}_lean_{s}" for s in SUFFIX.values()}
    for name, act in spec.lean_functions().items():
        lean = getattr(torch.ops.dsinf, name).default
        full = getattr(torch.ops.dsinf, name.replace("_lean", "")).default
        for args in _lean_samples(op, act):
            torch.library.opcheck(lean, args)
            want = full(*spec.lean.full_args(*args))
            assert torch.equal(lean(*args), want if isinstance(want, torch.Tensor) else want[0])


def _vm_case(dtype, transposed_mode, int8):
    """(config, x, weight, reference output) for VectorMatMulOp; K = 13, N = 8 (not square: a call with
    the layout flag lost is rejected by C++ and reruns through the full entry, which the profiler shows)."""
    if int8:
        cfg = InferenceConfig(dtype=torch.int8, act_dtype=dtype, transposed_mode=transposed_mode)
        x, w, _, scale = oracle.random_inputs(2, 3, 13, 8, dtype, int8_groups=4)
        return cfg, x, w, reference.vector_matmul(x, w, False, scale, True, transposed_mode)
    cfg = InferenceConfig(dtype=dtype, transposed_mode=transposed_mode)
    x, w, _, _ = oracle.random_inputs(2, 3, 13, 8, dtype, transposed_mode=transposed_mode)
    return cfg, x, w, reference.vector_matmul(x, w, False, None, False, transposed_mode)


@pytest.mark.parametrize("dtype", DTYPES, ids=list(SUFFIX.values()))
@pytest.mark.parametrize("transposed_mode", [False, True])
@pytest.mark.parametrize("int8", [False, True], ids=["float", "int8"])
def test_vector_matmul_call_runs_the_lean_entry(cpu_module, monkeypatch, dtype, transposed_mode, int8):
    cfg, x, w, want = _vm_case(dtype, transposed_mode, int8)
    vm = _op(VectorMatMulOp, cfg, monkeypatch)
    got = [vm(x, w)]  # warm: the first call binds
    ran = dsinf_ops_run(lambda: got.append(vm(x, w, True)))  # async_op is a hint: the same call
    assert ran == [f"dsinf::vector_matmul_lean_{SUFFIX[dtype]}"]
    for out in got:
        assert out.dtype == dtype and out.shape == (2, 3, 8)
        oracle.assert_close(out, want.to(torch.float64), dtype)


def test_vector_matmul_rejections_rerun_through_the_checks(cpu_module, monkeypatch):
    """What the lean entry rejects reruns through the full path, whose checks name the argument."""
    cfg, x, w, _ = _vm_case(torch.float32, True, False)
    vm = _op(VectorMatMulOp, cfg, monkeypatch)
    vm(x, w)
    with pytest.raises(ValueError, match="'weight'"):
        vm(x, w[:, :5])
    with pytest.raises(ValueError, match="'input'"):
        vm(x.to(torch.float16), w)
    with pytest.raises(ValueError, match="'weight'.*grad"):
        vm(x, w.clone().requires_grad_())
    with pytest.raises(ValueError, match="'weight'.*int8"):  # a float config given an int8 weight
        vm(x, oracle.random_inputs(1, 1, 13, 8, torch.float32, int8_groups=4)[1])
    cfg8, x8, w8, _ = _vm_case(torch.float32, True, True)
    vm8 = _op(VectorMatMulOp, cfg8, monkeypatch)
    vm8(x8, w8)
    with pytest.raises(ValueError, match="'weight'.*scale"):  # int8 without .scale
        vm8(x8, w8.clone())
    with pytest.raises(ValueError, match="'weight'.*float32"):  # an int8 config given a float weight
        vm8(x8, w)


@pytest.mark.parametrize("cls", [LinearOp, VectorMatMulOp])
def test_torch_compile_traces_the_full_op_not_the_lean_entry(cpu_module, monkeypatch, cls):
    op = _op(cls, InferenceConfig(dtype=torch.float32, transposed_mode=True), monkeypatch)
    x, w, b, _ = oracle.random_inputs(2, 3, 8, 16, torch.float32, transposed_mode=True)
    fn = (lambda x: op(x, w, b, True, False, 1)[0]) if cls is LinearOp else (lambda x: op(x, w))
    eager = fn(x)
    targets = []

    def backend(gm, example_inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(fn, backend=backend, fullgraph=True)(x), eager)
    assert f"dsinf.{cls.OP}_fp32.default" in targets and not any("_lean" in t for t in targets), targets


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_lean_entries_run_in_a_cuda_graph(cuda_module, monkeypatch):
    """The op classes' eager calls (lean entries) captured in a CUDA graph replay as they run eagerly."""
    monkeypatch.setenv("DSINF_BACKEND", "compiled")
    dt = torch.float16
    ops = {(cls, int8): cls(InferenceConfig(dtype=torch.int8, act_dtype=dt, transposed_mode=True) if int8
                            else InferenceConfig(dtype=dt, transposed_mode=True), device="cuda")
           for cls in (LinearOp, VectorMatMulOp) for int8 in (False, True)}
    x, w, b, _ = oracle.random_inputs(1, 1, 64, 96, dt, transposed_mode=True)  # (q_scale is None: float)
    x, w, b = x.cuda(), w.cuda(), b.cuda()
    _, q, _, scale = oracle.random_inputs(1, 1, 64, 96, dt, int8_groups=4)
    q = q.cuda()
    q.scale = scale.cuda()
    static_x = x.clone()

    def step(x):
        return (ops[LinearOp, False](x, w, b, True, False, 1)[0], ops[VectorMatMulOp, False](x, w),
                ops[VectorMatMulOp, True](x, q))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step(static_x)  # warm-up (binding, device info, cuBLAS handles) outside the capture
    torch.cuda.current_stream().wait_stream(side)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = step(static_x)
    assert [e.name for e in prof.events() if e.name.startswith("dsinf::")] == [
        "dsinf::linear_layer_lean_fp16", "dsinf::vector_matmul_lean_fp16", "dsinf::vector_matmul_lean_fp16"]
    for _ in range(3):
        static_x.copy_(torch.randn_like(static_x))
        graph.replay()
        torch.cuda.synchronize()
        for g, e in zip(static_out, step(static_x)):
            assert torch.equal(g, e)
