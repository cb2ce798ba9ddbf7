// Device helpers shared by the dsinf CUDA kernels: dtype conversions, 16-byte vector loads,
// tensor-core (mma.sync) wrappers, int8 -> float/half unpacking and the CTA/cluster reduction that
// ends every GEMV. No torch headers.
//
// Conversions use explicit intrinsics only: torch builds .cu files with __CUDA_NO_HALF_OPERATORS__,
// __CUDA_NO_HALF_CONVERSIONS__, __CUDA_NO_HALF2_OPERATORS__ and __CUDA_NO_BFLOAT16_CONVERSIONS__.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#if defined(DSINF_CUDA_BF16)
#include <cuda_bf16.h>
#endif

#include <cstdint>

#include "../include/cuda_kernels.h"

namespace dsinf {
namespace cuda {
namespace detail {

constexpr unsigned kFullMask = 0xffffffffu;

// ------------------------------------------------------------------------------------------------
// dtype traits
// ------------------------------------------------------------------------------------------------
template <typename T>
struct Act;

template <>
struct Act<float> {
  static __device__ __forceinline__ float to_float(float v) { return v; }
  static __device__ __forceinline__ float from_float(float v) { return v; }
};

template <>
struct Act<__half> {
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
  // two packed halves (low = lower index) -> two floats
  static __device__ __forceinline__ float2 pair_to_float2(uint32_t u) {
    __half2 h;
    *reinterpret_cast<uint32_t*>(&h) = u;
    return __half22float2(h);
  }
};

#if defined(DSINF_CUDA_BF16)
template <>
struct Act<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
  // bf16 -> fp32 is a 16-bit shift: no conversion unit involved
  static __device__ __forceinline__ float2 pair_to_float2(uint32_t u) {
    return make_float2(__uint_as_float(u << 16), __uint_as_float(u & 0xffff0000u));
  }
};
#endif

// ------------------------------------------------------------------------------------------------
// loads (16 bytes, read-only path; callers guarantee 16-byte alignment)
// ------------------------------------------------------------------------------------------------
__device__ __forceinline__ uint4 ldg16(const void* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }
__device__ __forceinline__ uint2 ldg8(const void* p) { return __ldg(reinterpret_cast<const uint2*>(p)); }

// Weight stream: read once, do not keep in L1 (L1 is for the activations every CTA re-reads).
__device__ __forceinline__ uint4 ldg16_stream(const void* p) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(p));
  return r;
}

// L2 prefetch of the 128-byte line holding `p` (a hint: no fault, no effect on what later loads return).
__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }

// Programmatic dependent launch (sm_90): let the next kernel of the stream be scheduled, and wait until
// the previous one has completed and its writes are visible. Both are no-ops in a kernel that was not
// launched with the programmatic attribute (and compiled away below sm_90, where it is never set).
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// ------------------------------------------------------------------------------------------------
// int8 unpacking. u = 4 int8 in one word (byte i = element i).
// float: 0x4B000000 | (v ^ 0x80) is the float 2^23 + v + 128, so one PRMT + one FADD per element.
// ------------------------------------------------------------------------------------------------
__device__ __forceinline__ float i8_to_float(uint32_t u_xor80, int i) {
  return __uint_as_float(__byte_perm(u_xor80, 0x4B00u, 0x5440u | static_cast<unsigned>(i))) - 8388736.0f;
}

// 16 int8 weights (one 16-byte load) -> 16 floats, in memory order. Exact.
__device__ __forceinline__ void i8x16_to_float(const uint4& v, float (&f)[16]) {
  const uint32_t u[4] = {v.x ^ 0x80808080u, v.y ^ 0x80808080u, v.z ^ 0x80808080u, v.w ^ 0x80808080u};
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int b = 0; b < 4; ++b) f[4 * i + b] = i8_to_float(u[i], b);
}

// 4 int8 -> two packed pairs of T (pair (0,1) and pair (2,3), low half = lower index). Exact.
template <typename T>
struct I8Pairs;

