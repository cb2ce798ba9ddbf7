"""LinearOp / VectorMatMulOp on every backend, against `dsinf.reference`.

Each backend is forced with DSINF_BACKEND, over the (backend, device, dtype) combinations it serves by
design (`SERVES`). A combination it serves must run: a backend that cannot run here fails the test, with
its reason - never a skip. Skips are for what is absent: a CUDA GPU (or one of compute capability 8.0
for bf16 / Triton), and the Triton interpreter on CPU tensors, which only a process started with
TRITON_INTERPRET=1 has (triton reads it when imported; CI runs `-k triton-cpu` in such a process).
What a backend does not serve is checked the other way: forcing it raises `BackendUnavailableError`.
On a CPU box this covers the compiled CPU module, the Triton interpreter and the torch reference; on a
GPU box (`-m gpu`) the CUDA module and Triton too. The expected values come from `dsinf.reference`
called with explicit arguments - not from the config - so the op's config -> argument plumbing is
checked on the torch backend as well.
"""
from __future__ import annotations

import pytest
import torch

import _dsinf_oracle as oracle
from dsinf import LinearOp, VectorMatMulOp, reference
from dsinf.config import InferenceConfig
from dsinf.checks import InputError
from dsinf.dispatch import BackendUnavailableError
from dsinf.ops.base import eager_call
from dsinf.library import has_kernel
from op_builder import knobs

