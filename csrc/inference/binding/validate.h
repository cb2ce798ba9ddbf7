// Argument validation primitives for the dsinf:: custom ops, shared by the CPU and CUDA bindings.
//
// Op-agnostic: checks of one argument (defined, device, dtype, shape, contiguity, a finite positive
// scalar), the matmul weight/scale parsing (MatmulShape) and the fused-QKV head layout (QKVLayout) that
// several ops share. Each op composes its own rules from these, once for both bindings in op_rules.h (the
// matmul ops in a few lines of their binding entries), so adding an op never touches this header
// (tests/test_structure.py checks that it names no op). The wording mirrors the Python checks
// (dsinf/checks.py, dsinf/ops/<op>.py) word for word, dtype names too ("float16", never "Half"):
// "<op>: argument '<arg>': ...", so a direct torch.ops.dsinf.* call gets the same clear ValueError as the
// op classes, never a crash. Binding-side only: kernel sources (.cu / kernel .cpp) never include this (it
// pulls ATen).
//
// Matmul layouts: input [B, S, K]; float weight [K, N] (transposed_mode=false) or [N, K] (true);
// int8 weight always [N, K] with float32 q_scale [G], G | N (row block g uses q_scale[g]).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <initializer_list>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <vector>
#include <utility>
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

// Output shapes of a matmul, split per head by `q` when given: {[B,S,N]}, {[3,B,H,S,D]} or, for GQA,
// {[B,H,S,D],[B,KV,S,D],[B,KV,S,D]}.
inline std::vector<std::vector<int64_t>> matmul_output_shapes(const MatmulShape& s, const QKVLayout* q) {
  if (!q) return {{s.B, s.S, s.N}};
  if (q->gqa)
    return {{s.B, q->heads, s.S, q->head_dim}, {s.B, q->kv_heads, s.S, q->head_dim}, {s.B, q->kv_heads, s.S, q->head_dim}};
  return {{3, s.B, q->heads, s.S, q->head_dim}};
}

// ---- one argument at a time (messages say "the input" for the op's first activation) -------------------

inline void check_tensor(const char* op, const char* arg, const at::Tensor& t) {
  DSINF_CHECK_ARG(t.defined(), op, arg, "expected a Tensor, got None");
}

// Inference-only (dsinf/checks.py no_backward): with grad mode on, a tensor that requires grad is an error on
// every route - not a gradless result from the GEMV and torch's out= error from the ATen path. Each op calls it
// last, after its other rules, as Python does; `args` are (name, tensor or nullptr for an absent optional).
inline void check_no_grad(const char* op, std::initializer_list<std::pair<const char*, const at::Tensor*>> args) {
  if (!at::GradMode::is_enabled()) return;
  for (const auto& arg : args) {
    DSINF_CHECK_ARG(!(arg.second && arg.second->defined() && arg.second->requires_grad()), op, arg.first,
                    "requires grad, but dsinf ops are inference-only (no backward): call them under "
                    "torch.no_grad() or torch.inference_mode(), or detach the tensor");
  }
}

inline void check_same_device(const char* op, const char* arg, const at::Tensor& t, const at::Tensor& input) {
  DSINF_CHECK_ARG(t.device() == input.device(), op, arg, "is on ", t.device(), " but the input is on ",
                  input.device());
}

// A defined activation of one of the three float dtypes.
inline void check_float_tensor(const char* op, const char* arg, const at::Tensor& t) {
  check_tensor(op, arg, t);
  const c10::ScalarType s = t.scalar_type();
  DSINF_CHECK_ARG(s == c10::ScalarType::Float || s == c10::ScalarType::Half || s == c10::ScalarType::BFloat16, op,
                  arg, "dtype ", detail::dtype_name(s), " is not supported (float32, float16, bfloat16)");
}

// `note` follows the expected dtype, e.g. " (same as the input)".
inline void check_dtype(const char* op, const char* arg, const at::Tensor& t, c10::ScalarType want,
                        const std::string& note = "") {
  DSINF_CHECK_ARG(t.scalar_type() == want, op, arg, "expected dtype ", detail::dtype_name(want), note, ", got ",
                  detail::dtype_name(t.scalar_type()));
}

inline void check_finite_positive(const char* op, const char* arg, double value) {
  DSINF_CHECK_ARG(std::isfinite(value) && value > 0, op, arg, "must be finite and > 0, got ", value);
}

