// CUDA implementations of the dsinf:: ops (schemas and semantics: the op specs, dsinf/ops/<op>.py).
//
// The only translation unit of the CUDA module that includes ATen. It validates with validate.h,
// allocates outputs with the torch allocator (fresh tensors, never workspace views), and runs
// everything on torch's current stream of the input's device:
//
//   M = B*S <= crossover (decode): one GEMV launch (csrc/inference/cuda, tensor cores for fp16/bf16,
//       int8 dequantized in registers), bias fused;
//   M >  crossover (prefill): cuBLAS through ATen (at::addmm fuses the bias; [N, K] weights are
//       passed as w.t(), a free view); int8 weights are first dequantized into a temporary;
//   do_flash_attn: the [M, N] product goes to a temporary, then one kernel splits it per head,
//       applies RoPE and writes the final [3, B, H, S, D] tensor (or q, k, v for GQA).
//
// async_op is accepted and ignored: work is always ordered on the caller's current stream.
// Light headers (this file bounds the cold build): aten_ops.h, and the generic c10::DeviceGuard (the same
// device switch through the CUDA guard torch registers) rather than c10/cuda/CUDAGuard.h, which adds the
// caching allocator's headers.
#include <ATen/core/Tensor.h>
#include <c10/core/DeviceGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>
#include <vector>

#include "../include/cuda_kernels.h"
#include "aten_ops.h"
#include "define_ops.h"
#include "routes.h"
#include "validate.h"

// Largest M = B*S that takes the GEMV path, per activation dtype (above it: cuBLAS), for a shape the
// route table (routes.h, measured per device) does not list. Build-time
// overridable (-D...) so the crossover can be swept on the GPU without edits. fp16/bf16: the GEMV is on
// par with cuBLAS up to M=8 and loses beyond (docs/PERFORMANCE.md); fp32: the CUDA-core GEMV handles 8
// tokens per pass; int8: the GEMV reads 1 byte per weight where the large-M path first writes and re-reads
// a dequantized copy, so it wins for every M it supports.
#ifndef DSINF_GEMV_MAX_M_HALF
#define DSINF_GEMV_MAX_M_HALF 8
#endif
#ifndef DSINF_GEMV_MAX_M_FP32
#define DSINF_GEMV_MAX_M_FP32 8
#endif
#ifndef DSINF_GEMV_MAX_M_INT8
#define DSINF_GEMV_MAX_M_INT8 16
#endif

