// Streaming decode GEMV for [N, K] weights (M <= 16), fp32 accumulation on tensor cores: fp16/bf16 weights
// as the activations, and int8 weight-only with a float32 scale per row group.
//
//   out[m, n] = (sum_k x[m, k] * w[n, k]) (* scale[n / (N/G)], int8) (+ bias[n])
//
// Why a kernel of its own (an int8 variant of the [N, K] tensor-core GEMV of gemv_mma.cu read int8 at
// 42-70% of the copy bandwidth on the H200, and was removed once this kernel beat it): that kernel loads
// weights into registers, and ptxas interleaves a batch's loads with the mma that consume them, so a warp
// (which issues in order) stalls at its first mma with only a few loads in flight. Here the weight goes
// global -> shared memory with cp.async: the copies write no register, so nothing waits on them until
// cp.async.wait_group, and every warp keeps up to kStages units of its own weights in flight (default
// 2 x 2 KiB: 16-32 KiB per CTA, 4 CTAs per SM) while it multiplies one. fp16/bf16 [N, K] weights had the
// same problem in gemv_mma.cu's design (82-86% of the copy bandwidth on the H200's large shapes); here they
// stream at 86-93% (2026-12-02: 4096x12288 M=1 26.2 us instead of 27.6, 8192x8192 34.5 instead of 37.2).
//
// Structure (a "chunk" is one thread's 16 bytes of one row: 16 k of int8, 8 k of fp16/bf16):
// - CTA = W = 8 warps (16 where the tiles are few, see DSINF_STREAM_WIDE_BELOW), output tile = RT row tiles
//   of 16 rows (RT mma m16 tiles; the weight is the mma's A operand, tokens its n = 8 columns: M <= 8 one
//   token tile, M <= 16 two). K is walked in 64-byte k-steps (4 chunks per row), grouped in units of
//   kUnitSteps consecutive steps; warp w takes the tile's units w, w + W, ...; for each step of a unit,
//   thread (g = lane / 4, t = lane % 4) copies its chunk of rows g + 8 r (r < 2 RT) at the step's chunk t
//   into its own ring slot, and later reads exactly those bytes back: the ring is thread-private, so no
//   barrier is needed in the k loop (cp.async.wait_group makes a thread's own copies visible to it). Its
//   activations for the next unit are loaded while it multiplies this one.
// - k-slot map (the sum over k is order-free, so the mma's 16 k slots may be any 16 k): mma h of a chunk
//   (h < 4 for int8, < 2 for 16-bit) takes its k = 4 h + {0, 1} in slots {2t, 2t+1} and 4 h + {2, 3} in
//   slots {2t+8, 2t+9}. For int8 word h of the chunk expands (I8Pairs: exact) to those A registers; for
//   16-bit they are words 2h and 2h+1 as loaded. The B registers are the same k of the activations, from
//   the 16 (16-bit) or 32 (int8) bytes of x the thread loads per token and chunk.
// - Persistent over row tiles: grid.x = ceil(tiles / q) CTAs with q = ceil(tiles / resident CTAs), CTA b
//   takes tiles b, b + grid.x, ... All CTAs are resident at once and hold (nearly) the same bytes, so they
//   finish together (no partial last wave); a warp's ring runs on across its tile boundaries (the next
//   tile's weights are in flight while the last one is reduced).
// - Few tiles (N / 16 < #SMs): K is split over a cluster of CTAs (gridDim.y, sm_90), reduced through
//   distributed shared memory (reduce_and_store), as for the other GEMVs.
// - The scale (per row group) and bias are applied once per output, after the dot product.
// Constraints (checked by the dispatcher): a chunk is all in K or all out (K % 16 == 0 int8, K % 8 == 0
// 16-bit), x and w 16-byte aligned.
#include "common.cuh"
#include "gemv_internal.cuh"

#if defined(DSINF_CUDA_BF16)

