// The CPU binding's op entries (op_entries.inc, shared with the CUDA binding) and the oneDNN linear its GEMM path
// calls: their declarations, shared by its two files.
//
// Why two files: the binding is the CPU build's slowest compile, so on a machine with a core per source it
// bounds the build. torch/library.h alone takes ~4.5 s to parse (g++ 12, -O3) and the op bodies do not need it;
// only the registrations (and the dispatcher's boxed call of oneDNN's linear) do. As one file the binding took
// 9.2 s on this repository's CI box; as the bodies (cpu_binding_ops.cpp, 4.6 s: ATen's Tensor headers and
// the code) and the registrations (cpu_binding.cpp, 6.3 s) its slowest half is 6.3 s. (Halves that each
// kept torch/library.h took 8.0 and 7.8 s, which is why the binding stayed one file until this split.) On a
// 16-core H100 host a cold CPU build took 6.5-7.1 s instead of 8.0-8.4 s (docs/PERFORMANCE.md, run 166); on
// two cores it takes ~1.3 s longer (one more header parse).
//
// Hidden: the two files link into one module and nothing outside it calls these, so they are not exported
// (both modules are loaded RTLD_GLOBAL into one process), and calls between them bind directly.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <tuple>
#include <vector>

namespace dsinf {
namespace __attribute__((visibility("hidden"))) cpu_binding {

// ---- the op entries (cpu_binding_ops.cpp), registered by cpu_binding.cpp ----------------------------------

#include "op_entries.inc"

// ---- oneDNN's fp32 linear (cpu_binding.cpp: a boxed call, which needs the dispatcher's headers) -----------

// Whether this torch has mkldnn::_linear_pointwise (looked up once).
bool onednn_linear_available();
// x [M, K] fp32 @ w_nk^T (+ bias) -> a fresh fp32 [M, N] on oneDNN; w_nk may be a strided view ([K, N]
// transposed): oneDNN reads either order. Only where onednn_linear_available().
at::Tensor onednn_linear(const at::Tensor& x, const at::Tensor& w_nk, const at::Tensor* bias);

}  // namespace cpu_binding
}  // namespace dsinf
