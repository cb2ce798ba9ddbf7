// The bf16 instantiation of the gated-MLP decode GEMV (mlp_gemm.cuh), apart from mlp_gemm.cu so that the two
// halves of the module's slowest .cu compile side by side (measured in mlp_gemm.cu).
#include "mlp_gemm.cuh"

#if defined(DSINF_CUDA_BF16)
namespace dsinf {
namespace cuda {
namespace detail {

cudaError_t gated_gemv_bf16(const void* x, int M, const void* w, bool w_nk, bool w_int8, const float* scale,
                            int64_t groups, void* out, int K, int I, int act, cudaStream_t stream) {
  return gated_gemv_t<__nv_bfloat16>(x, M, w, w_nk, w_int8, scale, groups, out, K, I, act, stream);
}

}  // namespace detail
}  // namespace cuda
}  // namespace dsinf
#endif  // DSINF_CUDA_BF16