BACKENDS = ["compiled", "triton", "torch"]
DEVICE_TYPES = ["cpu", "cuda"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
ID = dict(zip(DTYPES, DTYPE_IDS))
HAS_CUDA = torch.cuda.is_available()
INTERPRETER = knobs.get("TRITON_INTERPRET")

# What each backend serves by design, as data (dsinf.triton's docstring says why Triton serves what it does).
SERVES = {
    ("compiled", "cpu"): DTYPES, ("compiled", "cuda"): DTYPES,
    ("triton", "cpu"): [torch.float32, torch.float16],  # the interpreter computes bf16 wrongly
    ("triton", "cuda"): [torch.float16, torch.bfloat16],  # tl.dot rounds fp32 operands to tf32
    ("torch", "cpu"): DTYPES, ("torch", "cuda"): DTYPES,
}


def _absent(backend: str, device: str) -> list:
    """Marks skipping a combination whose hardware (or interpreter process) is absent here."""
    if device == "cuda":
        return [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")]
    if backend == "triton":
        return [pytest.mark.skipif(not INTERPRETER, reason="Triton on CPU tensors runs only in a process started "
                                   "with TRITON_INTERPRET=1 (CI runs -k triton-cpu in one)")]
    return []


def cases(dtypes=DTYPES) -> list:
    """(dtype, backend, device) for every combination served by design, ids like 'fp16-triton-cpu'."""
    return [pytest.param(dtype, backend, device, id=f"{ID[dtype]}-{backend}-{device}", marks=_absent(backend, device))
            for device in DEVICE_TYPES for backend in BACKENDS for dtype in dtypes
            if dtype in SERVES[backend, device]]


NOT_SERVED = [pytest.param(dtype, backend, device, id=f"{ID[dtype]}-{backend}-{device}",
                           marks=_absent("torch", device))  # the refusal needs no interpreter, only the device
              for device in DEVICE_TYPES for backend in BACKENDS for dtype in DTYPES
              if dtype not in SERVES[backend, device]]


def make_op(cls, cfg: InferenceConfig, backend: str, device: str, monkeypatch):
    """An op whose backend is forced to `backend` (resolved now). A backend that cannot run a combination it
    serves fails here (BackendUnavailableError says why); only an older GPU than the combination needs skips."""
    act = cfg.activation_dtype
    if device == "cuda" and (backend == "triton" or act == torch.bfloat16):
        capability = torch.cuda.get_device_capability()
        if capability < (8, 0):
            pytest.skip(f"{backend} {ID[act]} needs compute capability 8.0; this GPU has {capability}")
    monkeypatch.setenv("DSINF_BACKEND", backend)
    op = cls(cfg, device=device)
    assert op.backend == backend
    return op


@pytest.mark.parametrize("dtype,backend,device", NOT_SERVED)
@pytest.mark.parametrize("cls", [LinearOp, VectorMatMulOp])
def test_forced_backend_refuses_what_it_does_not_serve(cls, dtype, backend, device, monkeypatch):
    monkeypatch.setenv("DSINF_BACKEND", backend)
    with pytest.raises(BackendUnavailableError, match=f"DSINF_BACKEND={backend}, but {backend} cannot run"):
        cls(InferenceConfig(dtype=dtype), device=device)


def _to(device, *tensors):
    out = []
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        moved = t.to(device)
        if hasattr(t, "scale"):
            moved.scale = t.scale.to(device)  # .to() drops the attribute
        out.append(moved)
    return out


def assert_matches_reference(got: list[torch.Tensor], want: list[torch.Tensor], dtype: torch.dtype):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype and g.device == w.device
        oracle.assert_close(g.cpu(), w.cpu(), dtype)


# --- LinearOp ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,backend,device", cases())
@pytest.mark.parametrize("transposed_mode", [False, True])
@pytest.mark.parametrize("add_bias", [False, True])
@pytest.mark.parametrize("B,S,K,N", [(1, 1, 13, 7), (3, 5, 37, 24)])
def test_linear_plain(device, backend, dtype, transposed_mode, add_bias, B, S, K, N, monkeypatch):
    op = make_op(LinearOp, InferenceConfig(dtype=dtype, transposed_mode=transposed_mode), backend, device,
                 monkeypatch)
    x, w, b = _to(device, *oracle.random_inputs(B, S, K, N, dtype, transposed_mode=transposed_mode)[:3])
    got = op(x, w, b, add_bias, False, None)
    want = reference.linear_layer(x, w, b, add_bias, False, 1, transposed_mode)
    assert_matches_reference(got, want, dtype)


FLASH = [
    # heads, num_kv, D, rotary_dim, rotate_half, seq_offset, transposed_mode
    pytest.param(3, -1, 6, -1, False, 0, False, id="mha-norope-kn"),
    pytest.param(3, -1, 6, 6, True, 0, True, id="mha-rope-half-full"),
    pytest.param(3, -1, 6, 4, False, 5, False, id="mha-rope-gptj-partial-offset"),
    pytest.param(4, 2, 6, 4, True, 7, True, id="gqa-rope-half-partial-offset"),
    pytest.param(4, 1, 4, 4, False, 1, False, id="mqa-rope-gptj"),
]


@pytest.mark.parametrize("dtype,backend,device", cases())
@pytest.mark.parametrize("heads,num_kv,D,rotary_dim,rotate_half,seq_offset,transposed_mode", FLASH)
@pytest.mark.parametrize("B,S", [(1, 1), (2, 5)])
def test_linear_flash(device, backend, dtype, heads, num_kv, D, rotary_dim, rotate_half, seq_offset,
                      transposed_mode, B, S, monkeypatch):
    cfg = InferenceConfig(dtype=dtype, transposed_mode=transposed_mode, rotary_dim=rotary_dim,
                          rotate_half=rotate_half, num_kv=num_kv, rope_theta=500000.0)
    op = make_op(LinearOp, cfg, backend, device, monkeypatch)
    kv = heads if num_kv == -1 else num_kv
    K, N = heads * D, (heads + 2 * kv) * D
    x, w, b = _to(device, *oracle.random_inputs(B, S, K, N, dtype, transposed_mode=transposed_mode, seed=D)[:3])
    got = op(x, w, b, True, True, heads, seq_offset=seq_offset)
    want = reference.linear_layer(x, w, b, True, True, heads, transposed_mode, 500000.0, rotary_dim, rotate_half,
                                  num_kv, seq_offset)
    assert_matches_reference(got, want, dtype)


@pytest.mark.parametrize("act_dtype,backend,device", cases())
@pytest.mark.parametrize("groups", [1, 3, 24])
@pytest.mark.parametrize("do_flash_attn", [False, True])
def test_linear_int8(device, backend, act_dtype, groups, do_flash_attn, monkeypatch):
    cfg = InferenceConfig(dtype=torch.int8, act_dtype=act_dtype, rotary_dim=4, rotate_half=True)
    op = make_op(LinearOp, cfg, backend, device, monkeypatch)
    x, q, b, _ = oracle.random_inputs(2, 3, 8, 24, act_dtype, int8_groups=groups)
    x, q, b = _to(device, x, q, b)
    got = op(x, q, b, True, do_flash_attn, 2, seq_offset=2)
    want = reference.linear_layer(x, q, b, True, do_flash_attn, 2, False, 10000.0, 4, True, -1, 2, q.scale)
    assert_matches_reference(got, want, act_dtype)


# --- VectorMatMulOp ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,backend,device", cases())
@pytest.mark.parametrize("transposed_mode", [False, True])
@pytest.mark.parametrize("B,S,K,N", [(1, 1, 13, 7), (2, 5, 40, 33), (1, 1, 64, 96)])
def test_vector_matmul(device, backend, dtype, transposed_mode, B, S, K, N, monkeypatch):
    op = make_op(VectorMatMulOp, InferenceConfig(dtype=dtype, transposed_mode=transposed_mode), backend, device,
                 monkeypatch)
    x, w = _to(device, *oracle.random_inputs(B, S, K, N, dtype, transposed_mode=transposed_mode)[:2])
    got = op(x, w, async_op=True)
    assert_matches_reference([got], [reference.vector_matmul(x, w, False, None, False, transposed_mode)], dtype)


@pytest.mark.parametrize("act_dtype,backend,device", cases())
@pytest.mark.parametrize("groups", [1, 2, 6])
@pytest.mark.parametrize("transposed_mode", [False, True])  # ignored for int8: weights are always [N, K]
def test_vector_matmul_int8_is_dequantized(device, backend, act_dtype, groups, transposed_mode, monkeypatch):
    cfg = InferenceConfig(dtype=torch.int8, act_dtype=act_dtype, transposed_mode=transposed_mode)
    op = make_op(VectorMatMulOp, cfg, backend, device, monkeypatch)
    x, q, _, _ = oracle.random_inputs(3, 2, 11, 6, act_dtype, int8_groups=groups)
    x, q = _to(device, x, q)
    got = op(x, q)
    expected = oracle.vector_matmul(x, q, False, q.scale, True)  # x @ dequantized W, float64
    oracle.assert_close(got.cpu(), expected, act_dtype)
    raw = oracle.matmul(x, q.to(torch.float32), transposed_mode=True)  # DeepSpeed's silent int8 fallback
    assert not torch.allclose(got.cpu().to(torch.float64), raw, atol=0.1, rtol=0.1)


def test_int8_end_to_end_close_to_float_weights(monkeypatch):
    # quantize -> VectorMatMulOp approximates the float matmul within the quantization error bound
    from dsinf import quantize_int8

    w = torch.randn(40, 24) / 40 ** 0.5  # [K, N]
    x = torch.randn(2, 3, 40)
    q = quantize_int8(w, groups=24)
    op = make_op(VectorMatMulOp, InferenceConfig(dtype=torch.int8, act_dtype=torch.float32), "torch", "cpu",
                 monkeypatch)
    bound = (x.abs().sum(-1, keepdim=True) * q.scale.max() / 2)  # sum_k |x_k| * step/2
    assert bool(((op(x, q) - x @ w).abs() <= bound).all())


# --- ownership: outputs are never workspace views ------------------------------------------------------

@pytest.mark.parametrize("dtype,backend,device", cases([torch.float32, torch.float16]))
def test_outputs_are_owned(device, backend, dtype, monkeypatch):
    cfg = InferenceConfig(dtype=dtype, rotary_dim=4, num_kv=1, transposed_mode=True)
    lin = make_op(LinearOp, cfg, backend, device, monkeypatch)
    vm = make_op(VectorMatMulOp, cfg, backend, device, monkeypatch)
    x1, w, b = _to(device, *oracle.random_inputs(2, 3, 8, 16, dtype, transposed_mode=True, seed=1)[:3])
    x2 = _to(device, oracle.random_inputs(2, 3, 8, 16, dtype, seed=2)[0])[0]
    w_vm = w[:8].contiguous()  # [N=8, K=8]

    first = lin(x1, w, b, True, True, 2)
    first_vm = vm(x1, w_vm)
    kept = [t.clone() for t in first] + [first_vm.clone()]
    second = lin(x2, w, b, True, True, 2)
    second_vm = vm(x2, w_vm)
    for a, k in zip(first + [first_vm], kept):
        assert torch.equal(a, k), "a later call changed an earlier result"
    storages = {t.untyped_storage().data_ptr() for t in first + [first_vm]}
    assert not storages & {t.untyped_storage().data_ptr() for t in second + [second_vm]}
    assert not storages & {x1.untyped_storage().data_ptr(), w.untyped_storage().data_ptr()}


# --- the compiled module's registration: opcheck and torch.compile --------------------------------------

def _opcheck_samples(dtype):
    x, w, b, _ = oracle.random_inputs(2, 3, 8, 24, dtype, transposed_mode=True)
    xq, q, bq, scale = oracle.random_inputs(1, 2, 8, 16, dtype, int8_groups=4)
    linear = [
        (x, w, b, True, False, 2, True),
        (x, w, b, True, True, 2, True, 10000.0, 4, True, -1, 3),
        (x, w[:16].contiguous(), None, False, True, 2, True, 500000.0, 4, False, 1, 0),  # GQA: 2 q heads, 1 kv
        (xq, q, bq[:16], True, True, 2, False, 10000.0, -1, False, 1, 0, scale),
    ]
    vm = [(x, w[:6].contiguous(), False, None, False, True), (x, w.t().contiguous(), True),
          (xq, q, False, scale, True, False)]
    return {"linear_layer": linear, "vector_matmul": vm}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("op_name", ["linear_layer", "vector_matmul"])
def test_opcheck(cpu_module, op_name, dtype):
    name = f"{op_name}_{ID[dtype]}"
    assert has_kernel(name, "cpu"), f"the CPU module registers no {name} kernel"
    op = getattr(torch.ops.dsinf, name).default
    for args in _opcheck_samples(dtype)[op_name]:
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph_on_compiled_path(cpu_module, monkeypatch):
    cfg = InferenceConfig(dtype=torch.float32, transposed_mode=True, rotary_dim=4, rotate_half=True, num_kv=1)
    lin = make_op(LinearOp, cfg, "compiled", "cpu", monkeypatch)
    vm = make_op(VectorMatMulOp, cfg, "compiled", "cpu", monkeypatch)
    x, w, b, _ = oracle.random_inputs(2, 3, 8, 16, torch.float32, transposed_mode=True)
    w_vm = w[:8].contiguous()

    def block(x):
        q, k, v = lin(x, w, b, True, True, 2, seq_offset=1)
        return vm(q.transpose(1, 2).reshape(2, 3, 8), w_vm), k, v

    eager = block(x)
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)(x)
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e)


