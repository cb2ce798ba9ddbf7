"""The implementations of one case (ours, torch's peer on its fast path, Triton, extra peers), each
checked once against a reference before it is timed.

Names: "ours" (dsinf, the routed op on CUDA: see routes_step), "torch" (the peer the goals compare with),
and extras: "torch_kn" (the other layout), "dense" (torch on the dequantized weight), "aten_int8" (aten's
int8 weight-only kernel), "torch_2gemm" (the gated MLP as two GEMMs + torch ops), "triton", "gemv" (our
GEMV with the route forced to it, where the route sends the row to cuBLAS), and for int8 weights at prompt
lengths "gemm" / "deq" (our int8 GEMM / dequantize + cuBLAS, each forced) and "float_w" (cuBLAS on 16-bit
weights: the model without int8, not a peer of int8 weights).
"""
from __future__ import annotations

from typing import Any, Callable

from . import routes_step
from .cases import Case
from .context import first_line
from .env import Env, Unavailable, torch_dtype
from .results import ImplResult, Row
from .timing import Fns, Timing

#: Relative L2 error bound per activation dtype (outputs are rounded once to the dtype; bf16 keeps 8
#: mantissa bits, so its bound is the loosest; the eager torch chains round several times).
TOLERANCE = {"fp32": 1e-4, "fp16": 5e-3, "bf16": 2e-2}
EPS = 1e-5


class Impl:
    """fn(i) runs one call on copy i % copies."""

    def __init__(self, fn: Callable[[int], Any], copies: int):
        self.fn, self.copies = fn, copies


def rel_err(got, want) -> float:
    import torch

    got = got[0] if isinstance(got, (list, tuple)) else got
    want = want[0] if isinstance(want, (list, tuple)) else want
    if got.numel() != want.numel():
        return float("inf")
    g = got.reshape(want.shape).to(torch.float64)
    w = want.to(torch.float64)
    return float((g - w).norm() / w.norm().clamp_min(1e-30))


# --- torch's chains (what a model runs without our fusion) -------------------------------------------

def torch_qkv_chain(x, w_kn, b, heads: int, cos, sin, gemm=None):
    """addmm + bias (or gemm(x2d, w_kn, b)), split, per-head view/transpose, rotate-half RoPE on q and k,
    stacked contiguous to [3, B, H, S, D]."""
    import torch

    B, S, K = x.shape
    D = K // heads
    x2d = x.reshape(B * S, K)
    y = (gemm(x2d, w_kn, b) if gemm else torch.addmm(b, x2d, w_kn)).view(B, S, 3, heads, D)
    q, k, v = (y[:, :, i].transpose(1, 2) for i in range(3))

    def rope(t):
        t1, t2 = t[..., : D // 2], t[..., D // 2:]
        return t * cos + torch.cat((-t2, t1), dim=-1) * sin

    return torch.stack((rope(q), rope(k), v)).contiguous()


def torch_rms_norm(h, gamma, eps: float):
    """HF's LlamaRMSNorm: float32 statistics, result in h's dtype times gamma."""
    import torch

    hf = h.to(torch.float32)
    return (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype) * gamma


def torch_mlp_eager(x, residual, w_gate, w_up, w_down, gamma, eps: float):
    """HF's eager decoder MLP: residual add, RMSNorm, gate/up/down as three F.linear, SiLU * up."""
    import torch.nn.functional as F

    h = x + residual
    n = torch_rms_norm(h, gamma, eps)
    return F.linear(F.silu(F.linear(n, w_gate)) * F.linear(n, w_up), w_down), h


def torch_mlp_2gemm(x, residual, w_interm, w_down, gamma, eps: float):
    """Two cuBLAS GEMMs (gate|up fused into one weight [up; gate]) + torch ops between them."""
    import torch.nn.functional as F

    h = x + residual
    up, gate = F.linear(torch_rms_norm(h, gamma, eps), w_interm).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, w_down), h


def rope_tables(case: Case, env: Env):
    """cos/sin [S, D] in the activation dtype, in the rotate-half layout (HF's precomputed cache)."""
    import torch

    from dsinf import reference

    pos = torch.arange(case.seq_offset, case.seq_offset + case.S, device=env.device)
    cos, sin = reference.rope_cos_sin(pos, case.rotary_dim, 10000.0)
    dt = torch_dtype(case.dtype)
    return torch.cat([cos, cos], dim=-1).to(dt), torch.cat([sin, sin], dim=-1).to(dt)


