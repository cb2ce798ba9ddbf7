// The gated-MLP kernels and their launchers, shared by mlp_gemm.cu (fp32, fp16, the entry points) and
// mlp_gemm_bf16.cu (bf16): templates in an unnamed namespace, so each unit compiles only what it
// instantiates (why two units: mlp_gemm.cu).
#pragma once
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <type_traits>

#include "common.cuh"
#include "gemv_internal.cuh"

namespace dsinf {
namespace cuda {
namespace {

using detail::Act;
using detail::kFullMask;
using detail::aligned16;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxM = 8;
static_assert(kMaxM == kGatedGemvMaxM, "the launcher's M limit is the binding's (cuda_kernels.h)");
constexpr int kGatedGelu = 3;  // DeepSpeed ActivationFuncType.GATED_GELU
constexpr int kGatedSilu = 4;  // DeepSpeed ActivationFuncType.GATED_SILU

__device__ __forceinline__ float gated(int activation, float gate, float up) {
  const float a = activation == kGatedSilu ? gate / (1.0f + expf(-gate))
                                           : 0.5f * gate * (1.0f + erff(gate * 0.70710678118654752f));
  return a * up;
}

// 16-byte weight pack -> E floats (E = 4 fp32, 8 fp16/bf16, 16 int8).
template <typename WT>
struct WPack {
  static constexpr int E = 16 / sizeof(WT);
  static __device__ __forceinline__ void unpack(const uint4& v, float (&f)[E]) {
    const WT* e = reinterpret_cast<const WT*>(&v);
#pragma unroll
    for (int i = 0; i < E; ++i) f[i] = Act<WT>::to_float(e[i]);
  }
};

template <>
struct WPack<int8_t> {
  static constexpr int E = 16;
  static __device__ __forceinline__ void unpack(const uint4& v, float (&f)[16]) { detail::i8x16_to_float(v, f); }
};

// n consecutive x values (n * sizeof(T) a multiple of 16 bytes, 16-byte aligned) -> floats; zeros when !ok.
template <typename T, int n>
__device__ __forceinline__ void load_x(const T* p, bool ok, float (&f)[n]) {
  constexpr int per = 16 / sizeof(T);
  static_assert(n % per == 0, "x loads are 16 bytes");
#pragma unroll
  for (int i = 0; i < n / per; ++i) {
    const uint4 v = ok ? detail::ldg16(p + i * per) : make_uint4(0, 0, 0, 0);
    const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
    for (int j = 0; j < per; ++j) f[i * per + j] = Act<T>::to_float(e[j]);
  }
}

template <int V>
__device__ __forceinline__ void warp_allreduce(float (&v)[V]) {
#pragma unroll
  for (int i = 0; i < V; ++i)
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v[i] += __shfl_xor_sync(kFullMask, v[i], o);
}

// ------------------------------------------------------------------------------------------------ [N, K]
template <typename T, typename WT, int MB>
__global__ void __launch_bounds__(kThreads, 1) gated_nk_kernel(const T* __restrict__ x, const WT* __restrict__ w,
                                                            const float* __restrict__ scale, int rows_per_group,
                                                            T* __restrict__ out, int M, int K, int I, int activation) {
  constexpr int E = WPack<WT>::E, U = 2;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int j = (blockIdx.x * kWarps + warp) * 2;
  if (j >= I) return;  // whole warp; no block-level synchronisation below
  const int pair = min(2, I - j);
  const int rows[4] = {j, j + pair - 1, I + j, I + j + pair - 1};
  const WT* wr[4];
#pragma unroll
  for (int r = 0; r < 4; ++r) wr[r] = w + static_cast<size_t>(rows[r]) * K;
  const T* xr[MB];
#pragma unroll
  for (int m = 0; m < MB; ++m) xr[m] = x + static_cast<size_t>(min(m, M - 1)) * K;

  float acc[4 * MB];  // acc[r * MB + m]
#pragma unroll
  for (int i = 0; i < 4 * MB; ++i) acc[i] = 0.f;

  const int nchunks = K / E;
  for (int c0 = lane; c0 < nchunks; c0 += 32 * U) {
    uint4 wv[U][4];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + 32 * u;
#pragma unroll
      for (int r = 0; r < 4; ++r)
        wv[u][r] = c < nchunks ? detail::ldg16_stream(wr[r] + static_cast<size_t>(c) * E) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + 32 * u;
#pragma unroll
      for (int m = 0; m < MB; ++m) {
        float xf[E];
        load_x<T, E>(xr[m] + static_cast<size_t>(c) * E, c < nchunks, xf);
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          float wf[E];
          WPack<WT>::unpack(wv[u][r], wf);
#pragma unroll
          for (int e = 0; e < E; ++e) acc[r * MB + m] = fmaf(xf[e], wf[e], acc[r * MB + m]);
        }
      }
    }
  }
  warp_allreduce(acc);
  // Lane 2m + p stores output (m, j + p); constant register indices in every branch (a computed index
  // would put acc in local memory).
#pragma unroll
  for (int m = 0; m < MB; ++m)
#pragma unroll
    for (int p = 0; p < 2; ++p) {
      if (lane == 2 * m + p && m < M && p < pair) {
        float up = acc[p * MB + m], gate = acc[(2 + p) * MB + m];
        if (scale) {
          up *= __ldg(scale + (j + p) / rows_per_group);
          gate *= __ldg(scale + (I + j + p) / rows_per_group);
        }
        out[static_cast<size_t>(m) * I + j + p] = Act<T>::from_float(gated(activation, gate, up));
      }
    }
}

// ------------------------------------------------------------------------------------------------ [K, N]
constexpr int kKnTile = 32;               // output columns per CTA
constexpr int kKnE = 4;                   // adjacent columns per thread
constexpr int kKnL = kKnTile / kKnE;      // column lanes: 8
constexpr int kKnGroups = kThreads / kKnL;  // k-groups: 32 (4 per warp)

// 4 consecutive T (16 bytes for fp32, 8 for 16-bit; aligned) -> floats.
template <typename T>
__device__ __forceinline__ void load4(const T* p, bool ok, float (&f)[4]) {
  if constexpr (sizeof(T) == 4) {
    const uint4 v = ok ? detail::ldg16(p) : make_uint4(0, 0, 0, 0);
    f[0] = __uint_as_float(v.x);
    f[1] = __uint_as_float(v.y);
    f[2] = __uint_as_float(v.z);
    f[3] = __uint_as_float(v.w);
  } else {
    const uint2 v = ok ? detail::ldg8(p) : make_uint2(0, 0);
    const float2 a = Act<T>::pair_to_float2(v.x), b = Act<T>::pair_to_float2(v.y);
    f[0] = a.x;
    f[1] = a.y;
    f[2] = b.x;
    f[3] = b.y;
  }
}

template <typename T, int MB>
__global__ void __launch_bounds__(kThreads, 1) gated_kn_kernel(const T* __restrict__ x, const T* __restrict__ w,
                                                            T* __restrict__ out, int M, int K, int I, int activation) {
  constexpr int P = MB * 2 * kKnTile;  // per warp: [m][up | gate][column]
  __shared__ float red[kWarps * P];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int cl = threadIdx.x % kKnL, kg = threadIdx.x / kKnL;
  const int j = blockIdx.x * kKnTile + kKnE * cl;
  const bool col_ok = j < I;  // I % 4 == 0: a thread's 4 columns are all in range or all out
  const size_t ldw = 2 * static_cast<size_t>(I);
  const T* wu = w + (col_ok ? j : 0);
  const T* wg = wu + I;
  const T* xr[MB];
#pragma unroll
  for (int m = 0; m < MB; ++m) xr[m] = x + static_cast<size_t>(min(m, M - 1)) * K;

  float au[MB][kKnE], ag[MB][kKnE];
#pragma unroll
  for (int m = 0; m < MB; ++m)
#pragma unroll
    for (int e = 0; e < kKnE; ++e) au[m][e] = ag[m][e] = 0.f;

  for (int kb = 4 * kg; kb < K; kb += 4 * kKnGroups) {  // K % 4 == 0: a k-block is all in range
    float fu[4][kKnE], fg[4][kKnE];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      load4<T>(wu + (kb + i) * ldw, col_ok, fu[i]);
      load4<T>(wg + (kb + i) * ldw, col_ok, fg[i]);
    }
#pragma unroll
    for (int m = 0; m < MB; ++m) {
      float xf[4];
      load4<T>(xr[m] + kb, true, xf);
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int e = 0; e < kKnE; ++e) {
          au[m][e] = fmaf(xf[i], fu[i][e], au[m][e]);
          ag[m][e] = fmaf(xf[i], fg[i][e], ag[m][e]);
        }
    }
  }
  // Lanes l, l + 8, l + 16, l + 24 of a warp hold the same columns (different k-groups).
