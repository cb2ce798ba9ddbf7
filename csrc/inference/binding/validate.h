// Argument validation for the dsinf:: custom ops, shared by the CPU and CUDA bindings.
//
// Mirrors dsinf/checks.py rule for rule and word for word (dtype names too: "float16", never "Half") ("<op>: argument '<arg>': ..."), so a
// direct torch.ops.dsinf.* call gets the same clear ValueError as the Python op classes, never a
// crash. Binding-side only: kernel sources (.cu / kernel .cpp) never include this (it pulls ATen).
//
// Layouts: input [B, S, K]; float weight [K, N] (transposed_mode=false) or [N, K] (true);
// int8 weight always [N, K] with float32 q_scale [G], G | N (row block g uses q_scale[g]).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <vector>
#include <limits>

namespace dsinf {

struct MatmulShape {
  int64_t B, S, K, N;
  bool int8;       // weight is int8 [N, K]
  int64_t groups;  // scale groups G (0 unless int8)
  bool weight_nk;  // weight stored [N, K]
  int64_t M() const { return B * S; }
};

struct QKVLayout {
  int64_t heads, kv_heads, head_dim, rotary_dim;  // rotary_dim 0 = no RoPE
  bool rotate_half;
  double rope_theta;
  int64_t seq_offset;
  bool gqa;  // return {q, k, v} instead of one [3, B, H, S, D] tensor
};

namespace detail {

inline std::string dtype_name(c10::ScalarType t) {
  switch (t) {
    case c10::ScalarType::Float: return "float32";
    case c10::ScalarType::Half: return "float16";
    case c10::ScalarType::BFloat16: return "bfloat16";
    case c10::ScalarType::Double: return "float64";
    case c10::ScalarType::Char: return "int8";
    case c10::ScalarType::Byte: return "uint8";
    case c10::ScalarType::Short: return "int16";
    case c10::ScalarType::Int: return "int32";
    case c10::ScalarType::Long: return "int64";
    case c10::ScalarType::Bool: return "bool";
    case c10::ScalarType::ComplexFloat: return "complex64";
    case c10::ScalarType::ComplexDouble: return "complex128";
    default: return std::string(c10::toString(t));  // torch's own name (e.g. Float8_e4m3fn = torch.float8_e4m3fn)
  }
}

// Messages are assembled with std::to_string / snprintf and handed to TORCH_CHECK as ONE std::string,
// which c10::str passes through untouched: no std::ostream formatting of numbers in this binary.
// On the GPU image (g++ 13.3, torch 2.11) an `ostream << int64_t` issued from an extension segfaults
// inside libstdc++ (_M_insert<long>) once other libraries are loaded; string insertion does not.
inline void append(std::string& s, const std::string& v) { s += v; }
inline void append(std::string& s, const char* v) { s += v; }
inline void append(std::string& s, char v) { s += v; }
inline void append(std::string& s, bool v) { s += v ? "True" : "False"; }
inline void append(std::string& s, const c10::Device& d) { s += d.str(); }
// As Python's repr(float) writes it, for the usual values: shortest round-trip digits, "0.0" not "0".
inline void append(std::string& s, double v) {
  char buf[40];
  for (int precision = 1; precision <= 17; ++precision) {
    std::snprintf(buf, sizeof(buf), "%.*g", precision, v);
    if (std::strtod(buf, nullptr) == v) break;
  }
  std::string out = buf;
  if (out.find_first_of(".eni") == std::string::npos) out += ".0";  // not 1e+20, inf, nan
  s += out;
}
template <typename T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
inline void append(std::string& s, T v) {
  s += std::to_string(v);
}
template <typename... Args>
std::string cat(const Args&... args) {
  std::string s;
  (append(s, args), ...);
  return s;
}

inline std::string shape_str(const at::Tensor& t) {
  std::string s = "(";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + (t.dim() == 1 ? ",)" : ")");
}

}  // namespace detail

#define DSINF_CHECK_ARG(cond, op, arg, ...) \
  TORCH_CHECK_VALUE(cond, ::dsinf::detail::cat(op, ": argument '", arg, "': ", __VA_ARGS__))

inline MatmulShape check_matmul(const char* op, const at::Tensor& input, const at::Tensor& weight,
                                c10::ScalarType act_dtype, bool transposed_mode,
                                const c10::optional<at::Tensor>& q_scale, int int8_expected /*-1 any, 0 no, 1 yes*/) {
  using detail::dtype_name;
  using detail::shape_str;
  DSINF_CHECK_ARG(input.defined(), op, "input", "expected a Tensor, got None");
  DSINF_CHECK_ARG(weight.defined(), op, "weight", "expected a Tensor, got None");
  DSINF_CHECK_ARG(input.dim() == 3, op, "input", "expected a 3-D [B, S, K] tensor, got shape ", shape_str(input));
  DSINF_CHECK_ARG(input.scalar_type() == act_dtype, op, "input", "expected dtype ", dtype_name(act_dtype), ", got ",
                  dtype_name(input.scalar_type()));
  DSINF_CHECK_ARG(weight.device() == input.device(), op, "weight", "is on ", weight.device(), " but input is on ",
                  input.device());
  DSINF_CHECK_ARG(weight.dim() == 2, op, "weight", "expected a 2-D tensor, got shape ", shape_str(weight));
  DSINF_CHECK_ARG(weight.is_contiguous(), op, "weight",
                  "must be contiguous (call .contiguous() once at load time, not per call)");
  const bool is_int8 = weight.scalar_type() == c10::ScalarType::Char;
  DSINF_CHECK_ARG(!(int8_expected == 1 && !is_int8), op, "weight", "q_int8=True needs an int8 weight, got ",
                  dtype_name(weight.scalar_type()));
  DSINF_CHECK_ARG(!(int8_expected == 0 && is_int8), op, "weight",
                  "is int8 but q_int8=False: pass q_int8=True with its q_scale");
  DSINF_CHECK_ARG(is_int8 || weight.scalar_type() == act_dtype, op, "weight", "expected dtype ", dtype_name(act_dtype),
                  " (same as input) or int8, got ", dtype_name(weight.scalar_type()));
  MatmulShape s{};
  s.B = input.size(0);
  s.S = input.size(1);
  s.K = input.size(2);
  s.int8 = is_int8;
  s.weight_nk = is_int8 || transposed_mode;
  const int64_t Kw = s.weight_nk ? weight.size(1) : weight.size(0);
  s.N = s.weight_nk ? weight.size(0) : weight.size(1);
  DSINF_CHECK_ARG(Kw == s.K, op, "weight", "shape ", shape_str(weight), " read as ", (s.weight_nk ? "[N, K]" : "[K, N]"),
                  " has K=", Kw, ", but input has K=", s.K,
                  (is_int8 ? std::string() : std::string(" (transposed_mode=") + (transposed_mode ? "True" : "False") + ")"));
  s.groups = 0;
  if (is_int8) {
    DSINF_CHECK_ARG(q_scale.has_value() && q_scale->defined() && q_scale->numel() > 0, op, "q_scale",
                    "an int8 weight needs its float32 scales (weight.scale / q_scale)");
    const at::Tensor& qs = *q_scale;
    DSINF_CHECK_ARG(qs.scalar_type() == c10::ScalarType::Float, op, "q_scale", "expected dtype float32, got ",
                    dtype_name(qs.scalar_type()));
    DSINF_CHECK_ARG(qs.device() == input.device(), op, "q_scale", "is on ", qs.device(), " but input is on ",
                    input.device());
    DSINF_CHECK_ARG(qs.dim() == 1, op, "q_scale", "expected a 1-D [G] tensor, got shape ", shape_str(qs));
    DSINF_CHECK_ARG(qs.is_contiguous(), op, "q_scale", "must be contiguous");
    s.groups = qs.size(0);
    DSINF_CHECK_ARG(s.N % s.groups == 0, op, "q_scale", "G=", s.groups, " groups do not divide N=", s.N,
                    " output rows");
  }
  return s;
}

inline void check_bias(const char* op, const c10::optional<at::Tensor>& bias, bool add_bias, const at::Tensor& input,
                       int64_t N) {
  using detail::dtype_name;
  using detail::shape_str;
  if (!add_bias) return;
  DSINF_CHECK_ARG(bias.has_value() && bias->defined(), op, "bias", "add_bias=True needs a bias tensor");
  const at::Tensor& b = *bias;
  DSINF_CHECK_ARG(b.device() == input.device(), op, "bias", "is on ", b.device(), " but input is on ", input.device());
  DSINF_CHECK_ARG(b.scalar_type() == input.scalar_type(), op, "bias", "expected dtype ", dtype_name(input.scalar_type()),
                  " (same as input), got ", dtype_name(b.scalar_type()));
  DSINF_CHECK_ARG(b.dim() == 1 && b.size(0) == N, op, "bias", "expected shape (", N, ",), got ", shape_str(b));
  DSINF_CHECK_ARG(b.is_contiguous(), op, "bias", "must be contiguous");
}

// Integers are range-checked before any arithmetic on them (no signed overflow on any input).
inline QKVLayout check_qkv(const char* op, int64_t K, int64_t N, int64_t S, int64_t num_heads, int64_t num_kv,
                           int64_t rotary_dim, bool rotate_half, double rope_theta, int64_t seq_offset) {
  DSINF_CHECK_ARG(num_heads >= 1, op, "num_heads", "must be >= 1 with do_flash_attn=True, got ", num_heads);
  DSINF_CHECK_ARG(num_heads <= K, op, "num_heads", "must be <= the input hidden size K=", K, ", got ", num_heads);
  DSINF_CHECK_ARG(K % num_heads == 0, op, "num_heads", "input hidden size K=", K, " is not divisible by num_heads=",
                  num_heads);
  QKVLayout q{};
  q.heads = num_heads;
  q.head_dim = K / num_heads;
  q.kv_heads = num_kv == -1 ? num_heads : num_kv;
  DSINF_CHECK_ARG(q.kv_heads >= 1 && q.kv_heads <= num_heads && num_heads % q.kv_heads == 0, op, "num_kv",
                  "must be -1 or a divisor of num_heads=", num_heads, ", got ", num_kv);
  const int64_t expect = (num_heads + 2 * q.kv_heads) * q.head_dim;  // <= 3 * K: no overflow
  DSINF_CHECK_ARG(N == expect, op, "weight", "output width N=", N,
                  " does not hold q|k|v: expected (num_heads + 2*num_kv) * D = (", num_heads, " + 2*", q.kv_heads,
                  ") * ", q.head_dim, " = ", expect);
  q.rotary_dim = rotary_dim <= 0 ? 0 : rotary_dim;
  if (q.rotary_dim) {
    DSINF_CHECK_ARG(q.rotary_dim % 2 == 0, op, "rotary_dim", "must be even, got ", q.rotary_dim);
    DSINF_CHECK_ARG(q.rotary_dim <= q.head_dim, op, "rotary_dim", "must be <= head size D=", q.head_dim, ", got ",
                    q.rotary_dim);
    DSINF_CHECK_ARG(rope_theta > 0, op, "rope_theta", "must be > 0, got ", rope_theta);
  }
  DSINF_CHECK_ARG(seq_offset >= 0 && seq_offset <= std::numeric_limits<int64_t>::max() - S, op, "seq_offset",
                  "must be >= 0 with seq_offset + S <= 2**63 - 1 (S=", S, "), got ", seq_offset);
  q.rotate_half = rotate_half;
  q.rope_theta = rope_theta;
  q.seq_offset = seq_offset;
  q.gqa = q.kv_heads != num_heads;
  return q;
}

// Output shapes of linear_layer: {[B,S,N]}, {[3,B,H,S,D]} or, for GQA, {[B,H,S,D],[B,KV,S,D],[B,KV,S,D]}.
inline std::vector<std::vector<int64_t>> linear_output_shapes(const MatmulShape& s, const QKVLayout* q) {
  if (!q) return {{s.B, s.S, s.N}};
  if (q->gqa)
    return {{s.B, q->heads, s.S, q->head_dim}, {s.B, q->kv_heads, s.S, q->head_dim}, {s.B, q->kv_heads, s.S, q->head_dim}};
  return {{3, s.B, q->heads, s.S, q->head_dim}};
}

// ---- rms_norm / pre_rms_norm / rms_mlp_gemm (dsinf/ops/rms_norm.py, pre_rms_norm.py, mlp_gemm.py) ----------

struct NormShape {
  int64_t rows, H;  // rows = product of the leading dims of [..., H]
};

inline void check_epsilon(const char* op, double epsilon) {
  DSINF_CHECK_ARG(std::isfinite(epsilon) && epsilon > 0, op, "epsilon", "must be finite and > 0, got ", epsilon);
}

// `name`: what the op calls its activation ("vals", or "input" for rms_mlp_gemm).
inline NormShape check_rms_norm(const char* op, const at::Tensor& vals, const at::Tensor& gamma, double epsilon,
                                const char* name = "vals") {
  using detail::dtype_name;
  using detail::shape_str;
  DSINF_CHECK_ARG(vals.defined(), op, name, "expected a Tensor, got None");
  const c10::ScalarType t = vals.scalar_type();
  DSINF_CHECK_ARG(t == c10::ScalarType::Float || t == c10::ScalarType::Half || t == c10::ScalarType::BFloat16, op,
                  name, "dtype ", dtype_name(t), " is not supported (float32, float16, bfloat16)");
  DSINF_CHECK_ARG(vals.dim() >= 1, op, name, "expected at least one dimension [..., H], got a 0-d tensor");
  const int64_t H = vals.size(-1);
  DSINF_CHECK_ARG(gamma.defined(), op, "gamma", "expected a Tensor, got None");
  DSINF_CHECK_ARG(gamma.device() == vals.device(), op, "gamma", "is on ", gamma.device(), " but the input is on ",
                  vals.device());
  DSINF_CHECK_ARG(gamma.scalar_type() == t, op, "gamma", "expected dtype ", dtype_name(t), " (same as the input), got ",
                  dtype_name(gamma.scalar_type()));
  DSINF_CHECK_ARG(gamma.dim() == 1 && gamma.size(0) == H, op, "gamma", "expected shape (", H,
                  ",) to match the hidden size H=", H, ", got ", shape_str(gamma));
  check_epsilon(op, epsilon);
  return NormShape{H ? vals.numel() / H : 0, H};
}

inline NormShape check_pre_rms_norm(const char* op, const at::Tensor& vals, const at::Tensor& residual,
                                    const at::Tensor& gamma, double epsilon, const char* name = "vals") {
  using detail::dtype_name;
  using detail::shape_str;
  const NormShape s = check_rms_norm(op, vals, gamma, epsilon, name);
  DSINF_CHECK_ARG(residual.defined(), op, "residual", "expected a Tensor, got None");
  DSINF_CHECK_ARG(residual.device() == vals.device(), op, "residual", "is on ", residual.device(),
                  " but the input is on ", vals.device());
  DSINF_CHECK_ARG(residual.scalar_type() == vals.scalar_type(), op, "residual", "expected dtype ",
                  dtype_name(vals.scalar_type()), " (same as ", name, "), got ", dtype_name(residual.scalar_type()));
  DSINF_CHECK_ARG(residual.sizes() == vals.sizes(), op, "residual", "expected shape ", shape_str(vals), " (same as ",
                  name, "), got ", shape_str(residual));
  return s;
}

struct MLPShape {
  int64_t M, K, I;     // rows, hidden, intermediate (W_interm has 2I outputs)
  bool int8;           // both weights int8 [N, K]
  int64_t groups;      // q_scale groups (0 unless int8)
  int64_t groups_out;  // q_scale1 groups (0 unless int8)
  bool weight_nk;      // weights stored [N, K] (transposed_mode or int8)
  int activation;      // 3 GATED_GELU, 4 GATED_SILU (DeepSpeed's ActivationFuncType)
  MatmulShape interm() const { return {1, M, K, 2 * I, int8, groups, weight_nk}; }  // h [M, K] -> [M, 2I]
  MatmulShape out() const { return {1, M, I, K, int8, groups_out, weight_nk}; }     // a [M, I] -> [M, K]
};

namespace detail {

inline void check_mlp_weight(const char* op, const char* name, const at::Tensor& w, const at::Tensor& input,
                             bool q_int8) {
  DSINF_CHECK_ARG(w.defined(), op, name, "expected a Tensor, got None");
  DSINF_CHECK_ARG(w.device() == input.device(), op, name, "is on ", w.device(), " but the input is on ",
                  input.device());
  DSINF_CHECK_ARG(w.dim() == 2, op, name, "expected a 2-D tensor, got shape ", shape_str(w));
  DSINF_CHECK_ARG(w.is_contiguous(), op, name,
                  "must be contiguous (call .contiguous() once at load time, not per call)");
  const bool is_int8 = w.scalar_type() == c10::ScalarType::Char;
  DSINF_CHECK_ARG(!q_int8 || is_int8, op, name, "q_int8=True needs an int8 weight, got ", dtype_name(w.scalar_type()));
  DSINF_CHECK_ARG(q_int8 || w.scalar_type() == input.scalar_type(), op, name, "expected dtype ",
                  dtype_name(input.scalar_type()), " (same as input), got ", dtype_name(w.scalar_type()),
                  is_int8 ? ": pass q_int8=True with its scales" : "");
}

inline int64_t check_mlp_scale(const char* op, const char* name, const c10::optional<at::Tensor>& q_scale,
                               const at::Tensor& input, int64_t N, const char* weight_name) {
  DSINF_CHECK_ARG(q_scale.has_value() && q_scale->defined() && q_scale->numel() > 0, op, name,
                  "q_int8=True needs the float32 scales of ", weight_name);
  const at::Tensor& qs = *q_scale;
  DSINF_CHECK_ARG(qs.scalar_type() == c10::ScalarType::Float, op, name, "expected dtype float32, got ",
                  dtype_name(qs.scalar_type()));
  DSINF_CHECK_ARG(qs.device() == input.device(), op, name, "is on ", qs.device(), " but the input is on ",
                  input.device());
  DSINF_CHECK_ARG(qs.dim() == 1, op, name, "expected a 1-D [G] tensor, got shape ", shape_str(qs));
  DSINF_CHECK_ARG(qs.is_contiguous(), op, name, "must be contiguous");
  const int64_t groups = qs.size(0);
  DSINF_CHECK_ARG(N % groups == 0, op, name, "G=", groups, " groups do not divide the N=", N, " rows of ",
                  weight_name);
  return groups;
}

}  // namespace detail

inline MLPShape check_rms_mlp_gemm(const char* op, c10::ScalarType act, const at::Tensor& input,
                                   const at::Tensor& residual, const at::Tensor& weight_interm,
                                   const at::Tensor& weight_out, const at::Tensor& gamma, double epsilon,
                                   const c10::optional<at::Tensor>& q_scale, const c10::optional<at::Tensor>& q_scale1,
                                   bool q_int8, int64_t activation_type, bool transposed_mode) {
  using detail::dtype_name;
  using detail::shape_str;
  DSINF_CHECK_ARG(input.defined(), op, "input", "expected a Tensor, got None");
  DSINF_CHECK_ARG(input.scalar_type() == act, op, "input", "expected dtype ", dtype_name(act), ", got ",
                  dtype_name(input.scalar_type()));
  const NormShape ns = check_pre_rms_norm(op, input, residual, gamma, epsilon, "input");
  DSINF_CHECK_ARG(activation_type == 3 || activation_type == 4, op, "activation_type",
                  "expected GATED_GELU (3) or GATED_SILU (4) (DeepSpeed's ActivationFuncType), got ", activation_type);
  detail::check_mlp_weight(op, "weight_interm", weight_interm, input, q_int8);
  detail::check_mlp_weight(op, "weight_out", weight_out, input, q_int8);
  MLPShape s{};
  s.M = ns.rows;
  s.K = ns.H;
  s.int8 = q_int8;
  s.weight_nk = q_int8 || transposed_mode;
  s.activation = static_cast<int>(activation_type);
  const char* layout = s.weight_nk ? "[N, K]" : "[K, N]";
  const int64_t N = weight_interm.size(s.weight_nk ? 0 : 1), Kw = weight_interm.size(s.weight_nk ? 1 : 0);
  DSINF_CHECK_ARG(Kw == s.K, op, "weight_interm", "shape ", shape_str(weight_interm), " read as ", layout,
                  " has K=", Kw, ", but the input has hidden size ", s.K, " (transposed_mode=", transposed_mode,
                  ", q_int8=", q_int8, ")");
  DSINF_CHECK_ARG(N % 2 == 0 && N != 0, op, "weight_interm", "its ", N,
                  " outputs must be an even, non-zero 2*I ([up | gate] halves)");
  s.I = N / 2;
  const int64_t Kout = weight_out.size(s.weight_nk ? 0 : 1), Iout = weight_out.size(s.weight_nk ? 1 : 0);
  DSINF_CHECK_ARG(Iout == s.I && Kout == s.K, op, "weight_out", "expected shape (", s.weight_nk ? s.K : s.I, ", ",
                  s.weight_nk ? s.I : s.K, ") (", layout, " with K=", s.K, " outputs and I=", s.I, " inputs), got ",
                  shape_str(weight_out));
  if (q_int8) {
    s.groups = detail::check_mlp_scale(op, "q_scale", q_scale, input, N, "weight_interm");
    s.groups_out = detail::check_mlp_scale(op, "q_scale1", q_scale1, input, s.K, "weight_out");
  }
  return s;
}

}  // namespace dsinf
