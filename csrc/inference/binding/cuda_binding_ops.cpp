// CUDA implementations of linear_layer and vector_matmul (registered by cuda_binding.cpp), and the route
// table's entry points; why the binding's files are split so, and what they share: cuda_binding.h.
#include <cstdint>
#include <tuple>
#include <vector>

#include "cuda_binding.h"
#include "routes.h"

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

using namespace cuda_binding;

static_assert(DSINF_GEMV_MAX_M_HALF <= kc::kGemvMaxM && DSINF_GEMV_MAX_M_FP32 <= kc::kGemvMaxM &&
                  DSINF_GEMV_MAX_M_INT8 <= kc::kGemvMaxM,
              "a GEMV crossover exceeds what the GEMV kernels accept");

int64_t gemv_max_m(c10::ScalarType act, bool int8) {
  if (int8) return DSINF_GEMV_MAX_M_INT8;
  return act == c10::ScalarType::Float ? DSINF_GEMV_MAX_M_FP32 : DSINF_GEMV_MAX_M_HALF;
}

// gemv_max_m of a route-table key (dsinf/routes.py reports it for the shapes it has not measured).
int64_t default_route(int64_t dtype, int64_t layout) {
  return gemv_max_m(dtype == routes::kFp32 ? c10::ScalarType::Float : c10::ScalarType::Half, layout == routes::kInt8);
}

}  // namespace

at::Tensor cuda_binding::matmul(const char* op, const at::Tensor& x, const at::Tensor& weight, const at::Tensor* bias,
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

// ---- the entries (declared in cuda_ops.h, registered by cuda_binding.cpp) -------------------------------------

std::vector<at::Tensor> cuda_binding::linear_layer(const char* op, c10::ScalarType act, const at::Tensor& input,
                                                   const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                                   bool add_bias, bool do_flash_attn, int64_t num_heads,
                                                   bool transposed_mode, double rope_theta, int64_t rotary_dim,
                                                   bool rotate_half, int64_t num_kv, int64_t seq_offset,
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
at::Tensor cuda_binding::linear_layer_lean(const char* op, c10::ScalarType act, const at::Tensor& input,
                                           const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                           bool transposed_mode) {
  return linear_layer(op, act, input, weight, bias, bias.has_value(), false, 0, transposed_mode, 10000.0, -1, false,
                      -1, 0, c10::nullopt)[0];
}

at::Tensor cuda_binding::vector_matmul(const char* op, c10::ScalarType act, const at::Tensor& input,
                                       const at::Tensor& weight, bool /*async_op*/,
                                       const c10::optional<at::Tensor>& q_scale, bool q_int8, bool transposed_mode) {
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
at::Tensor cuda_binding::vector_matmul_lean(const char* op, c10::ScalarType act, const at::Tensor& input,
                                            const at::Tensor& weight, bool transposed_mode,
                                            const c10::optional<at::Tensor>& q_scale) {
  return vector_matmul(op, act, input, weight, false, q_scale, q_scale.has_value(), transposed_mode);
}

}  // namespace dsinf

// The route table's C entry points (dsinf/routes.py): the GEMV launchers accept M <= kGemvMaxM.
DSINF_ROUTE_API(cuda, dsinf::cuda::kGemvMaxM, dsinf::default_route)
