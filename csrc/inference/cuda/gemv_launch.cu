// GEMV dispatcher: validates the raw arguments, picks the kernel (gemv_path) and the K split, and
// launches. Host code only, apart from a probe kernel used to learn which code the device runs.
//
// Path choice (first that applies):
//   1. K == 0, a pointer not 16-byte aligned, or a size the vector loads cannot cover -> scalar.
//   2. fp16/bf16 activations in a >= sm_80 build -> tensor-core GEMV ([K, N]: N % 8, K % 4;
//      [N, K]: K % 8, int8 [N, K]: K % 16, the streaming kernel of gemv_stream.cu).
//   3. fp32 (and fp16 in builds with an arch < sm_80) -> CUDA-core GEMV ([N, K]: K % (16 B / elem);
//      [K, N]: N % (16 B / elem), K % 4).
// K split: a tile's K range is shared by `split` CTAs (one cluster) until tiles * split reaches
// DSINF_GEMV_CTAS_PER_SM * #SMs (default 1), so even N = 4096 fills 132 SMs (the [N, K] streaming kernel: 16-row
// tiles, so N >= 16 * #SMs is never split; the kernel sizes its persistent grid itself); the [K, N] tensor-core
// kernel fills to DSINF_KN_CTAS_PER_SM (3; its cp.async ring, for shapes of at most one 64-column tile per SM,
// to one CTA per SM) within its resident CTAs, by any integer split (kn_split). Only
// when the device is sm_90+ and the code it runs was compiled for sm_90+ (clusters, distributed shared
// memory); else split = 1.
#include <atomic>
#include <cstdint>

#include "common.cuh"
#include "gemv_internal.cuh"

