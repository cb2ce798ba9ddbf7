// The per-dtype entry points of the dsinf:: schemas (dsinf/library.py), shared by both bindings.
//
// DSINF_DEFINE_DTYPE_OPS(fp16, c10::ScalarType::Half) defines linear_layer_fp16 / vector_matmul_fp16 with
// the schemas' exact C++ signatures, forwarding to the binding's own dtype-generic
//   linear_layer(const char* op, c10::ScalarType act, <schema args>...)
//   vector_matmul(const char* op, c10::ScalarType act, <schema args>...)
// so a schema change is made here once, not once per device.
#pragma once

#define DSINF_DEFINE_DTYPE_OPS(SUFFIX, SCALAR)                                                                    \
  std::vector<at::Tensor> linear_layer_##SUFFIX(                                                                  \
      const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, bool add_bias,    \
      bool do_flash_attn, int64_t num_heads, bool transposed_mode, double rope_theta, int64_t rotary_dim,         \
      bool rotate_half, int64_t num_kv, int64_t seq_offset, const c10::optional<at::Tensor>& q_scale) {           \
    return linear_layer("linear_layer_" #SUFFIX, SCALAR, input, weight, bias, add_bias, do_flash_attn, num_heads, \
                        transposed_mode, rope_theta, rotary_dim, rotate_half, num_kv, seq_offset, q_scale);       \
  }                                                                                                               \
  at::Tensor vector_matmul_##SUFFIX(const at::Tensor& input, const at::Tensor& weight, bool async_op,             \
                                    const c10::optional<at::Tensor>& q_scale, bool q_int8, bool transposed_mode) { \
    return vector_matmul("vector_matmul_" #SUFFIX, SCALAR, input, weight, async_op, q_scale, q_int8,              \
                         transposed_mode);                                                                        \
  }
