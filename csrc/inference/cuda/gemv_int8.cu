// int8 weight-only decode GEMV, streaming: fp16/bf16 activations (M <= 16), int8 weight [N, K] with a
// float32 scale per row group, fp32 accumulation on tensor cores.
//
//   out[m, n] = (sum_k x[m, k] * w[n, k]) * scale[n / (N/G)] (+ bias[n])
//
// Why a kernel of its own (an int8 variant of the [N, K] tensor-core GEMV of gemv_mma.cu read int8 at
// 42-70% of the copy bandwidth on the H200, and was removed once this kernel beat it): that kernel loaded
// weights into registers, and ptxas interleaves a batch's loads with the mma that consume them, so a warp
// (which issues in order) stalled at its first mma with only a few loads in flight. Here the weight goes
// global -> shared memory with cp.async: the copies write no register, so nothing waits on them until
// cp.async.wait_group, and every warp keeps up to kStages units of its own weights in flight (default
// 2 x 2 KiB: 16-32 KiB per CTA, 4 CTAs per SM) while it multiplies one.
//
// Structure:
// - CTA = 8 warps, output tile = 16 rows (one mma m16 tile; the weight is the mma's A operand, tokens its
//   n = 8 columns: M <= 8 one token tile, M <= 16 two). K is walked in 64-byte k-steps, grouped in units
//   of kUnitSteps consecutive steps; warp w takes the tile's units w, w + 8, ...; for each step of a unit,
//   thread (g = lane / 4, t = lane % 4) copies 16 bytes of rows g and g + 8 at k = 64 * step + 16 t into
//   its own ring slot, and later reads exactly those bytes back: the ring is
//   thread-private, so no barrier is needed in the k loop (cp.async.wait_group makes a thread's own
//   copies visible to it).
// - k-slot map (the sum over k is order-free, so the mma's 16 k slots may be any 16 k): mma h (h < 4) of a
//   step takes k = 16 t + 4 h + {0, 1} (from the step's start) in slots {2t, 2t+1} and 16 t + 4 h + {2, 3}
//   in slots {2t+8, 2t+9}: word h of the thread's 16-byte weight load (per row) expands (I8Pairs: exact)
//   to its A registers, and words 2h, 2h+1 of the 32 bytes of x it loads per token at that k are its B
//   registers.
// - Persistent over row tiles: grid.x = ceil(tiles / q) CTAs with q = ceil(tiles / resident CTAs), CTA b
//   takes tiles b, b + grid.x, ... All CTAs are resident at once and hold (nearly) the same bytes, so they
//   finish together (no partial last wave); a warp's ring runs on across its tile boundaries (the next
//   tile's weights are in flight while the last one is reduced).
// - Few tiles (N / 16 < #SMs): K is split over a cluster of CTAs (gridDim.y, sm_90), reduced through
//   distributed shared memory (reduce_and_store), as for the other GEMVs.
// - The scale (per row group) and bias are applied once per output, after the dot product.
// Constraints (checked by the dispatcher): K % 16 == 0, x and w 16-byte aligned.
#include "common.cuh"
#include "gemv_internal.cuh"

#if defined(DSINF_CUDA_BF16)

#include <atomic>

