// RMSNorm and residual-add + RMSNorm, torch-free. fp32 accumulation, one rounding per stored value.
//
// Launchers (namespace dsinf::cuda; DType from cuda_kernels.h; the binding declares them itself). x,
// residual, out, res_out: contiguous [rows, H]; gamma [H]; all of `dtype`. Asynchronous on `stream`, no
// allocation; rows == 0 or H == 0 launches nothing. Returns the launch status (cudaErrorInvalidValue for
// bad sizes, cudaErrorNotSupported for bf16 in a build without DSINF_CUDA_BF16).
//
//   cudaError_t rms_norm(DType dtype, const void* x, const void* gamma, void* out, int64_t rows, int64_t H,
//                        float epsilon, cudaStream_t stream);
//       out[r, i] = round(x[r, i] * rsqrt(mean_i(x[r, i]^2) + epsilon) * gamma[i])
//   cudaError_t pre_rms_norm(DType dtype, const void* x, const void* residual, const void* gamma, void* out,
//                            void* res_out, int64_t rows, int64_t H, float epsilon, cudaStream_t stream);
//       res_out = round(x + residual) (fp32 add, rounded to dtype); out = rms_norm(res_out): the norm reads
//       the rounded sum, as DeepSpeed's kernel does.
//
// One pass: x and residual are read once and both outputs written once. A row's TPR threads (a warp group,
// several rows per 256-thread block when H is small) keep their share of the row in registers between the
// sum of squares and the scaling (UNROLL packs per thread), so nothing is re-read. Vector path: 16-byte
// packs when H % (16 / sizeof(T)) == 0 and every pointer is 16-byte aligned; else 1-element packs (any H).
// Rows longer than 256 * 8 packs (16384 16-bit / 8192 fp32 elements with 16-byte packs) take a loop kernel
// that re-reads the row (x, or res_out it wrote itself) from L2 for the second sweep.
#include <cstdint>

#include "common.cuh"

