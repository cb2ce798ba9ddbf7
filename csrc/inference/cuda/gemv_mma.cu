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
// Two kernels share one slot map and reduction. No ldmatrix: the sum over k is order-free, so the kernels
// assign the mma's 16 k "slots" to physical k indices such that every thread's A and B fragment registers
// are its own 16-byte chunks of the tile (see the slot map below). Each weight byte is loaded exactly once:
// - register batches (gemv_kn_mma_kernel): straight from global memory, U k-steps per thread at a time
//   (how many of them are really in flight at once depends on DSINF_MMA_PIPELINE, below);
// - a cp.async ring (gemv_kn_ring_kernel): through shared memory, S - 1 units in flight per warp, one CTA
//   per SM. It reads the shapes of up to one 64-column tile per SM at 90-96% of the copy bandwidth, where
//   the register batches read 87-90% (kn_ring_for picks per shape; gemv_internal.cuh has the numbers).
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
static_assert(kLoopUnroll >= 1, "a batch holds at least one k-step");

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

// The C fragments of a [K, N] tile (kn_mma_step's accumulators) set to zero.
template <int NT>
__device__ __forceinline__ void kn_zero(float (&acc)[4][NT][4]) {
#pragma unroll
  for (int j = 0; j < 4; ++j)
#pragma unroll
    for (int q = 0; q < NT; ++q)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[j][q][e] = 0.f;
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
  kn_zero<NT>(acc);

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

// ------------------------------------------------------------------------------------------------
// Weight [K, N] through a cp.async ring (DSINF_KN_RING_STAGES >= 2).
// The same tile, slot map, warp interleave and reduction as gemv_kn_mma_kernel, but a thread's loads go
// global -> shared memory with cp.async instead of into registers: a copy writes no register, so nothing
// waits on it until cp.async.wait_group, and every warp keeps S - 1 units of U k-steps in flight (each
// k-step 2 KiB of weights per warp) while it multiplies one, without the register cost that capped the
// batches above at 4 k-steps and 64 KiB per CTA. Why: Triton's pointer kernel, whose loads its pipeliner
// turns into a 3-stage cp.async ring (64-column tiles, 256 k per stage, one CTA per SM, no split), read
// [K, N] 8192x8192 at 96% of the copy bandwidth on the H200 (32.8 us, run 36) where the register batches
// read 87-90% (35.7-36.9 us, three CTAs per SM by a split of 3).
// Ring layout: a unit's k-step holds, per row group i (< 4), the 4 rows kb + 4 r + i (r < 4) of the tile, 128
// bytes each, at a pitch of 160 bytes. Lanes 8 r .. 8 r + 7 copy row r's 8 chunks of 16 bytes, so each copy
// instruction has global addresses and shared destinations that both run on in lane order: measured on the
// H200 (ncu, 8192x8192), copies whose lanes wrote their own slots (the mma's lane order, 16-byte runs) went
// to L2 as one request per 32-byte sector and read every sector twice (8.4 M sectors for 4.2 M of weights,
// 2.1 TB/s). Thread (g, t) then reads chunk g of row 4 t + i, after a __syncwarp (another lane copied it); the pitch
// of 160 bytes puts the 8 lanes of a quarter-warp (g < 2, t < 4) on distinct banks. Each thread copies its
// own 8 bytes of activations per token tile beside them. After the k loop the ring is reused for the
// reduction buffers.
// ------------------------------------------------------------------------------------------------
// Tried and dropped: a ring small enough that two CTAs fit an SM, so that with PDL the next call's CTAs could be
// resident (and hint their lines into L2) while this call's CTAs reduce, instead of taking an SM only when the
// old CTA exits. H100, 4096x4096, split held at 2 (128 CTAs), M = 1 / 8, us: 3 x 2 steps 13.5-13.6 / 13.8-14.0;
// 5 x 1 (110 KiB) 15.1-15.2 / 15.5; 4 x 1 (88 KiB) 13.8-13.9 / 14.7-14.8; 6 x 1 (132 KiB, one CTA per SM, the
// same bytes in flight as 3 x 2) 13.8 / 14.1. So 1-step units cost 0.2-0.3 us and the co-resident rings lost up
// to 1.4 us more (why was not measured).
#ifndef DSINF_KN_RING_STAGES
#define DSINF_KN_RING_STAGES 3  // 3 x 2 k-steps: 132 KiB of ring (144 at M > 8), one CTA per SM (0 = no ring)
#endif
// Weight lines of the first unit hinted into L2 before the PDL wait (with DSINF_KN_RING_PDL; 0 = none): the
// previous kernel's tail leaves DRAM idle, and the ring's first copies then find their lines in L2. H100,
// tools/probe_gemv.py variants alternated (2026-12-06), [K, N], M = 1 / 8, us, 0 -> 1 unit, fp16 and bf16 alike:
// 4096x4096 14.2 / 14.5 -> 13.5-13.7 / 13.8-14.0, 14336x4096 41.9 / 42.5-42.7 -> 41.2-41.3 / 42.0-42.1, 8192x8192
// 46.4-46.5 / 47.0-47.1 -> 45.8-45.9 / 46.3-46.6; 2 units: 4096x4096 13.6 / 14.0-14.1. The same hint lost in the
// streaming [N, K] kernel (fp16 4096x4096 M = 1 / 8: 13.1 / 13.6 -> 13.5 / 14.7 with 1 unit, 13.8 / 14.5 with 2;
// int8 on its wide CTAs 7.7 / 8.0 -> 8.4 / 8.5 with 2) and in Triton's slices kernel (16 lines per row: int8
// 4096x4096 0.2-0.8 us slower), so only the ring has it.
#ifndef DSINF_KN_RING_PDL_PREFETCH_UNITS
#define DSINF_KN_RING_PDL_PREFETCH_UNITS 1
#endif
#ifndef DSINF_KN_RING_UNIT
#define DSINF_KN_RING_UNIT 2  // k-steps (16 rows) per ring unit
#endif
constexpr int kRingStages = DSINF_KN_RING_STAGES, kRingUnit = DSINF_KN_RING_UNIT;
static_assert(kRingStages == 0 || kRingStages >= 2, "the ring needs two stages: one landing, one multiplied");
static_assert(kRingUnit >= 1, "a ring unit holds at least one k-step");
constexpr int kRingPitch = 160;                // bytes per row of a ring block (128 of data)
constexpr int kRingBlock = 4 * kRingPitch;     // one row group of a k-step: 4 rows

constexpr size_t kRingWBytes = static_cast<size_t>(kRingStages) * kGemvWarps * kRingUnit * 4 * kRingBlock;  // weights
static_assert(kRingBlock % 16 == 0 && kRingWBytes % 16 == 0, "16-byte copies stay aligned, the activations' too");
template <int NT>
constexpr size_t kn_ring_smem() {  // ring (weights, then activations), or the reduction buffers if larger
  const size_t ring = kRingWBytes + static_cast<size_t>(kRingStages) * kGemvWarps * kRingUnit * NT * 32 * 8;
  const size_t red = static_cast<size_t>(kGemvWarps + 1) * kTileKnMma * 8 * NT * sizeof(float);
  return ring > red ? ring : red;
}

template <typename T, int NT>
__global__ void DSINF_MMA_BOUNDS(NT) gemv_kn_ring_kernel(const T* __restrict__ x, const T* __restrict__ w,
                                                         Epilogue<T> epi, int M, int K, int N, int kchunk) {
  constexpr int S = kRingStages, U = kRingUnit, TN = kTileKnMma, P = TN * 8 * NT;
  constexpr int kStep = 16 * kGemvWarps;  // k from one of a warp's k-steps to its next
  extern __shared__ __align__(16) unsigned char smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;  // the mma's lane roles (consumer)
  const int cr = lane >> 3, cc = lane & 7;  // the copy's: row 4 cr + i, chunk cc
  const int n0 = blockIdx.x * TN;
  const int k_begin = blockIdx.y * kchunk;
  const int k_end = min(K, k_begin + kchunk);
  // Units per CTA, the same for every warp (all of them reach the reduction's barriers): >= 1.
  const int units = max(1, ceil_div(max(0, k_end - k_begin), kStep * U));

  // Shared addresses: ring block (s, u, i) of this warp; this lane's copy slot and read slot in it; its
  // activation slot (s, u, q).
  const uint32_t wwarp = smem_addr(smem) + warp * U * 4 * kRingBlock;
  auto block = [&](int s, int u, int i) { return wwarp + (((s * kGemvWarps) * U + u) * 4 + i) * kRingBlock; };
  const uint32_t copy_at = cr * kRingPitch + cc * 16, read_at = t * kRingPitch + g * 16;
  const uint32_t xbase = smem_addr(smem) + static_cast<uint32_t>(kRingWBytes) + ((warp * U * NT) * 32 + lane) * 8;
  auto xslot = [&](int s, int u, int q) { return xbase + (((s * kGemvWarps) * U + u) * NT + q) * 32 * 8; };

  const T* xrow[NT];
#pragma unroll
  for (int q = 0; q < NT; ++q) xrow[q] = x + static_cast<size_t>(min(g + 8 * q, M - 1)) * K;
  const bool ccol_ok = n0 + 8 * cc < N;
  const T* ccol = w + (ccol_ok ? n0 + 8 * cc : 0);
#if DSINF_KN_RING_PDL
  pdl_begin<DSINF_KN_RING_PDL>();
  if constexpr (DSINF_KN_RING_PDL_PREFETCH_UNITS > 0) {
    // The first units' weight rows into L2 while the previous kernel finishes: a hint only (a weight that kernel
    // still writes is read again, coherently, after the wait); one prefetch per 128-byte row of the tile.
    if (cc == 0 && ccol_ok) {
#pragma unroll
      for (int j = 0; j < DSINF_KN_RING_PDL_PREFETCH_UNITS; ++j)
#pragma unroll
        for (int u = 0; u < U; ++u)
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int k = k_begin + 16 * warp + j * kStep * U + u * kStep + 4 * cr + i;
            if (k < k_end) prefetch_l2(ccol + static_cast<size_t>(k) * N);
          }
    }
  }
  pdl_wait();
#endif

  // Producer: the next unit to copy (j-th of the CTA's units, first k-step kb). Past K or N a slot is
  // zero-filled without reading (a stale fp16/bf16 slot could hold inf/NaN, and 0 * inf is NaN).
  int p_j = 0, p_kb = k_begin + 16 * warp;
  auto issue = [&](int s) {
    if (p_j < units) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int kb = p_kb + u * kStep;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int k = kb + 4 * cr + i;
          const bool ok = ccol_ok && k < k_end;
          cp_async16_stream_l2(block(s, u, i) + copy_at, ok ? ccol + static_cast<size_t>(k) * N : w, ok ? 16 : 0);
        }
#pragma unroll
        for (int q = 0; q < NT; ++q) {
          const int k = kb + 4 * t;  // K % 4 == 0: the 4 elements are all in range or all out
          const bool ok = k < k_end;
          cp_async8_cached(xslot(s, u, q), ok ? xrow[q] + k : x, ok ? 8 : 0);
        }
      }
    }
    cp_async_commit();  // always: the group count is what cp.async.wait_group counts
    ++p_j;
    p_kb += U * kStep;
  };

  float acc[4][NT][4];
  kn_zero<NT>(acc);