def new_op(name: str, **config):
    """An instance of dsinf's op class `name` with `config`, or Unavailable while dsinf lacks it."""
    from dsinf import InferenceConfig

    from . import adapter

    cls = adapter.op_class(name)
    if cls is None:
        return Unavailable(f"not available: dsinf has no {name}")
    try:
        return cls(InferenceConfig(**config))
    except Exception as exc:  # noqa: BLE001
        return Unavailable(f"{name}: {type(exc).__name__}: {first_line(exc)}")


# --- per op -----------------------------------------------------------------------------------------

def _int8(case: Case, env: Env, ours, tri) -> tuple[Any, dict]:
    import torch
    import torch.nn.functional as F

    from dsinf import reference

    K, N = case.K, case.N
    ws = env.int8_weights(K, N)
    xs = env.inputs(case, max(len(ws), 2))
    ref = reference.vector_matmul(xs[0], ws[0], False, ws[0].scale, True, False)
    impls: dict[str, Any] = {}

    def vm_int8(f):
        return Impl(lambda i: f(xs[i % len(xs)], ws[i], False, ws[i].scale, True, False), len(ws))

    def aten():
        op = getattr(torch.ops.aten, "_weight_int8pack_mm", None)
        if op is None:
            return Unavailable(f"torch {torch.__version__} has no aten._weight_int8pack_mm")
        sc = [w.scale.to(torch_dtype(case.dtype)) for w in ws]  # per-channel [N], x's dtype
        return Impl(lambda i: op(xs[i % len(xs)].view(case.M, K), ws[i], sc[i]), len(ws))

    impls["ours"] = vm_int8(ours) if callable(ours) else ours
    if case.part == "int8prefill":
        return ref, _int8_prefill(case, env, ours, ws, xs, vm_int8, impls)
    gemv = routes_step.forced_gemv(case, ours) if callable(ours) else None
    if gemv is not None:
        impls["gemv"] = vm_int8(gemv)
    deq_kn = env.dequantized(K, N, case.dtype, "kn")
    dense = Impl(lambda i: torch.matmul(xs[i % len(xs)], deq_kn[i]), len(deq_kn))
    if case.section == "cuda":  # the peer: torch fp16 on the dequantized weight, both layouts
        deq_nk = env.dequantized(K, N, case.dtype, "nk")
        impls["torch"] = Impl(lambda i: F.linear(xs[i % len(xs)], deq_nk[i]), len(deq_nk))
        impls["torch_kn"] = dense
        impls["aten_int8"] = aten()  # where torch has a CUDA kernel for it
        impls["triton"] = vm_int8(tri.vector_matmul) if not isinstance(tri, Unavailable) else tri
    elif case.dtype == "fp32":  # aten's int8 kernel with fp32 activations is its slow path: dense peer
        impls["torch"] = dense
    else:  # bf16 activations: aten's fast path is the peer
        impls["torch"] = aten()
        impls["dense"] = dense
    return ref, impls


def _int8_prefill(case: Case, env: Env, ours, ws, xs, vm_int8, impls: dict) -> dict:
    """int8 weights at a prompt's M. torch's int8 weight-only path in eager mode (torchao's form): the weight
    cast to the activation dtype per call, F.linear, the per-channel scale on the output; our two paths each
    forced; and cuBLAS on 16-bit weights, what int8 costs against the float model. Not aten's int8 kernel:
    on CUDA (torch 2.9-2.11, aten/src/ATen/native/cuda/int8mm.cu) it is one thread per output with an fp32
    loop over K, a reference kernel that rereads the weight for every token (seconds per call at M = 2048 on
    a 112 MiB weight), not a fast path; the decode rows show it."""
    import torch.nn.functional as F

    dt = torch_dtype(case.dtype)
    sc = [w.scale.to(dt) for w in ws]
    impls["torch"] = Impl(lambda i: F.linear(xs[i % len(xs)], ws[i].to(dt)) * sc[i], len(ws))
    impls["aten_int8"] = Unavailable("aten._weight_int8pack_mm on CUDA is one thread per output (fp32 loop "
                                     "over K): not a fast path at prompt sizes")
    if callable(ours):
        for name, max_m in (("gemm", None), ("deq", 0)):
            impls[name] = vm_int8(routes_step.forced_int8_gemm(case, ours, max_m))
    deq = env.dequantized(case.K, case.N, case.dtype, "nk")
    impls["float_w"] = Impl(lambda i: F.linear(xs[i % len(xs)], deq[i]), len(deq))
    return impls


