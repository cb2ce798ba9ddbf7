"""The torch-free RMSNorm / gated-MLP kernels (csrc/inference/cpu/rms_norm.cpp, mlp_gemm.cpp) against the
pure-torch reference (the op specs' references), compiled here with g++ at every SIMD level this host runs, before any binding exists.

A small shim (written below) exports wrappers around the hidden launchers and supplies a parallel_for that
really runs the sub-ranges on several std::threads, so a race or a dependence on the split shows up. The
library is loaded with ctypes; tensors travel as raw pointers. The CUDA kernels are compile-checked with
nvcc when it is installed (GPU parity runs through the binding on the device).
"""
from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from dsinf.config import ActivationFuncType
from dsinf.ops import mlp_gemm, pre_rms_norm, rms_norm
from dsinf.reference import dequantize

ROOT = Path(__file__).resolve().parents[1]
CPU_DIR = ROOT / "csrc" / "inference" / "cpu"
CUDA_DIR = ROOT / "csrc" / "inference" / "cuda"
INCLUDE = ROOT / "csrc" / "inference" / "include"

DSINF = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.int8: 3}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GATED_GELU, GATED_SILU = int(ActivationFuncType.GATED_GELU), int(ActivationFuncType.GATED_SILU)

SHIM = r"""
#include <thread>
#include <vector>
#include "cpu_kernels.h"

extern "C" {
dsinf_status dsinf_cpu_rms_norm(const void*, const void*, dsinf_dtype, int64_t, int64_t, float, void*,
                                dsinf_parallel_fn);
dsinf_status dsinf_cpu_pre_rms_norm(const void*, const void*, const void*, dsinf_dtype, int64_t, int64_t, float,
                                    void*, void*, dsinf_parallel_fn);
dsinf_status dsinf_cpu_gated_gemv(const void*, dsinf_dtype, int64_t, int64_t, const dsinf_weight*, int, void*,
                                  int64_t, dsinf_parallel_fn);
dsinf_status dsinf_cpu_gated_act(const void*, dsinf_dtype, int64_t, int64_t, int64_t, int, void*, dsinf_dtype,
                                 int64_t, dsinf_parallel_fn);
}

// Sub-ranges of `grain` items, run on up to 3 threads at once.
static void threaded_for(int64_t b, int64_t e, int64_t grain, dsinf_parallel_body body, void* ctx) {
  if (grain < 1) grain = 1;
  std::vector<std::thread> ts;
  const int64_t step = (e - b + 2) / 3 > grain ? (e - b + 2) / 3 : grain;
  for (int64_t s = b; s < e; s += step) ts.emplace_back(body, ctx, s, s + step < e ? s + step : e);
  for (auto& t : ts) t.join();
}
static dsinf_parallel_fn pick(int threaded) { return threaded ? &threaded_for : nullptr; }

#define EXPORT extern "C" __attribute__((visibility("default")))
EXPORT int t_rms_norm(const void* x, const void* g, int dt, int64_t rows, int64_t H, float eps, void* out, int th) {
  return dsinf_cpu_rms_norm(x, g, dsinf_dtype(dt), rows, H, eps, out, pick(th));
}
EXPORT int t_pre_rms_norm(const void* x, const void* r, const void* g, int dt, int64_t rows, int64_t H, float eps,
                          void* out, void* res, int th) {
  return dsinf_cpu_pre_rms_norm(x, r, g, dsinf_dtype(dt), rows, H, eps, out, res, pick(th));
}
EXPORT int t_gated_gemv(const void* x, int xdt, int64_t M, const void* w, int wdt, int nk, int64_t K, int64_t N,
                        const float* scale, int64_t groups, int act, void* out, int th) {
  dsinf_weight wt{w, dsinf_dtype(wdt), nk, K, N, scale, groups};
  return dsinf_cpu_gated_gemv(x, dsinf_dtype(xdt), M, K, &wt, act, out, N / 2, pick(th));
}
EXPORT int t_gated_act(const void* src, int sdt, int64_t M, int64_t I, int act, void* out, int odt, int th) {
  return dsinf_cpu_gated_act(src, dsinf_dtype(sdt), M, I, 2 * I, act, out, dsinf_dtype(odt), I, pick(th));
}
"""