#pragma unroll
  for (int s = 0; s < S - 1; ++s) issue(s);
  int slot_c = 0, slot_p = S - 1;
  for (int j = 0; j < units; ++j) {
    __syncwarp();  // every lane has read stage slot_p (last iteration) before it is refilled
    issue(slot_p);
    slot_p = slot_p + 1 == S ? 0 : slot_p + 1;
    cp_async_wait<S - 1>();  // all but the S - 1 newest groups are done: this lane's part of unit j landed
    __syncwarp();            // and every other lane's
    uint4 wv[U][4];
    uint2 xv[U][NT];
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int i = 0; i < 4; ++i) wv[u][i] = lds16(block(slot_c, u, i) + read_at);
#pragma unroll
      for (int q = 0; q < NT; ++q) xv[u][q] = lds8(xslot(slot_c, u, q));
    }
    slot_c = slot_c + 1 == S ? 0 : slot_c + 1;
#pragma unroll
    for (int u = 0; u < U; ++u) kn_mma_step<T, NT>(acc, wv[u], xv[u]);
  }
  cp_async_wait<0>();  // only empty groups are left
  pdl_end<DSINF_KN_RING_PDL>();
  __syncthreads();  // every warp is done with the ring: the reduction buffers take its place
  float* red = reinterpret_cast<float*>(smem);
  kn_reduce_and_store<NT>(acc, red, red + kGemvWarps * P, n0, epi);
}