namespace dsinf {
namespace cuda {
namespace detail {
namespace {

// A warp's unit of work: kUnitSteps consecutive 64-byte k-steps of the 16 rows (2 KiB with 2: a warp reads
// whole 128-byte lines), copied as one cp.async group; its ring holds kStages units. The ring is
// 8 warps x kStages x kUnitSteps KiB of static shared memory and must leave room for the reduction buffers
// under 48 KiB: stages x steps <= 5 for M <= 8, <= 4 for M > 8 (twice the buffers). Default 2 x 2: 32 KiB of
// ring, 16-32 KiB of weights in flight per CTA, and half the per-byte loop overhead of 1-step units (SASS,
// sm_90a: ~160 instructions per 1-step unit, most of them index arithmetic, against ~240 issue slots per SM
// in the time the SM's share of 4.2 TB/s delivers 1 KiB; bf16 conversion adds ~50).
#ifndef DSINF_I8_UNIT_STEPS
#define DSINF_I8_UNIT_STEPS 2
#endif
#ifndef DSINF_I8_STAGES
#define DSINF_I8_STAGES 2
#endif
constexpr int kUnitSteps = DSINF_I8_UNIT_STEPS;
template <int NT>
constexpr int kStages = NT == 2 && DSINF_I8_STAGES * kUnitSteps > 4 ? 4 / kUnitSteps : DSINF_I8_STAGES;
static_assert(kStages<1> >= 2 && kStages<2> >= 2, "the ring needs two stages: one landing, one multiplied");
constexpr int kStepBytes = 64;  // k per warp step: 4 threads x 16 bytes per row

// 16-byte async copy global -> shared when `pred`, L2 only (the weight is read once; the L2::128B hint
// fetches whole lines). When !pred nothing is copied and the destination keeps stale bytes: any int8 bytes
// convert to finite values, and the kernel multiplies them only by zero activations (k >= K) or into rows
// >= N, which are never stored.
__device__ __forceinline__ void cp_async16_if(void* dst, const void* src, bool pred) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  asm volatile(
      "{\n\t.reg .pred p;\n\tsetp.ne.b32 p, %2, 0;\n\t@p cp.async.cg.shared.global.L2::128B [%0], [%1], 16;\n\t}"
      ::"r"(s), "l"(src), "r"(static_cast<int>(pred))
      : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

template <typename T, int NT>
__global__ void __launch_bounds__(kGemvThreads) gemv_i8_stream_kernel(const T* __restrict__ x,
                                                                      const int8_t* __restrict__ w, Epilogue<T> epi,
                                                                      int M, int K, int N, int kchunk) {
  constexpr int S = kStages<NT>, U = kUnitSteps, TR = kTileI8, NTOK = 8 * NT, P = TR * NTOK;
  constexpr int kUnitK = kStepBytes * U;           // k of one warp unit
  constexpr int kAdvance = kUnitK * kGemvWarps;    // k from a warp's unit to its next in the same tile
  __shared__ uint4 ring[S][kGemvWarps][U][2][32];  // [stage][warp][step][row g / g + 8][lane]: thread-private
  __shared__ float red[kGemvWarps * P];
  __shared__ float part[P];

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int k_begin = blockIdx.y * kchunk;
  const int k_end = min(K, k_begin + kchunk);
  // Units per tile, the same for every warp (a cluster partner waits for every epilogue): >= 1.
  const int units = max(1, ceil_div(max(0, k_end - k_begin), kAdvance));
  const int tiles = ceil_div(N, TR);
  const int bx = static_cast<int>(blockIdx.x), gx = static_cast<int>(gridDim.x);
  const int my_tiles = bx < tiles ? ceil_div(tiles - bx, gx) : 0;
  const int k_first = k_begin + kUnitK * warp + 16 * t;  // the thread's k in its first unit of a tile
  const size_t row8 = static_cast<size_t>(8) * K;        // row g -> row g + 8

  const T* xrow[NT];
#pragma unroll
  for (int q = 0; q < NT; ++q) xrow[q] = x + static_cast<size_t>(min(g + 8 * q, M - 1)) * K;

#if DSINF_GEMV_PDL
  {  // the start of the first tile's rows into L2 while the previous kernel finishes (see gemv_internal.cuh)
    pdl_begin();
    constexpr int kLines = DSINF_GEMV_PDL_PREFETCH_KB * 1024 / (TR * 128);
    for (int i = threadIdx.x; i < TR * kLines; i += kGemvThreads) {
      const int n = bx * TR + i / kLines, k = k_begin + (i % kLines) * 128;
      if (n < N && k < k_end) prefetch_l2(w + static_cast<size_t>(n) * K + k);
    }
    pdl_wait();
  }
#endif

  // Producer: the unit whose copies go out next. Rows g and g + 8 of its tile start at p_row and
  // p_row + 8 K (pointer arithmetic only while a row is >= N: such rows are never copied).
  int p_j = 0, p_k = k_first, p_n = bx * TR + g;
  bool p_ok0 = p_n < N, p_ok1 = p_n + 8 < N;
  const int8_t* p_row = w + static_cast<size_t>(p_n) * K;
  const int p_dn = gx * TR;
  const size_t p_drow = static_cast<size_t>(p_dn) * K;
  // Copy the thread's 2 x U x 16 bytes of the producer's unit into ring stage `slot` (nothing past K or N),
  // commit them as one group (always: the group count is what cp.async.wait_group counts), move on.
  auto issue = [&](int slot) {
#pragma unroll
    for (int v = 0; v < U; ++v) {
      const int k = p_k + kStepBytes * v;
      const bool k_ok = k < k_end;  // K % 16 == 0: a 16-byte chunk is all in range or all out
      cp_async16_if(&ring[slot][warp][v][0][lane], p_row + k, k_ok && p_ok0);
      cp_async16_if(&ring[slot][warp][v][1][lane], p_row + row8 + k, k_ok && p_ok1);
    }
    cp_async_commit();
    p_k += kAdvance;
    if (++p_j == units) {  // next tile of this CTA (past its last one every row is >= N)
      p_j = 0;
      p_k = k_first;
      p_n += p_dn;
      p_row += p_drow;
      p_ok0 = p_n < N;
      p_ok1 = p_n + 8 < N;
    }
  };

  float acc[NT][4];
#pragma unroll
  for (int q = 0; q < NT; ++q)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[q][e] = 0.f;

#pragma unroll
  for (int s = 0; s < S - 1; ++s) issue(s);
  int slot_c = 0, slot_p = S - 1;

  for (int ti = 0; ti < my_tiles; ++ti) {
    int c_k = k_first;  // the thread's k in the unit being multiplied
    for (int j = 0; j < units; ++j, c_k += kAdvance) {
      __syncwarp();  // stage slot_p was read (last iteration) before it is refilled
      issue(slot_p);
      slot_p = slot_p + 1 == S ? 0 : slot_p + 1;
      // This unit's activations (L1/L2 hits), issued before the wait so that they arrive during it; zeros
      // past K (never read there: a stand-in 0 * inf would be NaN, and the weights there are stale).
      uint4 xv[NT][U][2];
#pragma unroll
      for (int v = 0; v < U; ++v) {
        const int k = c_k + kStepBytes * v;
        const bool ok = k < k_end;
#pragma unroll
        for (int q = 0; q < NT; ++q)
#pragma unroll
          for (int l = 0; l < 2; ++l) xv[q][v][l] = ok ? ldg16(xrow[q] + k + 8 * l) : make_uint4(0, 0, 0, 0);
      }
      cp_async_wait<S - 1>();  // all but the S - 1 newest groups are done: this unit has landed
      uint4 wv[U][2];
#pragma unroll
      for (int v = 0; v < U; ++v) {
        wv[v][0] = ring[slot_c][warp][v][0][lane];  // row g
        wv[v][1] = ring[slot_c][warp][v][1][lane];  // row g + 8
      }
      slot_c = slot_c + 1 == S ? 0 : slot_c + 1;
#pragma unroll
      for (int v = 0; v < U; ++v)
#pragma unroll
        for (int h = 0; h < 4; ++h) {
          uint32_t a0[2], a1[2];  // pairs (4h, 4h+1), (4h+2, 4h+3) of rows g and g + 8
          I8Pairs<T>::convert(word(wv[v][0], h), a0[0], a0[1]);
          I8Pairs<T>::convert(word(wv[v][1], h), a1[0], a1[1]);
#pragma unroll
          for (int q = 0; q < NT; ++q)
            Mma<T>::run(acc[q], a0[0], a1[0], a0[1], a1[1], word(xv[q][v][h >> 1], 2 * (h & 1)),
                        word(xv[q][v][h >> 1], 2 * (h & 1) + 1));
        }
    }
    // Tile done: sum the 8 warps' partials, store (or reduce over the cluster). C fragment (q, e): row
    // g + 8 (e >> 1), token 8q + 2t + (e & 1).
#pragma unroll
    for (int q = 0; q < NT; ++q)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        red[warp * P + (8 * q + 2 * t + (e & 1)) * TR + g + 8 * (e >> 1)] = acc[q][e];
        acc[q][e] = 0.f;
      }
    __syncthreads();
    sum_warps(red, part, P, kGemvWarps);
    __syncthreads();
    reduce_and_store<TR>(part, P, (bx + ti * gx) * TR, epi);
  }
  cp_async_wait<0>();  // only empty groups are left; leave nothing pending at exit
  pdl_end();
}

// CTAs of `kernel` (256 threads, static shared memory) that fit on one SM of the current device, queried
// once per kernel and device (an attribute query: no synchronization, safe under graph capture).
template <typename Kernel>
int resident_per_sm(Kernel kernel) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cached[kMaxDevices];
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    (void)cudaGetLastError();
    return 1;
  }
  if (dev >= 0 && dev < kMaxDevices) {
    const int c = cached[dev].load(std::memory_order_relaxed);
    if (c > 0) return c;
  }
  int n = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kGemvThreads, 0) != cudaSuccess || n < 1) {
    (void)cudaGetLastError();
    return 1;
  }
  if (dev >= 0 && dev < kMaxDevices) cached[dev].store(n, std::memory_order_relaxed);
  return n;
}

