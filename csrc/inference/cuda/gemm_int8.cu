// Tensor-core GEMM with int8 weights for prefill (M = B*S above the GEMV's range), fp16/bf16 activations:
//
//   out[m, n] = scale[n / (N / G)] * sum_k x[m, k] * w[n, k]  (+ bias[n]),  w int8 [N, K], fp32 accumulation
//
// Why a kernel of our own: cuBLAS has no int8 x fp16 product, so the binding used to write each weight
// dequantized into a temporary (read 1 byte, write 2 per weight) before cuBLAS read it again (2 more): on the
// H200 a Llama-3-8B int8 prefill spent 7.2 of its 27 ms of kernels in that dequantization. This kernel reads
// the int8 weights once, straight into shared memory, and converts them in registers. H200 (docs/PERFORMANCE.md,
// twenty-second round): 1.05-2.2x the dequantize + cuBLAS path up to M = 64 on Llama-3-8B's fp16 shapes; from
// M ~ 128 cuBLAS's GEMM wins (ours: ~260 TFLOP/s, 8.8 instructions per mma), so the binding's route
// (routes.h, int8-gemm keys) sends larger M back to dequantize + cuBLAS.
//
// CTA tile: BM tokens (128, or 64 for M <= 64) x 128 weight rows, k-tiles of 64, a cp.async ring of kStages
// k-tiles; 8 warps as 2 (tokens) x 4 (weight rows), each warp BM/2 x 32 of the tile. mma.sync m16n8k16 with
// the activations as A (row-major, tokens x k) and the weight rows as B (col-major: w[n, k] has k
// contiguous, which is what the mma's B operand is).
//
// No ldmatrix: as in the GEMVs (common.cuh), the k-sum is order-free, so the mma's 16 k slots map to
// physical k such that thread (g = lane / 4, t = lane % 4) owns k = 8t .. 8t + 7 of every 32-wide k group:
// one 16-byte shared load per activation row (two mma: words 0-1 and 2-3) and one 8-byte load per weight
// row (bytes 0-3 and 4-7, converted to two pairs each by I8Pairs). Shared rows are swizzled so those loads
// hit distinct banks: activation rows (128 B) flip chunk bit 2 on odd rows, weight rows (64 B) flip chunk
// bit 1 on rows 2-3 of every 4 (k-tiles of 64; of 128: see b_off).
//
// Split K: where the output tiles are fewer than the SMs (prefill of a short prompt on a 4096-wide layer:
// 32 tiles for 132 SMs), `split` CTAs share each tile's K range as one thread-block cluster along y and
// reduce through distributed shared memory (cluster_reduce_store: deterministic, no workspace, one launch).
//
// Built only when every target is >= sm_80 (DSINF_CUDA_BF16): mma.m16n8k16 and cp.async need sm_80.
#include "common.cuh"
#include "gemv_internal.cuh"

