// CUDA implementations of rms_norm, pre_rms_norm and rms_mlp_gemm (registered by cuda_binding_norm_mlp.cpp);
// why the binding's files are split so, and what they share: cuda_binding.h.
#include <cstdint>
#include <tuple>
#include <vector>

#include "cuda_binding.h"
#include "op_rules.h"

namespace dsinf {
namespace cuda {
// launchers of cuda/rms_norm.cu
cudaError_t rms_norm(DType dtype, const void* x, const void* gamma, void* out, int64_t rows, int64_t H, float epsilon,
                     cudaStream_t stream);
cudaError_t pre_rms_norm(DType dtype, const void* x, const void* residual, const void* gamma, void* out, void* res_out,
                         int64_t rows, int64_t H, float epsilon, cudaStream_t stream);
// launchers of cuda/mlp_gemm.cu
cudaError_t gated_gemv(DType dtype, const void* x, int64_t M, const void* w, bool w_nk, bool w_int8,
                       const float* scale, int64_t groups, void* out, int64_t K, int64_t I, int activation,
                       cudaStream_t stream);
cudaError_t gated_act(DType dtype, const void* src, void* out, int64_t M, int64_t I, int activation,
                      cudaStream_t stream);
}  // namespace cuda

namespace {

using namespace cuda_binding;

// The single dtype-generic functions are registered whatever the build's archs: refuse bf16 by name when the
// build has no bf16 kernels (a target below sm_80), rather than fail the launch.
void check_bf16_built(const char* op, const char* arg, c10::ScalarType t) {
#if !defined(DSINF_CUDA_BF16)
  DSINF_CHECK_ARG(t != c10::ScalarType::BFloat16, op, arg,
                  "dtype bfloat16 needs a CUDA build whose every target arch is sm_80 or newer");
#endif
}

}  // namespace

// ---- the entries (declared in cuda_ops.h, registered by cuda_binding_norm_mlp.cpp) --------------------------

namespace cuda_binding {

at::Tensor rms_norm(const at::Tensor& vals, const at::Tensor& gamma, double epsilon) {
  const char* op = "rms_norm";
  const int64_t H = check_rms_norm(op, vals, gamma, epsilon), rows = rows_of(vals, H);
  check_no_grad(op, {{"vals", &vals}, {"gamma", &gamma}});
  DSINF_CHECK_ARG(vals.is_cuda(), op, "vals", "expected a CUDA tensor, got device ", vals.device());
  check_bf16_built(op, "vals", vals.scalar_type());
  const c10::DeviceGuard guard(vals.device());
  at::Tensor out = aten::empty(vals.sizes(), vals.options());
  if (rows == 0 || H == 0) return out;
  const at::Tensor x = vals.contiguous(), g = gamma.contiguous();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(vals.device().index()).stream();
  check_cuda(kc::rms_norm(kernel_dtype(x.scalar_type()), x.const_data_ptr(), g.const_data_ptr(), out.mutable_data_ptr(),
                          rows, H, float(epsilon), stream),
             op, "rms_norm launch");
  return out;
}

std::tuple<at::Tensor, at::Tensor> pre_rms_norm(const at::Tensor& vals, const at::Tensor& residual,
                                                const at::Tensor& gamma, double epsilon) {
  const char* op = "pre_rms_norm";
  const int64_t H = check_pre_rms_norm(op, vals, residual, gamma, epsilon), rows = rows_of(vals, H);
  check_no_grad(op, {{"vals", &vals}, {"residual", &residual}, {"gamma", &gamma}});
  DSINF_CHECK_ARG(vals.is_cuda(), op, "vals", "expected a CUDA tensor, got device ", vals.device());
  check_bf16_built(op, "vals", vals.scalar_type());
  const c10::DeviceGuard guard(vals.device());
  at::Tensor out = aten::empty(vals.sizes(), vals.options()), res = aten::empty(vals.sizes(), vals.options());
  if (rows == 0 || H == 0) return {out, res};
  const at::Tensor x = vals.contiguous(), r = residual.contiguous(), g = gamma.contiguous();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(vals.device().index()).stream();
  check_cuda(kc::pre_rms_norm(kernel_dtype(x.scalar_type()), x.const_data_ptr(), r.const_data_ptr(),
                              g.const_data_ptr(), out.mutable_data_ptr(), res.mutable_data_ptr(), rows, H,
                              float(epsilon), stream),
             op, "pre_rms_norm launch");
  return {out, res};
}

//   r, h = pre_rms_norm(input, residual)     one pass, both in the act dtype
//   a = act(gate) * up                        small M: the gated GEMV (the [M, 2I] product never exists);
//                                             larger M or a large gate|up (use_gated: the route table, else
//                                             the compiled rule): matmul into [M, 2I], then gated_act
//   output = a @ W_out                        the GEMV / cuBLAS path of linear_layer
std::vector<at::Tensor> rms_mlp_gemm(const char* op, c10::ScalarType act, const at::Tensor& input,
                                     const at::Tensor& residual, const at::Tensor& weight_interm,
                                     const at::Tensor& weight_out, const at::Tensor& gamma, double epsilon,
                                     const c10::optional<at::Tensor>& q_scale,
                                     const c10::optional<at::Tensor>& q_scale1, bool q_int8, int64_t activation_type,
                                     bool transposed_mode) {
  const MLPShape s = check_rms_mlp_gemm(op, act, input, residual, weight_interm, weight_out, gamma, epsilon, q_scale,
                                        q_scale1, q_int8, activation_type, transposed_mode);
  check_no_grad(op, {{"input", &input}, {"residual", &residual}, {"weight_interm", &weight_interm},
                     {"weight_out", &weight_out}, {"gamma", &gamma}});
  check_input_on_cuda(op, input);
  const c10::DeviceGuard guard(input.device());
  at::Tensor res = aten::empty(input.sizes(), input.options());
  if (s.M == 0 || s.K == 0) return {aten::empty(input.sizes(), input.options()), res};
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(input.device().index()).stream();
  const kc::DType dt = kernel_dtype(act);
  const at::Tensor x = prepare_input(input), r = prepare_input(residual), g = gamma.contiguous();
  at::Tensor h = aten::empty({s.M, s.K}, input.options());
  check_cuda(kc::pre_rms_norm(dt, x.const_data_ptr(), r.const_data_ptr(), g.const_data_ptr(), h.mutable_data_ptr(),
                              res.mutable_data_ptr(), s.M, s.K, float(epsilon), stream),
             op, "pre_rms_norm launch");
  at::Tensor a = aten::empty({s.M, s.I}, input.options());
  if (use_gated(act, s.interm)) {
    check_cuda(kc::gated_gemv(dt, h.const_data_ptr(), s.M, weight_interm.const_data_ptr(), s.interm.weight_nk, s.interm.int8,
                              s.interm.int8 ? q_scale->const_data_ptr<float>() : nullptr, s.interm.groups, a.mutable_data_ptr(), s.K,
                              s.I, s.activation, stream),
               op, "gated GEMV launch");
  } else {
    const at::Tensor t = matmul(op, h, weight_interm, nullptr, q_scale, s.interm, stream);  // [M, 2I]
    check_cuda(kc::gated_act(dt, t.const_data_ptr(), a.mutable_data_ptr(), s.M, s.I, s.activation, stream), op,
               "gated activation launch");
  }
  return {matmul(op, a, weight_out, nullptr, q_scale1, s.out, stream).view(input.sizes()), res};
}

}  // namespace cuda_binding
}  // namespace dsinf
