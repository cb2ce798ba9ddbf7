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
// tokens per pass; int8: the GEMV streams 1 byte per weight, and the paths above it (the int8 GEMM, or
// dequantize + cuBLAS, below) are built for prefill sizes, so it wins for every M it supports.
#ifndef DSINF_GEMV_MAX_M_HALF
#define DSINF_GEMV_MAX_M_HALF 8
#endif
#ifndef DSINF_GEMV_MAX_M_FP32
#define DSINF_GEMV_MAX_M_FP32 8
#endif
#ifndef DSINF_GEMV_MAX_M_INT8
#define DSINF_GEMV_MAX_M_INT8 16
#endif
// Largest M of an int8 matmul above the GEMV's range that runs on the int8 GEMM (cuda/gemm_int8.cu: reads the
// int8 weights once) rather than dequantize + cuBLAS (writes and re-reads a 16-bit copy of the weight, then runs
// cuBLAS's GEMM, faster at large M), for a shape the route table does not list (its int8-gemm keys). Where the
// GEMM does not apply (fp32 activations, K % 16, an unaligned weight): dequantize. H200, one process, each path
// forced by its route, dequantize + cuBLAS time / GEMM time (tools/probe_int8_prefill.py; docs/PERFORMANCE.md,
// twenty-third round, runs 117 and 118), fp16 / bf16:
//   warpgroup-MMA kernel (sm_90a code on a 9.0 device), M = 64 / 128 / 256 / 512 / 1024:
//     4096x6144 (24 MiB)    1.59 / 1.30 / 1.09 / 0.84 / 0.78;  1.42 / 1.17 / 0.96 / 0.72 / 0.70
//     4096x4096 (16 MiB)    1.42 / 1.26 / 0.95 / 0.94 / 0.84;  1.28 / 1.14 / 0.89 / 0.83 / 0.72
//     14336x4096 (56 MiB)   2.18 / 1.88 / 1.33 / 1.13 / 0.93;  1.91 / 1.68 / 1.20 / 1.02 / 0.85
//     4096x28672 (112 MiB)  3.02 / 2.57 / 1.49 / 1.06 / 0.77;  2.83 / 2.38 / 1.34 / 0.98 / 0.73
//   mma.sync kernel (other devices and builds; measured on the H200 with DSINF_GEMM_I8_WGMMA=0), M = 64 / 128:
//     16-24 MiB 1.10-1.42 / 0.83-0.93 (both dtypes); 56-112 MiB 1.47-2.85 / 1.14-1.71
// The GEMM reads the weights once where the other path moves three times their bytes, so it wins while the
// product is short; cuBLAS's GEMM (~700 TFLOP/s; ours: 400-565 with wgmma, ~300 with mma.sync) wins at large M,
// later on larger weights. So, on weights of at least DSINF_GEMM_INT8_BIG_MIB: M <= DSINF_GEMM_INT8_WG_MAX_M_BIG
// (bf16: _BF16) with wgmma, DSINF_GEMM_INT8_MAX_M_BIG with mma.sync; on smaller ones DSINF_GEMM_INT8_WG_MAX_M /
// DSINF_GEMM_INT8_MAX_M.
#ifndef DSINF_GEMM_INT8_BIG_MIB
#define DSINF_GEMM_INT8_BIG_MIB 48
#endif
#ifndef DSINF_GEMM_INT8_WG_MAX_M
#define DSINF_GEMM_INT8_WG_MAX_M 128
#endif
#ifndef DSINF_GEMM_INT8_WG_MAX_M_BIG
#define DSINF_GEMM_INT8_WG_MAX_M_BIG 512
#endif
#ifndef DSINF_GEMM_INT8_WG_MAX_M_BIG_BF16
#define DSINF_GEMM_INT8_WG_MAX_M_BIG_BF16 256  // bf16 112 MiB at M = 512: 0.98
#endif
#ifndef DSINF_GEMM_INT8_MAX_M
#define DSINF_GEMM_INT8_MAX_M 64
#endif
#ifndef DSINF_GEMM_INT8_MAX_M_BIG
#define DSINF_GEMM_INT8_MAX_M_BIG 128
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

// rms_mlp_gemm's gate|up (K -> N = 2I): the gated kernel, or the matmul into [M, 2I] and then gated_act. A
// measured route (a gated key of the table) decides where there is one; else this compiled rule.
//
// Largest M on the gated GEMV (the kernel accepts up to kc::kGatedGemvMaxM = 8, the cap of a forced route too).
// Tensor-core paths (fp16/bf16 activations with [N, K] or int8 weights: one mma n-tile holds 8 tokens, so
// the weight stream is the cost for every M <= 8) and int8 (the cuBLAS path would dequantize the whole
// weight) go to 8. The CUDA-core paths (fp32 activations, [K, N] weights) stop at 2: their cost grows with
// M (H200, 4096->14336->4096 fp16: 1.18x the two-cuBLAS chain at M=1, 0.92x at M=8; docs/PERFORMANCE.md).
constexpr int64_t kGatedGemvMaxM = kc::kGatedGemvMaxM;
constexpr int64_t kGatedGemvMaxMFloat = 2;

