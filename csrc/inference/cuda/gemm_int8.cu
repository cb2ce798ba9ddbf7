// Tensor-core GEMM with int8 weights for prefill (M = B*S above the GEMV's range), fp16/bf16 activations:
//
//   out[m, n] = scale[n / (N / G)] * sum_k x[m, k] * w[n, k]  (+ bias[n]),  w int8 [N, K], fp32 accumulation
//
// Why a kernel of our own: cuBLAS has no int8 x fp16 product, so the binding used to write each weight
// dequantized into a temporary (read 1 byte, write 2 per weight) before cuBLAS read it again (2 more): on the
// H200 a Llama-3-8B int8 prefill spent 7.2 of its 27 ms of kernels in that dequantization. This kernel reads
// the int8 weights once, straight into shared memory, and converts them in registers. Two kernels: warpgroup MMA
// (wgmma) where sm_90a code runs on a compute-capability-9.0 device (below), mma.sync elsewhere. H200
// (docs/PERFORMANCE.md, twenty-third round; dequantize + cuBLAS time / GEMM time): wgmma 1.2-3.3x up to M = 128
// on Llama-3-8B's shapes, and on the 56-112 MiB weights up to M = 512 (fp16); mma.sync 1.05-2.9x up to M = 64.
// Above that cuBLAS's GEMM (~700 TFLOP/s; wgmma 400-565, mma.sync ~300) wins, so the binding's route (routes.h,
// int8-gemm keys) sends larger M back to dequantize + cuBLAS.
//
// The mma.sync kernel:
// CTA tile: BM tokens (128, or 64 for M <= 64) x 128 weight rows, k-tiles of 64, a cp.async ring of kStages
// k-tiles; 8 warps as 2 (tokens) x 4 (weight rows), each warp BM/2 x 32 of the tile. mma.sync m16n8k16 with
// the weight rows as A (two m16 tiles per warp, converted from int8 straight into the fragment's registers)
// and the tokens as B (col-major: x[m, k] has k contiguous, which is what the mma's B operand is). With the
// tokens as A instead, each A fragment took rows g and g + 8 from two 16-byte loads, and the compiler spent
// ~180 register moves per k-tile assembling them (SASS: 7.4 instructions per mma; 3.8 now; H200: 12-25% faster).
//
// No ldmatrix: as in the GEMVs (common.cuh), the k-sum is order-free, so the mma's 16 k slots map to
// physical k such that thread (g = lane / 4, t = lane % 4) owns k = 8t .. 8t + 7 of every 32-wide k group:
// one 16-byte shared load per token row (the B fragments of two mma: words 0-1 and 2-3) and one 8-byte load
// per weight row (bytes 0-3 and 4-7, converted to two pairs each by I8Pairs). Shared rows are swizzled so those loads
// hit distinct banks: activation rows (128 B) flip chunk bit 2 on odd rows, weight rows (64 B) flip chunk
// bit 1 on rows 2-3 of every 4 (k-tiles of 64; of 128: see b_off).
//
// Split K (both kernels): where the output tiles are fewer than the SMs (prefill of a short prompt on a 4096-wide
// layer: 32 tiles for 132 SMs), `split` CTAs share each tile's K range as one thread-block cluster along y and
// reduce through distributed shared memory (cluster_reduce_store: deterministic, no workspace, one launch).
//
// Built only when every target is >= sm_80 (DSINF_CUDA_BF16): mma.m16n8k16 and cp.async need sm_80; the wgmma
// kernel only with sm_90a targets (DSINF_CUDA_SM90A, from the builder) and DSINF_GEMM_I8_WGMMA (default 1).
#include "common.cuh"
#include "gemv_internal.cuh"
#include "wgmma.cuh"

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
#ifndef DSINF_GEMM_I8_WGMMA
#define DSINF_GEMM_I8_WGMMA 1  // 0: the mma.sync kernel on Hopper too (sm_90a builds)
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