def _float(case: Case, env: Env, ours, tri) -> tuple[Any, dict]:
    import torch
    import torch.nn.functional as F

    from dsinf import reference

    K, N = case.K, case.N
    ws = env.weights(K, N, case.dtype, case.layout)
    xs = env.inputs(case, max(len(ws), 2))
    nk = case.layout == "nk"
    impls: dict[str, Any] = {}
    if case.op == "vector_matmul":
        ref = reference.vector_matmul(xs[0], ws[0], False, None, False, nk)
        args: tuple = (False, None, False, nk)
        torch_fn = (lambda i: F.linear(xs[i % len(xs)], ws[i])) if nk else \
            (lambda i: torch.matmul(xs[i % len(xs)], ws[i]))
        tri_fn = getattr(tri, "vector_matmul", None)
    elif case.op == "linear":
        b = env.vector(N, case.dtype)
        ref = reference.linear_layer(xs[0], ws[0], b, True, False, 1, nk)[0]
        args = (b, True, False, 1, nk)
        torch_fn = (lambda i: torch.addmm(b, xs[i % len(xs)].view(case.M, K), ws[i].t() if nk else ws[i]))
        tri_fn = getattr(tri, "linear_layer", None)
    else:  # qkv: fused QKV + RoPE (rotate_half, full rotary dim), [K, N] weight
        assert case.op == "qkv" and case.layout == "kn" and case.rotary_dim == K // case.heads
        b = env.vector(N, case.dtype)
        args = (b, True, True, case.heads, False, 10000.0, case.rotary_dim, True, -1, case.seq_offset)
        ref = reference.linear_layer(xs[0], ws[0], *args)[0]
        cos, sin = rope_tables(case, env)
        torch_fn = (lambda i: torch_qkv_chain(xs[i % len(xs)], ws[i], b, case.heads, cos, sin))
        tri_fn = getattr(tri, "linear_layer", None)

    def bind(f):
        return Impl(lambda i: f(xs[i % len(xs)], ws[i], *args), len(ws))

    impls["ours"] = bind(ours) if callable(ours) else ours
    gemv = routes_step.forced_gemv(case, ours) if callable(ours) and case.op == "vector_matmul" else None
    if gemv is not None:
        impls["gemv"] = bind(gemv)
    impls["torch"] = Impl(torch_fn, len(ws))
    if case.section == "cuda":
        impls["triton"] = bind(tri_fn) if tri_fn is not None else tri
    elif case.dtype == "fp32":
        impls["onednn"] = _onednn_peer(case, env, xs, ws, args, nk)
    return ref, impls


def _onednn_peer(case: Case, env: Env, xs, ws, args: tuple, nk: bool):
    """torch's chain on oneDNN's fp32 GEMM (mkldnn::_linear_pointwise, what torch's frozen CPU linears run;
    F.linear runs MKL's): a second torch peer, since our fp32 GEMM past the GEMV is oneDNN's on AMD hosts."""
    import torch

    if not torch.backends.mkldnn.is_available():
        return Unavailable("this torch has no oneDNN")
    lp = torch.ops.mkldnn._linear_pointwise

    def gemm(x2d, w, b=None):
        return lp(x2d, w if nk else w.t(), b, "none", [], "")

    if case.op == "vector_matmul":
        return Impl(lambda i: gemm(xs[i % len(xs)].view(case.M, case.K), ws[i]).view(*xs[0].shape[:-1], case.N),
                    len(ws))
    b = args[0]
    if case.op == "linear":
        return Impl(lambda i: gemm(xs[i % len(xs)].view(case.M, case.K), ws[i], b), len(ws))
    cos, sin = rope_tables(case, env)
    return Impl(lambda i: torch_qkv_chain(xs[i % len(xs)], ws[i], b, case.heads, cos, sin, gemm=gemm), len(ws))