// Decode gate/up for 16-bit weights (either layout) of at least this many MiB runs as the linear ops' matmul
// (the streaming GEMV, or cuBLAS where the route table says) into [M, 2I], then gated_act: two launches
// instead of the gated kernel's one, but each reads large weights faster. H200 fp16, M = 1 (M = 2..8
// alike), gated kernel -> matmul + act, by gate|up size (tools/probe_norm_mlp.py, no routes;
// docs/PERFORMANCE.md, nineteenth round):
//   17 MiB 15.1 -> 17.3 us; 44 MiB 25.5 -> 26.7; 64 MiB 33.6 -> 34.4; 67.5 MiB 36.4 -> 36.1 (the crossover)
//   86 MiB 43.0 -> 42.2; 96 MiB 45.6 -> 44.9; 172 MiB 78.7 -> 72.2; 224 MiB 100.1 -> 92.7; 259 MiB 109.5 ->
//   105.1; 896 MiB 414 -> 344 (the gated kernel was 0.85x HF's eager chain there)
// In the model (Llama-3-8B, fp16; inject's routes send its gate|up to cuBLAS, 56 us, 98% of the copy
// bandwidth) a token's GPU time fell 4.83 -> 4.62 ms at batch 1 and 5.19 -> 4.84 ms at batch 8. [K, N]
// weights (DeepSpeed's default layout; their gated kernel is CUDA-core), the whole MLP at M = 1 / 2, fp16
// (bf16 alike), gated kernel -> matmul + act (twenty-first round): 172 MiB 75.2 / 74.9 -> 72.7 / 73.4 us;
// 224 MiB 94.6 / 97.9 -> 90.2 / 90.4; 896 MiB 368.5 / 392.2 -> 323.9 / 324.6 (HF's eager chain 344 / 347).
// 0: always the matmul; a huge value: never.
#ifndef DSINF_GATED_VIA_GEMV_MIN_MIB
#define DSINF_GATED_VIA_GEMV_MIN_MIB 80
#endif
// The same rule for int8 gate|up weights (one byte per weight), whose matmul is the int8 streaming GEMV
// (cuBLAS would first write a dequantized copy). Its crossover lies higher. H200, the whole MLP (norm, gate|up,
// act, down) in us at M = 1 / 8, fp16 activations (bf16 alike), gated kernel -> matmul + act, by gate|up size
// (tools/probe_norm_mlp.py --define; docs/PERFORMANCE.md, twentieth round):
//   22 MiB 17.6 / 17.9 -> 19.1 / 19.8; 112 MiB (Llama-3-8B) 53.4 / 54.2 -> 53.4 / 55.5 (bf16 53.4 / 54.8 ->
//   55.1 / 57.3); 228 MiB 100.3 / 104.1 -> 95.3 / 99.9; 344 MiB 148.2 / 153.4 -> 139.6 / 143.8; 448 MiB
//   (Llama-3-70B) 187.4 / 192.7 -> 181.4 / 184.2
// The threshold sits between the last loss (112) and the first win (228).
#ifndef DSINF_GATED_VIA_GEMV_INT8_MIN_MIB
#define DSINF_GATED_VIA_GEMV_INT8_MIN_MIB 160
#endif

// The compiled rule: the largest M on the gated kernel for a gate|up of K inputs and N (= 2I) outputs.
int64_t gated_max_m(c10::ScalarType act, bool int8, bool weight_nk, int64_t K, int64_t N) {
  const bool half = act != c10::ScalarType::Float;
  const int64_t bytes = N * K * (int8 ? 1 : 2);
  const int64_t min_mib = int8 ? DSINF_GATED_VIA_GEMV_INT8_MIN_MIB : DSINF_GATED_VIA_GEMV_MIN_MIB;
  if (half && bytes >= (min_mib << 20)) return 0;
  return int8 || (half && weight_nk) ? kGatedGemvMaxM : kGatedGemvMaxMFloat;
}