namespace dsinf {
namespace cuda {

#if defined(DSINF_CUDA_BF16)
namespace detail {
namespace {

#ifndef DSINF_GEMM_I8_STAGES
#define DSINF_GEMM_I8_STAGES 4  // k-tiles in the ring: 96 KiB at BM = 128, BK = 64 (two CTAs fit an sm_90 SM)
#endif
constexpr int kStages = DSINF_GEMM_I8_STAGES;
static_assert(kStages >= 2, "the ring needs a stage landing and one multiplied");
#ifndef DSINF_GEMM_I8_BK
#define DSINF_GEMM_I8_BK 64  // k per ring stage: 64 or 128 (the weight rows' 64 or 128 bytes per stage)
#endif
constexpr int kBN = 128;            // weight rows (output columns) per CTA
constexpr int kBK = DSINF_GEMM_I8_BK;
static_assert(kBK == 64 || kBK == 128, "the shared-memory swizzles are written for k-tiles of 64 or 128");
constexpr int kThreads = 256;       // 8 warps: 2 x 4
constexpr int kARow = kBK * 2;      // bytes of one activation row of a stage (fp16/bf16)
constexpr int kBRow = kBK;          // bytes of one weight row of a stage (int8)
#ifndef DSINF_GEMM_I8_MIN_CTAS
#define DSINF_GEMM_I8_MIN_CTAS 2  // CTAs per SM the registers must allow (2: at most 128 per thread)
#endif
constexpr int kMinCtas = DSINF_GEMM_I8_MIN_CTAS;
#ifndef DSINF_GEMM_I8_BM64_MAX_M
#define DSINF_GEMM_I8_BM64_MAX_M 64  // largest M on the 64-token tile (above: 128 tokens)
#endif
#ifndef DSINF_GEMM_I8_MIN_K_PER_CTA
#define DSINF_GEMM_I8_MIN_K_PER_CTA 512  // do not split K below this many per CTA (the ring's ramp)
#endif

template <int BM>
constexpr size_t stage_bytes() {
  return static_cast<size_t>(BM) * kARow + static_cast<size_t>(kBN) * kBRow;
}
template <int BM>
constexpr size_t smem_bytes() {
  return stage_bytes<BM>() * kStages;
}
static_assert(static_cast<size_t>(128) * kBN * sizeof(float) <= smem_bytes<128>() &&
                  static_cast<size_t>(64) * kBN * sizeof(float) <= smem_bytes<64>(),
              "the split's fp32 tile reuses the ring");

// Byte offset of 16-byte chunk `ch` of row `row` in a stage's activation / weight block (swizzles: above; a
// weight row of 128 bytes spans all 32 banks, so rows 0-3 of every 4 each take their own pair of chunks).
__device__ __forceinline__ uint32_t a_off(int row, int ch) { return row * kARow + ((ch ^ ((row & 1) << 2)) << 4); }
__device__ __forceinline__ uint32_t b_off(int row, int ch) {
  const int flip = kBK == 64 ? ((row >> 1) & 1) << 1 : (row & 3) << 1;
  return row * kBRow + ((ch ^ flip) << 4);
}

// The split's reduction: after a cluster barrier, rank r sums its share of the BM x kBN fp32 tile (`part`, row
// major) over every rank of the cluster in rank order (deterministic) and stores it; a second barrier keeps
// each CTA's shared memory alive until all ranks have read it. 16-byte remote loads, those of all ranks issued
// before the sum: a tile is 16-32x a GEMV's, and with one serial 4-byte remote load per element and rank the
// reduction took a fifth of the kernel (H200, 4096x4096 at M = 17, split 5: 29.8 -> 23.5 us with these loads).
template <int BM, typename T>
__device__ __forceinline__ void cluster_reduce_store(const float* part, int m0, int n0, const Epilogue<T>& epi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cluster_sync();
  const int S = static_cast<int>(cluster_size()), rank = static_cast<int>(cluster_rank());
  constexpr int kVecs = BM * kBN / 4;
  const int per = ceil_div(kVecs, S), begin = rank * per, end = min(kVecs, begin + per);
  for (int v = begin + static_cast<int>(threadIdx.x); v < end; v += kThreads) {
    float4 r[DSINF_GEMV_MAX_SPLIT];
#pragma unroll
    for (int s = 0; s < DSINF_GEMV_MAX_SPLIT; ++s)
      if (s < S) {
        const uint32_t at = map_to_rank(part + 4 * v, static_cast<unsigned>(s));
        asm volatile("ld.shared::cluster.v4.f32 {%0, %1, %2, %3}, [%4];"
                     : "=f"(r[s].x), "=f"(r[s].y), "=f"(r[s].z), "=f"(r[s].w)
                     : "r"(at));
      }
    float4 sum = r[0];
#pragma unroll
    for (int s = 1; s < DSINF_GEMV_MAX_SPLIT; ++s)
      if (s < S) {
        sum.x += r[s].x;
        sum.y += r[s].y;
        sum.z += r[s].z;
        sum.w += r[s].w;
      }
    const int row = m0 + 4 * v / kBN, col = n0 + 4 * v % kBN;
    epi.store(row, col, sum.x);
    epi.store(row, col + 1, sum.y);
    epi.store(row, col + 2, sum.z);
    epi.store(row, col + 3, sum.w);
  }
  cluster_sync();
#else
  __trap();  // the launcher only splits K across CTAs on sm_90 code
#endif
}

template <typename T, int BM>
__global__ void __launch_bounds__(kThreads, kMinCtas) gemm_int8_kernel(const T* __restrict__ x, const int8_t* __restrict__ w,
                                                             Epilogue<T> epi, int M, int K, int N, int kchunk) {
  constexpr int WM = BM / 2;   // warp tile: WM tokens x 32 weight rows
  constexpr int MT = WM / 16;  // m16 tiles per warp
  static_assert(MT % 2 == 0, "m16 tiles go in pairs");
  constexpr uint32_t kABytes = BM * kARow, kStage = static_cast<uint32_t>(stage_bytes<BM>());
  extern __shared__ __align__(128) unsigned char smem[];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int wm = warp >> 2, wn = warp & 3;
  const int n0 = blockIdx.x * kBN, m0 = blockIdx.z * BM;
  const int k_begin = blockIdx.y * kchunk;
  const int k_end = min(K, k_begin + kchunk);
  const int ktiles = max(0, ceil_div(k_end - k_begin, kBK));
  const uint32_t s0 = smem_addr(smem);

  // This thread's copy slots, fixed for the whole k loop (address arithmetic once, not per k-tile: ncu counted
  // 565 instructions per warp and k-tile for 64 mma when every copy recomputed its row, pointer and swizzle).
  // Activation copy i is row a_row + i * kARowStep of the tile, chunk a_ch; weight copies likewise. The row
  // steps are multiples of 4, so a copy's swizzle is its first row's (a_off, b_off).
  constexpr int kAChunks = kBK / 8, kBChunks = kBK / 16;  // 16-byte chunks per row
  constexpr int kACopies = BM * kAChunks / kThreads, kBCopies = kBN * kBChunks / kThreads;
  constexpr int kARowStep = kThreads / kAChunks, kBRowStep = kThreads / kBChunks;
  static_assert(kARowStep % 4 == 0 && kBRowStep % 4 == 0, "copies of one thread share a swizzle");
  const int a_row = tid / kAChunks, a_ch = tid % kAChunks, b_row = tid / kBChunks, b_ch = tid % kBChunks;
  const T* a_src = x + static_cast<size_t>(m0 + a_row) * K + k_begin + a_ch * 8;
  const int8_t* b_src = w + static_cast<size_t>(n0 + b_row) * K + k_begin + b_ch * 16;
  const size_t a_step = static_cast<size_t>(kARowStep) * K, b_step = static_cast<size_t>(kBRowStep) * K;
  const uint32_t a_dst = a_off(a_row, a_ch), b_dst = b_off(b_row, b_ch);
  unsigned a_rows_ok = 0, b_rows_ok = 0;  // bit i: copy i's row exists
#pragma unroll
  for (int i = 0; i < kACopies; ++i) a_rows_ok |= static_cast<unsigned>(m0 + a_row + i * kARowStep < M) << i;
#pragma unroll
  for (int i = 0; i < kBCopies; ++i) b_rows_ok |= static_cast<unsigned>(n0 + b_row + i * kBRowStep < N) << i;

  // One k-tile into ring slot `slot`. K % 16 == 0 and kchunk % kBK == 0, so a chunk is all in range or all out
  // (zero-filled, no global read).
  auto load_stage = [&](int kt, int slot) {
    const int koff = kt * kBK;
    const uint32_t as = s0 + slot * kStage + a_dst, bs = s0 + slot * kStage + kABytes + b_dst;
    const bool a_k = k_begin + koff + a_ch * 8 < k_end, b_k = k_begin + koff + b_ch * 16 < k_end;
#pragma unroll
    for (int i = 0; i < kACopies; ++i) {
      const bool ok = a_k && ((a_rows_ok >> i) & 1u);
      cp_async16_stream(as + i * kARowStep * kARow, ok ? a_src + i * a_step + koff : x, ok ? 16 : 0);
    }
#pragma unroll
    for (int i = 0; i < kBCopies; ++i) {
      const bool ok = b_k && ((b_rows_ok >> i) & 1u);
      cp_async16_stream(bs + i * kBRowStep * kBRow, ok ? b_src + i * b_step + koff : w, ok ? 16 : 0);
    }
  };

  float acc[MT][4][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < ktiles) load_stage(s, s);
    cp_async_commit();  // empty groups too: the wait below counts groups
  }
  for (int kt = 0; kt < ktiles; ++kt) {
    cp_async_wait<kStages - 2>();  // this thread's copies of k-tile kt have landed ...
    __syncthreads();               // ... everyone's, and every warp is done with k-tile kt - 1's slot
    {
      const int next = kt + kStages - 1;
      if (next < ktiles) load_stage(next, next % kStages);
      cp_async_commit();
    }
    const uint32_t as = s0 + (kt % kStages) * kStage, bs = as + kABytes;
#pragma unroll
    for (int h = 0; h < kBK / 32; ++h) {  // 32-wide k groups: thread t owns k = 32h + 8t .. + 7
      uint32_t b[4][4];                   // weight row tile j: pairs (k 0-1, 2-3) and (4-5, 6-7)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int row = wn * 32 + 8 * j + g;
        const uint2 v = lds8(bs + b_off(row, 2 * h + (t >> 1)) + (t & 1) * 8);
        I8Pairs<T>::convert(v.x, b[j][0], b[j][1]);
        I8Pairs<T>::convert(v.y, b[j][2], b[j][3]);
      }
      // Two m16 tiles at a time: their eight accumulators with k 0-3 of the thread's 8, then again with k 4-7,
      // so an accumulator's second mma comes eight after its first (ncu: "wait" stalls led at four).
#pragma unroll
      for (int ip = 0; ip < MT; ip += 2) {
        uint4 lo[2], hi[2];
#pragma unroll
        for (int u = 0; u < 2; ++u) {
          const int r0 = wm * WM + 16 * (ip + u) + g;
          lo[u] = lds16(as + a_off(r0, 4 * h + t));
          hi[u] = lds16(as + a_off(r0 + 8, 4 * h + t));
        }
#pragma unroll
        for (int u = 0; u < 2; ++u)
#pragma unroll
          for (int j = 0; j < 4; ++j)
            Mma<T>::run(acc[ip + u][j], lo[u].x, hi[u].x, lo[u].y, hi[u].y, b[j][0], b[j][1]);
#pragma unroll
        for (int u = 0; u < 2; ++u)
#pragma unroll
          for (int j = 0; j < 4; ++j)
            Mma<T>::run(acc[ip + u][j], lo[u].z, hi[u].z, lo[u].w, hi[u].w, b[j][2], b[j][3]);
      }
    }
  }
  cp_async_wait<0>();  // only empty groups are left