#pragma unroll
  for (int m = 0; m < MB; ++m)
#pragma unroll
    for (int e = 0; e < kKnE; ++e)
#pragma unroll
      for (int o = 16; o >= kKnL; o >>= 1) {
        au[m][e] += __shfl_xor_sync(kFullMask, au[m][e], o);
        ag[m][e] += __shfl_xor_sync(kFullMask, ag[m][e], o);
      }
  if (lane < kKnL) {
#pragma unroll
    for (int m = 0; m < MB; ++m)
#pragma unroll
      for (int e = 0; e < kKnE; ++e) {
        red[warp * P + (m * 2) * kKnTile + kKnE * cl + e] = au[m][e];
        red[warp * P + (m * 2 + 1) * kKnTile + kKnE * cl + e] = ag[m][e];
      }
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < M * kKnTile; idx += kThreads) {
    const int m = idx / kKnTile, c = idx % kKnTile, col = blockIdx.x * kKnTile + c;
    float up = 0.f, gate = 0.f;
    for (int wi = 0; wi < kWarps; ++wi) {
      up += red[wi * P + (m * 2) * kKnTile + c];
      gate += red[wi * P + (m * 2 + 1) * kKnTile + c];
    }
    if (col < I) out[static_cast<size_t>(m) * I + col] = Act<T>::from_float(gated(activation, gate, up));
  }
}