def _host_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _isa_levels() -> list[tuple[str, list[str]]]:
    """Every vector path of cpu_simd.h this host can run, with the module's flags for it."""
    flags = _host_flags()
    levels = [("scalar", [])]
    if {"avx2", "fma", "f16c"} <= flags:
        levels.append(("avx2", ["-mavx2", "-mfma", "-mf16c"]))
    if {"avx512f", "avx512bw", "avx512vl", "fma", "f16c"} <= flags:
        levels.append(("avx512", ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma", "-mf16c"]))
    return levels


LEVELS = _isa_levels()


@pytest.fixture(scope="module", params=[name for name, _ in LEVELS])
def lib(request, tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("needs g++")
    flags = dict(LEVELS)[request.param]
    d = tmp_path_factory.mktemp(f"normmlp-{request.param}")
    shim = d / "shim.cpp"
    shim.write_text(SHIM)
    so = d / "libnormmlp.so"
    # The module's own flags (op_builder/inference.py) plus -Werror: the kernels must compile warning-free.
    cmd = ["g++", "-std=c++17", "-O3", "-DNDEBUG", "-fno-math-errno", "-Wall", "-Wno-unknown-pragmas", "-Werror",
           "-fPIC", "-shared", "-pthread", *flags, f"-I{INCLUDE}", f"-I{CPU_DIR}",
           str(shim), str(CPU_DIR / "rms_norm.cpp"), str(CPU_DIR / "mlp_gemm.cpp"), "-o", str(so)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lib = ctypes.CDLL(str(so))
    P, I32, I64, F = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
    lib.t_rms_norm.argtypes = [P, P, I32, I64, I64, F, P, I32]
    lib.t_pre_rms_norm.argtypes = [P, P, P, I32, I64, I64, F, P, P, I32]
    lib.t_gated_gemv.argtypes = [P, I32, I64, P, I32, I32, I64, I64, P, I64, I32, P, I32]
    lib.t_gated_act.argtypes = [P, I32, I64, I64, I32, P, I32, I32]
    return lib


def ptr(t: torch.Tensor | None):
    return ctypes.c_void_p(t.data_ptr() if t is not None else 0)


def randn(*shape, dtype=torch.float32, gen=None, scale=1.0):
    """Random, never exactly zero (|v| >= 0.05 * scale)."""
    t = torch.randn(*shape, generator=gen, dtype=torch.float64)
    t = torch.where(t.abs() < 0.05, torch.full_like(t, 0.05).copysign(t), t)
    return (t * scale).to(dtype)


# Both sides accumulate in fp32 and round once per stored value; they differ by summation order and, for
# 16-bit outputs, an occasional one-ulp flip at a rounding boundary (fp16 ulp <= 2^-10 relative, bf16 2^-7).
# The MLP rounds h and a in between (both sides), so a flip there moves the output a little more.
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
TOL_MLP = {torch.float32: 5e-5, torch.float16: 4e-3, torch.bfloat16: 2.5e-2}


def rel_err(got, want) -> float:
    got, want = got.double(), want.double()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


# ------------------------------------------------------------------------------------------ RMSNorm

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,H", [(1, 61), (3, 4095), (8, 4096), (37, 129), (5, 1), (2, 8200)])
@pytest.mark.parametrize("threaded", [0, 1])
def test_rms_norm(lib, dtype, rows, H, threaded):
    gen = torch.Generator().manual_seed(rows * 1000 + H)
    x = randn(rows, H, dtype=dtype, gen=gen, scale=3.0)
    g = randn(H, dtype=dtype, gen=gen)
    out = torch.full_like(x, float("nan"))
    assert lib.t_rms_norm(ptr(x), ptr(g), DSINF[dtype], rows, H, 1e-5, ptr(out), threaded) == 0
    want = rms_norm.rms_norm(x, g, 1e-5)
    assert rel_err(out, want) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,H", [(1, 61), (3, 4095), (8, 4096), (64, 72)])
@pytest.mark.parametrize("threaded", [0, 1])
def test_pre_rms_norm(lib, dtype, rows, H, threaded):
    gen = torch.Generator().manual_seed(rows * 7 + H)
    x = randn(rows, H, dtype=dtype, gen=gen)
    r = randn(rows, H, dtype=dtype, gen=gen, scale=2.0)
    g = randn(H, dtype=dtype, gen=gen)
    out, res = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
    assert lib.t_pre_rms_norm(ptr(x), ptr(r), ptr(g), DSINF[dtype], rows, H, 1e-6, ptr(out),
                              ptr(res), threaded) == 0
    want_out, want_res = pre_rms_norm.pre_rms_norm(x, r, g, 1e-6)
    assert torch.equal(res, want_res)  # one fp32 add, one rounding: bit-exact
    assert rel_err(out, want_out) <= TOL[dtype]


def test_rms_norm_empty_is_a_no_op(lib):
    out = torch.zeros(0, 8)
    x = torch.zeros(0, 8)
    assert lib.t_rms_norm(ptr(x), ptr(torch.ones(8)), 0, 0, 8, 1e-5, ptr(out), 0) == 0


# ------------------------------------------------------------------------------------------ gated GEMV

def _weights(K, I, dtype, layout, gen, groups=None):
    """W_interm in the stored form the kernel reads, plus the reference's (weight, q_scale, transposed_mode)."""
    if layout == "int8":
        w = torch.randint(-127, 128, (2 * I, K), dtype=torch.int8, generator=gen)
        w[w == 0] = 1
        scale = torch.rand(groups, generator=gen, dtype=torch.float32) * 0.02 + 0.002
        return w, scale
    scale_k = K ** -0.5
    if layout == "nk":
        return randn(2 * I, K, dtype=dtype, gen=gen, scale=scale_k), None
    return randn(K, 2 * I, dtype=dtype, gen=gen, scale=scale_k), None


def _reference_gated(x, w, scale, layout, activation):
    """act(gate) * up from the reference's pieces, rounded to x's dtype once."""
    xf = x.float()
    if layout == "int8":
        wk = dequantize(w, scale).t()
    else:
        wk = w.float().t() if layout == "nk" else w.float()
    return mlp_gemm.gated_activation(xf @ wk, ActivationFuncType(activation)).to(x.dtype)


CASES = [  # (M, K, I, layout, groups)
    (1, 61, 37, "nk", None), (3, 4095, 24, "nk", None), (8, 256, 19, "nk", None),
    (1, 61, 37, "kn", None), (3, 300, 100, "kn", None), (8, 129, 333, "kn", None),
    (1, 64, 48, "int8", 1), (3, 77, 40, "int8", 80), (8, 130, 36, "int8", 8), (5, 4096, 13, "int8", 2),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,I,layout,groups", CASES)
@pytest.mark.parametrize("activation", [GATED_SILU, GATED_GELU])
def test_gated_gemv(lib, dtype, M, K, I, layout, groups, activation):
    gen = torch.Generator().manual_seed(M * 31 + K * 7 + I)
    x = randn(M, K, dtype=dtype, gen=gen)
    w, scale = _weights(K, I, dtype, layout, gen, groups)
    out = torch.full((M, I), float("nan"), dtype=dtype)
    wdt = DSINF[w.dtype]
    st = lib.t_gated_gemv(ptr(x), DSINF[dtype], M, ptr(w), wdt, int(layout != "kn"), K, 2 * I, ptr(scale),
                          groups or 0, activation, ptr(out), 1)
    assert st == 0
    want = _reference_gated(x, w, scale, layout, activation)
    assert rel_err(out, want) <= TOL[dtype], (rel_err(out, want), layout)


def test_gated_gemv_rejects_bad_activation_and_odd_n(lib):
    x, w, out = torch.ones(1, 8), torch.ones(8, 8), torch.zeros(1, 4)
    assert lib.t_gated_gemv(ptr(x), 0, 1, ptr(w), 0, 1, 8, 8, ptr(None), 0, 1, ptr(out), 0) == 1  # GELU: not gated
    assert lib.t_gated_gemv(ptr(x), 0, 1, ptr(w), 0, 1, 8, 7, ptr(None), 0, GATED_SILU, ptr(out), 0) == 1


@pytest.mark.parametrize("src_dtype,out_dtype", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                                 (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("activation", [GATED_SILU, GATED_GELU])
def test_gated_act_large_m_epilogue(lib, src_dtype, out_dtype, activation):
    gen = torch.Generator().manual_seed(5)
    M, I = 67, 1029
    src = randn(M, 2 * I, dtype=src_dtype, gen=gen, scale=3.0)
    out = torch.full((M, I), float("nan"), dtype=out_dtype)
    assert lib.t_gated_act(ptr(src), DSINF[src_dtype], M, I, activation, ptr(out), DSINF[out_dtype], 1) == 0
    want = mlp_gemm.gated_activation(src.float(), ActivationFuncType(activation)).to(out_dtype)
    assert rel_err(out, want) <= TOL[out_dtype]


def test_gated_act_silu_over_the_whole_float_range(lib):
    """The epilogue's vectorized SiLU (cpu_simd.h vexp, clamped to [-87.3, 89]) against torch's fp32 silu,
    element by element: within a few ulp in the range activations live in, exact past the clamp where silu is
    x itself, ~0 far below it, signed zeros and NaN kept. Every vector width's tail (I = 45 is not a
    multiple of 8 or 16)."""
    I = 45
    gate = torch.cat([torch.linspace(-30, 30, 4 * I - 9), torch.tensor([-1e30, -500.0, -88.5, -87.0, 0.0, -0.0,
                                                                      88.5, 500.0, 1e30])])
    rows = gate.numel() // I
    gate = gate[: rows * I].reshape(rows, I)
    up = torch.rand(rows, I) + 0.5
    src = torch.cat([up, gate], dim=1).contiguous()
    out = torch.full((rows, I), float("nan"))
    assert lib.t_gated_act(ptr(src), 0, rows, I, GATED_SILU, ptr(out), 0, 1) == 0
    want = torch.nn.functional.silu(gate) * up
    ulp = torch.finfo(torch.float32).eps * want.abs().clamp_min(torch.finfo(torch.float32).tiny)
    assert ((out - want).abs() <= 4 * ulp + 1e-36).all(), (out - want).abs().max()  # + 1e-36: silu(-88.5) ~ -3e-37
    assert torch.equal(out.signbit(), want.signbit())  # -0.0 and the underflowed negatives stay negative
    nan = torch.tensor([[float("nan")] * I])
    src = torch.cat([torch.ones(1, I), nan], dim=1).contiguous()
    assert lib.t_gated_act(ptr(src), 0, 1, I, GATED_SILU, ptr(out), 0, 1) == 0
    assert out[0].isnan().all()


# ------------------------------------------------------------------------------------------ the whole MLP

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,I,layout,groups", [(1, 61, 37, "nk", None), (3, 128, 100, "kn", None),
                                                 (8, 96, 40, "int8", 4)])
@pytest.mark.parametrize("activation", [GATED_SILU, GATED_GELU])
def test_rms_mlp_gemm_from_kernels(lib, dtype, M, K, I, layout, groups, activation):
    """pre_rms_norm -> gated GEMV -> down projection (the decode recipe the binding will run; the down
    projection stands in for dsinf_cpu_gemv with a float32 matmul) equals reference.rms_mlp_gemm."""
    gen = torch.Generator().manual_seed(M + K + I)
    x = randn(1, M, K, dtype=dtype, gen=gen)
    resid = randn(1, M, K, dtype=dtype, gen=gen)
    gamma = randn(K, dtype=dtype, gen=gen)
    w1, s1 = _weights(K, I, dtype, layout, gen, groups)
    if layout == "int8":
        w2 = torch.randint(-127, 128, (K, I), dtype=torch.int8, generator=gen)
        s2 = torch.rand(K, generator=gen) * 0.02 + 0.002
    else:
        w2 = randn(K, I, dtype=dtype, gen=gen, scale=I ** -0.5)
        w2 = w2 if layout == "nk" else w2.t().contiguous()
        s2 = None

    h, res = torch.empty_like(x), torch.empty_like(x)
    assert lib.t_pre_rms_norm(ptr(x), ptr(resid), ptr(gamma), DSINF[dtype], M, K, 1e-5, ptr(h),
                              ptr(res), 1) == 0
    a = torch.empty(M, I, dtype=dtype)
    assert lib.t_gated_gemv(ptr(h), DSINF[dtype], M, ptr(w1), DSINF[w1.dtype], int(layout != "kn"), K, 2 * I,
                            ptr(s1), groups or 0, activation, ptr(a), 1) == 0
    w2f = dequantize(w2, s2).t() if layout == "int8" else (w2.float().t() if layout == "nk" else w2.float())
    out = (a.float() @ w2f).to(dtype).view(1, M, K)

    want_out, want_res = mlp_gemm.rms_mlp_gemm(x, resid, w1, w2, gamma, 1e-5, s1, s2, layout == "int8", activation,
                                          layout == "nk")
    assert torch.equal(res, want_res)
    assert rel_err(out, want_out) <= TOL_MLP[dtype]


# ------------------------------------------------------------------------------------------ CUDA compile check

@pytest.mark.parametrize("source", ["rms_norm.cu", "mlp_gemm.cu", "mlp_gemm_bf16.cu"])
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_cuda_kernels_compile(source, arch, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("needs nvcc")
    cmd = [nvcc, "-std=c++17", "-O3", f"-arch={arch}", "-DDSINF_CUDA_BF16", "--expt-relaxed-constexpr",
           "-Xptxas", "-v,-warn-spills", "-Werror", "all-warnings", f"-I{INCLUDE}", "-c", str(CUDA_DIR / source),
           "-o", str(tmp_path / "k.o")]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr  # -warn-spills + -Werror: a register spill fails the build
    # No local-memory arrays either (a register array indexed at run time lands in a stack frame).
    frames = [ln for ln in done.stderr.splitlines() if "stack frame" in ln and not ln.strip().startswith("0 bytes")]
    assert not frames, frames