// The split's reduction: after a cluster barrier, rank r sums its share of the BM x BN fp32 tile (`part`, row
// major) over every rank of the cluster in rank order (deterministic) and stores it; a second barrier keeps
// each CTA's shared memory alive until all ranks have read it. 16-byte remote loads, those of all ranks issued
// before the sum: a tile is 16-32x a GEMV's, and with one serial 4-byte remote load per element and rank the
// reduction took a fifth of the kernel (H200, 4096x4096 at M = 17, split 5: 29.8 -> 23.5 us with these loads).
template <int BM, typename T, int BN = kBN, int Threads = kThreads>
__device__ __forceinline__ void cluster_reduce_store(const float* part, int m0, int n0, const Epilogue<T>& epi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cluster_sync();
  const int S = static_cast<int>(cluster_size()), rank = static_cast<int>(cluster_rank());
  constexpr int kVecs = BM * BN / 4;
  const int per = ceil_div(kVecs, S), begin = rank * per, end = min(kVecs, begin + per);
  for (int v = begin + static_cast<int>(threadIdx.x); v < end; v += Threads) {
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
    const int row = m0 + 4 * v / BN, col = n0 + 4 * v % BN;
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

// The CTA's results (`each_result(f)` calls f(tile row, tile column, value) for each of its accumulators):
// stored, or, where K is split over a cluster, written to an fp32 tile in place of the ring (after a barrier:
// every warp is done with it) and reduced over the cluster.
template <int BM, int BN = kBN, int Threads = kThreads, typename T, typename Each>
__device__ __forceinline__ void finish_tile(Each&& each_result, unsigned char* smem, int m0, int n0, const Epilogue<T>& epi) {
  if (gridDim.y == 1) {
    each_result([&](int row, int col, float v) { epi.store(m0 + row, n0 + col, v); });
    return;
  }
  __syncthreads();
  float* part = reinterpret_cast<float*>(smem);
  each_result([&](int row, int col, float v) { part[row * BN + col] = v; });
  cluster_reduce_store<BM, T, BN, Threads>(part, m0, n0, epi);
}

// One operand's share of a ring stage for this thread: a tile of Rows rows of RowBytes bytes (16-byte chunks)
// starting at row `row0` of a [rows, K] matrix, copy i being tile row row() + i * kRowStep, chunk chunk(). Rows
// past `last_row` read that row instead: their results are never stored, and a copy's only condition is then
// its k range (K % 16 == 0 and whole k-tiles per CTA: a chunk is all in range or all out, zero-filled). Offsets
// are 32-bit, from the tile's base pointer (a tile's rows span < Rows * 2^24 <= 2^32 elements: K <= 2^24,
// gemm_int8_supported, and Rows <= 256).
// With one 64-bit pointer and a row mask per copy instead, and no room left in 128 registers, the mma.sync
// kernel's copies cost ~100 instructions per k-tile.
template <typename E, int Rows, int RowBytes, int Threads = kThreads>
struct TileCopy {
  static constexpr int kChunks = RowBytes / 16, kCopies = Rows * kChunks / Threads, kRowStep = Threads / kChunks;
  static constexpr int kPerChunk = 16 / static_cast<int>(sizeof(E));
  static_assert(kCopies >= 1 && Rows * kChunks % Threads == 0, "every thread copies whole rows' chunks");
  static_assert(Rows <= 256, "32-bit copy offsets: Rows * K must stay below 2^32 (K <= 2^24)");
  const E* base;
  uint32_t src[kCopies];  // element offsets from base
  int kc;                 // the chunk's first k within a stage

  static __device__ __forceinline__ int row() { return static_cast<int>(threadIdx.x) / kChunks; }
  static __device__ __forceinline__ int chunk() { return static_cast<int>(threadIdx.x) % kChunks; }
  __device__ __forceinline__ TileCopy(const E* p, int row0, int last_row, int K, int k_begin)
      : base(p + static_cast<size_t>(row0) * K + k_begin), kc(chunk() * kPerChunk) {
#pragma unroll
    for (int i = 0; i < kCopies; ++i) src[i] = static_cast<uint32_t>(min(row() + i * kRowStep, last_row - row0)) * K + kc;
  }
  // The k-tile at k offset `koff` of the CTA's range (k_len long) into shared memory, `dst` being this thread's
  // first copy's (swizzled) address; the other copies' rows are kRowStep apart.
  __device__ __forceinline__ void load(uint32_t dst, int koff, int k_len) const {
    const bool in = koff + kc < k_len;
#pragma unroll
    for (int i = 0; i < kCopies; ++i) cp_async16_stream(dst + i * kRowStep * RowBytes, base + (in ? koff + src[i] : 0), in ? 16 : 0);
  }
};

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
  const int k_len = min(K, k_begin + kchunk) - k_begin;
  const int ktiles = max(0, ceil_div(k_len, kBK));
  const uint32_t s0 = smem_addr(smem);

  // This thread's copy slots, fixed for the whole k loop. Its copies' rows are kRowStep (a multiple of 4) apart,
  // so they share the first one's swizzle (a_off, b_off).
  const TileCopy<T, BM, kARow> xc(x, m0, M - 1, K, k_begin);
  const TileCopy<int8_t, kBN, kBRow> wc(w, n0, N - 1, K, k_begin);
  static_assert(decltype(xc)::kRowStep % 4 == 0 && decltype(wc)::kRowStep % 4 == 0, "copies share a swizzle");
  const uint32_t a_dst = a_off(xc.row(), xc.chunk()), b_dst = b_off(wc.row(), wc.chunk());
  auto load_stage = [&](int kt, int slot) {
    xc.load(s0 + slot * kStage + a_dst, kt * kBK, k_len);
    wc.load(s0 + slot * kStage + kABytes + b_dst, kt * kBK, k_len);
  };

  // This thread's shared-memory reads, per 32-wide k group h of a stage: every row it reads is its first row
  // plus a multiple of 8, which keeps the swizzle, so another tile's row is a constant offset away.
  uint32_t a_rd[kBK / 32], b_rd[kBK / 32];
#pragma unroll
  for (int h = 0; h < kBK / 32; ++h) {
    a_rd[h] = a_off(wm * WM + g, 4 * h + t);
    b_rd[h] = b_off(wn * 32 + g, 2 * h + (t >> 1)) + (t & 1) * 8;
  }

  float acc[2][NT][4] = {};  // [m16 tile of weight rows][n8 tile of tokens][C fragment]

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
  finish_tile<BM>(each_result, smem, m0, n0, epi);
}

// K split until the tiles fill the SMs once (at most a cluster of 8), keeping >= the minimum K per CTA.
int split_for(int n_tiles, int m_tiles, int K) {
  int split = 1;
  if (device_clusters()) {
    const int64_t tiles = static_cast<int64_t>(n_tiles) * m_tiles, sms = device_sm_count();
    while (split < DSINF_GEMV_MAX_SPLIT && tiles * split < sms && K / (split + 1) >= DSINF_GEMM_I8_MIN_K_PER_CTA)
      ++split;
  }
  return split;
}

template <typename T, int BM>
cudaError_t launch(const GemvArgs& a, cudaStream_t stream) {
  constexpr size_t smem = smem_bytes<BM>();
  if (!opt_in_smem<gemm_int8_kernel<T, BM>, smem>()) return cudaErrorNotSupported;
  const int M = static_cast<int>(a.M), K = static_cast<int>(a.K), N = static_cast<int>(a.N);
  const int n_tiles = ceil_div(N, kBN), m_tiles = ceil_div(M, BM);
  const int kchunk = ceil_div(ceil_div(K, split_for(n_tiles, m_tiles, K)), kBK) * kBK;
  const int split = ceil_div(K, kchunk);  // no CTA without k-tiles
  const dim3 grid(static_cast<unsigned>(n_tiles), static_cast<unsigned>(split), static_cast<unsigned>(m_tiles));
  return launch_ex(gemm_int8_kernel<T, BM>, grid, dim3(kThreads), smem, split, false, stream,
                   static_cast<const T*>(a.x), static_cast<const int8_t*>(a.w), make_epilogue<T>(a), M, K, N, kchunk);
}

// ------------------------------------------------------------------------------------------------
// Hopper (sm_90a): warpgroup MMA. mma.sync tops out near 300 TFLOP/s here (above; cuBLAS's wgmma GEMMs run at
// ~700), because every m16n8k16 needs its operands issued by the warp. wgmma.m64nNk16 takes the tokens (B,
// up to 128 of them) straight from shared memory and the weights (A) from registers, so each converted weight
// fragment feeds N / 8 times the MACs of an mma.sync one.
//
// CTA: two warpgroups, 64 weight rows each (128 per CTA), BT tokens (64 or 128), k-tiles of 64 in a ring of
// kWgStages. Tokens in shared memory are K-major rows of 128 bytes in the 128-byte swizzle the descriptor
// names (wgmma_desc_k128b), so B is read in true k order; the A fragment therefore needs true k order too:
// thread (g, t) takes bytes 2t, 2t+1 and 2t+8, 2t+9 of its rows' 16-byte k16 chunk, two 4-byte loads and one
// byte permute per row (weight rows of 64 bytes, chunk c of row r at c ^ ((r >> 1) & 3): the 8 rows a warp
// reads at once land in 8 distinct 16-byte bank groups).
//
// Pipeline: the copy of k-tile kt + Stages - 2 is issued at k-tile kt (one slot of slack: the last wgmma
// of k-tile kt - 1 may still be reading its slot); one wgmma per k16 step, committed alone, then a wait for
// all but the newest, so the next step's conversion overlaps the running wgmma.
//
// At large M this kernel plateaus at 400-565 TFLOP/s (H200) against cuBLAS's ~700. A CTA of 4 warpgroups (256
// weight rows, two thirds of the L2 bytes per MAC, one CTA per SM, a 6-stage ring) was tried as a build
// variant on the guess that the L2's bandwidth was the limit: at M = 4096 from 1% faster to 5% slower, and 3-56%
// slower at M = 256-1024, where half as many CTAs fill the SMs worse (run 124). It was removed; the template
// keeps the warpgroups and the ring depth as parameters. ncu at M = 4096 (run 126): tensor pipe 54% busy, L2
// 39%, DRAM 5%, 16 warps per SM: latency, the conversion and the one-deep wgmma overlap, not bandwidth. A
// warp-specialized variant (a cp.async producer warpgroup signalling through mbarriers, two consumer warpgroups
// on m64n256k16, setmaxnreg 56 / 224, a 5-stage ring; runs 127-128, parity passed) ran 3-24% faster at M >= 2048
// and on 14336x4096 from M = 1024 (up to 640 TFLOP/s), but 4-42% slower at M <= 1024 on 4096x4096 and 4096x6144
// (a wave or less of 256-token CTAs). Where it won, dequantize + cuBLAS was faster still, except on 14336x4096
// at M = 1024 (194 against 201-208 us: ~0.3 ms of a 40 ms batch-8 Llama prompt). Not kept for that.
// ------------------------------------------------------------------------------------------------
#if defined(DSINF_CUDA_SM90A) && DSINF_GEMM_I8_WGMMA
#ifndef DSINF_GEMM_I8_WG_STAGES
#define DSINF_GEMM_I8_WG_STAGES 4  // 96 KiB at BT = 128: two CTAs per sm_90 SM
#endif
constexpr int kWgStages = DSINF_GEMM_I8_WG_STAGES;
static_assert(kWgStages >= 3, "the wgmma ring keeps one slot of slack");
constexpr int kWgBK = 64;  // k per stage: a token row of 128 bytes, the 128-byte swizzle's row

template <int BT, int WG>
constexpr size_t wg_stage_bytes() {
  return static_cast<size_t>(BT) * kWgBK * 2 + static_cast<size_t>(64 * WG) * kWgBK;
}
template <int BT, int WG, int Stages>
constexpr size_t wg_smem_bytes() {
  return wg_stage_bytes<BT, WG>() * Stages + 1024;  // + slack to align the ring to 1024 bytes (the swizzle atom)
}
template <int BT, int WG, int Stages>
constexpr bool wg_shape_ok() {
  return wg_stage_bytes<BT, WG>() % 1024 == 0 &&                                            // stages keep the alignment
         static_cast<size_t>(BT) * 64 * WG * sizeof(float) <= wg_smem_bytes<BT, WG, Stages>() &&  // the split's tile
         wg_smem_bytes<BT, WG, Stages>() <= 227 * 1024;                                     // sm_90's opt-in limit
}
static_assert(wg_shape_ok<64, 2, kWgStages>() && wg_shape_ok<128, 2, kWgStages>(), "the narrow CTA's ring");

__device__ __forceinline__ uint32_t wx_off(int row, int ch) { return row * (kWgBK * 2) + ((ch ^ (row & 7)) << 4); }
__device__ __forceinline__ uint32_t ww_off(int row, int ch) { return row * kWgBK + ((ch ^ ((row >> 1) & 3)) << 4); }

// WG warpgroups of 128 threads, 64 weight rows each; two CTAs per SM at WG = 2 (128 registers per thread at
// most either way).
template <typename T, int BT, int WG, int Stages>
__global__ void __launch_bounds__(128 * WG, WG == 2 ? 2 : 1)
    gemm_int8_wgmma_kernel(const T* __restrict__ x, const int8_t* __restrict__ w, Epilogue<T> epi, int M, int K, int N,
                           int kchunk) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int kThr = 128 * WG, kRows = 64 * WG;  // threads, weight rows (tile columns)
  extern __shared__ __align__(128) unsigned char smem[];
  constexpr uint32_t kXBytes = BT * kWgBK * 2, kStage = static_cast<uint32_t>(wg_stage_bytes<BT, WG>());
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int n0 = blockIdx.x * kRows, m0 = blockIdx.z * BT;
  const int k_begin = blockIdx.y * kchunk;
  const int k_len = min(K, k_begin + kchunk) - k_begin;
  const int ktiles = max(0, ceil_div(k_len, kWgBK));
  const uint32_t s0 = (smem_addr(smem) + 1023u) & ~1023u;

  // Copy slots as in the mma.sync kernel; rows kRowStep (a multiple of 8) apart share the 128-byte swizzle.
  const TileCopy<T, BT, kWgBK * 2, kThr> xc(x, m0, M - 1, K, k_begin);
  const TileCopy<int8_t, kRows, kWgBK, kThr> wc(w, n0, N - 1, K, k_begin);
  static_assert(decltype(xc)::kRowStep % 8 == 0 && decltype(wc)::kRowStep % 8 == 0, "copies share a swizzle");
  const uint32_t x_dst = wx_off(xc.row(), xc.chunk()), w_dst = ww_off(wc.row(), wc.chunk());
  auto load_stage = [&](int kt, int slot) {
    xc.load(s0 + slot * kStage + x_dst, kt * kWgBK, k_len);
    wc.load(s0 + slot * kStage + kXBytes + w_dst, kt * kWgBK, k_len);
  };

  // This thread's A reads: rows 16 warp + g and + 8 (the same swizzle; warpgroup w's warps hold its rows 64 w ..
  // 64 w + 63, the m64 the wgmma of that warpgroup multiplies), the words at 4 (t / 2) and 8 + 4 (t / 2)
  // of the k16 step's chunk; the byte permute keeps bytes 2t, 2t+1 of each (the halves t % 2 selects).
  const int a_row = 16 * warp + g;
  uint32_t a_rd[kWgBK / 16];
#pragma unroll
  for (int s = 0; s < kWgBK / 16; ++s) a_rd[s] = ww_off(a_row, s) + 4 * (t >> 1);
  const uint32_t pick = (t & 1) ? 0x7632u : 0x5410u;

  float acc[BT / 2] = {};

  constexpr int kAhead = Stages - 2;  // k-tiles in flight ahead of the one multiplied
#pragma unroll
  for (int s = 0; s < kAhead; ++s) {
    if (s < ktiles) load_stage(s, s);
    cp_async_commit();
  }
  for (int kt = 0; kt < ktiles; ++kt) {
    cp_async_wait<kAhead - 1>();  // this thread's copies of k-tile kt have landed ...
    __syncthreads();              // ... everyone's; and k-tile kt - 2's wgmma (slot of kt + kAhead) are done
    {
      const int next = kt + kAhead;
      if (next < ktiles) load_stage(next, next % Stages);
      cp_async_commit();
    }
    const uint32_t xs = s0 + (kt % Stages) * kStage, ws = xs + kXBytes;
    uint32_t raw[kWgBK / 16][4];  // the k-tile's weight words, all loaded before the first conversion
#pragma unroll
    for (int s = 0; s < kWgBK / 16; ++s) {
      raw[s][0] = lds4(ws + a_rd[s]);
      raw[s][1] = lds4(ws + a_rd[s] + 8);
      raw[s][2] = lds4(ws + a_rd[s] + 8 * kWgBK);
      raw[s][3] = lds4(ws + a_rd[s] + 8 * kWgBK + 8);
    }
#pragma unroll
    for (int s = 0; s < kWgBK / 16; ++s) {
      uint32_t a[4];
      I8Pairs<T>::convert(__byte_perm(raw[s][0], raw[s][1], pick), a[0], a[2]);
      I8Pairs<T>::convert(__byte_perm(raw[s][2], raw[s][3], pick), a[1], a[3]);
      wgmma_fence();
      Wgmma<T, BT>::run(acc, a, wgmma_desc_k128b(xs + 32 * s));
      wgmma_commit();
      wgmma_wait<1>();
    }
  }
  wgmma_wait<0>();
  cp_async_wait<0>();  // only empty groups are left

  // D fragment: weight row (tile column) 16 warp + g (+ 8 for e >= 2), token (tile row) 8 j + 2 t + (e & 1).
  auto each_result = [&](auto&& f) {
#pragma unroll
    for (int j = 0; j < BT / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) f(8 * j + 2 * t + (e & 1), a_row + 8 * (e >> 1), acc[4 * j + e]);
  };
  finish_tile<BT, kRows, kThr>(each_result, smem, m0, n0, epi);
#else
  __trap();  // the launcher takes this kernel only where sm_90a code runs (gemm_int8_wgmma)
#endif
}

