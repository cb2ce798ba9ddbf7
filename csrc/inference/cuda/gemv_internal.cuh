// Internal interface between the GEMV dispatcher (gemv_launch.cu) and the kernel files
// (gemv_mma.cu, gemv_stream.cu, gemv_simt.cu, gemv_scalar.cu). Not part of the launcher API.
#pragma once

#include <cuda_runtime.h>

#include <atomic>

#include "../include/cuda_kernels.h"
#include "common.cuh"

namespace dsinf {
namespace cuda {
namespace detail {

// Tuning constants. Overridable at build time (-D...) so they can be swept on the GPU without edits.
// Measured on H100 (fp16, M = 1 and 8, five LLM shapes, CUDA-graph replays, 2026-11-21): the GEMVs
// stream best with ~1-2 long-lived CTAs per SM. Splitting until tiles * split >= 1 x #SMs (so 132-264
// CTAs) with 4 k-steps of loads in flight gave 86-91% of the 3.0 TB/s copy bandwidth on 100+ MB
// weights; a target of 3 CTAs/SM (512 short CTAs for 4096^2) gave 57-79%.
#ifndef DSINF_GEMV_CTAS_PER_SM
#define DSINF_GEMV_CTAS_PER_SM 1  // split K over CTAs until tiles * split >= this * #SMs
#endif
// The [K, N] tensor-core kernel's target (64-column tiles), capped at 7/8 of the CTAs that fit the device at
// once (kn_split in gemv_launch.cu). H200, fp16 M=1, powers of two, fill 1 -> 2: 4096x12288 (192 tiles)
// 32.0 -> 26.7 us, 4096x14336 (224) 34.1 -> 30.7 (split 2: 384 and 448 CTAs of 528 resident); without the cap
// 8192x8192 would take 512 CTAs (split 4): 36.9 -> 45.5 us, 14336x4096 (split 8) 34.1 -> 40.5, 4096x4096
// 12.7 -> 16.0. Any integer split, fill 3 (run 35): 14336x4096 split 7 (448 CTAs) 31.3 us against 34.1 at
// split 4 and 31.9 at split 5; 8192x8192 split 3 36.2 against 37.0 at split 2.
#ifndef DSINF_KN_CTAS_PER_SM
#define DSINF_KN_CTAS_PER_SM 3
#endif
// The [K, N] kernel's cp.async ring (gemv_mma.cu) takes the shapes with at most DSINF_KN_RING_TILES_PER_SM
// 64-column tiles per SM, and fills to DSINF_KN_RING_CTAS_PER_SM, capped at every resident CTA (one wave).
// H200 (run 42), fp16 M=1, ring (one 132 KiB CTA per SM) against register batches, us: 4096x4096 11.3 / 12.5,
// 14336x4096 30.0 / 31.4, 8192x8192 33.6 / 36.2 (96% of the copy bandwidth) - N up to 8192, 128 tiles; but
// 4096x12288 (192 tiles: two waves of the ring, or 1-2 CTAs of an 88 KiB ring per SM) 28.0-28.7 / 26.7, and
// 4096x14336 30.5-32.0 / 30.7. Fill 2 (a split of 2 at 8192x8192, 88 KiB rings) measured no better there
// and slower on 4096x4096 (15.3) and 14336x4096 (38.7).
#ifndef DSINF_KN_RING_TILES_PER_SM
#define DSINF_KN_RING_TILES_PER_SM 1
#endif
#ifndef DSINF_KN_RING_CTAS_PER_SM
#define DSINF_KN_RING_CTAS_PER_SM 1
#endif
// Whether that split may be any integer up to DSINF_GEMV_MAX_SPLIT (1) or only a power of two (0). Powers of
// two jump from 256 to 512 CTAs where the tiles are few (64 on N = 4096), and 512 is over the cap.
#ifndef DSINF_KN_SPLIT_ANY
#define DSINF_KN_SPLIT_ANY 1
#endif
// The [K, N] split's shortest K range per CTA: 4096x4096 ran 12.7 us at split 5 (819 rows per CTA) and 13.0
// at split 7 (585 rows: the ramp and the cluster reduction weigh more on short CTAs).
#ifndef DSINF_KN_MIN_K_PER_CTA
#define DSINF_KN_MIN_K_PER_CTA 768
#endif
// The [N, K] streaming kernel's, for sweeping (fill 2 gave int8 14336x4096 19.9 us instead of 18.2, 4096x4096
// 8.6 instead of 7.4: split clusters of short CTAs, where one 16-row tile per CTA already fills the SMs).
#ifndef DSINF_NK_CTAS_PER_SM
#define DSINF_NK_CTAS_PER_SM DSINF_GEMV_CTAS_PER_SM
#endif
#ifndef DSINF_GEMV_MAX_SPLIT
#define DSINF_GEMV_MAX_SPLIT 8  // cluster size limit (8 = portable maximum)
#endif
// The [N, K] streaming kernel's (gemv_stream.cu) tiles take two row tiles (32 rows) when K is not
// split and N / 32 >= DSINF_STREAM_RT2_FILL * #SMs, else one (16 rows). H200 (132 SMs): 8192x8192 [N, K]
// fp16 M=1 took 37.2 us with 256 CTAs of 32 rows (fill 1) and 34.5 with 512 of 16 (fill 2: 4 CTAs per SM,
// twice the weights in flight); bf16 37.6 / 34.0; int8 alike (20.5 / 20.3); N = 12288, 14336 keep 32 rows.
// Tried and removed: 32-row tiles with K split 2 over a cluster where the 32-row tiles are too few (N = 4096:
// as many CTAs, half the activation reads per weight byte at M = 8). H200, M = 2..8, us: 4096x4096 fp16
// 10.8-11.3 -> 11.7-12.3, int8 7.4-7.6 -> 8.5-8.7; 14336x4096 fp16 31.7-32.2 -> 33.9-34.3 (2026-12-03).
#ifndef DSINF_STREAM_RT2_FILL
#define DSINF_STREAM_RT2_FILL 2
#endif
#ifndef DSINF_GEMV_MIN_K_PER_CTA
#define DSINF_GEMV_MIN_K_PER_CTA 256  // do not split K below this many rows per CTA
#endif

// Programmatic dependent launch (sm_90 code on an sm_90+ device; elsewhere off): a GEMV is launched so that
// it may start while the previous kernel on the stream is still finishing. Its CTAs then let the next
// kernel's CTAs be scheduled (griddepcontrol.launch_dependents: at the start with mode 1, after the k loop
// with 2) and wait for the previous grid to complete (griddepcontrol.wait) before they read or write
// anything that kernel may touch, so stream order is kept for every argument. Why: at decode sizes launch +
// DRAM ramp + tail cost ~5 us per kernel (H200, graph replays: 4096x4096 int8 streams in ~4 us but takes
// ~9.6 us), and overlapping them with the previous kernel is the lever that is left. One mode per kernel:
// - DSINF_KN_RING_PDL, the [K, N] ring: 2. H200 (run 45, CUDA-graph replays of back-to-back calls, fp16
//   M = 1 / 8, us): 10.7 / 11.1 on 4096x4096 (11.1 / 11.6 without PDL), 29.6 / 30.2 on 14336x4096 (30.3 /
//   30.5), 32.8 / 34.1 on 8192x8192 (33.2 / 34.3); mode 1 within 0.1-0.4 of mode 2.
// - DSINF_NK_STREAM_PDL / DSINF_I8_PDL, the streaming [N, K] kernel's 16-bit / int8 weights: 2 / 0, and
//   DSINF_I8_WIDE_PDL, int8 on its wide CTAs (few tiles): 2 (gemv_stream.cu has the numbers).
// - DSINF_GEMV_PDL, the register batches: 0. They also prefetch the first DSINF_GEMV_PDL_PREFETCH_KB KiB
//   of their weight tile into L2 before the wait (only a cache hint: a weight the previous kernel is still
//   writing is read again, coherently, after it), and lost with either mode (4096x12288 26.5 -> 30.6-30.9).
// Any other nonzero mode (e.g. 3) launches with PDL and waits but never triggers, so the next kernel is
// scheduled only at this one's exit. H100 (run 204, two builds of each alternated, fp16 M = 1, us): where
// mode 2 is the default it lost 0.6-2.6 ([K, N] 4096x4096 13.4 -> 14.6, 14336x4096 40.1 -> 42.1; [N, K]
// 4096x14336 40.4 -> 41.2; int8 4096x4096 7.5 -> 8.3; [K, N] 4096x14336 tied), so the early trigger is what
// gains there; where PDL is off it tied (int8 4096x14336 22.6 -> 22.6; [N, K] 14336x4096, the long-K gate
// lifted, 40.1 -> 40.0).
// 0 = off.
#ifndef DSINF_GEMV_PDL
#define DSINF_GEMV_PDL 0
#endif
#ifndef DSINF_KN_RING_PDL
#define DSINF_KN_RING_PDL 2
#endif
#ifndef DSINF_NK_STREAM_PDL
#define DSINF_NK_STREAM_PDL 2
#endif
#ifndef DSINF_I8_PDL
#define DSINF_I8_PDL 0
#endif
#ifndef DSINF_GEMV_PDL_PREFETCH_KB
#define DSINF_GEMV_PDL_PREFETCH_KB 32  // per CTA (a first batch of k-steps is 64 KiB); 0 = no prefetch
#endif

constexpr int kGemvThreads = 256;  // a GEMV CTA: 8 warps (the streaming kernel's wide CTAs: 16)
constexpr int kGemvWarps = kGemvThreads / 32;

// Output tile per CTA of each vector path, and the granularity its K range must be a multiple of.
constexpr int kTileKnMma = 64;   // columns
constexpr int kTileKnSimt = 64;  // columns
constexpr int kTileNkSimt = 4;   // rows (K never split)
constexpr int kTileStream = 16;  // rows per row tile, [N, K] streaming kernel (1 or 2 row tiles per CTA tile)

// Path launchers: `split` CTAs share each tile's K range (split > 1 needs a cluster-capable device
// and sm_90 code; the dispatcher decides). All return the launch status.
cudaError_t launch_kn_mma(const GemvArgs& a, int split, bool ring, cudaStream_t stream);  // ring: kn_ring_for
cudaError_t launch_kn_simt(const GemvArgs& a, int split, cudaStream_t stream);
cudaError_t launch_nk_simt(const GemvArgs& a, cudaStream_t stream);
cudaError_t launch_scalar(const GemvArgs& a, cudaStream_t stream);
// [N, K] streaming kernel (gemv_stream.cu): fp16/bf16 and int8 weights.
cudaError_t launch_nk_stream(const GemvArgs& a, int split, cudaStream_t stream);

// Multiprocessor count of the current device (cached per device; 1 if the query fails).
int device_sm_count();
// Whether the current device runs this module's sm_90+ code (thread-block clusters, distributed shared memory).
bool device_clusters();
// Compute capability exactly 9.0: where a build with sm_90a targets (DSINF_CUDA_SM90A) runs its sm_90a code,
// warpgroup MMA included.
bool device_hopper();
// Whether a [K, N] call takes the tensor-core kernel's cp.async ring rather than its register batches
// (gemv_mma.cu): the ring is built (DSINF_KN_RING_STAGES > 0), the device grants its shared memory, and the
// 64-column tiles are at most DSINF_KN_RING_TILES_PER_SM per SM.
bool kn_ring_for(const GemvArgs& a);
// CTAs of that kernel (the ring or the register batches) for this many token tiles that fit one SM.
int kn_mma_resident_per_sm(DType dtype, int token_tiles, bool ring);

#if defined(__CUDACC__)
// CTAs of `Kernel` (256 threads, its static shared memory plus `DynSmem` bytes) that fit on one SM of the
// current device, queried once per kernel and device (an attribute query: no synchronization, safe under
// graph capture); 1 if unknown. Keyed by the kernel itself, not its pointer type: the instantiations of a
// kernel template share a pointer type but each has its own shared memory and registers.
template <auto Kernel, size_t DynSmem = 0, int Threads = kGemvThreads>
int resident_per_sm() {
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
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, Kernel, Threads, DynSmem) != cudaSuccess || n < 1) {
    (void)cudaGetLastError();
    return 1;
  }
  if (dev >= 0 && dev < kMaxDevices) cached[dev].store(n, std::memory_order_relaxed);
  return n;
}

// Dynamic shared memory above 48 KiB needs the kernel's opt-in, once per device (idempotent: a race only
// sets it twice). False if the device refuses it.
template <auto Kernel, size_t Bytes>
bool opt_in_smem() {
  if constexpr (Bytes <= 48 * 1024) {
    return true;
  } else {
    constexpr int kMaxDevices = 64;
    static std::atomic<int> done[kMaxDevices];  // 0 unknown, 1 refused, 2 set
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess) {
      (void)cudaGetLastError();
      return false;
    }
    if (dev >= 0 && dev < kMaxDevices) {
      const int c = done[dev].load(std::memory_order_relaxed);
      if (c) return c == 2;
    }
    const bool ok = cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(Bytes)) == cudaSuccess;
    (void)cudaGetLastError();
    if (dev >= 0 && dev < kMaxDevices) done[dev].store(ok ? 2 : 1, std::memory_order_relaxed);
    return ok;
  }
}
#endif

