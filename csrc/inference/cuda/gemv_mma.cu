// Tensor-core GEMV for decode (M = B*S <= 16), fp16/bf16 activations, weight [K, N], fp32 accumulation.
//
//   out[m, n] = sum_k x[m, k] * W[k, n]  (+ bias[n]),  W fp16/bf16 as x
//
// Weights [N, K] (fp16/bf16 and int8) take the streaming kernel of gemv_stream.cu: an [N, K] kernel of this
// file's design (weights loaded straight into registers) reached 82-86% of the copy bandwidth on the H200's
// large shapes, the cp.async ring of the streaming kernel 86-93% (2026-12-02), and it was removed.
//
// Why tensor cores for a memory-bound product: with CUDA cores, M = 8..16 needs 8..16 FMAs plus
// conversions per weight element, which at 3 TB/s of fp16 weights is most of the H100's FP32 issue
// rate (M = 16 would be issue-bound). One mma.sync m16n8k16 does 2048 multiply-adds, so the weight
// stream is the only cost up to M = 16 (tokens are the mma's n = 8 dimension, padded: M <= 8 -> one
// n-tile, M <= 16 -> two; padding rows re-read x[M-1] and are never stored).
//
// No shared-memory staging and no ldmatrix: the sum over k is order-free, so the kernel assigns the
// mma's 16 k "slots" to physical k indices such that every thread's A and B fragment registers come
// straight out of its own 16-byte global loads (see the slot map below). Each weight byte is loaded
// exactly once, 16 bytes per load, in batches of U k-steps per thread (how many of them are really in
// flight at once depends on DSINF_MMA_PIPELINE, below).
//
// Split-K: a CTA (8 warps) owns an output tile and a K range; warps interleave over k-steps, reduce
// through shared memory, and when the launcher splits K over `split` CTAs (gridDim.y, sm_90), those
// CTAs form one cluster and reduce through distributed shared memory (detail::reduce_and_store):
// deterministic, no atomics, no workspace, one launch.
//
// Built only when every target is >= sm_80 (DSINF_CUDA_BF16): mma.m16n8k16 needs sm_80.
#include "common.cuh"
#include "gemv_internal.cuh"

#if defined(DSINF_CUDA_BF16)