namespace dsinf {
namespace {

namespace kc = dsinf::cuda;

static_assert(DSINF_GEMV_MAX_M_HALF <= kc::kGemvMaxM && DSINF_GEMV_MAX_M_FP32 <= kc::kGemvMaxM &&
                  DSINF_GEMV_MAX_M_INT8 <= kc::kGemvMaxM,
              "a GEMV crossover exceeds what the GEMV kernels accept");

kc::DType kernel_dtype(c10::ScalarType t) {
  switch (t) {
    case c10::ScalarType::Float: return kc::DType::kFloat32;
    case c10::ScalarType::Half: return kc::DType::kFloat16;
    default: return kc::DType::kBFloat16;
  }
}

int64_t gemv_max_m(c10::ScalarType act, bool int8) {
  if (int8) return DSINF_GEMV_MAX_M_INT8;
  return act == c10::ScalarType::Float ? DSINF_GEMV_MAX_M_FP32 : DSINF_GEMV_MAX_M_HALF;
}

// gemv_max_m of a route-table key (dsinf/routes.py reports it for the shapes it has not measured).
int64_t default_route(int64_t dtype, int64_t layout) {
  return gemv_max_m(dtype == routes::kFp32 ? c10::ScalarType::Float : c10::ScalarType::Half, layout == routes::kInt8);
}

void check_cuda(cudaError_t err, const char* op, const char* what) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA ", what, " failed: ", cudaGetErrorString(err));
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Input as a contiguous, 16-byte aligned tensor (the GEMV's vector loads need both; a copy of the
// activations is cheap next to the weight stream).
at::Tensor prepare_input(const at::Tensor& input) {
  at::Tensor x = input.contiguous();
  if (x.numel() > 0 && !aligned16(x.const_data_ptr())) x = x.clone();
  return x;
}

// out2d [M, N] (contiguous) = x2d @ W (+ bias). GEMV for small M, cuBLAS otherwise.
at::Tensor matmul(const char* op, const at::Tensor& x, const at::Tensor& weight, const at::Tensor* bias,
                  const c10::optional<at::Tensor>& q_scale, const MatmulShape& s, cudaStream_t stream) {
  const int64_t M = s.M();
  const at::Tensor x2d = x.view({M, s.K});
  if (routes::use_gemv(M, x.scalar_type(), s.int8, s.weight_nk, s.K, s.N, gemv_max_m(x.scalar_type(), s.int8))) {
    at::Tensor out = aten::empty({M, s.N}, x.options());
    kc::GemvArgs a;
    a.dtype = kernel_dtype(x.scalar_type());
    a.x = x2d.const_data_ptr();
    a.w = weight.const_data_ptr();
    a.w_nk = s.weight_nk;
    a.w_int8 = s.int8;
    a.scale = s.int8 ? q_scale->const_data_ptr<float>() : nullptr;
    a.groups = s.groups;
    a.bias = bias ? bias->const_data_ptr() : nullptr;
    a.out = out.mutable_data_ptr();
    a.M = M;
    a.K = s.K;
    a.N = s.N;
    check_cuda(kc::gemv(a, stream), op, "GEMV launch");
    return out;
  }
  at::Tensor w_kn;  // [K, N] view for cuBLAS
  if (s.int8) {
    at::Tensor deq = aten::empty({s.N, s.K}, x.options());
    check_cuda(kc::dequantize_int8(kernel_dtype(x.scalar_type()), weight.const_data_ptr<int8_t>(),
                                   q_scale->const_data_ptr<float>(), s.groups, deq.mutable_data_ptr(), s.N, s.K,
                                   stream),
               op, "int8 dequantize launch");
    w_kn = deq.t();
  } else {
    w_kn = s.weight_nk ? weight.t() : weight;
  }
  at::Tensor out = bias ? aten::addmm(*bias, x2d, w_kn) : aten::mm(x2d, w_kn);
  return out.is_contiguous() ? out : out.contiguous();  // cuBLAS results are row-major; be certain
}

// Reached when only an argument that is not read (e.g. q_scale with a float weight) is on CUDA.
void check_input_on_cuda(const char* op, const at::Tensor& input) {
  DSINF_CHECK_ARG(input.is_cuda(), op, "input", "expected a CUDA tensor, got device ", input.device());
}

std::vector<at::Tensor> linear_layer(const char* op, c10::ScalarType act, const at::Tensor& input,
                                     const at::Tensor& weight, const c10::optional<at::Tensor>& bias, bool add_bias,
                                     bool do_flash_attn, int64_t num_heads, bool transposed_mode, double rope_theta,
                                     int64_t rotary_dim, bool rotate_half, int64_t num_kv, int64_t seq_offset,
                                     const c10::optional<at::Tensor>& q_scale) {
  const MatmulShape s = check_matmul(op, input, weight, act, transposed_mode, q_scale, -1);
  check_bias(op, bias, add_bias, input, s.N);
  QKVLayout qkv{};
  if (do_flash_attn)
    qkv = check_qkv(op, s.K, s.N, s.S, num_heads, num_kv, rotary_dim, rotate_half, rope_theta, seq_offset);
  check_no_grad(op, {{"input", &input}, {"weight", &weight}, {"bias", bias ? &*bias : nullptr}});
  check_input_on_cuda(op, input);  // last: a device mismatch is reported on the argument that differs

  const c10::DeviceGuard guard(input.device());
  const auto shapes = matmul_output_shapes(s, do_flash_attn ? &qkv : nullptr);
  if (s.M() == 0 || s.N == 0) {
    std::vector<at::Tensor> outs;
    for (const auto& shape : shapes) outs.push_back(aten::empty(shape, input.options()));
    return outs;
  }
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(input.device().index()).stream();
  const at::Tensor x = prepare_input(input);
  const at::Tensor* b = add_bias ? &*bias : nullptr;
  at::Tensor y = matmul(op, x, weight, b, q_scale, s, stream);  // [M, N]
  if (!do_flash_attn) return {y.view({s.B, s.S, s.N})};

  kc::QKVArgs a;
  a.dtype = kernel_dtype(act);
  a.y = y.const_data_ptr();
  a.B = s.B;
  a.S = s.S;
  a.H = qkv.heads;
  a.KV = qkv.kv_heads;
  a.D = qkv.head_dim;
  a.rotary_dim = qkv.rotary_dim;
  a.rotate_half = qkv.rotate_half;
  a.rope_theta = qkv.rope_theta;
  a.seq_offset = qkv.seq_offset;
  std::vector<at::Tensor> outs;
  if (qkv.gqa) {
    for (const auto& shape : shapes) outs.push_back(aten::empty(shape, input.options()));
    a.q = outs[0].mutable_data_ptr();
    a.k = outs[1].mutable_data_ptr();
    a.v = outs[2].mutable_data_ptr();
  } else {
    outs.push_back(aten::empty(shapes[0], input.options()));  // [3, B, H, S, D]
    at::Tensor& t = outs[0];
    a.q = t.select(0, 0).mutable_data_ptr();
    a.k = t.select(0, 1).mutable_data_ptr();
    a.v = t.select(0, 2).mutable_data_ptr();
  }
  check_cuda(kc::qkv_split_rope(a, stream), op, "QKV split/RoPE launch");
  return outs;
}

// linear_layer's lean entry: as in cpu_binding.cpp.
at::Tensor linear_layer_lean(const char* op, c10::ScalarType act, const at::Tensor& input, const at::Tensor& weight,
                             const c10::optional<at::Tensor>& bias, bool transposed_mode) {
  return linear_layer(op, act, input, weight, bias, bias.has_value(), false, 0, transposed_mode, 10000.0, -1, false,
                      -1, 0, c10::nullopt)[0];
}

at::Tensor vector_matmul(const char* op, c10::ScalarType act, const at::Tensor& input, const at::Tensor& weight,
                         bool /*async_op*/, const c10::optional<at::Tensor>& q_scale, bool q_int8,
                         bool transposed_mode) {
  const MatmulShape s = check_matmul(op, input, weight, act, transposed_mode, q_scale, q_int8 ? 1 : 0);
  check_no_grad(op, {{"input", &input}, {"weight", &weight}});
  check_input_on_cuda(op, input);
  const c10::DeviceGuard guard(input.device());
  if (s.M() == 0 || s.N == 0) return aten::empty({s.B, s.S, s.N}, input.options());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(input.device().index()).stream();
  const at::Tensor x = prepare_input(input);
  return matmul(op, x, weight, nullptr, q_scale, s, stream).view({s.B, s.S, s.N});
}

// vector_matmul's lean entry: as in cpu_binding.cpp.
at::Tensor vector_matmul_lean(const char* op, c10::ScalarType act, const at::Tensor& input, const at::Tensor& weight,
                              bool transposed_mode, const c10::optional<at::Tensor>& q_scale) {
  return vector_matmul(op, act, input, weight, false, q_scale, q_scale.has_value(), transposed_mode);
}

// ---- rms_norm, pre_rms_norm (kernels: cuda/rms_norm.cu) -------------------------------------------------

}  // namespace
namespace cuda {  // launchers of cuda/rms_norm.cu
cudaError_t rms_norm(DType dtype, const void* x, const void* gamma, void* out, int64_t rows, int64_t H, float epsilon,
                     cudaStream_t stream);
cudaError_t pre_rms_norm(DType dtype, const void* x, const void* residual, const void* gamma, void* out, void* res_out,
                         int64_t rows, int64_t H, float epsilon, cudaStream_t stream);
}  // namespace cuda
namespace {

// rms_norm's rules (dsinf/ops/rms_norm.py), from validate.h's primitives; `x`: what the op calls its
// activation. Returns H of vals [..., H].
int64_t check_rms_norm(const char* op, const at::Tensor& vals, const at::Tensor& gamma, double epsilon,
                       const char* x = "vals") {
  check_float_tensor(op, x, vals);
  DSINF_CHECK_ARG(vals.dim() >= 1, op, x, "expected at least one dimension [..., H], got a 0-d tensor");
  const int64_t H = check_channel_vector(op, "gamma", gamma, vals);
  check_finite_positive(op, "epsilon", epsilon);
  return H;
}

// pre_rms_norm's rules (dsinf/ops/pre_rms_norm.py): rms_norm's, and a residual like vals.
int64_t check_pre_rms_norm(const char* op, const at::Tensor& vals, const at::Tensor& residual, const at::Tensor& gamma,
                           double epsilon, const char* x = "vals") {
  const int64_t H = check_rms_norm(op, vals, gamma, epsilon, x);
  check_like(op, "residual", residual, vals, x);
  return H;
}

int64_t rows_of(const at::Tensor& x, int64_t H) { return H ? x.numel() / H : 0; }

// The single dtype-generic functions are registered whatever the build's archs: refuse bf16 by name when the
// build has no bf16 kernels (a target below sm_80), rather than fail the launch.
void check_bf16_built(const char* op, const char* arg, c10::ScalarType t) {
#if !defined(DSINF_CUDA_BF16)
  DSINF_CHECK_ARG(t != c10::ScalarType::BFloat16, op, arg,
                  "dtype bfloat16 needs a CUDA build whose every target arch is sm_80 or newer");
#endif
}

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

// ---- rms_mlp_gemm (kernels: cuda/mlp_gemm.cu, rms_norm.cu, the GEMV / cuBLAS path above) -------------------

}  // namespace
namespace cuda {  // launchers of cuda/mlp_gemm.cu
cudaError_t gated_gemv(DType dtype, const void* x, int64_t M, const void* w, bool w_nk, bool w_int8,
                       const float* scale, int64_t groups, void* out, int64_t K, int64_t I, int activation,
                       cudaStream_t stream);
cudaError_t gated_act(DType dtype, const void* src, void* out, int64_t M, int64_t I, int activation,
                      cudaStream_t stream);
}  // namespace cuda
namespace {

// Largest M on the gated GEMV (the kernel accepts up to 8); above it cuBLAS into [M, 2I], then gated_act.
// Tensor-core paths (fp16/bf16 activations with [N, K] or int8 weights: one mma n-tile holds 8 tokens, so
// the weight stream is the cost for every M <= 8) and int8 (the cuBLAS path would dequantize the whole
// weight) go to 8. The CUDA-core paths (fp32 activations, [K, N] weights) stop at 2: their cost grows with
// M (H200, 4096->14336->4096 fp16: 1.18x the two-cuBLAS chain at M=1, 0.92x at M=8; docs/PERFORMANCE.md).
constexpr int64_t kGatedGemvMaxM = 8;
constexpr int64_t kGatedGemvMaxMFloat = 2;

// rms_mlp_gemm's problem: M rows of hidden size K, intermediate size I (W_interm has 2I outputs).
struct MLPShape {
  int64_t M, K, I;
  int activation;           // 3 GATED_GELU, 4 GATED_SILU (DeepSpeed's ActivationFuncType)
  MatmulShape interm, out;  // h [M, K] -> [M, 2I]; a [M, I] -> [M, K]
};

bool gated_gemv_tensor_core(c10::ScalarType act, const MLPShape& s) {
  return act != c10::ScalarType::Float && (s.interm.int8 || s.interm.weight_nk);
}

// rms_mlp_gemm's rules (dsinf/ops/mlp_gemm.py), from validate.h's primitives.
MLPShape check_rms_mlp_gemm(const char* op, c10::ScalarType act, const at::Tensor& input, const at::Tensor& residual,
                            const at::Tensor& weight_interm, const at::Tensor& weight_out, const at::Tensor& gamma,
                            double epsilon, const c10::optional<at::Tensor>& q_scale,
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

//   r, h = pre_rms_norm(input, residual)     one pass, both in the act dtype
//   a = act(gate) * up                        small M: the gated GEMV (the [M, 2I] product never exists);
//                                             larger M: matmul into [M, 2I] (cuBLAS), then gated_act
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
  if (s.M <= (s.interm.int8 || gated_gemv_tensor_core(act, s) ? kGatedGemvMaxM : kGatedGemvMaxMFloat)) {
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

}  // namespace
}  // namespace dsinf

namespace dsinf {
namespace {
// bf16 kernels need sm_80+: built only when every target has it (the build's -DDSINF_CUDA_BF16).
#if defined(DSINF_CUDA_BF16)
constexpr DtypeEntry kCudaDtypes[] = {kFloatDtypes[0], kFloatDtypes[1], kFloatDtypes[2]};
#else
constexpr DtypeEntry kCudaDtypes[] = {kFloatDtypes[0], kFloatDtypes[1]};
#endif
}  // namespace
}  // namespace dsinf

// The route table's C entry points (dsinf/routes.py): the GEMV launchers accept M <= kGemvMaxM.
DSINF_ROUTE_API(cuda, dsinf::cuda::kGemvMaxM, dsinf::default_route)

// Schemas are defined from Python (dsinf.library, from the op specs) before this library is loaded.
// One line per op.
TORCH_LIBRARY_IMPL(dsinf, CUDA, m) {
  dsinf::impl_per_dtype(m, "linear_layer", &dsinf::linear_layer, dsinf::kCudaDtypes);
  dsinf::impl_per_dtype(m, "linear_layer_lean", &dsinf::linear_layer_lean, dsinf::kCudaDtypes);
  dsinf::impl_per_dtype(m, "vector_matmul_lean", &dsinf::vector_matmul_lean, dsinf::kCudaDtypes);
  dsinf::impl_per_dtype(m, "vector_matmul", &dsinf::vector_matmul, dsinf::kCudaDtypes);
  m.impl("rms_norm", &dsinf::rms_norm);
  m.impl("pre_rms_norm", &dsinf::pre_rms_norm);
  dsinf::impl_per_dtype(m, "rms_mlp_gemm", &dsinf::rms_mlp_gemm, dsinf::kCudaDtypes);
}
