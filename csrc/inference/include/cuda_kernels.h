// C-style launcher API of the dsinf CUDA inference kernels (csrc/inference/cuda/*.cu).
//
// No torch headers: the binding (csrc/inference/binding/cuda_binding*.cpp) validates arguments with
// validate.h, allocates outputs with the torch allocator and passes raw pointers, sizes and torch's
// current stream here. Every launcher is asynchronous on `stream`, never synchronizes, never
// allocates, and returns the launch status (cudaSuccess or the error of the failed launch), so it is
// safe under CUDA-graph capture.
//
// Layouts (all row-major, contiguous):
//   x      [M, K]   activations, M = B*S rows
//   w      float: [K, N] (w_nk = false, DeepSpeed's default) or [N, K] (w_nk = true, nn.Linear);
//          int8:  always [N, K], row block g (rows g*N/G .. (g+1)*N/G-1) scaled by scale[g]
//   out    [M, N]
//   out[m, n] = sum_k x[m, k] * W(k, n) (* scale[n / (N/G)] for int8) (+ bias[n]), accumulated in fp32,
//   rounded to the activation dtype once.
//
// bf16 entry points exist only when the module is built with DSINF_CUDA_BF16 (every target arch >= 8.0);
// a bf16 call into a build without it returns cudaErrorNotSupported.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace dsinf {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// The GEMV launchers accept M = B*S in [1, kGemvMaxM]; larger M goes to cuBLAS in the binding.
constexpr int64_t kGemvMaxM = 16;
// The gated GEMV launcher (rms_mlp_gemm's gate|up, cuda/mlp_gemm.cu) accepts M in [1, kGatedGemvMaxM].
constexpr int64_t kGatedGemvMaxM = 8;

// One small-M matrix product (decode). The launcher picks the kernel:
//   tensor-core GEMV (fp16/bf16 activations, builds for >= sm_80) for [K, N], [N, K] and int8 [N, K];
//   CUDA-core GEMV with 16-byte loads (fp32 activations, and fp16 in builds that include sm_75);
//   a scalar fallback for shapes or pointers the vector paths cannot take (K or N not a multiple of
//   the vector width, pointers not 16-byte aligned, K == 0).
struct GemvArgs {
  DType dtype = DType::kFloat16;  // activation, float-weight, bias and output dtype
  const void* x = nullptr;        // [M, K]
  const void* w = nullptr;        // see above
  bool w_nk = false;              // weight stored [N, K]; must be true for int8
  bool w_int8 = false;            // weight is int8 with float32 scales
  const float* scale = nullptr;   // int8 only: [groups]
  int64_t groups = 0;             // int8 only: G, divides N
  const void* bias = nullptr;     // [N] in `dtype`, or nullptr
  void* out = nullptr;            // [M, N] in `dtype`
  int64_t M = 0, K = 0, N = 0;
};

enum class GemvPath : int {
  kInvalid = 0,     // arguments the launcher rejects (returns cudaErrorInvalidValue)
  kTensorCoreKN,    // mma.sync, weight [K, N]
  kTensorCoreNK,    // mma.sync, weight [N, K] (fp16/bf16 or int8)
  kSimtKN,          // CUDA cores, 16-byte weight loads, weight [K, N]
  kSimtNK,          // CUDA cores, 16-byte weight loads, weight [N, K] (float or int8)
  kScalar,          // scalar fallback, any shape/alignment
};

// Which kernel gemv() would launch for these arguments on the current device (no launch; for tests,
// benchmarks and debugging). `split` (optional) receives the number of CTAs that share one output
// tile's K range (1 = no split; > 1 uses a thread-block cluster, sm_90 only).
GemvPath gemv_path(const GemvArgs& a, int* split = nullptr);

// out = x @ W (+bias) for M <= kGemvMaxM. Returns cudaErrorInvalidValue for bad sizes/pointers.
cudaError_t gemv(const GemvArgs& a, cudaStream_t stream);

// Prefill product with int8 weights (cuda/gemm_int8.cu): the GemvArgs math for any M >= 1, reading the int8
// weights once (tensor cores, fp16/bf16 activations; int8 [N, K] only). gemm_int8_supported says whether it
// takes these arguments, `out` aside (dtype, K % 16 == 0, K <= 2^24, 16-byte aligned x and w, a build for
// >= sm_80); gemm_int8 returns
// cudaErrorNotSupported for those it does not, and the caller then dequantizes for cuBLAS.
bool gemm_int8_supported(const GemvArgs& a);
cudaError_t gemm_int8(const GemvArgs& a, cudaStream_t stream);
// Whether gemm_int8 runs its warpgroup-MMA kernel on the current device (a compute-capability-9.0 device and a
// build with sm_90a targets); else its mma.sync kernel. The binding's compiled rule depends on it.
bool gemm_int8_wgmma();

// out[n, k] = w[n, k] * scale[n / (N / groups)] in `out_dtype` (int8 weights at large M where gemm_int8 does
// not apply: dequantize once into a temporary, then cuBLAS).
cudaError_t dequantize_int8(DType out_dtype, const int8_t* w, const float* scale, int64_t groups, void* out,
                            int64_t N, int64_t K, cudaStream_t stream);

// Fused-QKV epilogue: splits y [B*S, (H + 2*KV) * D] (rows [Q | K | V], each head D wide) into
// q [B, H, S, D], k [B, KV, S, D], v [B, KV, S, D], applying RoPE to q and k:
//   position p = seq_offset + s, f_i = rope_theta^(-2i / rotary_dim), i < rotary_dim / 2,
//   rotate_half: pairs (i, i + rotary_dim/2) (NeoX/Llama), else (2i, 2i + 1) (GPT-J);
//   (a, b) -> (a cos(p f_i) - b sin(p f_i), b cos(p f_i) + a sin(p f_i)); dims >= rotary_dim copied.
// q, k, v may be three slices of one [3, B, H, S, D] tensor (KV == H). rotary_dim == 0 disables RoPE.
struct QKVArgs {
  DType dtype = DType::kFloat16;
  const void* y = nullptr;
  void* q = nullptr;
  void* k = nullptr;
  void* v = nullptr;
  int64_t B = 0, S = 0, H = 0, KV = 0, D = 0;
  int64_t rotary_dim = 0;
  bool rotate_half = false;
  double rope_theta = 10000.0;
  int64_t seq_offset = 0;
};

cudaError_t qkv_split_rope(const QKVArgs& a, cudaStream_t stream);

}  // namespace cuda
}  // namespace dsinf