namespace dsinf {
namespace cuda {
namespace detail {
namespace {

#ifndef DSINF_MMA_UNROLL
#define DSINF_MMA_UNROLL 4  // k-steps per batch, unpipelined (4 x 16 B weight loads each): 256 B per thread
#endif
constexpr int kUnroll = DSINF_MMA_UNROLL;
// Software-pipelined k loop (1) or load-then-compute (0). ptxas interleaves a batch's
// weight loads with the mma that consume them (SASS, sm_90a: LDG, LDG, HMMA, LDG, ...), and a warp
// issues in order, so with load-then-compute a warp has only a few loads in flight while its first
// mma waits. Pipelined, the mma of batch j read registers loaded one batch earlier, so interleaving
// batch j+1's loads with them costs no stall (SASS: all of batch j+1's LDGs, then batch j's HMMAs),
// for twice the weight registers. Measured on the H200 (`tools/probe_gemv.py --sweep DSINF_MMA_PIPELINE=0,1`):
// pipelined, the [K, N] kernel ran at 0.64x of torch on the large shapes, so 0 stays the default.
#ifndef DSINF_MMA_PIPELINE
#define DSINF_MMA_PIPELINE 0
#endif
// k-steps per buffer when pipelined. Registers per thread (ptxas -v, sm_90a, no spills), NT = 1 / 2:
// unpipelined (4 steps) 50-64 / 94-128; pipelined 1 step 64-74 / 78-96 (3 CTAs of 256 threads fit an
// SM), 2 steps 112-122 / 126-162 (2 CTAs: grids of ~3 tiles per SM, e.g. 12288 rows, then take two
// waves); 4 steps spill at NT = 2.
#ifndef DSINF_MMA_PIPELINE_UNROLL
#define DSINF_MMA_PIPELINE_UNROLL 2
#endif
constexpr int kLoopUnroll = DSINF_MMA_PIPELINE ? DSINF_MMA_PIPELINE_UNROLL : kUnroll;  // k-steps per batch

// Minimum CTAs per SM the one-token-tile kernels (M <= 8) must fit (__launch_bounds__ min blocks).
// 0 = no min-blocks clause (today's register allocation: 50-70 registers, 3-4 CTAs fit). Note that
// an explicit 1 is not the same as 0: ptxas then spends up to ~180 registers (more loads hoisted, 1-2
// CTAs per SM), which the sweep may find better or worse. 2 caps at 128 registers; 3 and 4 spill (sm_90a).
// M > 8 kernels (two token tiles) get min blocks 0, which ptxas treats as no clause.
#ifndef DSINF_GEMV_MIN_CTAS
#define DSINF_GEMV_MIN_CTAS 0
#endif
template <int NT>
constexpr int kMinCtas = NT == 1 ? DSINF_GEMV_MIN_CTAS : 0;  // 0: as if no clause
#if DSINF_GEMV_MIN_CTAS > 0
#define DSINF_MMA_BOUNDS(NT) __launch_bounds__(kGemvThreads, kMinCtas<NT>)
#else
#define DSINF_MMA_BOUNDS(NT) __launch_bounds__(kGemvThreads)
#endif

// The k loop: batches at kb0 = first, first + step, ... < end. load(kb0, buf) fills a
// register batch (zeros out of range), compute(buf) multiplies it.
template <class Batch, class Load, class Compute>
__device__ __forceinline__ void k_loop(int first, int end, int step, const Load& load, const Compute& compute) {
#if DSINF_MMA_PIPELINE
  Batch a, b;  // batch j + 1 is loaded before batch j is multiplied
  int kb0 = first;
  if (kb0 < end) load(kb0, a);
  for (; kb0 < end; kb0 += 2 * step) {
    const bool more = kb0 + step < end;
    if (more) load(kb0 + step, b);
    compute(a);
    if (!more) break;
    if (kb0 + 2 * step < end) load(kb0 + 2 * step, a);
    compute(b);
  }
#else
  for (int kb0 = first; kb0 < end; kb0 += step) {
    Batch v;
    load(kb0, v);
    compute(v);
  }
#endif
}

// Slot map of the [K, N] kernel below. Thread (g = lane / 4, t = lane % 4) owns columns c = n0 + 8g .. c+7 of
// a 64-column tile and k rows kb + 4t + i (i < 4) of a 16-row k-step: w[i] holds row i's 8 columns, x[q] token
// tile q's 4 activations at those rows. k slots {2t, 2t+1, 2t+8, 2t+9} <-> rows {kb+4t, +1, +2, +3}; mma j
// (j < 4) computes columns c + 2j (A row g) and c + 2j + 1 (A row g + 8) from the 16-bit halves of word j of
// the four rows, paired across rows by PRMT.
template <typename T, int NT>
__device__ __forceinline__ void kn_mma_step(float (&acc)[4][NT][4], const uint4 (&w)[4], const uint2 (&x)[NT]) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const uint32_t r0 = word(w[0], j), r1 = word(w[1], j), r2 = word(w[2], j), r3 = word(w[3], j);
    const uint32_t a0 = __byte_perm(r0, r1, 0x5410);  // column c+2j,   rows kb+4t, kb+4t+1
    const uint32_t a1 = __byte_perm(r0, r1, 0x7632);  // column c+2j+1, rows kb+4t, kb+4t+1
    const uint32_t a2 = __byte_perm(r2, r3, 0x5410);  // column c+2j,   rows kb+4t+2, kb+4t+3
    const uint32_t a3 = __byte_perm(r2, r3, 0x7632);  // column c+2j+1, rows kb+4t+2, kb+4t+3
#pragma unroll
    for (int q = 0; q < NT; ++q) Mma<T>::run(acc[j][q], a0, a1, a2, a3, x[q].x, x[q].y);
  }
}

// The 8 warps' partials of a [K, N] tile summed in shared memory (`red`: kGemvWarps x P floats, `part`: P;
// P = 64 columns x 8 NT tokens), then stored, or reduced over the cluster (reduce_and_store). C fragment
// (j, q, e): column c + 2j + (e >> 1), token 8q + 2t + (e & 1). The XOR on bits 1-2 of the column (by token)
// spreads a warp's 32 stores over 16 banks instead of 4; it is undone in `part`.
template <int NT, typename T>
__device__ __forceinline__ void kn_reduce_and_store(const float (&acc)[4][NT][4], float* red, float* part, int n0,
                                                    const Epilogue<T>& epi) {
  constexpr int TN = kTileKnMma, P = TN * 8 * NT;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int j = 0; j < 4; ++j)
#pragma unroll
    for (int q = 0; q < NT; ++q)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int nl = 8 * g + 2 * j + (e >> 1);
        const int tok = 8 * q + 2 * t + (e & 1);
        red[warp * P + tok * TN + (nl ^ (((tok >> 1) & 3) << 1))] = acc[j][q][e];
      }
  __syncthreads();
  for (int i = threadIdx.x; i < P; i += kGemvThreads) {
    float v = 0.f;
#pragma unroll
    for (int ww = 0; ww < kGemvWarps; ++ww) v += red[ww * P + i];
    const int tok = i / TN, nls = i % TN;
    part[tok * TN + (nls ^ (((tok >> 1) & 3) << 1))] = v;  // un-swizzle
  }
  __syncthreads();
  reduce_and_store<TN>(part, P, n0, epi);
}