// True when a GEMV kernel built with PDL mode `mode` (DSINF_GEMV_PDL and the per-kernel modes) is launched with
// programmatic dependent launch: a mode other than 0, and the device and the code it runs are sm_90+.
bool gemv_pdl(int mode = DSINF_GEMV_PDL);

// K rows per split CTA: ceil(K / split) rounded up to `granule`.
inline int k_per_split(int64_t K, int split, int granule) {
  int64_t c = (K + split - 1) / split;
  c = (c + granule - 1) / granule * granule;
  return static_cast<int>(c < granule ? granule : c);
}

#if defined(__CUDACC__)
// Word j (0..3) of a 16-byte load.
__device__ __forceinline__ uint32_t word(const uint4& v, int j) {
  return j == 0 ? v.x : (j == 1 ? v.y : (j == 2 ? v.z : v.w));
}

// Where a GEMV kernel built with PDL mode `Mode` lets the next one be scheduled: 1 = at its start, before
// the prefetch (the next GEMV's CTAs fill the SM slots this grid leaves free and wait there), 2 = after
// its k loop (only the reduction is left to overlap).
template <int Mode = DSINF_GEMV_PDL>
__device__ __forceinline__ void pdl_begin() {
  if (Mode == 1) pdl_launch_dependents();
}
template <int Mode = DSINF_GEMV_PDL>
__device__ __forceinline__ void pdl_end() {
  if (Mode == 2) pdl_launch_dependents();
}
#endif