namespace dsinf {
namespace cuda {
namespace detail {
namespace {

// A warp's unit of work: kUnitSteps consecutive 64-byte k-steps of the CTA tile's rows (2 KiB with 2 steps
// of 16 rows, or 1 step of 32: a warp reads whole 128-byte lines), copied as one cp.async group; its ring
// holds kStages units. The ring is W warps x kStages x kUnitSteps x RT KiB of static shared memory and must
// leave room for the reduction buffers under 48 KiB (kStages below lowers the stages when it would not).
// Deeper rings in dynamic shared memory lost (H200, 2026-12-03, fp16 M = 1 / 8, us, 2 x 2 -> 4 x 2): 4096x4096
// 10.9 / 11.3 -> 11.4 / 12.1, 4096x14336 30.3 / 31.2 -> 31.8 / 36.2, 8192x8192 33.5 / 34.0 -> 36.3 / 36.9;
// 6 x 2 and 8 x 1 lost more, int8 alike (fewer CTAs fit an SM). They lose where no CTA is lost too: deep
// rings only where every tile keeps a resident CTA of its own (14336x4096: 256 tiles, ~2 CTAs per SM either
// way) lost more with every stage (2026-12-03, M = 1 / 8, us, 2 -> 4 -> 6 stages of 2 KiB: fp16 31.4 / 32.0 ->
// 32.2 / 32.8 -> 33.5 / 34.5; int8, bf16 activations, 17.7 / 18.4 -> 19.4 / 20.6 -> 21.1 / 22.3), so the
// weight bytes in flight per SM are not what holds that shape below 90% of the copy bandwidth.
// int8 default 2 x 2 (16 rows): 32 KiB of ring, 16-32 KiB of weights in flight per CTA, and half the
// per-byte loop overhead of 1-step units (SASS, sm_90a: ~160 instructions per 1-step unit, most of them
// index arithmetic, against ~240 issue slots per SM in the time the SM's share of 4.2 TB/s delivers 1 KiB;
// bf16 activations add ~25 for the conversion: 3 per 4 weights, ~50 through fp32). 16-bit weights have their
// own pair of knobs (DSINF_NK_STREAM_*): half the mma and no conversion per byte, so the best ring shape may
// differ.
#ifndef DSINF_I8_UNIT_STEPS
#define DSINF_I8_UNIT_STEPS 2
#endif
#ifndef DSINF_I8_STAGES
#define DSINF_I8_STAGES 2
#endif
#ifndef DSINF_NK_STREAM_UNIT_STEPS
#define DSINF_NK_STREAM_UNIT_STEPS 2
#endif
#ifndef DSINF_NK_STREAM_STAGES
#define DSINF_NK_STREAM_STAGES 2
#endif
// Activations one unit ahead (1 = for M <= 8, 2 = also for M > 8, 0 = off), both weight types: a unit's x
// comes from L2 (~300 cycles) and, loaded just before the unit is multiplied, was the warps' top stall (ncu,
// H200, int8 4096x14336 M=1: 6.1 of 13.8 cycles between issues on the long scoreboard, 0.48 IPC per
// scheduler); loaded one unit earlier it lands while the previous unit is multiplied, for 4 x U (NT = 1)
// more registers. At M > 8 (2) it took int8 M=16 from 22.5 to 20.3 us on 4096x12288 and from 27.2 to 19.7
// on 14336x4096 (H200, fp16; 2026-12-02), so 2 is the default.
#ifndef DSINF_I8_X_AHEAD
#define DSINF_I8_X_AHEAD 2
#endif
template <int NT>
constexpr bool kXAhead = DSINF_I8_X_AHEAD >= NT;
// Row tiles of 16 per CTA tile, both weight types: 1 or 2 (stream_tokens says when). At M = 8 a CTA reads its
// K range of all 8 activation rows from L2 per tile: with one 16-row int8 tile as many bytes as its weights,
// which doubles the L2 -> SM traffic; with two tiles each activation byte serves 32 rows. At M = 16 one
// 16-row int8 tile reads twice its weight bytes of activations (int8 M=16 ran at 1.5x its M=1 time).
// DSINF_I8_ROW_TILES=1 turns the 2-tile kernels off; DSINF_STREAM_RT2_M16=0 keeps M 9..16 on 16-row tiles.
#ifndef DSINF_I8_ROW_TILES
#define DSINF_I8_ROW_TILES 2
#endif
#ifndef DSINF_STREAM_RT2_M16
#define DSINF_STREAM_RT2_M16 1
#endif
// The CTA's warps and a warp unit's k-steps by how many 16-row tiles an SM gets (M <= 8 on 16-row tiles, no K
// split; H200, runs 76-77, three builds of each alternated, us at M = 1 / 8):
// - Below DSINF_STREAM_WIDE_BELOW tiles per SM (N = 4096: 256 tiles, 1.9 CTAs and 15 warps per SM; ncu:
//   latency-bound, 45-67% of a warp's cycles waiting on the long scoreboard): CTAs of 16 warps with 1-step
//   units (the ring stays in 48 KiB), so twice the warps per SM keep the same bytes in flight. fp16 [N, K]
//   4096x4096 11.0 / 11.5 -> 10.4 / 11.1, 14336x4096 32.1 / 32.5 -> 30.2 / 32.3, bf16 alike; int8 with fp16
//   activations 14336x4096 18.4 / 19.3 -> 17.7 / 18.1, 4096x4096 even. int8 with bf16 activations lost
//   there with the former conversion through fp32 (4096x4096 7.8 / 7.9 -> 8.1 / 8.3); with the integer one
//   (I8Pairs) it needs them: on 8-warp CTAs that took 14336x4096 M = 8 from 23.1 to 29.8 us (16 warps: 23.0)
//   and 4096x4096 M = 8 from 9.0 to 9.8 (16 warps: 9.1) (H100, 2026-12-06).
// - int8 from DSINF_I8_SHORT_UNITS_FROM tiles per SM (8192x8192: 512 tiles, 3.9 per SM): 1-step units,
//   8 warps (ring 16 KiB instead of 32; the weight bytes in flight are still plenty at 4 CTAs per SM).
//   fp16 activations 20.9 / 21.7 -> 19.4 / 20.2, bf16 21.4 / 21.9 -> 20.1 / 20.4. The 16-bit weights lost
//   there (fp16 8192x8192 M = 8 34.6 -> 35.2), as did every shape with fewer tiles per SM (14336x4096 int8
//   18.4 -> 22.6 with 8 warps).
// Between the two (2 to 3 tiles per SM: N 4224 to 6335 on 132 SMs) the 8-warp 2-step units stay. 0 turns
// either off.
// Tried and dropped: 32-row tiles on the 16-warp CTAs from M = 2 (one CTA on each of N / 32 SMs, the ring in
// 64 KiB of dynamic shared memory), to halve the activation reads per weight byte; at M = 8 those reads cost
// the 16-row tiles 0.1-0.4 us on 4096x4096 (H100, every token pointed at row 0 as a diagnostic). H100,
// 2026-12-07, M = 2 / 8, us: fp16 4096x4096 13.3 / 13.6-13.7 -> 14.3-14.4 / 14.8-14.9, int8 (fp16 act.)
// 7.9-8.0 / 8.1-8.2 -> 9.0-9.3 / 9.1-9.3, fp16 14336x4096 42.2-42.3 / 43.0-43.1 -> 44.4-44.5 / 44.7.
#ifndef DSINF_STREAM_WIDE_BELOW
#define DSINF_STREAM_WIDE_BELOW 2
#endif
#ifndef DSINF_I8_SHORT_UNITS_FROM
#define DSINF_I8_SHORT_UNITS_FROM 3
#endif
constexpr int kWideWarps = 2 * kGemvWarps;

// Programmatic dependent launch per weight type (modes as in gemv_internal.cuh; the kernel waits before any
// load and, with 2, lets the next kernel be scheduled after its last tile's k loop). H200, the probe's
// CUDA-graph replays of back-to-back calls, M = 1 / 8, off -> mode 2, us (2026-12-03): fp16 [N, K] 4096x4096
// 11.5 / 11.8 -> 10.9 / 11.4, 4096x14336 31.3 / 31.8 -> 30.2 / 30.9, 8192x8192 34.5 / 35.5 -> 33.6 /
// 34.5; bf16 alike. int8 lost with it (bf16 14336x4096 18.0 -> 21.8, fp16 4096x12288 15.1 -> 16.2), and
// mode 1 lost for both types (fp16 4096x12288 26.3 -> 30.6; a likely cause, not measured: the next grid's
// CTAs, scheduled at this one's start, take SM slots the persistent grid was sized for). So 16-bit weights
// take mode 2 (DSINF_NK_STREAM_PDL), int8 none (DSINF_I8_PDL). Except for a long K (K >= 2N), which is
// launched without it: 14336x4096 took 33.3-33.9 us with it at M = 2..8 and 30.6-31.8 without (fp16; bf16
// 33.4-33.6 against 31.1-31.7 at M 4, 8), while M = 1 gained 0.2-0.4. Every other shape gained or tied at
// every M (4096x4096 0.1-0.5 us, 8192x8192 0.5-1.1).
// int8 on the wide CTAs (fewer 16-row tiles than 2 per SM, DSINF_STREAM_WIDE_BELOW: N = 4096 on 132 SMs) takes
// its own mode, DSINF_I8_WIDE_PDL: there the launch and the one-wave ramp are a larger share of the call, and
// mode 2 gained on the H100 where it lost on the larger int8 grids (4096x12288, 8-warp CTAs, fp16 M = 1 / 8
// 20.0 / 20.5 -> 20.5 / 21.5 us, 2026-12-05). H100, 2026-12-06, two builds of each alternated, 4096x4096,
// M = 1 / 4 / 8, us, off -> mode 2: fp16 8.6 / 8.8 / 8.9 -> 7.7 / 7.9 / 8.2 (1.55x -> 1.69x torch at M = 8),
// bf16 8.7 / 8.8 / 8.9 -> 7.9 / 8.0 / 8.2; 4096x12288 (not on wide CTAs) within 0.2 either way. Long K
// (14336x4096, also on wide CTAs) stays off, as above.
#ifndef DSINF_I8_WIDE_PDL
#define DSINF_I8_WIDE_PDL 2
#endif
template <typename WT, int W>
constexpr int kStreamPdl =
    sizeof(WT) != 1 ? DSINF_NK_STREAM_PDL : W == kWideWarps ? DSINF_I8_WIDE_PDL : DSINF_I8_PDL;

// What a 16-byte chunk of one weight row holds, per weight type WT (int8_t, or T itself).
template <typename WT>
struct Chunk {
  static constexpr bool kInt8 = sizeof(WT) == 1;
  static constexpr int kK = 16 / static_cast<int>(sizeof(WT));  // k per chunk: 16 int8, 8 fp16/bf16
  static constexpr int kMma = kK / 4;                             // mma per chunk and row tile (4 k each)
  static constexpr int kXVecs = kK / 8;                           // 16-byte activation loads per token: 2, 1
  static constexpr int kStepK = 4 * kK;                           // k per 64-byte warp step
  static constexpr int kUnitStepsCfg = kInt8 ? DSINF_I8_UNIT_STEPS : DSINF_NK_STREAM_UNIT_STEPS;
  static constexpr int kStagesCfg = kInt8 ? DSINF_I8_STAGES : DSINF_NK_STREAM_STAGES;
};
// k-steps per unit: Steps (0: the configured steps) / row tiles, halved again for 16 warps, so that a unit
// stays ~2 KiB per warp and the ring within its shared memory; at least 1.
template <typename WT, int Steps>
constexpr int kStepsCfg = Steps ? Steps : Chunk<WT>::kUnitStepsCfg;
template <typename WT, int RT, int W = kGemvWarps, int Steps = 0>
constexpr int kUnitSteps = kStepsCfg<WT, Steps> * kGemvWarps / (W * RT) > 0
                               ? kStepsCfg<WT, Steps> * kGemvWarps / (W * RT) : 1;
// Row tiles per pass of the end-of-tile reduction: all of them with one token tile, one at a time with two
// (then the buffers stay at 9 KiB, so that 32-row tiles fit beside the ring at M > 8 too).
template <int NT, int RT>
constexpr int kRowTilesPerPass = NT == 1 ? RT : 1;
// Stages of the ring: as configured, fewer when the ring (S x U x RT x W KiB) and the reduction buffers
// (row tiles per pass x NT x (W + 1) / 2 KiB) would pass the 48 KiB of static shared memory.
template <int NT, int RT, int W = kGemvWarps>
constexpr int kRedKiB = kRowTilesPerPass<NT, RT> * NT * (W + 1) / 2;
template <typename WT, int NT, int RT, int W = kGemvWarps, int Steps = 0>
constexpr int kStages = Chunk<WT>::kStagesCfg * kUnitSteps<WT, RT, W, Steps> * RT * W + kRedKiB<NT, RT, W> <= 48
                            ? Chunk<WT>::kStagesCfg
                            : (48 - kRedKiB<NT, RT, W>) / (kUnitSteps<WT, RT, W, Steps> * RT * W);
template <typename WT>
constexpr bool kTwoStagesEverywhere =
    kStages<WT, 1, 1> >= 2 && kStages<WT, 2, 1> >= 2 && kStages<WT, 1, 2> >= 2 && kStages<WT, 2, 2> >= 2;
static_assert(kTwoStagesEverywhere<int8_t> && kTwoStagesEverywhere<__half>,
              "the ring needs two stages: one landing, one multiplied");
static_assert(kStages<int8_t, 1, 1, kWideWarps> >= 2 && kStages<__half, 1, 1, kWideWarps> >= 2 &&
                  kStages<int8_t, 1, 1, kGemvWarps, 1> >= 2,
              "the ring needs two stages: one landing, one multiplied");

// The A registers of mma h of a chunk for one row: k pairs (4h, 4h+1) and (4h+2, 4h+3) as packed T.
template <typename T, typename WT>
__device__ __forceinline__ void a_pairs(const uint4& v, int h, uint32_t& p01, uint32_t& p23) {
  if constexpr (Chunk<WT>::kInt8) {
    I8Pairs<T>::convert(word(v, h), p01, p23);
  } else {
    p01 = word(v, 2 * h);
    p23 = word(v, 2 * h + 1);
  }
}

// 16-byte async copies global -> shared, L2 only (the weight is read once). cp_async16_if copies when `pred`
// and otherwise leaves the destination's stale bytes: int8 bytes always convert to finite values, which the
// kernel multiplies only by zero activations (k >= K) or into rows >= N, never stored. 16-bit weights left
// stale could hold inf/NaN, and 0 * inf in an mma is NaN in a valid row, so a chunk past K is zero-filled
// instead (cp_async16_stream_l2 with 0 bytes reads nothing). int8 keeps the predicated form: on the H200 the
// zero-fill's extra selects cost bf16 int8 (issue-bound) 6-8%.
// The int8 copies carry an L2 evict-first policy (DSINF_I8_EVICT_FIRST) and fetch 256-byte line pairs into L2
// (DSINF_I8_L2_PREFETCH: 256; 128 = whole lines, the 16-bit copies' hint; 0 = no hint). H100, the
// probe's graph replays over rotating weights, two builds of each alternated, us at M = 1 / 8 (128 B, no
// policy -> 256 B + evict-first): fp16 4096x14336 22.9-23.0 / 23.5-23.6 -> 22.8-23.1 / 23.0-23.3, bf16
// 23.6-23.8 / 24.1 -> 23.5-23.8 / 23.4-23.6, fp16 4096x12288 19.5-19.6 / 19.9-20.0 -> 19.4-19.6 / 19.5-19.6,
// 4096x4096 7.7 / 8.0-8.1 -> 7.5-7.7 / 7.8-8.0; 14336x4096 and 8192x8192 even. The policy did most of it
// (alone: 4096x14336 M = 8 23.2, bf16 23.7), 256 B alone nothing; both, the most. It gains at M = 8, where
// every CTA re-reads 8 tokens' activations from L2 (half the weight bytes again at 32-row tiles): a likely
// cause, not measured, is that weight lines marked evict-first no longer push those out.
#ifndef DSINF_I8_L2_PREFETCH
#define DSINF_I8_L2_PREFETCH 256
#endif
#ifndef DSINF_I8_EVICT_FIRST
#define DSINF_I8_EVICT_FIRST 1
#endif
#if DSINF_I8_L2_PREFETCH == 256
#define DSINF_I8_PF ".L2::256B"
#elif DSINF_I8_L2_PREFETCH == 0
#define DSINF_I8_PF ""
#else
#define DSINF_I8_PF ".L2::128B"
#endif
__device__ __forceinline__ uint64_t i8_copy_policy() {
  uint64_t p = 0;
  if constexpr (DSINF_I8_EVICT_FIRST) asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(p));
  return p;
}
__device__ __forceinline__ void cp_async16_if(void* dst, const void* src, bool pred, uint64_t policy) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
#if DSINF_I8_EVICT_FIRST
  asm volatile(
      "{\n\t.reg .pred p;\n\tsetp.ne.b32 p, %2, 0;\n\t@p cp.async.cg.shared.global.L2::cache_hint" DSINF_I8_PF
      " [%0], [%1], 16, %3;\n\t}" ::"r"(s), "l"(src), "r"(static_cast<int>(pred)), "l"(policy)
      : "memory");
#else
  (void)policy;
  asm volatile(
      "{\n\t.reg .pred p;\n\tsetp.ne.b32 p, %2, 0;\n\t@p cp.async.cg.shared.global" DSINF_I8_PF
      " [%0], [%1], 16;\n\t}" ::"r"(s), "l"(src), "r"(static_cast<int>(pred))
      : "memory");
#endif
}

// The weights are read from rows of [N, K] (16-row tiles: a warp's copy reads 64 bytes of each of 8 rows).
// Tried as a diagnostic (wrong results, the same bytes; H100, 2026-12-07, two builds of each alternated, us at
// M = 1): a tile-packed layout. [N/16][K/64 B][16 rows][64 B] blocks, a layout quantize_int8 could write: int8
// (fp16 act.) 4096x14336 23.4 -> 22.7, 8192x8192 25.7 -> 24.8, 14336x4096 23.1 -> 22.3, 4096x12288 19.9 -> 19.5
// (bf16 act. even, 20.2), fp16 [N, K] 8192x8192 47.4 -> 45.5 but 4096x12288 36.3 -> 37.5. Each warp unit's
// bytes in one contiguous block (this kernel's own order): int8 4096x12288 19.9 -> 19.3; with the mma removed
// as well, 18.8, a bare read's speed. The int8 goal's worst row (85% of the copy bandwidth) read 82-84% as the
// rows are, 83-84% with the blocks and 84.8-86% with the contiguous units, whose order is tied to this kernel's
// tile and warp counts; a second int8 layout, which every int8 consumer would have to read, was not added.
template <typename T, typename WT, int NT, int RT, int W = kGemvWarps, int Steps = 0>
__global__ void __launch_bounds__(32 * W) gemv_stream_kernel(const T* __restrict__ x, const WT* __restrict__ w,
                                                             Epilogue<T> epi, int M, int K, int N, int kchunk) {
  using C = Chunk<WT>;
  constexpr int S = kStages<WT, NT, RT, W, Steps>, U = kUnitSteps<WT, RT, W, Steps>;
  constexpr int TR = kTileStream * RT, NTOK = 8 * NT;
  constexpr int RP = kRowTilesPerPass<NT, RT>, P = kTileStream * RP * NTOK;  // a reduction pass's outputs
  constexpr int R8 = 2 * RT;                       // the thread's rows in a tile: g + 8 r, r < R8
  constexpr int kUnitK = C::kStepK * U;            // k of one warp unit
  constexpr int kAdvance = kUnitK * W;             // k from a warp's unit to its next in the same tile
  __shared__ uint4 ring[S][W][U][R8][32];          // [stage][warp][step][row g + 8 r][lane]: thread-private
  __shared__ float red[W * P];
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
  const int k_first = k_begin + kUnitK * warp + C::kK * t;  // the thread's k in its first unit of a tile
  const size_t row8 = static_cast<size_t>(8) * K;           // row g + 8 r -> row g + 8 (r + 1)

  const T* xrow[NT];
#pragma unroll
  for (int q = 0; q < NT; ++q) xrow[q] = x + static_cast<size_t>(min(g + 8 * q, M - 1)) * K;

  if constexpr (kStreamPdl<WT, W> != 0) {
    pdl_begin<kStreamPdl<WT, W>>();
    pdl_wait();  // before any load: the previous kernel may still be writing x or w
  }

  const uint64_t policy = C::kInt8 ? i8_copy_policy() : 0;  // only the int8 copies take it
  // Producer: the unit whose copies go out next. Rows g + 8 r of its tile start at p_row + 8 r K (pointer
  // arithmetic only while a row is >= N: such rows are never copied).
  int p_j = 0, p_k = k_first, p_n = bx * TR + g;
  bool p_ok[R8];
#pragma unroll
  for (int r = 0; r < R8; ++r) p_ok[r] = p_n + 8 * r < N;
  const WT* p_row = w + static_cast<size_t>(p_n) * K;
  const int p_dn = gx * TR;
  const size_t p_drow = static_cast<size_t>(p_dn) * K;
  // Copy the thread's R8 x U chunks of the producer's unit into ring stage `slot` (past K: nothing, int8, or
  // zeros, 16-bit; rows >= N are skipped: their stale bytes only reach outputs that are never stored),
  // commit them as one group (always: the group count is what cp.async.wait_group counts), move on.
  auto issue = [&](int slot) {
#pragma unroll
    for (int v = 0; v < U; ++v) {
      const int k = p_k + C::kStepK * v;
      const bool k_ok = k < k_end;  // a chunk is all in range or all out
#pragma unroll
      for (int r = 0; r < R8; ++r) {
        if constexpr (C::kInt8)
          cp_async16_if(&ring[slot][warp][v][r][lane], p_row + r * row8 + k, k_ok && p_ok[r], policy);
        else if (p_ok[r])
          cp_async16_stream_l2(smem_addr(&ring[slot][warp][v][r][lane]), p_row + r * row8 + (k_ok ? k : 0),
                               k_ok ? 16 : 0);
      }
    }
    cp_async_commit();
    p_k += kAdvance;
    if (++p_j == units) {  // next tile of this CTA (past its last one every row is >= N)
      p_j = 0;
      p_k = k_first;
      p_n += p_dn;
      p_row += p_drow;
#pragma unroll
      for (int r = 0; r < R8; ++r) p_ok[r] = p_n + 8 * r < N;
    }
  };

  float acc[RT][NT][4];
#pragma unroll
  for (int r = 0; r < RT; ++r)
#pragma unroll
    for (int q = 0; q < NT; ++q)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[r][q][e] = 0.f;

#pragma unroll
  for (int s = 0; s < S - 1; ++s) issue(s);
  int slot_c = 0, slot_p = S - 1;

  // A unit's activations (L1/L2 hits) at the thread's k `ck` of a unit; zeros past K. x depends on k only,
  // so the unit after a tile's last one (the next tile's first) reads the first unit's x again.
  using XUnit = uint4[NT][U][C::kXVecs];
  auto load_x = [&](XUnit& dst, int ck) {
#pragma unroll
    for (int v = 0; v < U; ++v) {
      const int k = ck + C::kStepK * v;
      const bool ok = k < k_end;
#pragma unroll
      for (int q = 0; q < NT; ++q)
#pragma unroll
        for (int l = 0; l < C::kXVecs; ++l) dst[q][v][l] = ok ? ldg16(xrow[q] + k + 8 * l) : make_uint4(0, 0, 0, 0);
    }
  };
  XUnit xv;  // the activations of the unit being multiplied
  if constexpr (kXAhead<NT>) load_x(xv, k_first);

  for (int ti = 0; ti < my_tiles; ++ti) {
    int c_k = k_first;  // the thread's k in the unit being multiplied
    for (int j = 0; j < units; ++j, c_k += kAdvance) {
      __syncwarp();  // stage slot_p was read (last iteration) before it is refilled
      issue(slot_p);
      slot_p = slot_p + 1 == S ? 0 : slot_p + 1;
      // The next unit's activations go out now and land while this unit is multiplied (kXAhead), or this
      // unit's go out now and land during the wait below.
      XUnit xn;
      if constexpr (kXAhead<NT>)
        load_x(xn, j + 1 < units ? c_k + kAdvance : k_first);
      else
        load_x(xv, c_k);
      cp_async_wait<S - 1>();  // all but the S - 1 newest groups are done: this unit has landed
      uint4 wv[U][R8];  // rows g + 8 r
#pragma unroll
      for (int v = 0; v < U; ++v)
#pragma unroll
        for (int r = 0; r < R8; ++r) wv[v][r] = ring[slot_c][warp][v][r][lane];
      slot_c = slot_c + 1 == S ? 0 : slot_c + 1;
#pragma unroll
      for (int v = 0; v < U; ++v)
#pragma unroll
        for (int h = 0; h < C::kMma; ++h)
#pragma unroll
          for (int r = 0; r < RT; ++r) {  // row tile r: rows g + 16 r and g + 16 r + 8
            uint32_t a0[2], a1[2];        // k pairs (4h, 4h+1), (4h+2, 4h+3) of those rows
            a_pairs<T, WT>(wv[v][2 * r], h, a0[0], a0[1]);
            a_pairs<T, WT>(wv[v][2 * r + 1], h, a1[0], a1[1]);
#pragma unroll
            for (int q = 0; q < NT; ++q)
              Mma<T>::run(acc[r][q], a0[0], a1[0], a0[1], a1[1], word(xv[q][v][h >> 1], 2 * (h & 1)),
                          word(xv[q][v][h >> 1], 2 * (h & 1) + 1));
          }
      if constexpr (kXAhead<NT>) {
#pragma unroll
        for (int q = 0; q < NT; ++q)
#pragma unroll
          for (int v = 0; v < U; ++v)
#pragma unroll
            for (int l = 0; l < C::kXVecs; ++l) xv[q][v][l] = xn[q][v][l];
      }
    }
    if (ti + 1 == my_tiles) pdl_end<kStreamPdl<WT, W>>();  // mode 2: the last k loop is done
    // Tile done: in passes of RP row tiles, sum the 8 warps' partials, store (or reduce over the cluster).
    // C fragment (r, q, e): row 16 r + g + 8 (e >> 1), token 8q + 2t + (e & 1).
#pragma unroll
    for (int r0 = 0; r0 < RT; r0 += RP) {
#pragma unroll
      for (int r = r0; r < r0 + RP; ++r)
#pragma unroll
        for (int q = 0; q < NT; ++q)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            red[warp * P + (8 * q + 2 * t + (e & 1)) * (kTileStream * RP) + 16 * (r - r0) + g + 8 * (e >> 1)] =
                acc[r][q][e];
            acc[r][q][e] = 0.f;
          }
      __syncthreads();  // (a second pass: every thread has also read `part` of the first)
      sum_warps(red, part, P, W);
      __syncthreads();
      reduce_and_store<kTileStream * RP>(part, P, (bx + ti * gx) * TR + kTileStream * r0, epi);
    }
  }
  cp_async_wait<0>();  // only empty groups are left; leave nothing pending at exit
}

template <typename T, typename WT, int NT, int RT, int W = kGemvWarps, int Steps = 0>
cudaError_t run_stream(const GemvArgs& a, int split, cudaStream_t stream) {
  auto kernel = gemv_stream_kernel<T, WT, NT, RT, W, Steps>;
  constexpr int kRows = kTileStream * RT;
  const int tiles = static_cast<int>((a.N + kRows - 1) / kRows);
  int grid_x = tiles;
  if (split <= 1) {  // persistent: every CTA resident, ceil or floor of tiles / grid_x tiles each
    // (H200, int8, tried: one CTA per resident slot, with 16-row tiles where those spread the rows more
    // evenly over the SMs - 4096x14336 at 75% of copy bandwidth instead of 81% (fp16), 70% instead of 77%
    // (bf16))
    const int slots = resident_per_sm<gemv_stream_kernel<T, WT, NT, RT, W, Steps>, 0, 32 * W>() *
                      device_sm_count();
    const int q = (tiles + slots - 1) / slots;
    grid_x = (tiles + q - 1) / q;
  }
  const int kchunk = k_per_split(a.K, split, Chunk<WT>::kStepK);
  const int M = static_cast<int>(a.M), K = static_cast<int>(a.K), N = static_cast<int>(a.N);
  // Long K (K >= 2N): launched without PDL, so the kernel's wait and trigger are no-ops (see kStreamPdl).
  const bool pdl = gemv_pdl(kStreamPdl<WT, W>) && a.K < 2 * a.N;
  return launch_split<32 * W>(kernel, grid_x, split, pdl, 0, stream, static_cast<const T*>(a.x),
                              static_cast<const WT*>(a.w), make_epilogue<T>(a), M, K, N, kchunk);
}

// One token tile for M <= 8, two for M 9..16; two row tiles per CTA tile when the 32-row tiles still give
// every SM DSINF_STREAM_RT2_FILL of them without a K split (H200, int8 fp16 M <= 8, 32-row vs 16-row tiles:
// 4096x12288 80% vs 76% of copy bandwidth, 4096x14336 80% vs 75%; 4096x4096 48% vs 55% and 14336x4096 73%
// vs 77%, where the 32-row tiles are fewer than the SMs; fp16 [N, K] 8192x8192, two 32-row tiles per SM:
// 85% vs 92%).
template <typename T, typename WT>
cudaError_t stream_tokens(const GemvArgs& a, int split, cudaStream_t s) {
  const bool rt2 = DSINF_I8_ROW_TILES >= 2 && split <= 1 &&
                   (a.N + 2 * kTileStream - 1) / (2 * kTileStream) >= DSINF_STREAM_RT2_FILL * device_sm_count();
  if (a.M > 8) {
    if constexpr (DSINF_I8_ROW_TILES >= 2 && DSINF_STREAM_RT2_M16) {
      if (rt2) return run_stream<T, WT, 2, 2>(a, split, s);
    }
    return run_stream<T, WT, 2, 1>(a, split, s);
  }
  if constexpr (DSINF_I8_ROW_TILES >= 2) {
    if (rt2) return run_stream<T, WT, 1, 2>(a, split, s);
  }
  // 16-row tiles: the warps and unit steps by tiles per SM (DSINF_STREAM_WIDE_BELOW, DSINF_I8_SHORT_UNITS_FROM)
  const int tiles = static_cast<int>((a.N + kTileStream - 1) / kTileStream), sms = device_sm_count();
  constexpr bool kInt8 = Chunk<WT>::kInt8;
  if constexpr (DSINF_STREAM_WIDE_BELOW > 0) {
    if (split <= 1 && tiles < DSINF_STREAM_WIDE_BELOW * sms) return run_stream<T, WT, 1, 1, kWideWarps>(a, split, s);
  }
  if constexpr (DSINF_I8_SHORT_UNITS_FROM > 0 && kInt8) {
    if (split <= 1 && tiles >= DSINF_I8_SHORT_UNITS_FROM * sms)
      return run_stream<T, WT, 1, 1, kGemvWarps, 1>(a, split, s);
  }
  return run_stream<T, WT, 1, 1>(a, split, s);
}

template <typename T>
cudaError_t stream_weights(const GemvArgs& a, int split, cudaStream_t s) {
  return a.w_int8 ? stream_tokens<T, int8_t>(a, split, s) : stream_tokens<T, T>(a, split, s);
}

}  // namespace

cudaError_t launch_nk_stream(const GemvArgs& a, int split, cudaStream_t stream) {
  switch (a.dtype) {
    case DType::kFloat16: return stream_weights<__half>(a, split, stream);
    case DType::kBFloat16: return stream_weights<__nv_bfloat16>(a, split, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace detail
}  // namespace cuda
}  // namespace dsinf

#endif  // DSINF_CUDA_BF16