// ------------------------------------------------------------------------------------------------ scalar
template <typename WT>
__device__ __forceinline__ float weight_value(const WT* w, size_t i) {
  return Act<WT>::to_float(w[i]);
}
template <>
__device__ __forceinline__ float weight_value<int8_t>(const int8_t* w, size_t i) {
  return static_cast<float>(w[i]);
}

// One warp per output column j; lanes stride K. Any shape, any alignment.
template <typename T, typename WT>
__global__ void __launch_bounds__(kThreads, 1) gated_scalar_kernel(const T* __restrict__ x, const WT* __restrict__ w,
                                                                bool w_nk, const float* __restrict__ scale,
                                                                int rows_per_group, T* __restrict__ out, int M, int K,
                                                                int I, int activation) {
  const int lane = threadIdx.x & 31;
  const int j = blockIdx.x * kWarps + (threadIdx.x >> 5);
  if (j >= I) return;
  const size_t N = 2 * static_cast<size_t>(I);
  float acc[2 * kMaxM];  // [up m0..m7 | gate m0..m7]
#pragma unroll
  for (int i = 0; i < 2 * kMaxM; ++i) acc[i] = 0.f;
  for (int k = lane; k < K; k += 32) {
    const float wu = weight_value(w, w_nk ? static_cast<size_t>(j) * K + k : k * N + j);
    const float wg = weight_value(w, w_nk ? (I + static_cast<size_t>(j)) * K + k : k * N + I + j);
#pragma unroll
    for (int m = 0; m < kMaxM; ++m) {
      if (m < M) {
        const float xv = Act<T>::to_float(x[static_cast<size_t>(m) * K + k]);
        acc[m] = fmaf(xv, wu, acc[m]);
        acc[kMaxM + m] = fmaf(xv, wg, acc[kMaxM + m]);
      }
    }
  }
  warp_allreduce(acc);
#pragma unroll
  for (int m = 0; m < kMaxM; ++m) {
    if (lane == m && m < M) {  // constant register indices (see gated_nk_kernel)
      float up = acc[m], gate = acc[kMaxM + m];
      if (scale) {
        up *= __ldg(scale + j / rows_per_group);
        gate *= __ldg(scale + (I + j) / rows_per_group);
      }
      out[static_cast<size_t>(m) * I + j] = Act<T>::from_float(gated(activation, gate, up));
    }
  }
}

