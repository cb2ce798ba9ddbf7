// CUDA-core GEMV for decode (M = B*S <= 16). fp32 accumulation.
//
//   out[m, n] = sum_k x[m, k] * W(k, n)  (* scale[n / (N/G)] for int8)  (+ bias[n])
//
// Used for fp32 activations (tensor cores would need tf32, which is not fp32-accurate), and for fp16
// in builds that include an arch below sm_80 (no mma.m16n8k16 there). Tokens are a compile-time
// bucket MB in {1, 2, 4, 8} (rows >= M re-read row M-1 and are never stored), so the per-thread
// accumulators stay in registers. M = 9..16 runs as two launches of 8 tokens (fp32 is not the decode
// fast path; fewer instantiations keep the build fast).
#include <type_traits>

#include "common.cuh"
#include "gemv_internal.cuh"

namespace dsinf {
namespace cuda {
namespace detail {
namespace {

#ifndef DSINF_SIMT_UNROLL
#define DSINF_SIMT_UNROLL 2
#endif
constexpr int kSimtUnroll = DSINF_SIMT_UNROLL;
constexpr int kSimtMaxTokens = 8;

// Weight 16-byte vector -> E floats (E = 4 fp32, 8 fp16/bf16, 16 int8).
template <typename WT>
struct WVec;

template <>
struct WVec<float> {
  static constexpr int E = 4;
  static __device__ __forceinline__ void unpack(const uint4& v, float (&f)[4]) {
    f[0] = __uint_as_float(v.x);
    f[1] = __uint_as_float(v.y);
    f[2] = __uint_as_float(v.z);
    f[3] = __uint_as_float(v.w);
  }
};

#if !defined(DSINF_CUDA_BF16)  // fp16 weights take the CUDA-core path only in builds with an arch < sm_80
template <>
struct WVec<__half> {
  static constexpr int E = 8;
  static __device__ __forceinline__ void unpack(const uint4& v, float (&f)[8]) {
    const uint32_t u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 p = Act<__half>::pair_to_float2(u[i]);
      f[2 * i] = p.x;
      f[2 * i + 1] = p.y;
    }
  }
};
#endif

template <>
struct WVec<int8_t> {
  static constexpr int E = 16;
  static __device__ __forceinline__ void unpack(const uint4& v, float (&f)[16]) { i8x16_to_float(v, f); }
};

// n consecutive activations (n * sizeof(T) a multiple of 8 bytes, aligned) -> floats; zeros when
// !valid (predicated loads: no branch in the unrolled body, and no 0 * inf from a stand-in read).
template <typename T, int n>
__device__ __forceinline__ void load_x(const T* p, bool valid, float (&f)[n]) {
  if constexpr (std::is_same<T, float>::value) {
    static_assert(n % 4 == 0, "fp32 x loads are float4");
#pragma unroll
    for (int i = 0; i < n / 4; ++i) {
      const uint4 v = valid ? ldg16(p + 4 * i) : make_uint4(0, 0, 0, 0);
      f[4 * i] = __uint_as_float(v.x);
      f[4 * i + 1] = __uint_as_float(v.y);
      f[4 * i + 2] = __uint_as_float(v.z);
      f[4 * i + 3] = __uint_as_float(v.w);
    }
  } else {
    static_assert(n % 4 == 0, "16-bit x loads are 8 bytes");
#pragma unroll
    for (int i = 0; i < n / 4; ++i) {
      const uint2 v = valid ? ldg8(p + 4 * i) : make_uint2(0, 0);
      const float2 a = Act<T>::pair_to_float2(v.x), b = Act<T>::pair_to_float2(v.y);
      f[4 * i] = a.x;
      f[4 * i + 1] = a.y;
      f[4 * i + 2] = b.x;
      f[4 * i + 3] = b.y;
    }
  }
}

// Warp reduce-scatter of C values per lane over the xor offsets O, O/2, ..., STOP: at each level a lane
// keeps half of its values and adds its partner's copy of that half (C/2 shuffles instead of C), so
// 64 values over 32 lanes cost 62 shuffles instead of 320. Once one value is left the remaining levels
// all-reduce it. `base` accumulates the original index of v[0].
template <int C, int O, int STOP, int V>
struct ReduceScatter {
  static __device__ __forceinline__ void run(float (&v)[V], int lane, int& base) {
    if constexpr (O < STOP) {
      return;
    } else if constexpr (C > 1) {
      constexpr int H = C / 2;
      const bool up = (lane & O) != 0;
#pragma unroll
      for (int i = 0; i < H; ++i) {
        const float send = up ? v[i] : v[i + H];
        const float keep = up ? v[i + H] : v[i];
        v[i] = keep + __shfl_xor_sync(kFullMask, send, O);
      }
      if (up) base += H;
      ReduceScatter<H, O / 2, STOP, V>::run(v, lane, base);
    } else {
      v[0] += __shfl_xor_sync(kFullMask, v[0], O);
      ReduceScatter<1, O / 2, STOP, V>::run(v, lane, base);
    }
  }
};

// ------------------------------------------------------------------------------------------------
// Weight [N, K] (float or int8). CTA = 4 rows n0..n0+3 x the whole K; its 256 threads stride K in
// chunks of E weight elements (one 16-byte load per row per chunk; a warp reads 512 contiguous bytes
// of a row). Per thread: 4 x MB accumulators, U chunks x 4 rows of loads in flight. Reduction: warp
// reduce-scatter, then across the 8 warps in shared memory. Constraints: K % E == 0, x/W 16-byte
// aligned (fp32 x rows: K % 4 == 0 follows).
// ------------------------------------------------------------------------------------------------
template <typename T, typename WT, int MB>
__global__ void __launch_bounds__(kGemvThreads) gemv_nk_simt_kernel(const T* __restrict__ x, const WT* __restrict__ w,
                                                                    Epilogue<T> epi, int M, int K, int N) {
  constexpr int R = kTileNkSimt, E = WVec<WT>::E, V = R * MB;
  __shared__ float red[kGemvWarps * V];
  __shared__ float part[V];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int n0 = blockIdx.x * R;
  const int nchunks = K / E;

  const WT* wrow[R];
  bool row_ok[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    row_ok[r] = n0 + r < N;
    wrow[r] = w + static_cast<size_t>(row_ok[r] ? n0 + r : 0) * K;
  }
  const T* xrow[MB];
#pragma unroll
  for (int m = 0; m < MB; ++m) xrow[m] = x + static_cast<size_t>(min(m, M - 1)) * K;

  float acc[V];  // acc[m * R + r]
#pragma unroll
  for (int i = 0; i < V; ++i) acc[i] = 0.f;

  for (int c0 = threadIdx.x; c0 < nchunks; c0 += kGemvThreads * kSimtUnroll) {
    uint4 wv[kSimtUnroll][R];
#pragma unroll
    for (int u = 0; u < kSimtUnroll; ++u) {
      const int c = c0 + u * kGemvThreads;
#pragma unroll
      for (int r = 0; r < R; ++r)
        wv[u][r] = (c < nchunks && row_ok[r]) ? ldg16_stream(wrow[r] + static_cast<size_t>(c) * E)
                                              : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < kSimtUnroll; ++u) {
      const int c = c0 + u * kGemvThreads;
      const bool c_ok = c < nchunks;  // predicated, not a branch: keeps the unrolled body straight-line
      float wf[R][E];
#pragma unroll
      for (int r = 0; r < R; ++r) WVec<WT>::unpack(wv[u][r], wf[r]);
#pragma unroll
      for (int m = 0; m < MB; ++m) {
        float xf[E];
        load_x<T, E>(xrow[m] + static_cast<size_t>(c) * E, c_ok, xf);
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
          for (int e = 0; e < E; ++e) acc[m * R + r] = fmaf(xf[e], wf[r][e], acc[m * R + r]);
      }
    }
  }

  int base = 0;
  ReduceScatter<V, 16, 1, V>::run(acc, lane, base);
  constexpr int kLeft = V >= 32 ? V / 32 : 1;  // values each lane holds after the reduce-scatter
  constexpr int kDup = V >= 32 ? 1 : 32 / V;   // lanes holding the same value (low lane bits all-reduced)
  if ((lane & (kDup - 1)) == 0) {
#pragma unroll
    for (int j = 0; j < kLeft; ++j) red[warp * V + base + j] = acc[j];
  }
  __syncthreads();
  sum_warps(red, part, V, kGemvWarps);
  __syncthreads();
  reduce_and_store<R>(part, V, n0, epi);  // part[m * R + r]: token m, row n0 + r
}

// ------------------------------------------------------------------------------------------------
// Weight [K, N] (fp32, or fp16 in sm_75 builds). CTA tile: 64 columns x K range. Thread (cl, kg):
// cl = tid % L owns columns n0 + E*cl .. +E-1 (E = 16 B / sizeof(T), L = 64 / E lanes: one k-row of
// the tile is 256 (fp32) or 128 (fp16) contiguous bytes), kg = tid / L takes k-blocks of 4 rows
// (k = k_begin + 4 * (kg + KG * j)), reading 4 consecutive x values per token with one load.
// Reduction: reduce-scatter over the k-groups inside a warp, shared memory across warps, and the
// cluster reduction when K is split over CTAs. Constraints: N % E == 0, K % 4 == 0, 16-byte aligned.
// ------------------------------------------------------------------------------------------------
template <typename T, int MB>
__global__ void __launch_bounds__(kGemvThreads) gemv_kn_simt_kernel(const T* __restrict__ x, const T* __restrict__ w,
                                                                    Epilogue<T> epi, int M, int K, int N, int kchunk) {
  constexpr int TN = kTileKnSimt, E = WVec<T>::E, L = TN / E, KG = kGemvThreads / L, V = MB * E, P = MB * TN;
  static_assert(32 % L == 0, "column lanes must divide a warp");
  __shared__ float red[kGemvWarps * P];
  __shared__ float part[P];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int cl = threadIdx.x % L, kg = threadIdx.x / L;
  const int n0 = blockIdx.x * TN;
  const int col = n0 + E * cl;
  const bool col_ok = col < N;
  const int k_begin = blockIdx.y * kchunk;
  const int k_end = min(K, k_begin + kchunk);
  const T* wcol = w + (col_ok ? col : 0);
  const T* xrow[MB];
#pragma unroll
  for (int m = 0; m < MB; ++m) xrow[m] = x + static_cast<size_t>(min(m, M - 1)) * K;

  float acc[V];  // acc[m * E + e]: token m, column col + e
#pragma unroll
  for (int i = 0; i < V; ++i) acc[i] = 0.f;

  for (int kb0 = k_begin + 4 * kg; kb0 < k_end; kb0 += 4 * KG * kSimtUnroll) {
    uint4 wv[kSimtUnroll][4];
#pragma unroll
    for (int u = 0; u < kSimtUnroll; ++u) {
      const int kb = kb0 + u * 4 * KG;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int k = kb + i;
        wv[u][i] = (col_ok && k < k_end) ? ldg16_stream(wcol + static_cast<size_t>(k) * N) : make_uint4(0, 0, 0, 0);
      }
    }
#pragma unroll
    for (int u = 0; u < kSimtUnroll; ++u) {
      const int kb = kb0 + u * 4 * KG;
      // K % 4 == 0 and kchunk % 4 == 0: a k-block is all in range or all out (then W and x are 0).
      float wf[4][E];
#pragma unroll
      for (int i = 0; i < 4; ++i) WVec<T>::unpack(wv[u][i], wf[i]);
#pragma unroll
      for (int m = 0; m < MB; ++m) {
        float xf[4];
        load_x<T, 4>(xrow[m] + kb, kb < k_end, xf);
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int e = 0; e < E; ++e) acc[m * E + e] = fmaf(xf[i], wf[i][e], acc[m * E + e]);
      }
    }
  }

