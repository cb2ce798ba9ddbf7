// Each op's argument rules that the CPU and CUDA bindings apply alike, composed from validate.h's primitives:
// written once here, so the two bindings can never word or order an op's checks differently. Each rule is the
// C++ statement of the op's Python checks (dsinf/ops/<op>.py), same words. What one binding adds on its own
// (the CUDA build's bf16 refusal, the device checks) stays in its entry.
//
// The matmul ops (linear_layer, vector_matmul, qkv_gemm) compose validate.h's shared matmul/QKV parsing in a
// few lines of their entries instead: check_matmul, check_bias, check_qkv.
//
// Binding-side only, like validate.h: kernel sources never include this (it pulls ATen).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Optional.h>

#include <cstdint>

#include "validate.h"

namespace dsinf {

// Rows of x viewed as [rows, H] (0 when H is 0: an empty last dimension has no rows to compute).
inline int64_t rows_of(const at::Tensor& x, int64_t H) { return H ? x.numel() / H : 0; }

// ---- rms_norm, pre_rms_norm ----------------------------------------------------------------------------

// rms_norm's rules (dsinf/ops/rms_norm.py); `x`: what the op calls its activation. Returns H of vals [..., H].
inline int64_t check_rms_norm(const char* op, const at::Tensor& vals, const at::Tensor& gamma, double epsilon,
                              const char* x = "vals") {
  check_float_tensor(op, x, vals);
  DSINF_CHECK_ARG(vals.dim() >= 1, op, x, "expected at least one dimension [..., H], got a 0-d tensor");
  const int64_t H = check_channel_vector(op, "gamma", gamma, vals);
  check_finite_positive(op, "epsilon", epsilon);
  return H;
}

// pre_rms_norm's rules (dsinf/ops/pre_rms_norm.py): rms_norm's, and a residual like vals.
inline int64_t check_pre_rms_norm(const char* op, const at::Tensor& vals, const at::Tensor& residual,
                                  const at::Tensor& gamma, double epsilon, const char* x = "vals") {
  const int64_t H = check_rms_norm(op, vals, gamma, epsilon, x);
  check_like(op, "residual", residual, vals, x);
  return H;
}

// ---- rms_mlp_gemm ---------------------------------------------------------------------------------------

// rms_mlp_gemm's problem: M rows of hidden size K, intermediate size I (W_interm has 2I outputs).
struct MLPShape {
  int64_t M, K, I;
  int activation;           // 3 GATED_GELU, 4 GATED_SILU (DeepSpeed's ActivationFuncType)
  MatmulShape interm, out;  // h [M, K] -> [M, 2I]; a [M, I] -> [M, K]
};

// rms_mlp_gemm's rules (dsinf/ops/mlp_gemm.py).
inline MLPShape check_rms_mlp_gemm(const char* op, c10::ScalarType act, const at::Tensor& input,
                                   const at::Tensor& residual, const at::Tensor& weight_interm,
                                   const at::Tensor& weight_out, const at::Tensor& gamma, double epsilon,
                                   const c10::optional<at::Tensor>& q_scale,
                                   const c10::optional<at::Tensor>& q_scale1, bool q_int8, int64_t activation_type,
                                   bool transposed_mode) {
  check_tensor(op, "input", input);
  check_dtype(op, "input", input, act);
  const int64_t K = check_pre_rms_norm(op, input, residual, gamma, epsilon, "input");
  DSINF_CHECK_ARG(activation_type == 3 || activation_type == 4, op, "activation_type",
                  "expected GATED_GELU (3) or GATED_SILU (4) (DeepSpeed's ActivationFuncType), got ", activation_type);
  check_weight(op, "weight_interm", weight_interm, input, q_int8);
  check_weight(op, "weight_out", weight_out, input, q_int8);
  const bool nk = q_int8 || transposed_mode;
  const int64_t N = check_weight_inputs(op, "weight_interm", weight_interm, nk, K,
                                        detail::cat(" (transposed_mode=", transposed_mode, ", q_int8=", q_int8, ")"));
  DSINF_CHECK_ARG(N % 2 == 0 && N != 0, op, "weight_interm", "its ", N,
                  " outputs must be an even, non-zero 2*I ([up | gate] halves)");
  const int64_t I = N / 2;
  check_weight_shape(op, "weight_out", weight_out, nk, K, I, detail::cat("K=", K, " outputs and I=", I, " inputs"));
  const int64_t G = q_int8 ? check_row_scales(op, "q_scale", q_scale, input, N, "weight_interm") : 0;
  const int64_t G1 = q_int8 ? check_row_scales(op, "q_scale1", q_scale1, input, K, "weight_out") : 0;
  const int64_t M = rows_of(input, K);
  return {M, K, I, static_cast<int>(activation_type), {1, M, K, N, q_int8, G, nk}, {1, M, I, K, q_int8, G1, nk}};
}

}  // namespace dsinf
