// Element-wise kernels around the GEMMs: the fused-QKV split/transpose/RoPE epilogue and the int8
// weight dequantization used before cuBLAS at large M.
#include <cstdint>

#include "common.cuh"
#include "gemv_internal.cuh"

namespace dsinf {
namespace cuda {
namespace detail {
namespace {

// 16-bit pair packing for vector stores.
template <typename T>
struct Pack;
template <>
struct Pack<__half> {
  static __device__ __forceinline__ uint32_t pair(float a, float b) {
    __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};
#if defined(DSINF_CUDA_BF16)
template <>
struct Pack<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t pair(float a, float b) {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};
#endif

// ------------------------------------------------------------------------------------------------
// QKV split + RoPE. y: [M = B*S, (H + 2 KV) * D], row m = b*S + s holds heads [q_0..q_{H-1} |
// k_0..k_{KV-1} | v_0..v_{KV-1}], each D wide. Writes q [B, H, S, D], k and v [B, KV, S, D].
// Grid: (M, head blocks); a CTA handles one row and `hpb` consecutive heads, so it reads a contiguous
// piece of y and writes contiguous D-element runs. Work item = (head, pair slot j < ceil(D/2)):
//   q/k head, j < rd/2: rotate pair (j, j + rd/2) (rotate_half) or (2j, 2j+1), angle p * f_j;
//   otherwise copy elements (2j, 2j+1) (the second only if < D; D may be odd when rd < D).
// cos/sin of the row's position are computed once per CTA in float64 (angle p * theta^(-2j/rd) can
// be ~1e5 rad; fp32 would lose ~1e-2 there) and rounded to fp32, exactly as the reference does, into
// a shared table (rd/2 <= 512; beyond that each item computes its own).
// ------------------------------------------------------------------------------------------------
constexpr int kRopeThreads = 128;
constexpr int kRopeTable = 512;

__device__ __forceinline__ float2 rope_cos_sin(double pos, int i, int rd, double theta) {
  const double inv_freq = pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(rd));
  // sincospi: exact range reduction with no Payne-Hanek slow path (no local memory); the extra
  // division by pi costs ~1 ulp of the angle, far below the fp32 rounding of the result.
  double s, c;
  sincospi(pos * inv_freq / 3.141592653589793238462643383279502884, &s, &c);
  return make_float2(static_cast<float>(c), static_cast<float>(s));
}

template <typename T>
__global__ void __launch_bounds__(kRopeThreads) qkv_split_rope_kernel(const T* __restrict__ y, T* __restrict__ q,
                                                                      T* __restrict__ k, T* __restrict__ v, int S,
                                                                      int H, int KV, int D, int rd, bool rotate_half,
                                                                      double theta, long long seq_offset, int hpb) {
  __shared__ float2 table[kRopeTable];
  const int m = blockIdx.x;
  const int b = m / S, s = m % S;
  const int HT = H + 2 * KV;
  const int h_begin = blockIdx.y * hpb;
  const int h_end = min(HT, h_begin + hpb);
  const int half_rd = rd / 2;
  const double pos = static_cast<double>(seq_offset + s);
  const bool any_rope = half_rd > 0 && h_begin < H + KV;  // uniform over the CTA
  const bool use_table = any_rope && half_rd <= kRopeTable;
  if (use_table) {
    for (int i = threadIdx.x; i < half_rd; i += kRopeThreads) table[i] = rope_cos_sin(pos, i, rd, theta);
    __syncthreads();
  }
  const int P = (D + 1) / 2;
  const T* yrow = y + static_cast<size_t>(m) * HT * D;
  const int items = (h_end - h_begin) * P;
  for (int it = threadIdx.x; it < items; it += kRopeThreads) {
    const int hh = h_begin + it / P, j = it % P;
    T* dst;
    int hp, nheads;
    if (hh < H) {
      dst = q, hp = hh, nheads = H;
    } else if (hh < H + KV) {
      dst = k, hp = hh - H, nheads = KV;
    } else {
      dst = v, hp = hh - H - KV, nheads = KV;
    }
    const T* src = yrow + static_cast<size_t>(hh) * D;
    T* out = dst + ((static_cast<size_t>(b) * nheads + hp) * S + s) * D;
    if (hh < H + KV && j < half_rd) {
      const int lo = rotate_half ? j : 2 * j;
      const int hi = rotate_half ? j + half_rd : 2 * j + 1;
      const float2 cs = use_table ? table[j] : rope_cos_sin(pos, j, rd, theta);
      const float a = Act<T>::to_float(src[lo]), bb = Act<T>::to_float(src[hi]);
      out[lo] = Act<T>::from_float(a * cs.x - bb * cs.y);
      out[hi] = Act<T>::from_float(bb * cs.x + a * cs.y);
    } else {
      const int lo = 2 * j;
      out[lo] = src[lo];
      if (lo + 1 < D) out[lo + 1] = src[lo + 1];
    }
  }
}

template <typename T>
cudaError_t split_rope(const QKVArgs& a, cudaStream_t stream) {
  const int64_t M = a.B * a.S;
  const int64_t HT = a.H + 2 * a.KV;
  // Enough CTAs to cover the GPU at decode (M = 1: one head per CTA), one CTA per row at prefill.
  const int64_t want = 4LL * device_sm_count();
  int64_t hblocks = (want + M - 1) / M;
  hblocks = hblocks < 1 ? 1 : (hblocks > HT ? HT : hblocks);
  const int64_t hpb = (HT + hblocks - 1) / hblocks;
  hblocks = (HT + hpb - 1) / hpb;
  const dim3 grid(static_cast<unsigned>(M), static_cast<unsigned>(hblocks), 1);
  qkv_split_rope_kernel<T><<<grid, kRopeThreads, 0, stream>>>(
      static_cast<const T*>(a.y), static_cast<T*>(a.q), static_cast<T*>(a.k), static_cast<T*>(a.v),
      static_cast<int>(a.S), static_cast<int>(a.H), static_cast<int>(a.KV), static_cast<int>(a.D),
      static_cast<int>(a.rotary_dim), a.rotate_half, a.rope_theta, static_cast<long long>(a.seq_offset),
      static_cast<int>(hpb));
  return cudaGetLastError();
}

// ------------------------------------------------------------------------------------------------
// Dequantize: out[n, k] = w[n, k] * scale[n / rows_per_group], rounded once to T. Row path (K % 8 == 0,
// w 8-byte and out 16-byte aligned, N and K below 2^31): a CTA per weight row (grid-stride over rows), so
// the row's scale is read once and no index is divided; each thread converts 8 weights per 8-byte load into
// one 16-byte store (whole-warp contiguous loads and stores), two loads in flight. H200, fp16 and bf16, the
// four Llama-3-8B linears (tools/probe_int8_prefill.py --dequant-time, runs 127-128): 3.8-4.0 TB/s of int8
// read + 16-bit write, where a grid-stride kernel over 16-byte chunks (an int64 division per chunk, two
// 16-byte stores per thread 32 bytes apart) moved 2.7-3.3 TB/s; with 16-byte loads per thread the row kernel
// moved 2.4-3.0 TB/s, with four 8-byte loads in flight 3.8-4.0 (no gain). Else one element per thread,
// 64-bit indices.
// ------------------------------------------------------------------------------------------------
constexpr int kDequantThreads = 256;
constexpr int kDequantLoads = 2;  // 8-byte loads in flight per thread

template <typename T>
__global__ void __launch_bounds__(kDequantThreads)
    dequant_rows_kernel(const int8_t* __restrict__ w, const float* __restrict__ scale, int rpg, T* __restrict__ out,
                        int N, int K) {
  const int chunks = K / 8;
  for (int r = blockIdx.x; r < N; r += gridDim.x) {
    const float sc = __ldg(scale + r / rpg);
    const uint2* src = reinterpret_cast<const uint2*>(w + static_cast<int64_t>(r) * K);
    T* dst = out + static_cast<int64_t>(r) * K;
    for (int c0 = threadIdx.x; c0 < chunks; c0 += kDequantLoads * kDequantThreads) {
      uint2 raw[kDequantLoads];
#pragma unroll
      for (int u = 0; u < kDequantLoads; ++u) {
        const int c = c0 + u * kDequantThreads;
        if (c < chunks) raw[u] = __ldg(src + c);
      }
#pragma unroll
      for (int u = 0; u < kDequantLoads; ++u) {
        const int c = c0 + u * kDequantThreads;
        if (c >= chunks) break;
        const uint32_t words[2] = {raw[u].x ^ 0x80808080u, raw[u].y ^ 0x80808080u};
        float f[8];
#pragma unroll
        for (int a = 0; a < 2; ++a)
#pragma unroll
          for (int b = 0; b < 4; ++b) f[4 * a + b] = i8_to_float(words[a], b) * sc;
        if constexpr (sizeof(T) == 4) {
          float4* o = reinterpret_cast<float4*>(dst + 8 * c);
          o[0] = make_float4(f[0], f[1], f[2], f[3]);
          o[1] = make_float4(f[4], f[5], f[6], f[7]);
        } else {
          *reinterpret_cast<uint4*>(dst + 8 * c) = make_uint4(Pack<T>::pair(f[0], f[1]), Pack<T>::pair(f[2], f[3]),
                                                              Pack<T>::pair(f[4], f[5]), Pack<T>::pair(f[6], f[7]));
        }
      }
    }
  }
}

template <typename T>
__global__ void dequant_scalar_kernel(const int8_t* __restrict__ w, const float* __restrict__ scale, int64_t rpg,
                                      T* __restrict__ out, int64_t total, int64_t K) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = Act<T>::from_float(static_cast<float>(w[i]) * __ldg(scale + (i / K) / rpg));
}

template <typename T>
cudaError_t dequant(const int8_t* w, const float* scale, int64_t groups, void* out, int64_t N, int64_t K,
                    cudaStream_t stream) {
  const int64_t rpg = N / groups;
  const bool rows = K % 8 == 0 && N <= INT32_MAX && K <= INT32_MAX && (reinterpret_cast<uintptr_t>(w) & 7u) == 0 &&
                    (reinterpret_cast<uintptr_t>(out) & 15u) == 0;
  if (rows) {
    const int64_t cap = 16LL * device_sm_count();  // two rounds of the 8 CTAs an SM holds; then rows go round
    dequant_rows_kernel<T><<<static_cast<unsigned>(N < cap ? N : cap), kDequantThreads, 0, stream>>>(
        w, scale, static_cast<int>(rpg), static_cast<T*>(out), static_cast<int>(N), static_cast<int>(K));
    return cudaGetLastError();
  }
  const int64_t total = N * K;
  int64_t blocks = (total + kDequantThreads - 1) / kDequantThreads;
  const int64_t cap = 32LL * device_sm_count();
  if (blocks > cap) blocks = cap;
  dequant_scalar_kernel<T><<<static_cast<unsigned>(blocks), kDequantThreads, 0, stream>>>(
      w, scale, rpg, static_cast<T*>(out), total, K);
  return cudaGetLastError();
}

}  // namespace
}  // namespace detail

cudaError_t qkv_split_rope(const QKVArgs& a, cudaStream_t stream) {
  const int64_t M = a.B * a.S;
  if (a.B < 0 || a.S < 0 || a.H < 1 || a.KV < 1 || a.D < 0 || a.rotary_dim < 0 || a.rotary_dim % 2 != 0 ||
      a.rotary_dim > a.D || a.seq_offset < 0)
    return cudaErrorInvalidValue;
  if (M == 0 || a.D == 0) return cudaSuccess;
  if (!a.y || !a.q || !a.k || !a.v || M > INT32_MAX || (a.H + 2 * a.KV) > 65535 ||
      (a.H + 2 * a.KV) * a.D > INT32_MAX)
    return cudaErrorInvalidValue;
  switch (a.dtype) {
    case DType::kFloat32: return detail::split_rope<float>(a, stream);
    case DType::kFloat16: return detail::split_rope<__half>(a, stream);
#if defined(DSINF_CUDA_BF16)
    case DType::kBFloat16: return detail::split_rope<__nv_bfloat16>(a, stream);
#endif
    default: return cudaErrorNotSupported;
  }
}

cudaError_t dequantize_int8(DType out_dtype, const int8_t* w, const float* scale, int64_t groups, void* out,
                            int64_t N, int64_t K, cudaStream_t stream) {
  if (N < 0 || K < 0 || groups < 1 || N % groups != 0) return cudaErrorInvalidValue;
  if (N == 0 || K == 0) return cudaSuccess;
  if (!w || !scale || !out) return cudaErrorInvalidValue;
  switch (out_dtype) {
    case DType::kFloat32: return detail::dequant<float>(w, scale, groups, out, N, K, stream);
    case DType::kFloat16: return detail::dequant<__half>(w, scale, groups, out, N, K, stream);
#if defined(DSINF_CUDA_BF16)
    case DType::kBFloat16: return detail::dequant<__nv_bfloat16>(w, scale, groups, out, N, K, stream);
#endif
    default: return cudaErrorNotSupported;
  }
}

}  // namespace cuda
}  // namespace dsinf
