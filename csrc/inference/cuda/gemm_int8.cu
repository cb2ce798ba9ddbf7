// Tensor-core GEMM with int8 weights for prefill (M = B*S above the GEMV's range), fp16/bf16 activations:
//
//   out[m, n] = scale[n / (N / G)] * sum_k x[m, k] * w[n, k]  (+ bias[n]),  w int8 [N, K], fp32 accumulation
//
// Why a kernel of our own: cuBLAS has no int8 x fp16 product, so the binding used to write each weight
// dequantized into a temporary (read 1 byte, write 2 per weight) before cuBLAS read it again (2 more): on the
// H200 a Llama-3-8B int8 prefill spent 7.2 of its 27 ms of kernels in that dequantization. This kernel reads
// the int8 weights once, straight into shared memory, and converts them in registers. H200 (docs/PERFORMANCE.md,
// twenty-second and twenty-third rounds): 1.2-2.9x the dequantize + cuBLAS path up to M = 64 on Llama-3-8B's fp16
// shapes; from M ~ 128 cuBLAS's GEMM wins (ours: ~300 TFLOP/s at 4.4 instructions per mma, cuBLAS's ~700), so
// the binding's route (routes.h, int8-gemm keys) sends larger M back to dequantize + cuBLAS.
//
// CTA tile: BM tokens (128, or 64 for M <= 64) x 128 weight rows, k-tiles of 64, a cp.async ring of kStages
// k-tiles; 8 warps as 2 (tokens) x 4 (weight rows), each warp BM/2 x 32 of the tile. mma.sync m16n8k16 with
// the weight rows as A (two m16 tiles per warp, converted from int8 straight into the fragment's registers)
// and the tokens as B (col-major: x[m, k] has k contiguous, which is what the mma's B operand is). With the
// tokens as A instead, each A fragment took rows g and g + 8 from two 16-byte loads, and the compiler spent
// ~180 register moves per k-tile assembling them (7.4 instructions per mma; 4.4 now, H200: 12-25% faster).
//
// No ldmatrix: as in the GEMVs (common.cuh), the k-sum is order-free, so the mma's 16 k slots map to
// physical k such that thread (g = lane / 4, t = lane % 4) owns k = 8t .. 8t + 7 of every 32-wide k group:
// one 16-byte shared load per token row (the B fragments of two mma: words 0-1 and 2-3) and one 8-byte load
// per weight row (bytes 0-3 and 4-7, converted to two pairs each by I8Pairs). Shared rows are swizzled so those loads
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
  constexpr int WM = BM / 2;   // warp tile: WM tokens x 32 weight rows (two m16 tiles)
  constexpr int NT = WM / 8;   // n8 token tiles per warp
  static_assert(NT % 4 == 0, "token tiles go in fours");
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

  // This thread's copy slots, fixed for the whole k loop: activation copy i is row a_row + i * kARowStep of the
  // tile, chunk a_ch; weight copies likewise. Rows past M (N) read the last row instead: their results are
  // never stored, and a copy's only condition is then its k range. Offsets are 32-bit, from the CTA's base
  // pointers (a tile's rows span < 2^31 elements: K <= 2^24, gemm_int8_supported). With one 64-bit pointer
  // and a row mask per copy, and no room left in 128 registers, the copies cost ~100 instructions per k-tile.
  constexpr int kAChunks = kBK / 8, kBChunks = kBK / 16;  // 16-byte chunks per row
  constexpr int kACopies = BM * kAChunks / kThreads, kBCopies = kBN * kBChunks / kThreads;
  constexpr int kARowStep = kThreads / kAChunks, kBRowStep = kThreads / kBChunks;
  static_assert(kARowStep % 4 == 0 && kBRowStep % 4 == 0, "copies of one thread share a swizzle");
  const int a_row = tid / kAChunks, a_ch = tid % kAChunks, b_row = tid / kBChunks, b_ch = tid % kBChunks;
  const T* a_base = x + static_cast<size_t>(m0) * K + k_begin;
  const int8_t* b_base = w + static_cast<size_t>(n0) * K + k_begin;
  uint32_t a_src[kACopies], b_src[kBCopies];
#pragma unroll
  for (int i = 0; i < kACopies; ++i)
    a_src[i] = static_cast<uint32_t>(min(a_row + i * kARowStep, M - 1 - m0)) * K + a_ch * 8;