// A per-channel vector [H] over the last dim of `input` (a norm's gamma): on its device, of its dtype.
// Returns H.
inline int64_t check_channel_vector(const char* op, const char* arg, const at::Tensor& v, const at::Tensor& input) {
  const int64_t H = input.size(-1);
  check_tensor(op, arg, v);
  check_same_device(op, arg, v, input);
  check_dtype(op, arg, v, input.scalar_type(), " (same as the input)");
  DSINF_CHECK_ARG(v.dim() == 1 && v.size(0) == H, op, arg, "expected shape (", H, ",) to match the hidden size H=", H,
                  ", got ", detail::shape_str(v));
  return H;
}

// `t` has the device, dtype and shape of `x` (an activation the messages call `x_name`).
inline void check_like(const char* op, const char* arg, const at::Tensor& t, const at::Tensor& x,
                       const char* x_name) {
  check_tensor(op, arg, t);
  check_same_device(op, arg, t, x);
  check_dtype(op, arg, t, x.scalar_type(), detail::cat(" (same as ", x_name, ")"));
  DSINF_CHECK_ARG(t.sizes() == x.sizes(), op, arg, "expected shape ", detail::shape_str(x), " (same as ", x_name,
                  "), got ", detail::shape_str(t));
}

// A 2-D contiguous weight on the input's device: int8 when `q_int8`, else of the input's dtype.
inline void check_weight(const char* op, const char* arg, const at::Tensor& w, const at::Tensor& input, bool q_int8) {
  using detail::dtype_name;
  check_tensor(op, arg, w);
  check_same_device(op, arg, w, input);
  DSINF_CHECK_ARG(w.dim() == 2, op, arg, "expected a 2-D tensor, got shape ", detail::shape_str(w));
  DSINF_CHECK_ARG(w.is_contiguous(), op, arg, "must be contiguous (call .contiguous() once at load time, not per call)");
  const bool is_int8 = w.scalar_type() == c10::ScalarType::Char;
  DSINF_CHECK_ARG(!q_int8 || is_int8, op, arg, "q_int8=True needs an int8 weight, got ", dtype_name(w.scalar_type()));
  DSINF_CHECK_ARG(q_int8 || w.scalar_type() == input.scalar_type(), op, arg, "expected dtype ",
                  dtype_name(input.scalar_type()), " (same as input), got ", dtype_name(w.scalar_type()),
                  is_int8 ? ": pass q_int8=True with its scales" : "");
}

// A weight read as [N, K] (`nk`) or [K, N] takes the input's hidden size K; returns its N outputs. `note`
// ends the message, e.g. " (transposed_mode=True, q_int8=False)".
inline int64_t check_weight_inputs(const char* op, const char* arg, const at::Tensor& w, bool nk, int64_t K,
                                   const std::string& note) {
  const int64_t N = w.size(nk ? 0 : 1), Kw = w.size(nk ? 1 : 0);
  DSINF_CHECK_ARG(Kw == K, op, arg, "shape ", detail::shape_str(w), " read as ", nk ? "[N, K]" : "[K, N]", " has K=",
                  Kw, ", but the input has hidden size ", K, note);
  return N;
}

// A weight read as [N, K] (`nk`) or [K, N] has N outputs and K inputs; `names` says what they are, e.g.
// "K=8 outputs and I=4 inputs".
inline void check_weight_shape(const char* op, const char* arg, const at::Tensor& w, bool nk, int64_t N, int64_t K,
                               const std::string& names) {
  DSINF_CHECK_ARG(w.size(nk ? 0 : 1) == N && w.size(nk ? 1 : 0) == K, op, arg, "expected shape (", nk ? N : K, ", ",
                  nk ? K : N, ") (", nk ? "[N, K]" : "[K, N]", " with ", names, "), got ", detail::shape_str(w));
}

// float32 [G] scales of the N rows of an int8 weight (`weight_name`), G | N. Returns G.
inline int64_t check_row_scales(const char* op, const char* arg, const c10::optional<at::Tensor>& q_scale,
                                const at::Tensor& input, int64_t N, const char* weight_name) {
  DSINF_CHECK_ARG(q_scale.has_value() && q_scale->defined() && q_scale->numel() > 0, op, arg,
                  "q_int8=True needs the float32 scales of ", weight_name);
  const at::Tensor& qs = *q_scale;
  check_dtype(op, arg, qs, c10::ScalarType::Float);
  check_same_device(op, arg, qs, input);
  DSINF_CHECK_ARG(qs.dim() == 1, op, arg, "expected a 1-D [G] tensor, got shape ", detail::shape_str(qs));
  DSINF_CHECK_ARG(qs.is_contiguous(), op, arg, "must be contiguous");
  const int64_t groups = qs.size(0);
  DSINF_CHECK_ARG(N % groups == 0, op, arg, "G=", groups, " groups do not divide the N=", N, " rows of ", weight_name);
  return groups;
}

}  // namespace dsinf