// The compiled rule for an int8 matmul above the GEMV's range: the largest M on the int8 GEMM (fp32
// activations: none, the GEMM takes fp16 / bf16 only), by the kernel the device runs.
int64_t gemm_int8_max_m(c10::ScalarType act, int64_t K, int64_t N) {
  if (act == c10::ScalarType::Float) return 0;
  const bool big = N * K >= (int64_t{DSINF_GEMM_INT8_BIG_MIB} << 20);
  if (kc::gemm_int8_wgmma()) {
    if (!big) return DSINF_GEMM_INT8_WG_MAX_M;
    return act == c10::ScalarType::BFloat16 ? DSINF_GEMM_INT8_WG_MAX_M_BIG_BF16 : DSINF_GEMM_INT8_WG_MAX_M_BIG;
  }
  return big ? DSINF_GEMM_INT8_MAX_M_BIG : DSINF_GEMM_INT8_MAX_M;
}

// The compiled crossover of a route-table key (dsinf/routes.py reports it for the shapes it has not measured).
int64_t default_route(int64_t dtype, int64_t layout, int64_t K, int64_t N) {
  const c10::ScalarType act = dtype == routes::kFp32   ? c10::ScalarType::Float
                              : dtype == routes::kBf16 ? c10::ScalarType::BFloat16
                                                       : c10::ScalarType::Half;
  if (layout == routes::kInt8GemmKey) return gemm_int8_max_m(act, K, N);
  const int64_t plain = routes::plain_layout(layout);
  if (plain != layout) return gated_max_m(act, plain == routes::kInt8, plain != routes::kKN, K, N);
  return gemv_max_m(act, layout == routes::kInt8);
}

}  // namespace

bool cuda_binding::use_gated(c10::ScalarType act, const MatmulShape& s) {
  return routes::use_gated(s.M(), act, s.int8, s.weight_nk, s.K, s.N, gated_max_m(act, s.int8, s.weight_nk, s.K, s.N));
}

at::Tensor cuda_binding::matmul(const char* op, const at::Tensor& x, const at::Tensor& weight, const at::Tensor* bias,
                                const c10::optional<at::Tensor>& q_scale, const MatmulShape& s, cudaStream_t stream) {
  const int64_t M = s.M();
  const at::Tensor x2d = x.view({M, s.K});
  kc::GemvArgs a;  // the GEMV's and the int8 GEMM's arguments, but for `out`
  a.dtype = kernel_dtype(x.scalar_type());
  a.x = x2d.const_data_ptr();
  a.w = weight.const_data_ptr();
  a.w_nk = s.weight_nk;
  a.w_int8 = s.int8;
  a.scale = s.int8 ? q_scale->const_data_ptr<float>() : nullptr;
  a.groups = s.groups;
  a.bias = bias ? bias->const_data_ptr() : nullptr;
  a.M = M;
  a.K = s.K;
  a.N = s.N;
  if (routes::use_gemv(M, x.scalar_type(), s.int8, s.weight_nk, s.K, s.N, gemv_max_m(x.scalar_type(), s.int8))) {
    at::Tensor out = aten::empty({M, s.N}, x.options());
    a.out = out.mutable_data_ptr();
    check_cuda(kc::gemv(a, stream), op, "GEMV launch");
    return out;
  }
  if (s.int8 && kc::gemm_int8_supported(a) &&
      routes::use_int8_gemm(M, x.scalar_type(), s.K, s.N, gemm_int8_max_m(x.scalar_type(), s.K, s.N))) {
    at::Tensor out = aten::empty({M, s.N}, x.options());
    a.out = out.mutable_data_ptr();
    check_cuda(kc::gemm_int8(a, stream), op, "int8 GEMM launch");
    return out;
  }
  at::Tensor w_kn;  // [K, N] view for cuBLAS
  if (s.int8) {
    at::Tensor deq = aten::empty({s.N, s.K}, x.options());
    check_cuda(kc::dequantize_int8(a.dtype, weight.const_data_ptr<int8_t>(), a.scale, s.groups,
                                   deq.mutable_data_ptr(), s.N, s.K, stream),
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

// linear_layer's lean entry: as in cpu_binding_ops.cpp.
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

// vector_matmul's lean entry: as in cpu_binding_ops.cpp.
at::Tensor cuda_binding::vector_matmul_lean(const char* op, c10::ScalarType act, const at::Tensor& input,
                                            const at::Tensor& weight, bool transposed_mode,
                                            const c10::optional<at::Tensor>& q_scale) {
  return vector_matmul(op, act, input, weight, false, q_scale, q_scale.has_value(), transposed_mode);
}

}  // namespace dsinf

// The route table's C entry points (dsinf/routes.py): the GEMV launchers accept M <= kGemvMaxM, the gated
// GEMV M <= kGatedGemvMaxM.
DSINF_ROUTE_API(cuda, dsinf::cuda::kGemvMaxM, dsinf::kGatedGemvMaxM, dsinf::default_route)