// ------------------------------------------------------------------------------------------------ tensor core
// [N, K] fp16/bf16 or int8 weights, fp16/bf16 activations: mma.sync m16n8k16 with fp32 accumulation.
// Why: on CUDA cores every weight element costs M FMAs plus a conversion, so at M = 8 the gated GEMV was
// issue-bound (slower than cuBLAS); one mma does 16 x 8 x 16 multiply-adds, leaving the weight stream as
// the only cost for any M <= 8 (tokens are the mma's n = 8 columns; padding columns re-read x[M-1] and are
// never stored).
// CTA tile: 16 outputs j0..j0+15, i.e. the 32 weight rows up j0.. (first m16 tile) and gate I+j0..
// (second m16 tile), so the two accumulators of a thread hold up and gate of the same (j, token) and the
// epilogue pairs them without any exchange. 4 warps split the tile's K range in k-steps of KS = 4 x one
// 16-byte load (thread (g = lane/4, t = lane%4) loads rows j0+g, j0+g+8, I+j0+g, I+j0+g+8 at k = kb + E*t,
// E elements per 16 bytes, and the same k range of x for token g). Slot map as gemv_stream_kernel
// (gemv_stream.cu) for fp16/bf16 and int8 weights: A and B registers are words of the thread's own loads.
// Loads: cp.async into a kTcStages-deep ring in shared memory that only the issuing thread reads back, so
// (kTcStages - 1) k-steps (~200 bytes per thread) are always in flight and the loop has no barrier.
// Split-K across CTAs (clusters, sm_90) only when the tiles alone would leave SMs idle.
// PDL: launched with programmatic serialization after the RMSNorm kernel, a CTA issues its first weight
// stages (independent of that kernel), then waits for it (griddepcontrol.wait) before it reads x.
#if defined(DSINF_CUDA_BF16)
#ifndef DSINF_GATED_STAGES
#define DSINF_GATED_STAGES 4  // cp.async ring depth (k-steps); 4: 40 KB (int8: 48 KB) per 128-thread CTA
#endif
#ifndef DSINF_GATED_PDL
#define DSINF_GATED_PDL 1  // launch the tensor-core gated GEMV with programmatic serialization (sm_90)
#endif
constexpr int kTcThreads = 128;
constexpr int kTcWarps = kTcThreads / 32;
constexpr int kTcStages = DSINF_GATED_STAGES;
constexpr int kTcTile = 16;                       // outputs j per CTA (32 weight rows)
constexpr int kTcItems = 8 * kTcTile;             // (token, j) outputs per CTA
static_assert(kTcStages >= 2, "the ring needs two stages");

template <typename WT>
__host__ __device__ constexpr int tc_chunks() {  // 16-byte cp.async per thread per k-step: 4 weight rows + x
  return 4 + (16 / static_cast<int>(sizeof(WT))) * 2 / 16;
}
template <typename WT>
__host__ __device__ constexpr size_t tc_smem_bytes() {
  return static_cast<size_t>(kTcStages) * tc_chunks<WT>() * kTcThreads * 16;
}

