// The ATen functions the bindings call, defined exactly as ATen/ops/<op>.h defines them (inline calls of
// the operator's at::_ops entry), from the light ATen/ops/<op>_ops.h. The full per-operator headers add
// ATen/Context.h and more: about 56k of a binding's 190k preprocessed lines, and the bindings are the
// slowest compiles of a cold build (docs/ARCHITECTURE.md, "Build time"). Names no op of ours.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm_ops.h>
#include <ATen/ops/copy_ops.h>
#include <ATen/ops/empty_ops.h>
#include <ATen/ops/mm_ops.h>

namespace dsinf {
namespace aten {

inline at::Tensor empty(c10::IntArrayRef size, const at::TensorOptions& options) {
  return at::_ops::empty_memory_format::call(
      c10::fromIntArrayRefSlow(size), c10::optTypeMetaToScalarType(options.dtype_opt()), options.layout_opt(),
      options.device_opt(), options.pinned_memory_opt(),
      c10::impl::check_tensor_options_and_extract_memory_format(options, std::nullopt));
}

inline at::Tensor mm(const at::Tensor& self, const at::Tensor& mat2) { return at::_ops::mm::call(self, mat2); }

inline at::Tensor addmm(const at::Tensor& self, const at::Tensor& mat1, const at::Tensor& mat2) {
  return at::_ops::addmm::call(self, mat1, mat2, 1, 1);
}

inline at::Tensor& mm_out(at::Tensor& out, const at::Tensor& self, const at::Tensor& mat2) {
  return at::_ops::mm_out::call(self, mat2, out);
}

inline at::Tensor& copy_(at::Tensor& self, const at::Tensor& src) {
  return at::_ops::copy_::call(self, src, false);
}

inline at::Tensor& addmm_out(at::Tensor& out, const at::Tensor& self, const at::Tensor& mat1, const at::Tensor& mat2) {
  return at::_ops::addmm_out::call(self, mat1, mat2, 1, 1, out);
}

}  // namespace aten
}  // namespace dsinf
