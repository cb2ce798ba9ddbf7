// Gated MLP pieces of rms_mlp_gemm, torch-free. fp32 accumulation, one rounding per stored value.
//
// Launchers (namespace dsinf::cuda; DType from cuda_kernels.h; the binding declares them itself).
// `activation` is DeepSpeed's ActivationFuncType value: 3 = GATED_GELU (exact erf GELU, as DeepSpeed's
// gated kernel), 4 = GATED_SILU; anything else -> cudaErrorInvalidValue. Asynchronous on `stream`, no
// allocation, returns the launch status.
//
//   cudaError_t gated_gemv(DType dtype, const void* x, int64_t M, const void* w, bool w_nk, bool w_int8,
//                          const float* scale, int64_t groups, void* out, int64_t K, int64_t I, int activation,
//                          cudaStream_t stream);
//       Decode gate/up projection with the activation in its epilogue, 1 <= M <= kGatedGemvMaxM (8,
//       cuda_kernels.h):
//         t[m, n]   = sum_k x[m, k] * W(k, n) (* scale[n / (2I / G)] for int8),  W logical [K, 2I]
//         out[m, j] = round( act(t[m, I + j]) * t[m, j] ),  j < I      (up = first half, gate = second)
//       x [M, K] and out [M, I] in dtype; w: dtype [K, 2I] (w_nk = false) or [2I, K] (w_nk = true), or
//       int8 [2I, K] (w_int8, w_nk must be true) with float32 scale [groups], groups | 2I.
//       The [M, 2I] product never reaches memory: each output j reduces weight rows (or columns) j and I + j
//       together and stores only act(gate) * up.
//
//   cudaError_t gated_act(DType dtype, const void* src, void* out, int64_t M, int64_t I, int activation,
//                         cudaStream_t stream);
//       Large-M epilogue after a cuBLAS GEMM into src [M, 2I]: out[m, j] = round(act(src[m, I + j]) * src[m, j]).
//
// Paths of gated_gemv:
//   [N, K] (nn.Linear, int8) with fp16/bf16 activations, in a build for sm_80+ (DSINF_CUDA_BF16): tensor
//     cores (gated_tc_kernel below: mma.sync, cp.async ring, split-K over a cluster when tiles are few).
//     Needs K % (16 / sizeof(weight)) == 0 and 16-byte aligned x and W.
//   [N, K] otherwise (fp32 activations): one warp per output pair (j, j+1) = 4 weight rows; lanes stride K in 16-byte
//     weight loads (2 in flight per row), MB (bucket of M: 1, 2, 4, 8) tokens of x per load, warp-shuffle
//     reduction, then the epilogue. Needs K % (16 / sizeof(weight)) == 0 and 16-byte aligned pointers.
//   [K, N]: a 256-thread CTA owns 32 output columns j (and gate columns I + j); thread = 4 adjacent columns x
//     k-blocks of 4 rows, one 8/16-byte load per row per half; k-groups reduced by shuffles and shared memory.
//     Needs I % 4 == 0, K % 4 == 0 and 16-byte aligned pointers.
//   anything else: a scalar kernel (one warp per output column), any shape and alignment.
//
// Two units: the kernels live in mlp_gemm.cuh; fp32 and fp16 are instantiated here, bf16 in mlp_gemm_bf16.cu,
// so that the module's slowest .cu compile runs as two halves side by side. H200 machine, 16 cores, cold CUDA
// loads alternating on one machine, manifest build seconds (2026-12-03): one unit 10.14, 10.40, 9.72; two units
// 8.72, 9.58, 9.44 (this unit 7.5-7.8 s under the build, the bf16 one 5.5-5.8, against 9.0-9.1 whole); the
// four-file binding is the critical path again. Tried before and not kept: a unit per activation dtype beside
// the two-file binding (three units 10.45, 12.04, 10.13 s against one 10.99, 9.41, 10.89: the binding's halves
// slowed under the extra compiles).
#include "mlp_gemm.cuh"

namespace dsinf {
namespace cuda {

cudaError_t gated_gemv(DType dtype, const void* x, int64_t M, const void* w, bool w_nk, bool w_int8,
                       const float* scale, int64_t groups, void* out, int64_t K, int64_t I, int activation,
                       cudaStream_t stream) {
  if (M < 1 || M > kMaxM || K < 0 || I < 1 || K > INT32_MAX || 2 * I > INT32_MAX) return cudaErrorInvalidValue;
  if (activation != kGatedGelu && activation != kGatedSilu) return cudaErrorInvalidValue;
  if (!out || ((!x || !w) && K > 0)) return cudaErrorInvalidValue;
  if (w_int8 && (!w_nk || !scale || groups < 1 || (2 * I) % groups != 0)) return cudaErrorInvalidValue;
  const int m = static_cast<int>(M), k = static_cast<int>(K), i = static_cast<int>(I);
  switch (dtype) {
    case DType::kFloat32: return gated_gemv_t<float>(x, m, w, w_nk, w_int8, scale, groups, out, k, i, activation, stream);
    case DType::kFloat16: return gated_gemv_t<__half>(x, m, w, w_nk, w_int8, scale, groups, out, k, i, activation, stream);
#if defined(DSINF_CUDA_BF16)
    case DType::kBFloat16:
      return detail::gated_gemv_bf16(x, m, w, w_nk, w_int8, scale, groups, out, k, i, activation, stream);
#endif
    default: return cudaErrorNotSupported;
  }
}

cudaError_t gated_act(DType dtype, const void* src, void* out, int64_t M, int64_t I, int activation,
                      cudaStream_t stream) {
  if (M < 0 || I < 0 || (activation != kGatedGelu && activation != kGatedSilu)) return cudaErrorInvalidValue;
  if (M == 0 || I == 0) return cudaSuccess;
  if (!src || !out) return cudaErrorInvalidValue;
  const int64_t blocks64 = (M * I + kThreads - 1) / kThreads;
  const unsigned blocks = static_cast<unsigned>(blocks64 < (int64_t(1) << 20) ? blocks64 : (int64_t(1) << 20));
  switch (dtype) {
    case DType::kFloat32:
      gated_act_kernel<float><<<blocks, kThreads, 0, stream>>>(static_cast<const float*>(src), static_cast<float*>(out),
                                                              M, I, activation);
      break;
    case DType::kFloat16:
      gated_act_kernel<__half><<<blocks, kThreads, 0, stream>>>(static_cast<const __half*>(src),
                                                               static_cast<__half*>(out), M, I, activation);
      break;
#if defined(DSINF_CUDA_BF16)
    case DType::kBFloat16:
      gated_act_kernel<__nv_bfloat16><<<blocks, kThreads, 0, stream>>>(
          static_cast<const __nv_bfloat16*>(src), static_cast<__nv_bfloat16*>(out), M, I, activation);
      break;
#endif
    default: return cudaErrorNotSupported;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace dsinf