template <>
struct I8Pairs<__half> {
  // half 0x6400 | b is 1024 + b for a byte b, so (v ^ 0x80) placed in the mantissa gives 1152 + v.
  static __device__ __forceinline__ void convert(uint32_t u, uint32_t& p01, uint32_t& p23) {
    const uint32_t x = u ^ 0x80808080u;
    uint32_t a = __byte_perm(x, 0x64646464u, 0x4140u);
    uint32_t b = __byte_perm(x, 0x64646464u, 0x4342u);
    const uint32_t bias = 0x64806480u;  // half2(1152, 1152)
    __half2 ha = __hsub2(*reinterpret_cast<__half2*>(&a), *reinterpret_cast<const __half2*>(&bias));
    __half2 hb = __hsub2(*reinterpret_cast<__half2*>(&b), *reinterpret_cast<const __half2*>(&bias));
    p01 = *reinterpret_cast<uint32_t*>(&ha);
    p23 = *reinterpret_cast<uint32_t*>(&hb);
  }
};

#if defined(DSINF_CUDA_BF16)
template <>
struct I8Pairs<__nv_bfloat16> {
  // bf16 has 7 mantissa bits, too few for the half trick's one constant over 256 values, but enough for
  // 128: with the byte's low 7 bits l placed in the mantissa of 0x4300 (128) it reads 128 + l exactly, and
  // v = l - 128 s (s = the byte's sign bit), so v = bf16(0x4300 | l) - bf16(0x4300 | s << 7): 128 + l minus
  // 128 or 256, an integer in [-128, 127], exact under any rounding. Per 4 weights 2 AND, 4 PRMT and 2 bf16x2
  // subtractions, where convert_via_fp32 takes an XOR, 6 PRMT and 4 FADD.
  static __device__ __forceinline__ void convert(uint32_t u, uint32_t& p01, uint32_t& p23) {
    const uint32_t low7 = u & 0x7F7F7F7Fu, sign = u & 0x80808080u;
    const uint32_t e = 0x43434343u;  // the high byte of bf16 128 and 256 (0x4300, 0x4380)
    uint32_t a01 = __byte_perm(low7, e, 0x4140u), a23 = __byte_perm(low7, e, 0x4342u);  // 128 + l
    uint32_t s01 = __byte_perm(sign, e, 0x4140u), s23 = __byte_perm(sign, e, 0x4342u);  // 128 or 256
    using B2 = __nv_bfloat162;
    const B2 r01 = __hsub2(*reinterpret_cast<B2*>(&a01), *reinterpret_cast<B2*>(&s01));
    const B2 r23 = __hsub2(*reinterpret_cast<B2*>(&a23), *reinterpret_cast<B2*>(&s23));
    p01 = *reinterpret_cast<const uint32_t*>(&r01);
    p23 = *reinterpret_cast<const uint32_t*>(&r23);
  }
  // Through fp32: an int8 value has at most 8 significant bits, so its fp32 has zero low 16 bits and its bf16
  // is exactly the high half (one PRMT packs two). More instructions than convert, yet the gated MLP kernel
  // ran 8-9% faster with it (H100, 4096 -> 2 x 14336, M = 4 and 8: 69.3 / 70.4 us against 75.1 / 76.9), where
  // the GEMV and the int8 GEMM gained 1-7% with convert. Why was not measured: convert has fewer integer-pipe
  // instructions too (6 against 7), so likely that kernel's schedule or registers.
  static __device__ __forceinline__ void convert_via_fp32(uint32_t u, uint32_t& p01, uint32_t& p23) {
    const uint32_t x = u ^ 0x80808080u;
    const uint32_t f0 = __float_as_uint(i8_to_float(x, 0)), f1 = __float_as_uint(i8_to_float(x, 1));
    const uint32_t f2 = __float_as_uint(i8_to_float(x, 2)), f3 = __float_as_uint(i8_to_float(x, 3));
    p01 = __byte_perm(f0, f1, 0x7632);  // low half = bf16(element 0), high half = bf16(element 1)
    p23 = __byte_perm(f2, f3, 0x7632);
  }
};
#endif

// ------------------------------------------------------------------------------------------------
// mma.sync m16n8k16, fp32 accumulate (sm_80+). Fragment layout (PTX ISA, g = lane/4, t = lane%4):
//   A (16x16, row): a0 = (row g,   k 2t..2t+1), a1 = (row g+8, k 2t..2t+1),
//                   a2 = (row g,   k 2t+8..9),  a3 = (row g+8, k 2t+8..9)
//   B (16x8, col):  b0 = (k 2t..2t+1, col g),   b1 = (k 2t+8..9, col g)
//   C (16x8):       c0,c1 = (row g, col 2t, 2t+1), c2,c3 = (row g+8, col 2t, 2t+1)
// Because the k-sum is order-free, each GEMV assigns the 16 k "slots" to physical k indices so that
// a thread's slots are contiguous in memory and come straight from its own 16-byte loads.
// ------------------------------------------------------------------------------------------------
#if defined(DSINF_CUDA_BF16)
template <typename T>
struct Mma;