template <typename T, typename WT>
__global__ void __launch_bounds__(kTcThreads) gated_tc_kernel(const T* __restrict__ x, const WT* __restrict__ w,
                                                             const float* __restrict__ scale, int rows_per_group,
                                                             T* __restrict__ out, int M, int K, int I, int activation,
                                                             int kchunk) {
  constexpr bool kInt8 = std::is_same<WT, int8_t>::value;
  constexpr int E = 16 / static_cast<int>(sizeof(WT));  // weight elements per 16-byte load
  constexpr int KS = 4 * E;                             // k per warp step
  constexpr int XL = E * 2 / 16;                        // 16-byte x loads per step (1, or 2 for int8)
  constexpr int C = tc_chunks<WT>();
  constexpr int P = 2 * kTcItems;                       // per-warp partials: [token][j][up, gate]
  extern __shared__ uint4 ring[];                       // [stage][chunk][thread]
  static_assert(static_cast<size_t>(kTcWarps + 1) * P * sizeof(float) <= tc_smem_bytes<WT>(), "reduction fits");

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int j0 = blockIdx.x * kTcTile;
  const int k_begin = blockIdx.y * kchunk;
  const int k_end = min(K, k_begin + kchunk);

  const WT* wrow[4];
  int wbytes[4];  // 16, or 0 for a row past I (zero-filled, never read)
#pragma unroll
  for (int i = 0; i < 4; ++i) {  // i = 2 * (gate ? 1 : 0) + half: row (gate ? I : 0) + j0 + 8 * half + g
    const int j = j0 + 8 * (i & 1) + g;
    wbytes[i] = j < I ? 16 : 0;
    wrow[i] = w + static_cast<size_t>((i >> 1) * I + (j < I ? j : 0)) * K;
  }
  const T* xrow = x + static_cast<size_t>(min(g, M - 1)) * K;
  const int first = k_begin + KS * warp, step = KS * kTcWarps;
  const int nsteps = first < k_end ? (k_end - first + step - 1) / step : 0;
  const uint32_t base = detail::smem_addr(ring) + threadIdx.x * 16;
  auto slot = [&](int s, int c) { return base + static_cast<uint32_t>((s * C + c) * kTcThreads * 16); };
  auto issue_w = [&](int j) {
    if (j >= nsteps) return;
    const int k = first + j * step + E * t;  // K % E == 0: a load is all in range or all out
    const bool ok = k < k_end;
#pragma unroll
    for (int i = 0; i < 4; ++i)
      detail::cp_async16_stream(slot(j % kTcStages, i), ok ? wrow[i] + k : wrow[i], ok ? wbytes[i] : 0);
  };
  auto issue_x = [&](int j) {
    if (j >= nsteps) return;
    const int k = first + j * step + E * t;
    const bool ok = k < k_end;
#pragma unroll
    for (int l = 0; l < XL; ++l)
      detail::cp_async16_cached(slot(j % kTcStages, 4 + l), ok ? xrow + k + 8 * l : xrow, ok ? 16 : 0);
  };

  // Group s (s < kTcStages - 1) holds k-step s's x, and group 0 also the first weight stages, so
  // "groups 0..j complete" means k-step j has fully landed.
#pragma unroll
  for (int s = 0; s < kTcStages - 1; ++s) issue_w(s);
  detail::pdl_wait();  // x is the previous kernel's output
#pragma unroll
  for (int s = 0; s < kTcStages - 1; ++s) {
    issue_x(s);
    detail::cp_async_commit();
  }

  float acc[2][4];  // [up, gate][C fragment]
#pragma unroll
  for (int r = 0; r < 2; ++r)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[r][e] = 0.f;

  for (int j = 0; j < nsteps; ++j) {
    issue_w(j + kTcStages - 1);  // into the slot k-step j - 1 used: this thread has consumed it
    issue_x(j + kTcStages - 1);
    detail::cp_async_commit();
    detail::cp_async_wait<kTcStages - 1>();
    const int s = j % kTcStages;
    uint4 wv[4], xv[XL];
#pragma unroll
    for (int i = 0; i < 4; ++i) wv[i] = detail::lds16(slot(s, i));
#pragma unroll
    for (int l = 0; l < XL; ++l) xv[l] = detail::lds16(slot(s, 4 + l));
    if constexpr (!kInt8) {
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int r = 0; r < 2; ++r)
          detail::Mma<T>::run(acc[r], detail::u4_word(wv[2 * r], 2 * h), detail::u4_word(wv[2 * r + 1], 2 * h),
                              detail::u4_word(wv[2 * r], 2 * h + 1), detail::u4_word(wv[2 * r + 1], 2 * h + 1),
                              detail::u4_word(xv[0], 2 * h), detail::u4_word(xv[0], 2 * h + 1));
    } else {
#pragma unroll
      for (int h = 0; h < 4; ++h) {
        uint32_t a[4][2];  // [load i][pair]: elements (4h, 4h+1) and (4h+2, 4h+3) of row i's 16
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          if constexpr (std::is_same_v<T, __half>)
            detail::I8Pairs<T>::convert(detail::u4_word(wv[i], h), a[i][0], a[i][1]);
          else  // bf16: through fp32, measured faster in this kernel (common.cuh)
            detail::I8Pairs<T>::convert_via_fp32(detail::u4_word(wv[i], h), a[i][0], a[i][1]);
        }
#pragma unroll
        for (int r = 0; r < 2; ++r)
          detail::Mma<T>::run(acc[r], a[2 * r][0], a[2 * r + 1][0], a[2 * r][1], a[2 * r + 1][1],
                              detail::u4_word(xv[h >> 1], 2 * (h & 1)), detail::u4_word(xv[h >> 1], 2 * (h & 1) + 1));
      }
    }
  }
  detail::cp_async_wait<0>();
  detail::pdl_launch_dependents();  // only the reduction is left: the down projection may be scheduled

  // C fragment (r, e): j = j0 + g + 8 (e >> 1), token 2t + (e & 1); the ring is reused for the sums.
  __syncthreads();
  float* red = reinterpret_cast<float*>(ring);
  float* part = red + kTcWarps * P;