namespace dsinf {
namespace cuda {
namespace detail {
namespace {

__global__ void arch_probe_kernel() {}

constexpr int kMaxDevices = 64;

struct DeviceInfo {
  int sms = 0;
  bool cluster = false;  // sm_90+ device running sm_90+ code of this module
  bool hopper = false;   // compute capability exactly 9.0 (where sm_90a code, if built, is what runs)
};

// Per-device facts, queried once (cheap attribute queries, no synchronization, safe under capture).
DeviceInfo device_info() {
  static std::atomic<int> cached[kMaxDevices];  // 0 unknown, else (sms << 2 | hopper << 1 | cluster)
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0) {
    (void)cudaGetLastError();
    return DeviceInfo{1, false, false};
  }
  if (dev < kMaxDevices) {
    const int c = cached[dev].load(std::memory_order_relaxed);
    if (c != 0) return DeviceInfo{c >> 2, (c & 1) != 0, (c & 2) != 0};
  }
  DeviceInfo info;
  int sms = 0, major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) sms = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) major = 0;
  if (cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess) minor = -1;
  cudaFuncAttributes fa;
  const bool have_attr = cudaFuncGetAttributes(&fa, arch_probe_kernel) == cudaSuccess;
  (void)cudaGetLastError();
  info.sms = sms > 0 ? sms : 1;
  info.cluster = major >= 9 && have_attr && fa.ptxVersion >= 90 && fa.binaryVersion >= 90;
  info.hopper = major == 9 && minor == 0;
  if (dev < kMaxDevices && sms > 0)
    cached[dev].store((info.sms << 2) | (info.hopper ? 2 : 0) | (info.cluster ? 1 : 0), std::memory_order_relaxed);
  return info;
}

int elem_size(DType d) { return d == DType::kFloat32 ? 4 : 2; }

bool dtype_built(DType d) {
#if defined(DSINF_CUDA_BF16)
  return d == DType::kFloat32 || d == DType::kFloat16 || d == DType::kBFloat16;
#else
  return d == DType::kFloat32 || d == DType::kFloat16;
#endif
}

bool args_valid(const GemvArgs& a) {
  if (!dtype_built(a.dtype)) return false;
  if (a.M < 1 || a.M > kGemvMaxM || a.K < 0 || a.N < 1) return false;
  if (a.K > INT32_MAX || a.N > INT32_MAX) return false;
  if (!a.x && a.K > 0) return false;
  if (!a.w && a.K > 0) return false;
  if (!a.out) return false;
  if (a.w_int8 && (!a.w_nk || !a.scale || a.groups < 1 || a.N % a.groups != 0)) return false;
  return true;
}

// Number of CTAs sharing a tile's K range: doubled while tiles * split < ctas_per_sm * #SMs, and while
// the doubled grid stays within `max_ctas`.
int choose_split(const DeviceInfo& dev, int64_t tiles, int64_t K, int ctas_per_sm = DSINF_GEMV_CTAS_PER_SM,
                 int64_t max_ctas = INT64_MAX) {
  if (!dev.cluster) return 1;
  const int64_t target = static_cast<int64_t>(ctas_per_sm) * dev.sms;
  int split = 1;
  while (split < DSINF_GEMV_MAX_SPLIT && tiles * split < target && tiles * 2 * split <= max_ctas &&
         K / (2 * split) >= DSINF_GEMV_MIN_K_PER_CTA)
    split *= 2;
  return split;
}

// The [K, N] kernel's split: the smallest that reaches the fill target DSINF_KN_CTAS_PER_SM (the ring:
// DSINF_KN_RING_CTAS_PER_SM), within 7/8 of the CTAs that fit the device at once (the ring: all of them, one
// per SM) or else the largest within, keeping DSINF_KN_MIN_K_PER_CTA rows per CTA.
// The split CTAs of a tile are one cluster, and a cluster must fit whole in one GPC, so a grid near the
// resident limit may not all be placed at once (H200: 512 CTAs for 528 slots ran 1.2-1.3x slower than 256;
// 448 ran fine). Any integer split (DSINF_KN_SPLIT_ANY): N = 4096 has 64 tiles, and powers of two jump from
// 256 CTAs to 512; 7 gives 448.
int kn_split(const DeviceInfo& dev, const GemvArgs& a, int64_t tiles, bool ring) {
  const int64_t slots = static_cast<int64_t>(kn_mma_resident_per_sm(a.dtype, a.M > 8 ? 2 : 1, ring)) * dev.sms;
  const int64_t cap = ring ? slots : slots * 7 / 8;
  const int fill = ring ? DSINF_KN_RING_CTAS_PER_SM : DSINF_KN_CTAS_PER_SM;
  if (!DSINF_KN_SPLIT_ANY) return choose_split(dev, tiles, a.K, fill, cap);
  if (!dev.cluster) return 1;
  const int64_t target = static_cast<int64_t>(fill) * dev.sms;
  int split = 1;
  while (split < DSINF_GEMV_MAX_SPLIT && tiles * split < target && tiles * (split + 1) <= cap &&
         a.K / (split + 1) >= DSINF_KN_MIN_K_PER_CTA)
    ++split;
  return split;
}

// The path, its K split and, for the [K, N] tensor-core path, whether it takes the cp.async ring (decided here
// once per call: the split depends on it, and the launch must use the same kernel).
GemvPath select_path(const GemvArgs& a, const DeviceInfo& dev, int* split, bool* ring) {
  *split = 1;
  *ring = false;
  if (!args_valid(a)) return GemvPath::kInvalid;
  if (a.K == 0 || !aligned16(a.x) || !aligned16(a.w)) return GemvPath::kScalar;
  const bool half_act = a.dtype != DType::kFloat32;
#if defined(DSINF_CUDA_BF16)
  if (half_act) {  // tensor cores (w_int8 implies w_nk)
    const bool nk = a.w_nk;
    const bool ok = nk ? a.K % (a.w_int8 ? 16 : 8) == 0 : (a.N % 8 == 0 && a.K % 4 == 0);
    if (!ok) return GemvPath::kScalar;
    const int64_t tiles = (a.N + (nk ? kTileStream : kTileKnMma) - 1) / (nk ? kTileStream : kTileKnMma);
    if (!nk) *ring = kn_ring_for(a);
    *split = nk ? choose_split(dev, tiles, a.K, DSINF_NK_CTAS_PER_SM) : kn_split(dev, a, tiles, *ring);
    return nk ? GemvPath::kTensorCoreNK : GemvPath::kTensorCoreKN;
  }
#else
  (void)half_act;
#endif
  const int e = 16 / elem_size(a.dtype);
  if (a.w_int8) return a.K % 16 == 0 ? GemvPath::kSimtNK : GemvPath::kScalar;
  if (a.w_nk) return a.K % e == 0 ? GemvPath::kSimtNK : GemvPath::kScalar;
  if (a.N % e == 0 && a.K % 4 == 0) {
    *split = choose_split(dev, (a.N + kTileKnSimt - 1) / kTileKnSimt, a.K);
    return GemvPath::kSimtKN;
  }
  return GemvPath::kScalar;
}

}  // namespace

int device_sm_count() { return device_info().sms; }

bool device_clusters() { return device_info().cluster; }

bool device_hopper() { return device_info().hopper; }

bool gemv_pdl(int mode) { return mode != 0 && device_info().cluster; }

}  // namespace detail

GemvPath gemv_path(const GemvArgs& a, int* split) {
  int s = 1;
  bool ring = false;
  const GemvPath p = detail::select_path(a, detail::device_info(), &s, &ring);
  if (split) *split = s;
  return p;
}

cudaError_t gemv(const GemvArgs& a, cudaStream_t stream) {
  if (!detail::dtype_built(a.dtype)) return cudaErrorNotSupported;
  int split = 1;
  bool ring = false;
  const GemvPath p = detail::select_path(a, detail::device_info(), &split, &ring);
  switch (p) {
#if defined(DSINF_CUDA_BF16)
    case GemvPath::kTensorCoreKN:
      return detail::launch_kn_mma(a, split, ring, stream);
    case GemvPath::kTensorCoreNK:
      return detail::launch_nk_stream(a, split, stream);
#endif
    case GemvPath::kSimtKN: return detail::launch_kn_simt(a, split, stream);
    case GemvPath::kSimtNK: return detail::launch_nk_simt(a, stream);
    case GemvPath::kScalar: return detail::launch_scalar(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace dsinf
