// Scalar GEMV fallback (M = B*S <= 16), fp32 accumulation:
//
//   out[m, n] = sum_k x[m, k] * W(k, n)  (* scale[n / (N/G)] for int8)  (+ bias[n])
//
// Any shape, any alignment, K == 0; one element per load. Correct, not fast: it exists for odd K / N
// and misaligned weight views, which the vector paths cannot read with 16-byte loads.
#include <type_traits>

#include "common.cuh"
#include "gemv_internal.cuh"

namespace dsinf {
namespace cuda {
namespace detail {
namespace {

// ------------------------------------------------------------------------------------------------
// Scalar fallback, weight [N, K] (any dtype, any K, any alignment): one warp per output row n, lanes
// stride k; M <= 16 accumulators; warp all-reduce.
// ------------------------------------------------------------------------------------------------
template <typename T, typename WT>
__global__ void __launch_bounds__(kGemvThreads) gemv_scalar_nk_kernel(const T* __restrict__ x, const WT* __restrict__ w,
                                                                      Epilogue<T> epi, int M, int K, int N) {
  constexpr int MB = static_cast<int>(kGemvMaxM);
  const int lane = threadIdx.x & 31;
  const int n = blockIdx.x * kGemvWarps + (threadIdx.x >> 5);
  if (n >= N) return;  // whole warp exits together: no barrier below
  const WT* wr = w + static_cast<size_t>(n) * K;
  float acc[MB];
#pragma unroll
  for (int m = 0; m < MB; ++m) acc[m] = 0.f;
  for (int k = lane; k < K; k += 32) {
    float wf;
    if constexpr (std::is_same<WT, int8_t>::value) wf = static_cast<float>(wr[k]);
    else wf = Act<WT>::to_float(wr[k]);
#pragma unroll
    for (int m = 0; m < MB; ++m)
      if (m < M) acc[m] = fmaf(Act<T>::to_float(x[static_cast<size_t>(m) * K + k]), wf, acc[m]);
  }
#pragma unroll
  for (int m = 0; m < MB; ++m) {
#pragma unroll
    for (int o = 16; o >= 1; o >>= 1) acc[m] += __shfl_xor_sync(kFullMask, acc[m], o);
    if (lane == m) epi.store(m, n, acc[m]);  // store() skips m >= M
  }
}

// Scalar fallback, weight [K, N]: CTA = 32 consecutive columns x 8 k-groups (coalesced along n).
template <typename T>
__global__ void __launch_bounds__(kGemvThreads) gemv_scalar_kn_kernel(const T* __restrict__ x, const T* __restrict__ w,
                                                                      Epilogue<T> epi, int M, int K, int N) {
  constexpr int MB = static_cast<int>(kGemvMaxM);
  __shared__ float red[kGemvWarps][MB][32];
  const int lane = threadIdx.x & 31, kg = threadIdx.x >> 5;
  const int n = blockIdx.x * 32 + lane;
  const bool n_ok = n < N;
  float acc[MB];
#pragma unroll
  for (int m = 0; m < MB; ++m) acc[m] = 0.f;
  if (n_ok) {
    for (int k = kg; k < K; k += kGemvWarps) {
      const float wf = Act<T>::to_float(w[static_cast<size_t>(k) * N + n]);
#pragma unroll
      for (int m = 0; m < MB; ++m)
        if (m < M) acc[m] = fmaf(Act<T>::to_float(x[static_cast<size_t>(m) * K + k]), wf, acc[m]);
    }
  }
#pragma unroll
  for (int m = 0; m < MB; ++m) red[kg][m][lane] = acc[m];
  __syncthreads();
  for (int i = threadIdx.x; i < MB * 32; i += kGemvThreads) {
    const int m = i / 32, l = i % 32;
    float v = 0.f;
#pragma unroll
    for (int g = 0; g < kGemvWarps; ++g) v += red[g][m][l];
    epi.store(m, blockIdx.x * 32 + l, v);
  }
}

template <typename T, typename WT>
cudaError_t scalar(const GemvArgs& a, cudaStream_t stream) {
  const T* x = static_cast<const T*>(a.x);
  const int M = static_cast<int>(a.M), K = static_cast<int>(a.K), N = static_cast<int>(a.N);
  const Epilogue<T> e = make_epilogue<T>(a);
  if constexpr (std::is_same<WT, int8_t>::value) {
    const unsigned blocks = static_cast<unsigned>((a.N + kGemvWarps - 1) / kGemvWarps);
    gemv_scalar_nk_kernel<T, int8_t><<<blocks, kGemvThreads, 0, stream>>>(x, static_cast<const int8_t*>(a.w), e, M, K, N);
  } else if (a.w_nk) {
    const unsigned blocks = static_cast<unsigned>((a.N + kGemvWarps - 1) / kGemvWarps);
    gemv_scalar_nk_kernel<T, T><<<blocks, kGemvThreads, 0, stream>>>(x, static_cast<const T*>(a.w), e, M, K, N);
  } else {
    const unsigned blocks = static_cast<unsigned>((a.N + 31) / 32);
    gemv_scalar_kn_kernel<T><<<blocks, kGemvThreads, 0, stream>>>(x, static_cast<const T*>(a.w), e, M, K, N);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t scalar_any(const GemvArgs& a, cudaStream_t stream) {
  return a.w_int8 ? scalar<T, int8_t>(a, stream) : scalar<T, T>(a, stream);
}

}  // namespace

cudaError_t launch_scalar(const GemvArgs& a, cudaStream_t stream) {
  switch (a.dtype) {
    case DType::kFloat32: return scalar_any<float>(a, stream);
    case DType::kFloat16: return scalar_any<__half>(a, stream);
#if defined(DSINF_CUDA_BF16)
    case DType::kBFloat16: return scalar_any<__nv_bfloat16>(a, stream);
#endif
    default: return cudaErrorNotSupported;
  }
}

}  // namespace detail
}  // namespace cuda
}  // namespace dsinf