#pragma unroll
  for (int r = 0; r < 2; ++r)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int item = (2 * t + (e & 1)) * kTcTile + g + 8 * (e >> 1);
      red[warp * P + 2 * item + r] = acc[r][e];
    }
  __syncthreads();
  for (int i = threadIdx.x; i < P; i += kTcThreads) {
    float v = 0.f;
#pragma unroll
    for (int ww = 0; ww < kTcWarps; ++ww) v += red[ww * P + i];
    part[i] = v;
  }
  __syncthreads();
  detail::reduce_items_and_store<2>(part, kTcItems, [&](int item, const float (&v)[2]) {
    const int tok = item / kTcTile, j = j0 + item % kTcTile;
    if (tok >= M || j >= I) return;
    float up = v[0], gate = v[1];
    if (kInt8) {
      up *= __ldg(scale + j / rows_per_group);
      gate *= __ldg(scale + (I + j) / rows_per_group);
    }
    out[static_cast<size_t>(tok) * I + j] = Act<T>::from_float(gated(activation, gate, up));
  });
}

// sm_90 device running sm_90+ code of `kernel` (clusters and PDL); cached per device.
bool sm90_code(const void* kernel) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cached[kMaxDevices];  // 0 unknown, 1 no, 2 yes (one kernel family: same answer)
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  if (dev < kMaxDevices) {
    const int c = cached[dev].load(std::memory_order_relaxed);
    if (c) return c == 2;
  }
  int major = 0;
  cudaFuncAttributes fa = {};
  const bool yes = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
                   major >= 9 && cudaFuncGetAttributes(&fa, kernel) == cudaSuccess && fa.binaryVersion >= 90;
  (void)cudaGetLastError();
  if (dev < kMaxDevices) cached[dev].store(yes ? 2 : 1, std::memory_order_relaxed);
  return yes;
}

template <typename T, typename WT>
cudaError_t launch_tc(const T* x, const WT* w, const float* scale, int rpg, T* out, int M, int K, int I, int act,
                      cudaStream_t stream) {
  constexpr int KS = 4 * 16 / static_cast<int>(sizeof(WT));
  auto* kernel = gated_tc_kernel<T, WT>;
  const int tiles = detail::ceil_div(I, kTcTile);
  const bool sm90 = sm90_code(reinterpret_cast<const void*>(kernel));
  // Split K over a cluster until there are 2 CTAs per SM, keeping >= DSINF_GEMV_MIN_K_PER_CTA k per CTA.
  int split = 1;
  const int want = 2 * detail::device_sm_count();
  if (sm90 && tiles < want) {
    split = std::min({detail::ceil_div(want, tiles), DSINF_GEMV_MAX_SPLIT, std::max(1, K / DSINF_GEMV_MIN_K_PER_CTA)});
  }
  const int kchunk = split > 1 ? detail::k_per_split(K, split, KS) : std::max(K, 1);
  if (split > 1) split = detail::ceil_div(K, kchunk);  // no CTA without k
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(split), 1);
  // tc_smem_bytes <= 48 KB: no opt-in attribute needed
  return detail::launch_ex(kernel, grid, dim3(kTcThreads, 1, 1), tc_smem_bytes<WT>(), split, DSINF_GATED_PDL && sm90,
                           stream, x, w, scale, rpg, out, M, K, I, act, kchunk);
}
static_assert(tc_smem_bytes<int8_t>() <= 48 * 1024, "dynamic shared memory above 48 KB needs an opt-in");
#endif  // DSINF_CUDA_BF16

// ------------------------------------------------------------------------------------------------ large M
template <typename T>
__global__ void gated_act_kernel(const T* __restrict__ src, T* __restrict__ out, int64_t M, int64_t I,
                                 int activation) {
  const int64_t total = M * I;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t m = i / I, c = i - m * I;
    const T* row = src + m * 2 * I;
    out[i] = Act<T>::from_float(gated(activation, Act<T>::to_float(row[I + c]), Act<T>::to_float(row[c])));
  }
}