  // lanes l, l + L, l + 2L, ... of a warp hold the same columns: reduce-scatter over offsets 16..L.
  int base = 0;
  ReduceScatter<V, 16, L, V>::run(acc, lane, base);
  constexpr int kLeft = V / (32 / L);  // V >= 4 >= 32 / L levels' worth: no all-reduce needed
  static_assert(kLeft >= 1, "bucket too small for the reduce-scatter");
#pragma unroll
  for (int j = 0; j < kLeft; ++j) {
    const int vi = base + j, m = vi / E, e = vi % E;
    red[warp * P + m * TN + E * cl + e] = acc[j];
  }
  __syncthreads();
  sum_warps(red, part, P, kGemvWarps);
  __syncthreads();
  reduce_and_store<TN>(part, P, n0, epi);
}

template <typename T, typename WT>
cudaError_t nk_simt(const GemvArgs& a, cudaStream_t stream) {
  const unsigned tiles = static_cast<unsigned>((a.N + kTileNkSimt - 1) / kTileNkSimt);
  const T* x = static_cast<const T*>(a.x);
  const WT* w = static_cast<const WT*>(a.w);
  const int M = static_cast<int>(a.M), K = static_cast<int>(a.K), N = static_cast<int>(a.N);
  const Epilogue<T> e = make_epilogue<T>(a);
  if (M <= 1) gemv_nk_simt_kernel<T, WT, 1><<<tiles, kGemvThreads, 0, stream>>>(x, w, e, M, K, N);
  else if (M <= 2) gemv_nk_simt_kernel<T, WT, 2><<<tiles, kGemvThreads, 0, stream>>>(x, w, e, M, K, N);
  else if (M <= 4) gemv_nk_simt_kernel<T, WT, 4><<<tiles, kGemvThreads, 0, stream>>>(x, w, e, M, K, N);
  else gemv_nk_simt_kernel<T, WT, 8><<<tiles, kGemvThreads, 0, stream>>>(x, w, e, M, K, N);
  return cudaGetLastError();
}

template <typename T>
cudaError_t kn_simt(const GemvArgs& a, int split, cudaStream_t stream) {
  const int tiles = static_cast<int>((a.N + kTileKnSimt - 1) / kTileKnSimt);
  const int kchunk = k_per_split(a.K, split, 4);
  const T* x = static_cast<const T*>(a.x);
  const T* w = static_cast<const T*>(a.w);
  const int M = static_cast<int>(a.M), K = static_cast<int>(a.K), N = static_cast<int>(a.N);
  const Epilogue<T> e = make_epilogue<T>(a);
  if (M <= 1) return launch_split(gemv_kn_simt_kernel<T, 1>, tiles, split, false, 0, stream, x, w, e, M, K, N, kchunk);
  if (M <= 2) return launch_split(gemv_kn_simt_kernel<T, 2>, tiles, split, false, 0, stream, x, w, e, M, K, N, kchunk);
  if (M <= 4) return launch_split(gemv_kn_simt_kernel<T, 4>, tiles, split, false, 0, stream, x, w, e, M, K, N, kchunk);
  return launch_split(gemv_kn_simt_kernel<T, 8>, tiles, split, false, 0, stream, x, w, e, M, K, N, kchunk);
}

// Tokens 0..7 and 8..M-1 as two launches (the kernels take at most 8 tokens).
template <typename Launch>
cudaError_t by_eight_tokens(const GemvArgs& a, Launch launch) {
  if (a.M <= kSimtMaxTokens) return launch(a);
  const size_t esize = a.dtype == DType::kFloat32 ? 4 : 2;
  GemvArgs lo = a, hi = a;
  lo.M = kSimtMaxTokens;
  hi.M = a.M - kSimtMaxTokens;
  hi.x = static_cast<const char*>(a.x) + kSimtMaxTokens * static_cast<size_t>(a.K) * esize;
  hi.out = static_cast<char*>(a.out) + kSimtMaxTokens * static_cast<size_t>(a.N) * esize;
  const cudaError_t err = launch(lo);
  return err != cudaSuccess ? err : launch(hi);
}

}  // namespace

cudaError_t launch_nk_simt(const GemvArgs& a, cudaStream_t stream) {
  return by_eight_tokens(a, [stream](const GemvArgs& p) -> cudaError_t {
    switch (p.dtype) {
      case DType::kFloat32: return p.w_int8 ? nk_simt<float, int8_t>(p, stream) : nk_simt<float, float>(p, stream);
#if !defined(DSINF_CUDA_BF16)
      case DType::kFloat16:
        return p.w_int8 ? nk_simt<__half, int8_t>(p, stream) : nk_simt<__half, __half>(p, stream);
#endif
      default: return cudaErrorInvalidValue;
    }
  });
}

cudaError_t launch_kn_simt(const GemvArgs& a, int split, cudaStream_t stream) {
  return by_eight_tokens(a, [split, stream](const GemvArgs& p) -> cudaError_t {
    switch (p.dtype) {
      case DType::kFloat32: return kn_simt<float>(p, split, stream);
#if !defined(DSINF_CUDA_BF16)
      case DType::kFloat16: return kn_simt<__half>(p, split, stream);
#endif
      default: return cudaErrorInvalidValue;
    }
  });
}

}  // namespace detail
}  // namespace cuda
}  // namespace dsinf
