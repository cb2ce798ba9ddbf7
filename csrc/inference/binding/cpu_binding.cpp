// Registers the CPU implementations of the dsinf:: ops (their bodies: cpu_binding_ops.cpp), and runs oneDNN's
// linear for their GEMM path through the dispatcher. The only file of the CPU module that includes
// torch/library.h (cpu_ops.h says why the binding is split so).
#include <ATen/Config.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

#include "cpu_ops.h"
#include "define_ops.h"

namespace dsinf {
namespace cpu_binding {
namespace {

// mkldnn::_linear_pointwise, the op torch's own frozen CPU linears run (cpu_binding_ops.cpp's onednn_fp32_gemm
// says when the binding takes it over MKL's GEMM).
const c10::OperatorHandle* onednn_linear_op() {
  static const c10::OperatorHandle* op = []() -> const c10::OperatorHandle* {
#if AT_MKLDNN_ENABLED()
    const auto h = c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
    if (h) return new c10::OperatorHandle(*h);  // leaked on purpose: lives as long as the process
#endif
    return nullptr;
  }();
  return op;
}

std::atomic<int64_t> g_onednn_fp32_calls{0};  // GEMMs run on oneDNN (tests: the path that ran)

}  // namespace

bool onednn_linear_available() { return onednn_linear_op() != nullptr; }

// A boxed call: its schema types (Scalar?[]) need no C++ spelling here.
at::Tensor onednn_linear(const at::Tensor& x, const at::Tensor& w_nk, const at::Tensor* bias) {
  std::vector<c10::IValue> stack;
  stack.reserve(6);
  stack.emplace_back(x);
  stack.emplace_back(w_nk);
  stack.emplace_back(bias ? c10::IValue(*bias) : c10::IValue());
  stack.emplace_back(std::string("none"));
  stack.emplace_back(c10::List<std::optional<c10::Scalar>>());
  stack.emplace_back(std::string(""));
  onednn_linear_op()->callBoxed(&stack);
  g_onednn_fp32_calls.fetch_add(1, std::memory_order_relaxed);
  return std::move(stack[0]).toTensor();
}

}  // namespace cpu_binding
}  // namespace dsinf

// How many GEMMs oneDNN has run in this process (dsinf/routes.py: Binding.onednn_fp32_calls).
extern "C" __attribute__((visibility("default"))) int64_t dsinf_cpu_onednn_fp32_calls() {
  return dsinf::cpu_binding::g_onednn_fp32_calls.load();
}

// Schemas are defined from Python (dsinf.library, from the op specs) before this library is loaded.
// One line per op; the bodies are in cpu_binding_ops.cpp.
TORCH_LIBRARY_IMPL(dsinf, CPU, m) {
  namespace cb = dsinf::cpu_binding;
  dsinf::impl_per_dtype(m, "linear_layer", &cb::linear_layer, dsinf::kFloatDtypes);
  dsinf::impl_per_dtype(m, "linear_layer_lean", &cb::linear_layer_lean, dsinf::kFloatDtypes);
  dsinf::impl_per_dtype(m, "vector_matmul_lean", &cb::vector_matmul_lean, dsinf::kFloatDtypes);
  dsinf::impl_per_dtype(m, "vector_matmul", &cb::vector_matmul, dsinf::kFloatDtypes);
  m.impl("rms_norm", &cb::rms_norm);
  m.impl("pre_rms_norm", &cb::pre_rms_norm);
  dsinf::impl_per_dtype(m, "rms_mlp_gemm", &cb::rms_mlp_gemm, dsinf::kFloatDtypes);
}