template <>
struct Mma<__half> {
  static __device__ __forceinline__ void run(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                             uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
};

template <>
struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                             uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
};
#endif

// ------------------------------------------------------------------------------------------------
// Epilogue: v = acc (* scale[n / rows_per_group]) (+ bias[n]) -> out[m, n] in T.
// ------------------------------------------------------------------------------------------------
template <typename T>
struct Epilogue {
  T* out;
  const T* bias;
  const float* scale;  // int8 only
  int rows_per_group;
  int M, N;
  __device__ __forceinline__ void store(int m, int n, float v) const {
    if (m >= M || n >= N) return;
    if (scale) v *= __ldg(scale + n / rows_per_group);
    if (bias) v += Act<T>::to_float(bias[n]);
    out[static_cast<size_t>(m) * N + n] = Act<T>::from_float(v);
  }
};

// Host side: the epilogue of a GemvArgs.
template <typename T>
inline Epilogue<T> make_epilogue(const GemvArgs& a) {
  Epilogue<T> e;
  e.out = static_cast<T*>(a.out);
  e.bias = static_cast<const T*>(a.bias);
  e.scale = a.w_int8 ? a.scale : nullptr;
  e.rows_per_group = a.w_int8 ? static_cast<int>(a.N / a.groups) : 1;
  e.M = static_cast<int>(a.M);
  e.N = static_cast<int>(a.N);
  return e;
}

// Thread-block cluster primitives (sm_90), as raw PTX so no kernel file pulls in the heavy
// cooperative_groups headers (compile time). All threads of every CTA of the cluster must call
// cluster_sync() (it is also a CTA-wide barrier).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
__device__ __forceinline__ unsigned cluster_rank() {
  unsigned r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
  return r;
}
__device__ __forceinline__ unsigned cluster_size() {
  unsigned r;
  asm volatile("mov.u32 %0, %%cluster_nctarank;" : "=r"(r));
  return r;
}
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}
// Shared-memory address of `p` (this CTA's) mapped into CTA `rank` of the cluster.
__device__ __forceinline__ uint32_t map_to_rank(const void* p, unsigned rank) {
  const uint32_t local = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(local), "r"(rank));
  return remote;
}
__device__ __forceinline__ float ld_cluster_f32(uint32_t addr) {
  float v;
  asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(addr) : "memory");
  return v;
}
#endif

// Every GEMV ends the same way: the CTA holds P = ntok * TN fp32 partial sums in shared memory
// (`part`, index = token * TN + local column). With gridDim.y == 1 the CTA owns the whole K range and
// stores. With gridDim.y == S > 1 the S CTAs that split this tile's K range form one thread-block
// cluster (sm_90): after a cluster barrier, rank r sums slice r of all S partials through distributed
// shared memory, in rank order (deterministic, no atomics, no workspace), and stores it; a second
// barrier keeps every CTA's shared memory alive until all ranks have read it.
// Precondition: `part` complete and visible (call after __syncthreads()). Any S (slices of ceil(P / S)).
template <int TN, typename T>
__device__ __forceinline__ void reduce_and_store(const float* part, int P, int n0, const Epilogue<T>& epi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (gridDim.y > 1) {
    cluster_sync();
    const unsigned S = cluster_size();
    const unsigned rank = cluster_rank();
    const int chunk = (P + static_cast<int>(S) - 1) / static_cast<int>(S);
    const int begin = static_cast<int>(rank) * chunk, end = min(P, begin + chunk);
    for (int idx = begin + threadIdx.x; idx < end; idx += blockDim.x) {
      float v = 0.f;
      for (unsigned s = 0; s < S; ++s) v += ld_cluster_f32(map_to_rank(part + idx, s));
      epi.store(idx / TN, n0 + idx % TN, v);
    }
    cluster_sync();
    return;
  }
#else
  if (gridDim.y > 1) __trap();  // the launcher only splits K across CTAs on sm_90 code
#endif
  for (int idx = threadIdx.x; idx < P; idx += blockDim.x) epi.store(idx / TN, n0 + idx % TN, part[idx]);
}