def test_torch_compile_of_an_op_not_yet_called(cpu_module):
    """An op chooses its backend at its first call (loading or building the module), code Dynamo cannot
    trace: under torch.compile it runs outside the graph, and under fullgraph=True the error says so and
    what to do (it used to be Dynamo's 'unsupported context manager' on a lock deep in the probes). One
    eager call later, fullgraph compiles."""
    x, w, _, _ = oracle.random_inputs(1, 3, 8, 16, torch.float32)
    want = reference.vector_matmul(x, w, False, None, False, False)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(VectorMatMulOp(InferenceConfig(dtype=torch.float32)))(x, w), want)
    vm = VectorMatMulOp(InferenceConfig(dtype=torch.float32))
    torch._dynamo.reset()
    with pytest.raises(Exception, match="call the op once outside torch.compile"):
        torch.compile(lambda a: vm(a, w), fullgraph=True)(x)
    vm(x, w)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(lambda a: vm(a, w), fullgraph=True)(x), want)
    assert vm.backend == "compiled"


def test_a_new_config_object_is_a_config_change(cpu_module):
    """`op.config = InferenceConfig(...)`: the new object's version counter starts again, so the op kept the
    call bound for the old config (x @ w where x @ w.T was asked, an fp32 input accepted by a bf16 op)."""
    x, w, _, _ = oracle.random_inputs(1, 3, 16, 16, torch.float32)
    vm = VectorMatMulOp(InferenceConfig(dtype=torch.float32))
    torch.testing.assert_close(vm(x, w), reference.vector_matmul(x, w, False, None, False, False))
    vm.config = InferenceConfig(dtype=torch.float32, transposed_mode=True)
    torch.testing.assert_close(vm(x, w), reference.vector_matmul(x, w, False, None, False, True))
    vm.config = InferenceConfig(dtype=torch.bfloat16)
    with pytest.raises(InputError, match="argument 'input'"):
        vm(x, w)
    assert vm.decision.request.act_dtype == torch.bfloat16
    with pytest.raises(TypeError, match="config must be an InferenceConfig"):
        vm.config = {"dtype": torch.float32}