namespace dsinf {
namespace cuda {
namespace {

using detail::Act;
using detail::aligned16;

constexpr int kThreads = 256;
constexpr int kMaxUnroll = 8;

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// Read-only inputs (x, residual, gamma) go through the non-coherent path.
template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_ro(const T* p) {
  if constexpr (sizeof(Pack<T, VEC>) == 16) {
    const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
    return *reinterpret_cast<const Pack<T, VEC>*>(&u);
  } else {
    return *reinterpret_cast<const Pack<T, VEC>*>(p);
  }
}

// out = round(a + b) per element.
template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> add_round(const Pack<T, VEC>& a, const Pack<T, VEC>& b) {
  Pack<T, VEC> s;
#pragma unroll
  for (int i = 0; i < VEC; ++i) s.v[i] = Act<T>::from_float(Act<T>::to_float(a.v[i]) + Act<T>::to_float(b.v[i]));
  return s;
}

template <typename T, int VEC>
__device__ __forceinline__ float sum_sq(const Pack<T, VEC>& a) {
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    const float f = Act<T>::to_float(a.v[i]);
    s = fmaf(f, f, s);
  }
  return s;
}

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> scale(const Pack<T, VEC>& a, const Pack<T, VEC>& g, float inv) {
  Pack<T, VEC> o;
#pragma unroll
  for (int i = 0; i < VEC; ++i) o.v[i] = Act<T>::from_float(Act<T>::to_float(a.v[i]) * inv * Act<T>::to_float(g.v[i]));
  return o;
}

// Sum over the TPR = blockDim.x threads of this row (row = threadIdx.y): warp shuffles, then shared memory
// across the row's warps. Every thread of the block must call it (it holds a __syncthreads).
__device__ __forceinline__ float row_sum(float v) {
  __shared__ float red[kThreads / 32];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(detail::kFullMask, v, o);
  const int warps = blockDim.x >> 5;
  if (warps == 1) return v;  // uniform over the block: blockDim.x is
  const int warp = threadIdx.x >> 5, first = threadIdx.y * warps;
  if ((threadIdx.x & 31) == 0) red[first + warp] = v;
  __syncthreads();
  float s = 0.f;
  for (int w = 0; w < warps; ++w) s += red[first + w];
  return s;
}

__device__ __forceinline__ float inv_rms(float sum_sq, int H, float epsilon) {
  return 1.0f / sqrtf(sum_sq / static_cast<float>(H) + epsilon);  // IEEE sqrt and division
}

// blockDim = (TPR, kThreads / TPR): TPR threads per row (a multiple of 32), one row per threadIdx.y.
// Thread t of a row owns packs t, t + TPR, ..., t + (UNROLL - 1) * TPR.
// At decode and prefill sizes (a few MB) the kernel is one DRAM round trip plus launch, so every load a
// thread makes (x, residual and gamma, all UNROLL packs) is issued before the first use of any of them:
// one round of memory latency, then the shuffles and the block's single barrier, then the stores.
// Gamma joins the first round up to UNROLL = 4; at 8 (rows of 8K-16K 16-bit elements) the three register
// arrays would exceed the 128 registers of 2 CTAs per SM (ptxas spills), so gamma is read after the sum.
template <typename T, int VEC, int UNROLL, bool PRE>
__global__ void __launch_bounds__(kThreads, 2) rms_norm_cached_kernel(const T* __restrict__ x, const T* __restrict__ res_in,
                                                                   const T* __restrict__ gamma, T* __restrict__ out,
                                                                   T* __restrict__ res_out, int rows, int H,
                                                                   float epsilon) {
  // A kernel launched after this one with programmatic serialization (the gated GEMV of rms_mlp_gemm) may
  // be scheduled now: it prefetches its weights and waits for this grid's completion before reading h.
  detail::pdl_launch_dependents();
  const int row = blockIdx.x * blockDim.y + threadIdx.y;
  const bool row_ok = row < rows;
  const int npack = H / VEC;
  const size_t base = static_cast<size_t>(row_ok ? row : 0) * H;
  constexpr bool kGammaFirst = UNROLL <= 4;
  Pack<T, VEC> cache[UNROLL], other[UNROLL], g[kGammaFirst ? UNROLL : 1];
#pragma unroll
  for (int u = 0; u < UNROLL; ++u) {
    const int p = u * blockDim.x + threadIdx.x;
    if (row_ok && p < npack) {
      const size_t off = static_cast<size_t>(p) * VEC;
      cache[u] = load_ro<T, VEC>(x + base + off);
      if constexpr (PRE) other[u] = load_ro<T, VEC>(res_in + base + off);
      if constexpr (kGammaFirst) g[u] = load_ro<T, VEC>(gamma + off);
    }
  }
  float ss = 0.f;
#pragma unroll
  for (int u = 0; u < UNROLL; ++u) {
    const int p = u * blockDim.x + threadIdx.x;
    if (row_ok && p < npack) {
      if constexpr (PRE) {
        cache[u] = add_round(cache[u], other[u]);
        *reinterpret_cast<Pack<T, VEC>*>(res_out + base + static_cast<size_t>(p) * VEC) = cache[u];
      }
      ss += sum_sq(cache[u]);
    }
  }
  const float inv = inv_rms(row_sum(ss), H, epsilon);
#pragma unroll
  for (int u = 0; u < UNROLL; ++u) {
    const int p = u * blockDim.x + threadIdx.x;
    if (row_ok && p < npack) {
      const size_t off = static_cast<size_t>(p) * VEC;
      const Pack<T, VEC> gu = kGammaFirst ? g[kGammaFirst ? u : 0] : load_ro<T, VEC>(gamma + off);
      *reinterpret_cast<Pack<T, VEC>*>(out + base + off) = scale(cache[u], gu, inv);
    }
  }
}

// Rows too long for the register cache: one row per 256-thread block; the second sweep re-reads the row
// from L2 (res_out with a plain load: this kernel wrote it, so the non-coherent path may not be used).
template <typename T, int VEC, bool PRE>
__global__ void __launch_bounds__(kThreads) rms_norm_loop_kernel(const T* __restrict__ x, const T* __restrict__ res_in,
                                                                 const T* __restrict__ gamma, T* __restrict__ out,
                                                                 T* res_out, int H, float epsilon) {
  detail::pdl_launch_dependents();  // as in rms_norm_cached_kernel
  const size_t base = static_cast<size_t>(blockIdx.x) * H;
  const int npack = H / VEC;
  float ss = 0.f;
  for (int p = threadIdx.x; p < npack; p += blockDim.x) {
    const size_t off = base + static_cast<size_t>(p) * VEC;
    Pack<T, VEC> v = load_ro<T, VEC>(x + off);
    if constexpr (PRE) {
      v = add_round(v, load_ro<T, VEC>(res_in + off));
      *reinterpret_cast<Pack<T, VEC>*>(res_out + off) = v;
    }
    ss += sum_sq(v);
  }
  const float inv = inv_rms(row_sum(ss), H, epsilon);
  for (int p = threadIdx.x; p < npack; p += blockDim.x) {
    const size_t off = static_cast<size_t>(p) * VEC;
    const Pack<T, VEC> v = PRE ? *reinterpret_cast<const Pack<T, VEC>*>(res_out + base + off)
                               : load_ro<T, VEC>(x + base + off);
    *reinterpret_cast<Pack<T, VEC>*>(out + base + off) = scale(v, load_ro<T, VEC>(gamma + off), inv);
  }
}

template <typename T, int VEC, bool PRE>
cudaError_t launch_vec(const T* x, const T* res_in, const T* gamma, T* out, T* res_out, int rows, int H, float eps,
                       cudaStream_t stream) {
  const int npack = H / VEC;
  if (npack > kThreads * kMaxUnroll) {
    rms_norm_loop_kernel<T, VEC, PRE><<<rows, kThreads, 0, stream>>>(x, res_in, gamma, out, res_out, H, eps);
    return cudaGetLastError();
  }
  const int tpr = npack >= kThreads ? kThreads : (npack + 31) / 32 * 32;
  const int need = (npack + tpr - 1) / tpr;
  const int rpb = kThreads / tpr;
  const dim3 block(tpr, rpb);
  const dim3 grid((rows + rpb - 1) / rpb);
#define DSINF_RMS_LAUNCH(U) \
  rms_norm_cached_kernel<T, VEC, U, PRE><<<grid, block, 0, stream>>>(x, res_in, gamma, out, res_out, rows, H, eps)
  if (need <= 1) DSINF_RMS_LAUNCH(1);
  else if (need <= 2) DSINF_RMS_LAUNCH(2);
  else if (need <= 4) DSINF_RMS_LAUNCH(4);
  else DSINF_RMS_LAUNCH(8);
#undef DSINF_RMS_LAUNCH
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch(const void* x, const void* residual, const void* gamma, void* out, void* res_out, int64_t rows,
                   int64_t H, float eps, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const T* xt = static_cast<const T*>(x);
  const T* rt = static_cast<const T*>(residual);
  const T* gt = static_cast<const T*>(gamma);
  T* ot = static_cast<T*>(out);
  T* rot = static_cast<T*>(res_out);
  const int r = static_cast<int>(rows), h = static_cast<int>(H);
  const bool vec = H % kVec == 0 && aligned16(x) && aligned16(gamma) && aligned16(out) &&
                   (residual == nullptr || (aligned16(residual) && aligned16(res_out)));
  if (residual) {
    return vec ? launch_vec<T, kVec, true>(xt, rt, gt, ot, rot, r, h, eps, stream)
               : launch_vec<T, 1, true>(xt, rt, gt, ot, rot, r, h, eps, stream);
  }
  return vec ? launch_vec<T, kVec, false>(xt, nullptr, gt, ot, nullptr, r, h, eps, stream)
             : launch_vec<T, 1, false>(xt, nullptr, gt, ot, nullptr, r, h, eps, stream);
}

cudaError_t dispatch(DType dtype, const void* x, const void* residual, const void* gamma, void* out, void* res_out,
                     int64_t rows, int64_t H, float eps, cudaStream_t stream) {
  if (rows < 0 || H < 0 || rows > INT32_MAX || H > INT32_MAX) return cudaErrorInvalidValue;
  if (rows == 0 || H == 0) return cudaSuccess;
  if (!x || !gamma || !out || (residual && !res_out)) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32: return launch<float>(x, residual, gamma, out, res_out, rows, H, eps, stream);
    case DType::kFloat16: return launch<__half>(x, residual, gamma, out, res_out, rows, H, eps, stream);
#if defined(DSINF_CUDA_BF16)
    case DType::kBFloat16: return launch<__nv_bfloat16>(x, residual, gamma, out, res_out, rows, H, eps, stream);
#endif
    default: return cudaErrorNotSupported;
  }
}

}  // namespace

cudaError_t rms_norm(DType dtype, const void* x, const void* gamma, void* out, int64_t rows, int64_t H, float epsilon,
                     cudaStream_t stream) {
  return dispatch(dtype, x, nullptr, gamma, out, nullptr, rows, H, epsilon, stream);
}

cudaError_t pre_rms_norm(DType dtype, const void* x, const void* residual, const void* gamma, void* out, void* res_out,
                         int64_t rows, int64_t H, float epsilon, cudaStream_t stream) {
  if (!residual) return cudaErrorInvalidValue;
  return dispatch(dtype, x, residual, gamma, out, res_out, rows, H, epsilon, stream);
}

}  // namespace cuda
}  // namespace dsinf