#pragma unroll
  for (int i = 0; i < kBCopies; ++i)
    b_src[i] = static_cast<uint32_t>(min(b_row + i * kBRowStep, N - 1 - n0)) * K + b_ch * 16;
  const uint32_t a_dst = a_off(a_row, a_ch), b_dst = b_off(b_row, b_ch);
  const int k_len = k_end - k_begin;

  // One k-tile into ring slot `slot`. K % 16 == 0 and kchunk % kBK == 0, so a chunk is all in range or all out
  // (zero-filled, no global read).
  auto load_stage = [&](int kt, int slot) {
    const int koff = kt * kBK;
    const uint32_t as = s0 + slot * kStage + a_dst, bs = s0 + slot * kStage + kABytes + b_dst;
    const bool a_k = koff + a_ch * 8 < k_len, b_k = koff + b_ch * 16 < k_len;
#pragma unroll
    for (int i = 0; i < kACopies; ++i)
      cp_async16_stream(as + i * kARowStep * kARow, a_k ? a_base + koff + a_src[i] : x, a_k ? 16 : 0);
#pragma unroll
    for (int i = 0; i < kBCopies; ++i)
      cp_async16_stream(bs + i * kBRowStep * kBRow, b_k ? b_base + koff + b_src[i] : w, b_k ? 16 : 0);
  };

  // This thread's shared-memory reads, per 32-wide k group h of a stage: every row it reads is its first row
  // plus a multiple of 8, which keeps the swizzle, so another tile's row is a constant offset away.
  uint32_t a_rd[kBK / 32], b_rd[kBK / 32];
#pragma unroll
  for (int h = 0; h < kBK / 32; ++h) {
    a_rd[h] = a_off(wm * WM + g, 4 * h + t);
    b_rd[h] = b_off(wn * 32 + g, 2 * h + (t >> 1)) + (t & 1) * 8;
  }

  float acc[2][NT][4];  // [m16 tile of weight rows][n8 tile of tokens][C fragment]
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
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
      // A fragments of the two m16 weight tiles, converted straight into the registers the mma reads:
      // wa[i][0] for k 0-3 of the thread's 8 (rows g, g + 8: pairs k 0-1, then k 2-3), wa[i][1] for k 4-7.
      uint32_t wa[2][2][4];
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const uint2 v = lds8(bs + b_rd[h] + (16 * i + 8 * r) * kBRow);
          I8Pairs<T>::convert(v.x, wa[i][0][r], wa[i][0][r + 2]);
          I8Pairs<T>::convert(v.y, wa[i][1][r], wa[i][1][r + 2]);
        }
      // Token tiles four at a time: one 16-byte load per token row is the B fragment of both mma (words
      // 0-1: k 0-3, words 2-3: k 4-7), already in register order. The eight accumulators take k 0-3, then
      // k 4-7, so an accumulator's second mma comes eight after its first (ncu: "wait" stalls led at four).
#pragma unroll
      for (int j0 = 0; j0 < NT; j0 += 4) {
        uint4 xb[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) xb[u] = lds16(as + a_rd[h] + 8 * (j0 + u) * kARow);
#pragma unroll
        for (int u = 0; u < 4; ++u)
#pragma unroll
          for (int i = 0; i < 2; ++i) Mma<T>::run(acc[i][j0 + u], wa[i][0][0], wa[i][0][1], wa[i][0][2], wa[i][0][3], xb[u].x, xb[u].y);
#pragma unroll
        for (int u = 0; u < 4; ++u)
#pragma unroll
          for (int i = 0; i < 2; ++i) Mma<T>::run(acc[i][j0 + u], wa[i][1][0], wa[i][1][1], wa[i][1][2], wa[i][1][3], xb[u].z, xb[u].w);
      }
    }
  }
  cp_async_wait<0>();  // only empty groups are left

  // C fragment (i, j, e) is weight row (tile column) wn 32 + 16 i + g (+ 8 for e >= 2), token (tile row)
  // wm WM + 8 j + 2 t + (e & 1).
  auto each_result = [&](auto&& f) {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) f(wm * WM + 8 * j + 2 * t + (e & 1), wn * 32 + 16 * i + g + 8 * (e >> 1), acc[i][j][e]);
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
         (a.M + 63) / 64 <= 65535 && a.K >= 16 && a.K % 16 == 0 && a.K <= (1 << 24) && a.x && a.w &&
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