// ------------------------------------------------------------------------------------------------ launch
template <typename T, typename WT>
cudaError_t launch_nk(const T* x, const WT* w, const float* scale, int rpg, T* out, int M, int K, int I, int act,
                      cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>((I + 2 * kWarps - 1) / (2 * kWarps));
  if (M <= 1) gated_nk_kernel<T, WT, 1><<<grid, kThreads, 0, stream>>>(x, w, scale, rpg, out, M, K, I, act);
  else if (M <= 2) gated_nk_kernel<T, WT, 2><<<grid, kThreads, 0, stream>>>(x, w, scale, rpg, out, M, K, I, act);
  else if (M <= 4) gated_nk_kernel<T, WT, 4><<<grid, kThreads, 0, stream>>>(x, w, scale, rpg, out, M, K, I, act);
  else gated_nk_kernel<T, WT, 8><<<grid, kThreads, 0, stream>>>(x, w, scale, rpg, out, M, K, I, act);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_kn(const T* x, const T* w, T* out, int M, int K, int I, int act, cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>((I + kKnTile - 1) / kKnTile);
  if (M <= 1) gated_kn_kernel<T, 1><<<grid, kThreads, 0, stream>>>(x, w, out, M, K, I, act);
  else if (M <= 2) gated_kn_kernel<T, 2><<<grid, kThreads, 0, stream>>>(x, w, out, M, K, I, act);
  else if (M <= 4) gated_kn_kernel<T, 4><<<grid, kThreads, 0, stream>>>(x, w, out, M, K, I, act);
  else gated_kn_kernel<T, 8><<<grid, kThreads, 0, stream>>>(x, w, out, M, K, I, act);
  return cudaGetLastError();
}

template <typename T>
cudaError_t gated_gemv_t(const void* xv, int M, const void* wv, bool w_nk, bool w_int8, const float* scale,
                         int64_t groups, void* outv, int K, int I, int act, cudaStream_t stream) {
  const T* x = static_cast<const T*>(xv);
  T* out = static_cast<T*>(outv);
  const int rpg = w_int8 ? static_cast<int>(2 * static_cast<int64_t>(I) / groups) : 1;
  const bool aligned = aligned16(xv) && aligned16(wv);
  const unsigned scalar_grid = static_cast<unsigned>((I + kWarps - 1) / kWarps);
  if (w_int8) {
    const int8_t* w = static_cast<const int8_t*>(wv);
    if (aligned && K % WPack<int8_t>::E == 0) {
#if defined(DSINF_CUDA_BF16)
      if constexpr (!std::is_same<T, float>::value) return launch_tc<T, int8_t>(x, w, scale, rpg, out, M, K, I, act, stream);
#endif
      return launch_nk<T, int8_t>(x, w, scale, rpg, out, M, K, I, act, stream);
    }
    gated_scalar_kernel<T, int8_t><<<scalar_grid, kThreads, 0, stream>>>(x, w, true, scale, rpg, out, M, K, I, act);
    return cudaGetLastError();
  }
  const T* w = static_cast<const T*>(wv);
  if (w_nk && aligned && K % WPack<T>::E == 0) {
#if defined(DSINF_CUDA_BF16)
    if constexpr (!std::is_same<T, float>::value) return launch_tc<T, T>(x, w, nullptr, 1, out, M, K, I, act, stream);
#endif
    return launch_nk<T, T>(x, w, nullptr, 1, out, M, K, I, act, stream);
  }
  if (!w_nk && aligned && I % kKnE == 0 && K % 4 == 0) return launch_kn<T>(x, w, out, M, K, I, act, stream);
  gated_scalar_kernel<T, T><<<scalar_grid, kThreads, 0, stream>>>(x, w, w_nk, nullptr, 1, out, M, K, I, act);
  return cudaGetLastError();
}

}  // namespace

#if defined(DSINF_CUDA_BF16)
namespace detail {
cudaError_t gated_gemv_bf16(const void* x, int M, const void* w, bool w_nk, bool w_int8, const float* scale,
                            int64_t groups, void* out, int K, int I, int act, cudaStream_t stream);
}  // namespace detail
#endif

}  // namespace cuda
}  // namespace dsinf