  // C fragment (i, j, e) is tile row wm WM + 16 i + g (+ 8 for e >= 2), tile column wn 32 + 8 j + 2 t + (e & 1).
  auto each_result = [&](auto&& f) {
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) f(wm * WM + 16 * i + g + 8 * (e >> 1), wn * 32 + 8 * j + 2 * t + (e & 1), acc[i][j][e]);
  };
  if (gridDim.y == 1) {
    each_result([&](int row, int col, float v) { epi.store(m0 + row, n0 + col, v); });
    return;
  }
  __syncthreads();  // every warp is done with the ring: the fp32 tile takes its place
  float* part = reinterpret_cast<float*>(smem);
  each_result([&](int row, int col, float v) { part[row * kBN + col] = v; });
  cluster_reduce_store<BM>(part, m0, n0, epi);
}

template <typename T, int BM>
cudaError_t launch(const GemvArgs& a, cudaStream_t stream) {
  constexpr size_t smem = smem_bytes<BM>();
  if (!opt_in_smem<gemm_int8_kernel<T, BM>, smem>()) return cudaErrorNotSupported;
  const int M = static_cast<int>(a.M), K = static_cast<int>(a.K), N = static_cast<int>(a.N);
  const int n_tiles = ceil_div(N, kBN), m_tiles = ceil_div(M, BM);
  // Split K until the tiles fill the SMs once (at most a cluster of 8), keeping >= the minimum K per CTA.
  int split = 1;
  if (device_clusters()) {
    const int64_t tiles = static_cast<int64_t>(n_tiles) * m_tiles, sms = device_sm_count();
    while (split < DSINF_GEMV_MAX_SPLIT && tiles * split < sms && K / (split + 1) >= DSINF_GEMM_I8_MIN_K_PER_CTA)
      ++split;
  }
  const int kchunk = ceil_div(ceil_div(K, split), kBK) * kBK;
  split = ceil_div(K, kchunk);  // no CTA without k-tiles
  const dim3 grid(static_cast<unsigned>(n_tiles), static_cast<unsigned>(split), static_cast<unsigned>(m_tiles));
  return launch_ex(gemm_int8_kernel<T, BM>, grid, dim3(kThreads), smem, split, false, stream,
                   static_cast<const T*>(a.x), static_cast<const int8_t*>(a.w), make_epilogue<T>(a), M, K, N, kchunk);
}

template <typename T>
cudaError_t launch_for(const GemvArgs& a, cudaStream_t stream) {
  return a.M <= DSINF_GEMM_I8_BM64_MAX_M ? launch<T, 64>(a, stream) : launch<T, 128>(a, stream);
}

}  // namespace
}  // namespace detail
#endif  // DSINF_CUDA_BF16

bool gemm_int8_supported(const GemvArgs& a) {
#if defined(DSINF_CUDA_BF16)
  return (a.dtype == DType::kFloat16 || a.dtype == DType::kBFloat16) && a.w_int8 && a.w_nk && a.scale &&
         a.groups >= 1 && a.N >= 1 && a.N % a.groups == 0 && a.N <= INT32_MAX && a.M >= 1 &&
         (a.M + 63) / 64 <= 65535 && a.K >= 16 && a.K % 16 == 0 && a.K <= INT32_MAX && a.x && a.w &&
         detail::aligned16(a.x) && detail::aligned16(a.w);
#else
  (void)a;
  return false;
#endif
}

cudaError_t gemm_int8(const GemvArgs& a, cudaStream_t stream) {
  if (!gemm_int8_supported(a) || !a.out) return cudaErrorNotSupported;
#if defined(DSINF_CUDA_BF16)
  return a.dtype == DType::kFloat16 ? detail::launch_for<__half>(a, stream)
                                    : detail::launch_for<__nv_bfloat16>(a, stream);
#else
  return cudaErrorNotSupported;
#endif
}

}  // namespace cuda
}  // namespace dsinf