def _mlp(case: Case, env: Env) -> tuple[Any, dict]:
    """Fused gated MLP (RMSNorm, SiLU) in nn.Linear layouts; the reference is the chain in float32."""
    import torch

    from . import adapter

    H, I = case.K, case.N
    dt = torch_dtype(case.dtype)

    def make():  # per copy: interm [up; gate] [2I, H] and down [H, I], nn.Linear layouts
        interm = (torch.randn(2 * I, H, device=env.device) / H ** 0.5).to(dt)
        down = (torch.randn(H, I, device=env.device) / I ** 0.5).to(dt)
        return list(zip(env.rotating(interm), env.rotating(down)))

    sets = env.cached(("mlp", H, I, case.dtype), make)
    n = len(sets)
    xs, rs = env.inputs(case, max(n, 2)), env.inputs(case, max(n, 2))
    gamma = env.vector(H, case.dtype, "gamma")
    f32 = torch.float32
    ref = torch_mlp_2gemm(xs[0].to(f32), rs[0].to(f32), sets[0][0].to(f32), sets[0][1].to(f32), gamma.to(f32),
                          EPS)[0]
    op = new_op("MLPGemmOp", dtype=dt, transposed_mode=True, layer_norm_eps=EPS,
                norm_type=adapter.enum_member("NormType", "RMSNorm"),
                mlp_act_func_type=adapter.enum_member("ActivationFuncType", "GATED_SILU"))
    impls: dict[str, Any] = {}
    impls["ours"] = op if isinstance(op, Unavailable) else Impl(
        lambda i: op(xs[i % len(xs)], rs[i % len(rs)], sets[i][0], sets[i][1], None, None, gamma), n)
    impls["torch"] = Impl(lambda i: torch_mlp_eager(xs[i % len(xs)], rs[i % len(rs)], sets[i][0][I:],
                                                    sets[i][0][:I], sets[i][1], gamma, EPS), n)
    impls["torch_2gemm"] = Impl(lambda i: torch_mlp_2gemm(xs[i % len(xs)], rs[i % len(rs)], sets[i][0],
                                                          sets[i][1], gamma, EPS), n)
    return ref, impls


def _pre_rms_norm(case: Case, env: Env) -> tuple[Any, dict]:
    """PreRMSNorm: (rms_norm(vals + residual) * gamma, vals + residual); inputs rotate (they are the traffic)."""
    import torch

    n = env.copies(case.weight_bytes)
    xs, rs = env.inputs(case, n), env.inputs(case, n)
    gamma = env.vector(case.K, case.dtype, "gamma")
    f32 = torch.float32
    ref = torch_rms_norm(xs[0].to(f32) + rs[0].to(f32), gamma.to(f32), EPS)
    op = new_op("PreRMSNormOp", dtype=torch_dtype(case.dtype))
    impls: dict[str, Any] = {}
    impls["ours"] = op if isinstance(op, Unavailable) else Impl(lambda i: op(xs[i], rs[i], gamma, EPS), n)

    def eager(i):
        h = xs[i] + rs[i]
        return torch_rms_norm(h, gamma, EPS), h

    impls["torch"] = Impl(eager, n)
    return ref, impls


def build_impls(case: Case, env: Env) -> tuple[Any, dict[str, Impl | Unavailable]]:
    """(reference output, {name: Impl | Unavailable}) for one case."""
    if case.op == "mlp":
        return _mlp(case, env)
    if case.op == "pre_rms_norm":
        return _pre_rms_norm(case, env)
    ours = env.ours(f"{'vector_matmul' if case.op == 'vector_matmul' else 'linear_layer'}_{case.dtype}")
    tri = env.triton_for(case) if case.section == "cuda" else None
    if case.layout == "int8":
        return _int8(case, env, ours, tri)
    return _float(case, env, ours, tri)


def run_case(case: Case, env: Env, timer: Callable[[Fns], dict[str, Timing]]) -> Row:
    """Check every implementation against the reference once, then time those that pass."""
    row = Row(case)
    try:
        ref, impls = build_impls(case, env)
    except Exception as exc:  # noqa: BLE001 - e.g. out of memory, a torch op missing
        row.note = f"setup failed: {type(exc).__name__}: {first_line(exc)}"
        return row
    tol = TOLERANCE[case.dtype]
    runnable: Fns = {}
    for name, impl in impls.items():
        if isinstance(impl, Unavailable):
            row.impls[name] = ImplResult(name, "n/a", impl.reason)
            continue
        try:
            err = rel_err(impl.fn(0), ref)
        except Exception as exc:  # noqa: BLE001
            row.impls[name] = ImplResult(name, "n/a", f"{type(exc).__name__}: {first_line(exc)}", copies=impl.copies)
            continue
        if not err <= tol:  # NaN fails too
            row.impls[name] = ImplResult(name, "FAIL", f"rel err {err:.2e} > {tol:.0e}", err, impl.copies)
            continue
        row.impls[name] = ImplResult(name, "ok", "", err, impl.copies)
        runnable[name] = (impl.fn, impl.copies)
    del ref
    if runnable:
        try:
            for name, t in timer(runnable).items():
                row.impls[name].timing = t
        except Exception as exc:  # noqa: BLE001
            row.note = f"timing failed: {type(exc).__name__}: {first_line(exc)}"
            for name in runnable:
                row.impls[name].status, row.impls[name].reason = "n/a", row.note
    return row