template <typename T, int BT, int WG = 2, int Stages = kWgStages>
cudaError_t launch_wgmma(const GemvArgs& a, cudaStream_t stream) {
  constexpr size_t smem = wg_smem_bytes<BT, WG, Stages>();
  if (!opt_in_smem<gemm_int8_wgmma_kernel<T, BT, WG, Stages>, smem>()) return cudaErrorNotSupported;
  const int M = static_cast<int>(a.M), K = static_cast<int>(a.K), N = static_cast<int>(a.N);
  const int n_tiles = ceil_div(N, 64 * WG), m_tiles = ceil_div(M, BT);
  const int split = split_for(n_tiles, m_tiles, K);
  const int kchunk = ceil_div(ceil_div(K, split), kWgBK) * kWgBK;
  const dim3 grid(static_cast<unsigned>(n_tiles), static_cast<unsigned>(ceil_div(K, kchunk)), static_cast<unsigned>(m_tiles));
  return launch_ex(gemm_int8_wgmma_kernel<T, BT, WG, Stages>, grid, dim3(128 * WG), smem, static_cast<int>(grid.y), false,
                   stream, static_cast<const T*>(a.x), static_cast<const int8_t*>(a.w), make_epilogue<T>(a), M, K, N,
                   kchunk);
}
#endif  // DSINF_CUDA_SM90A && DSINF_GEMM_I8_WGMMA

template <typename T>
cudaError_t launch_for(const GemvArgs& a, cudaStream_t stream) {
  const bool small = a.M <= DSINF_GEMM_I8_BM64_MAX_M;
#if defined(DSINF_CUDA_SM90A) && DSINF_GEMM_I8_WGMMA
  if (gemm_int8_wgmma()) return small ? launch_wgmma<T, 64>(a, stream) : launch_wgmma<T, 128>(a, stream);
#endif
  return small ? launch<T, 64>(a, stream) : launch<T, 128>(a, stream);
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

bool gemm_int8_wgmma() {
#if defined(DSINF_CUDA_BF16) && defined(DSINF_CUDA_SM90A) && DSINF_GEMM_I8_WGMMA
  return detail::device_hopper();
#else
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
