// The CUDA binding's op entries: their declarations, all a registration needs (see cuda_binding.h for why
// the bodies and the registrations are in separate files). Each is the dtype-generic entry of one op,
//   R op(const char* function_name, c10::ScalarType act, <the schema's arguments, in order>...)
// (rms_norm and pre_rms_norm: the schema's arguments only, one function for every dtype).
// Bodies: cuda_binding_ops.cpp (linear_layer, vector_matmul), cuda_binding_ops_norm_mlp.cpp (the others).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <tuple>
#include <vector>

namespace dsinf {
namespace cuda_binding {

std::vector<at::Tensor> linear_layer(const char* op, c10::ScalarType act, const at::Tensor& input,
                                     const at::Tensor& weight, const c10::optional<at::Tensor>& bias, bool add_bias,
                                     bool do_flash_attn, int64_t num_heads, bool transposed_mode, double rope_theta,
                                     int64_t rotary_dim, bool rotate_half, int64_t num_kv, int64_t seq_offset,
                                     const c10::optional<at::Tensor>& q_scale);
at::Tensor linear_layer_lean(const char* op, c10::ScalarType act, const at::Tensor& input, const at::Tensor& weight,
                             const c10::optional<at::Tensor>& bias, bool transposed_mode);
at::Tensor vector_matmul(const char* op, c10::ScalarType act, const at::Tensor& input, const at::Tensor& weight,
                         bool async_op, const c10::optional<at::Tensor>& q_scale, bool q_int8, bool transposed_mode);
at::Tensor vector_matmul_lean(const char* op, c10::ScalarType act, const at::Tensor& input, const at::Tensor& weight,
                              bool transposed_mode, const c10::optional<at::Tensor>& q_scale);

at::Tensor rms_norm(const at::Tensor& vals, const at::Tensor& gamma, double epsilon);
std::tuple<at::Tensor, at::Tensor> pre_rms_norm(const at::Tensor& vals, const at::Tensor& residual,
                                                const at::Tensor& gamma, double epsilon);
std::vector<at::Tensor> rms_mlp_gemm(const char* op, c10::ScalarType act, const at::Tensor& input,
                                     const at::Tensor& residual, const at::Tensor& weight_interm,
                                     const at::Tensor& weight_out, const at::Tensor& gamma, double epsilon,
                                     const c10::optional<at::Tensor>& q_scale,
                                     const c10::optional<at::Tensor>& q_scale1, bool q_int8, int64_t activation_type,
                                     bool transposed_mode);

}  // namespace cuda_binding
}  // namespace dsinf