template <typename T, int NT>
bool ring_ready() {  // the ring is built and this device gives its kernel the shared memory it needs
  if constexpr (kRingStages > 0) {
    return opt_in_smem<gemv_kn_ring_kernel<T, NT>, kn_ring_smem<NT>()>();
  } else {
    return false;
  }
}

template <typename T, int NT>
int kn_resident(bool ring) {
  if constexpr (kRingStages > 0) {
    if (ring) return resident_per_sm<gemv_kn_ring_kernel<T, NT>, kn_ring_smem<NT>()>();
  }
  return resident_per_sm<gemv_kn_mma_kernel<T, NT>>();
}

// 64-column tiles x `split` CTAs along K; one token tile for M <= 8, two above.
template <typename T, int NT>
cudaError_t kn_tokens(const GemvArgs& a, int split, bool ring, cudaStream_t stream) {
  const int tiles = static_cast<int>((a.N + kTileKnMma - 1) / kTileKnMma);
  const int kchunk = k_per_split(a.K, split, 16);
  const T* x = static_cast<const T*>(a.x);
  const T* w = static_cast<const T*>(a.w);
  const int M = static_cast<int>(a.M), K = static_cast<int>(a.K), N = static_cast<int>(a.N);
  if constexpr (kRingStages > 0) {
    if (ring)
      return launch_split(gemv_kn_ring_kernel<T, NT>, tiles, split, gemv_pdl(DSINF_KN_RING_PDL), kn_ring_smem<NT>(),
                          stream, x, w, make_epilogue<T>(a), M, K, N, kchunk);
  }
  return launch_split(gemv_kn_mma_kernel<T, NT>, tiles, split, gemv_pdl(), 0, stream, x, w, make_epilogue<T>(a), M, K,
                      N, kchunk);
}