// Launch `kernel` on `grid` with `block` threads; split > 1 launches clusters of (1, split, 1);
// cudaLaunchKernelEx with a cluster of `split` CTAs along grid y (split > 1) and, with `pdl`, the
// programmatic-dependent-launch attribute (the kernel must be one that waits: see above). A failed launch
// leaves no non-sticky error behind for the next caller.
template <typename... KArgs, typename... Args>
cudaError_t launch_ex(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, int split, bool pdl,
                      cudaStream_t stream, Args... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[2];
  unsigned n = 0;
  if (split > 1) {
    attr[n].id = cudaLaunchAttributeClusterDimension;
    attr[n].val.clusterDim.x = 1;
    attr[n].val.clusterDim.y = static_cast<unsigned>(split);
    attr[n].val.clusterDim.z = 1;
    ++n;
  }
  if (pdl) {
    attr[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[n].val.programmaticStreamSerializationAllowed = 1;
    ++n;
  }
  cfg.attrs = attr;
  cfg.numAttrs = n;
  cudaError_t err = cudaLaunchKernelEx(&cfg, kernel, args...);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    return err;
  }
  return cudaGetLastError();
}

// A GEMV launch: `tiles` x `split` CTAs of Threads (kGemvThreads unless given) with `smem` bytes of dynamic
// shared memory (a cluster of `split` along y when split > 1); `pdl` adds the programmatic-dependent-launch
// attribute. The plain case keeps the <<<>>> launch.
template <int Threads = kGemvThreads, typename... KArgs, typename... Args>
cudaError_t launch_split(void (*kernel)(KArgs...), int tiles, int split, bool pdl, size_t smem, cudaStream_t stream,
                         Args... args) {
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(split), 1);
  const dim3 block(Threads, 1, 1);
  if (split <= 1 && !pdl) {
    kernel<<<grid, block, smem, stream>>>(args...);
    return cudaGetLastError();
  }
  return launch_ex(kernel, grid, block, smem, split, pdl, stream, args...);
}

}  // namespace detail
}  // namespace cuda
}  // namespace dsinf