template <typename T, int NT>
cudaError_t i8_stream(const GemvArgs& a, int split, cudaStream_t stream) {
  auto kernel = gemv_i8_stream_kernel<T, NT>;
  const int tiles = static_cast<int>((a.N + kTileI8 - 1) / kTileI8);
  int grid_x = tiles;
  if (split <= 1) {  // persistent: every CTA resident, ceil or floor of tiles / grid_x tiles each
    const int slots = resident_per_sm(kernel) * device_sm_count();
    const int q = (tiles + slots - 1) / slots;
    grid_x = (tiles + q - 1) / q;
  }
  const int kchunk = k_per_split(a.K, split, kStepBytes);
  const int M = static_cast<int>(a.M), K = static_cast<int>(a.K), N = static_cast<int>(a.N);
  return launch_split(kernel, grid_x, split, gemv_pdl(), stream, static_cast<const T*>(a.x),
                      static_cast<const int8_t*>(a.w), make_epilogue<T>(a), M, K, N, kchunk);
}

template <typename T>
cudaError_t i8_stream_tokens(const GemvArgs& a, int split, cudaStream_t stream) {
  return a.M <= 8 ? i8_stream<T, 1>(a, split, stream) : i8_stream<T, 2>(a, split, stream);
}

}  // namespace

cudaError_t launch_i8_stream(const GemvArgs& a, int split, cudaStream_t stream) {
  switch (a.dtype) {
    case DType::kFloat16: return i8_stream_tokens<__half>(a, split, stream);
    case DType::kBFloat16: return i8_stream_tokens<__nv_bfloat16>(a, split, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace detail
}  // namespace cuda
}  // namespace dsinf

#endif  // DSINF_CUDA_BF16