template <typename T>
cudaError_t kn_mma(const GemvArgs& a, int split, bool ring, cudaStream_t stream) {
  return a.M <= 8 ? kn_tokens<T, 1>(a, split, ring, stream) : kn_tokens<T, 2>(a, split, ring, stream);
}

}  // namespace

bool kn_ring_for(const GemvArgs& a) {
  const int64_t tiles = (a.N + kTileKnMma - 1) / kTileKnMma;
  if (kRingStages == 0 || tiles > static_cast<int64_t>(DSINF_KN_RING_TILES_PER_SM) * device_sm_count()) return false;
  const bool two = a.M > 8;
  if (a.dtype == DType::kBFloat16) return two ? ring_ready<__nv_bfloat16, 2>() : ring_ready<__nv_bfloat16, 1>();
  return two ? ring_ready<__half, 2>() : ring_ready<__half, 1>();
}

int kn_mma_resident_per_sm(DType dtype, int token_tiles, bool ring) {
  using bf16 = __nv_bfloat16;
  const bool two = token_tiles > 1;
  if (dtype == DType::kBFloat16) return two ? kn_resident<bf16, 2>(ring) : kn_resident<bf16, 1>(ring);
  return two ? kn_resident<__half, 2>(ring) : kn_resident<__half, 1>(ring);
}

cudaError_t launch_kn_mma(const GemvArgs& a, int split, bool ring, cudaStream_t stream) {
  switch (a.dtype) {
    case DType::kFloat16: return kn_mma<__half>(a, split, ring, stream);
    case DType::kBFloat16: return kn_mma<__nv_bfloat16>(a, split, ring, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace detail
}  // namespace cuda
}  // namespace dsinf

#endif  // DSINF_CUDA_BF16