// red[w * P + i] (one row per warp) -> part[i] = sum over warps, fixed order.
__device__ __forceinline__ void sum_warps(const float* red, float* part, int P, int nwarps) {
  for (int i = threadIdx.x; i < P; i += blockDim.x) {
    float v = 0.f;
    for (int w = 0; w < nwarps; ++w) v += red[w * P + i];
    part[i] = v;
  }
}

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Host side: whether a pointer allows the 16-byte vector loads and copies.
inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// ------------------------------------------------------------------------------------------------
// cp.async (sm_80+): 16-byte global -> shared copies that complete in the background, grouped by
// commit; a thread that waits for a group may then read what its own copies wrote (no barrier needed
// for data a thread consumes itself). `bytes` < 16 zero-fills the rest (0: no global read at all).
// ------------------------------------------------------------------------------------------------
#if defined(DSINF_CUDA_BF16)
__device__ __forceinline__ uint32_t smem_addr(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }
// Bypasses L1 (a weight stream, read once).
__device__ __forceinline__ void cp_async16_stream(uint32_t dst, const void* src, int bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(bytes) : "memory");
}
// As cp_async16_stream, with the hint that the L2 fetch whole 128-byte lines. (H200, 2026-12-03, the weight
// streams of both GEMVs with L2::256B: worst share of the copy bandwidth on >= 4096x12288 fp16 `[N, K]` 89% ->
// 87%, `[K, N]` 91% -> 86%, int8 75% -> 73%; with L2::64B 84%, 86%, 71%.)
__device__ __forceinline__ void cp_async16_stream_l2(uint32_t dst, const void* src, int bytes) {
  asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(bytes) : "memory");
}
// Allocates in L1 (activations every CTA re-reads).
__device__ __forceinline__ void cp_async16_cached(uint32_t dst, const void* src, int bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(bytes) : "memory");
}
// 8 bytes, allocating in L1 (cp.async.cg copies only 16).
__device__ __forceinline__ void cp_async8_cached(uint32_t dst, const void* src, int bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;" ::"r"(dst), "l"(src), "r"(bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>  // wait until at most N of this thread's committed groups are pending
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}
__device__ __forceinline__ uint32_t lds4(uint32_t addr) {
  uint32_t r;
  asm volatile("ld.shared.u32 %0, [%1];" : "=r"(r) : "r"(addr));
  return r;
}
__device__ __forceinline__ uint2 lds8(uint32_t addr) {
  uint2 r;
  asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];" : "=r"(r.x), "=r"(r.y) : "r"(addr));
  return r;
}
__device__ __forceinline__ uint4 lds16(uint32_t addr) {
  uint4 r;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "r"(addr));
  return r;
}
#endif

// 32-bit word j (0..3) of a 16-byte load; j must be a compile-time constant after unrolling.
__device__ __forceinline__ uint32_t u4_word(const uint4& v, int j) {
  return j == 0 ? v.x : (j == 1 ? v.y : (j == 2 ? v.z : v.w));
}

// reduce_and_store with a caller-defined epilogue: `part` holds `items` items of W consecutive fp32
// partial sums (item-major), and store(item, float (&v)[W]) writes one item's output. Same cluster
// protocol as reduce_and_store (gridDim.y CTAs of one cluster split K; rank r sums items
// [r * ceil(items / S), ...) over all ranks, in rank order). Lets an epilogue combine several sums of
// the CTA (the gated GEMV: act(gate) * up of one output).
template <int W, class Store>
__device__ __forceinline__ void reduce_items_and_store(const float* part, int items, const Store& store) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (gridDim.y > 1) {
    cluster_sync();
    const int S = static_cast<int>(cluster_size());
    const int rank = static_cast<int>(cluster_rank());
    const int chunk = ceil_div(items, S);
    for (int i = threadIdx.x; i < chunk; i += blockDim.x) {
      const int item = rank * chunk + i;
      if (item >= items) break;
      float v[W];
#pragma unroll
      for (int w = 0; w < W; ++w) v[w] = 0.f;
      for (int s = 0; s < S; ++s)
#pragma unroll
        for (int w = 0; w < W; ++w) v[w] += ld_cluster_f32(map_to_rank(part + item * W + w, static_cast<unsigned>(s)));
      store(item, v);
    }
    cluster_sync();
    return;
  }
#else
  if (gridDim.y > 1) __trap();  // the launchers only split K across CTAs on sm_90 code
#endif
  for (int item = threadIdx.x; item < items; item += blockDim.x) {
    float v[W];
#pragma unroll
    for (int w = 0; w < W; ++w) v[w] = part[item * W + w];
    store(item, v);
  }
}

}  // namespace detail
}  // namespace cuda
}  // namespace dsinf