def test_eager_call_skips_module_call_but_keeps_hooks(cpu_module, monkeypatch):
    """Without hooks the op classes call the compiled op's C++ entry directly (no nn.Module.__call__, no
    OpOverload frame); a forward hook or pre-hook still runs, through nn.Module.__call__ and forward."""
    cfg = InferenceConfig(dtype=torch.float32, transposed_mode=True)
    lin = make_op(LinearOp, cfg, "compiled", "cpu", monkeypatch)
    vm = make_op(VectorMatMulOp, cfg, "compiled", "cpu", monkeypatch)
    x, w, b, _ = oracle.random_inputs(1, 3, 8, 16, torch.float32, transposed_mode=True)
    want = reference.linear_layer(x, w, b, True, False, 1, True)[0]
    torch.testing.assert_close(lin(x, w, b, True, False, 1)[0], want)
    assert eager_call(lin, x) is lin._eager_calls[False] is not lin._calls[False]
    torch.testing.assert_close(vm(x, w), reference.vector_matmul(x, w, False, None, False, True))
    seen = []
    handles = [lin.register_forward_hook(lambda m, args, out: seen.append(("lin", len(args)))),
               vm.register_forward_pre_hook(lambda m, args: seen.append(("vm", len(args))))]
    try:
        assert eager_call(lin, x) is None
        torch.testing.assert_close(lin(x, w, b, True, False, 1)[0], want)
        vm(x, w)
        assert seen == [("lin", 8), ("vm", 3)]
    finally:
        for h in handles:
            h.remove()
    assert eager_call(lin, x) is lin._eager_calls[False]
    with pytest.raises(ValueError, match="num_heads"):  # a bool is not an int (C++ would read True as 1)
        lin(x, w, b, True, False, True)
    with pytest.raises(ValueError, match="weight"):  # C++ rejects it; the rerun through Python names it
        lin(x, w[:, :5], b, True, False, 1)
    # An int8 config with a float weight that carries a .scale: C++ would take it, so Python must refuse it.
    cfg8 = InferenceConfig(dtype=torch.int8, act_dtype=torch.float32, transposed_mode=True)
    w_float = w.clone()
    w_float.scale = torch.ones(w.shape[0])
    for op, args in ((make_op(LinearOp, cfg8, "compiled", "cpu", monkeypatch), (b, True, False, 1)),
                     (make_op(VectorMatMulOp, cfg8, "compiled", "cpu", monkeypatch), ())):
        with pytest.raises(ValueError, match="'weight'.*int8"):
            op(x, w_float, *args)


def test_op_config_forms():
    assert LinearOp().config == InferenceConfig()
    assert VectorMatMulOp({"dtype": "fp32", "transposed_mode": True}).config.transposed_mode is True
    with pytest.raises(TypeError, match="from_dict"):
        LinearOp(object())