// ------------------------------------------------------------------------------------------------
// Weight [K, N] (row k holds N contiguous columns).
// CTA tile: 64 columns n0..n0+63 x K range [k_begin, k_end). Warp w takes k-steps of 16 rows
// kb = k_begin + 16 * (w + 8 j). Thread (g = lane/4, t = lane%4) owns columns c = n0 + 8g .. c+7 and
// loads W[kb + 4t + i][c .. c+7] for i < 4 (a k-row of the tile is one 128-byte line, read by the 8
// threads of one t) plus x[tok][kb + 4t .. +3] (8 bytes) for its tokens tok = g (+8).
// Slot map and reduction: kn_mma_step and kn_reduce_and_store (above).
// Constraints (checked by the dispatcher): N % 8 == 0, K % 4 == 0, x and W 16-byte aligned.
// ------------------------------------------------------------------------------------------------
template <typename T, int NT>
__global__ void DSINF_MMA_BOUNDS(NT) gemv_kn_mma_kernel(const T* __restrict__ x, const T* __restrict__ w,
                                                                   Epilogue<T> epi, int M, int K, int N, int kchunk) {
  constexpr int TN = kTileKnMma, NTOK = 8 * NT, P = TN * NTOK;
  __shared__ float red[kGemvWarps * P];
  __shared__ float part[P];

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int n0 = blockIdx.x * TN;
  const int col = n0 + 8 * g;
  const bool col_ok = col < N;
  const int k_begin = blockIdx.y * kchunk;
  const int k_end = min(K, k_begin + kchunk);

  const T* xrow[NT];
#pragma unroll
  for (int q = 0; q < NT; ++q) xrow[q] = x + static_cast<size_t>(min(g + 8 * q, M - 1)) * K;
  const T* wcol = w + (col_ok ? col : 0);
#if DSINF_GEMV_PDL
  {  // the first k rows of the tile (one 128-byte line each: 64 columns), 8 threads per row
    pdl_begin();
    constexpr int kRows = DSINF_GEMV_PDL_PREFETCH_KB * 1024 / (TN * static_cast<int>(sizeof(T)));
    const int c = n0 + 8 * (threadIdx.x % 8);
    for (int r = threadIdx.x / 8; r < kRows; r += kGemvThreads / 8)
      if (k_begin + r < k_end && c < N) prefetch_l2(w + static_cast<size_t>(k_begin + r) * N + c);
    pdl_wait();
  }
#endif

  float acc[4][NT][4];
#pragma unroll
  for (int j = 0; j < 4; ++j)
#pragma unroll
    for (int q = 0; q < NT; ++q)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[j][q][e] = 0.f;

  struct Batch {
    uint4 w[kLoopUnroll][4];
    uint2 x[kLoopUnroll][NT];
  };
  auto load_batch = [&](int kb0, Batch& b) {
#pragma unroll
    for (int u = 0; u < kLoopUnroll; ++u) {
      const int kb = kb0 + u * 16 * kGemvWarps;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int k = kb + 4 * t + i;
        b.w[u][i] = (col_ok && k < k_end) ? ldg16_stream(wcol + static_cast<size_t>(k) * N) : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int q = 0; q < NT; ++q) {
        const int k = kb + 4 * t;  // K % 4 == 0: the 4 elements are all in range or all out
        b.x[u][q] = (k < k_end) ? ldg8(xrow[q] + k) : make_uint2(0, 0);
      }
    }
  };
  auto compute_batch = [&](const Batch& b) {
#pragma unroll
    for (int u = 0; u < kLoopUnroll; ++u) kn_mma_step<T, NT>(acc, b.w[u], b.x[u]);
  };
  k_loop<Batch>(k_begin + 16 * warp, k_end, 16 * kGemvWarps * kLoopUnroll, load_batch, compute_batch);
  pdl_end();

  kn_reduce_and_store<NT>(acc, red, part, n0, epi);
}

// 64-column tiles x `split` CTAs along K; one token tile for M <= 8, two above.
template <typename T>
cudaError_t kn_mma(const GemvArgs& a, int split, cudaStream_t stream) {
  const int tiles = static_cast<int>((a.N + kTileKnMma - 1) / kTileKnMma);
  const int kchunk = k_per_split(a.K, split, 16);
  const T* x = static_cast<const T*>(a.x);
  const T* w = static_cast<const T*>(a.w);
  const int M = static_cast<int>(a.M), K = static_cast<int>(a.K), N = static_cast<int>(a.N);
  return launch_split(a.M <= 8 ? gemv_kn_mma_kernel<T, 1> : gemv_kn_mma_kernel<T, 2>, tiles, split, gemv_pdl(),
                      stream, x, w, make_epilogue<T>(a), M, K, N, kchunk);
}

}  // namespace

int kn_mma_resident_per_sm(DType dtype, int token_tiles) {
  using bf16 = __nv_bfloat16;
  const bool two = token_tiles > 1;
  if (dtype == DType::kBFloat16)
    return two ? resident_per_sm<gemv_kn_mma_kernel<bf16, 2>>() : resident_per_sm<gemv_kn_mma_kernel<bf16, 1>>();
  return two ? resident_per_sm<gemv_kn_mma_kernel<__half, 2>>() : resident_per_sm<gemv_kn_mma_kernel<__half, 1>>();
}

cudaError_t launch_kn_mma(const GemvArgs& a, int split, cudaStream_t stream) {
  switch (a.dtype) {
    case DType::kFloat16: return kn_mma<__half>(a, split, stream);
    case DType::kBFloat16: return kn_mma<__nv_bfloat16>(a, split, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace detail
}  // namespace cuda
}  // namespace dsinf

#endif  // DSINF_CUDA_BF16
