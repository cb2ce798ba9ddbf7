// What the op bodies of the CUDA binding share. The binding implements the dsinf:: ops on CUDA (schemas and
// semantics: the op specs, dsinf/ops/<op>.py) in four files:
//   cuda_binding_ops.cpp            linear_layer, vector_matmul (and their lean entries), the route table;
//   cuda_binding_ops_norm_mlp.cpp   rms_norm, pre_rms_norm, rms_mlp_gemm;
//   cuda_binding.cpp, cuda_binding_norm_mlp.cpp   their registrations, one line per op (cuda_ops.h declares
//                                   the entries).
// They are the only translation units of the CUDA module that include ATen. The bodies validate with
// validate.h and op_rules.h, allocate outputs with the torch allocator (fresh tensors, never workspace
// views), and run everything on torch's current stream of the input's device:
//
//   M = B*S <= crossover (decode): one GEMV launch (csrc/inference/cuda, tensor cores for fp16/bf16,
//       int8 dequantized in registers), bias fused;
//   M >  crossover (prefill): cuBLAS through ATen (at::addmm fuses the bias; [N, K] weights are
//       passed as w.t(), a free view); int8 weights are first dequantized into a temporary;
//   do_flash_attn: the [M, N] product goes to a temporary, then one kernel splits it per head,
//       applies RoPE and writes the final [3, B, H, S, D] tensor (or q, k, v for GQA).
//
// async_op is accepted and ignored: work is always ordered on the caller's current stream.
//
// Why four files: the binding bounds the module's cold build on a machine with a core per source.
// torch/library.h alone takes 4.8 s to parse (g++ 12), and each registration's boxing wrappers about 0.6 s
// more at -O3; the op bodies need neither. As two files of bodies and registrations the halves took 9.2 and
// 8.1 s (this repository's CI box, alone); as bodies (4.7, 4.3 s) and registrations (7.4, 7.3 s) the
// slowest is 7.4 s. On the H200 host, under the build (three cold builds each, alternated): the slowest
// binding compile 8.8-9.9 s as two files, 6.8-7.6 s as four; the cold build 10.1-11.1 s against 8.9-10.5 s,
// the gated MLP's mlp_gemm.cu (7.7-9.3 s) now its longest compile. (As one file: 7.8 s alone on that host.)
// Light headers for the same reason: aten_ops.h, and the generic c10::DeviceGuard (the same device switch
// through the CUDA guard torch registers) rather than c10/cuda/CUDAGuard.h, which adds the caching
// allocator's headers.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>

#include "../include/cuda_kernels.h"
#include "aten_ops.h"
#include "cuda_ops.h"
#include "validate.h"

// Both modules are loaded RTLD_GLOBAL into one process: what has external linkage here is in a namespace
// only the CUDA module uses.
namespace dsinf {
namespace cuda_binding {

namespace kc = dsinf::cuda;

inline kc::DType kernel_dtype(c10::ScalarType t) {
  switch (t) {
    case c10::ScalarType::Float: return kc::DType::kFloat32;
    case c10::ScalarType::Half: return kc::DType::kFloat16;
    default: return kc::DType::kBFloat16;
  }
}

inline void check_cuda(cudaError_t err, const char* op, const char* what) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA ", what, " failed: ", cudaGetErrorString(err));
}

// Input as a contiguous, 16-byte aligned tensor (the GEMV's vector loads need both; a copy of the
// activations is cheap next to the weight stream).
inline at::Tensor prepare_input(const at::Tensor& input) {
  at::Tensor x = input.contiguous();
  if (x.numel() > 0 && (reinterpret_cast<uintptr_t>(x.const_data_ptr()) & 15u) != 0) x = x.clone();
  return x;
}

// Reached when only an argument that is not read (e.g. q_scale with a float weight) is on CUDA.
inline void check_input_on_cuda(const char* op, const at::Tensor& input) {
  DSINF_CHECK_ARG(input.is_cuda(), op, "input", "expected a CUDA tensor, got device ", input.device());
}

// rms_mlp_gemm's gate|up `s` (K -> N = 2I outputs) at s.M() rows: true: the gated kernel; false: matmul()
// into [M, N], then the gated epilogue. The route table decides (its gated keys), else the compiled rule.
bool use_gated(c10::ScalarType act, const MatmulShape& s);

// out2d [M, N] (contiguous) = x2d @ W (+ bias): the GEMV for small M (the route table decides), cuBLAS
// otherwise. Defined in cuda_binding_ops.cpp, the file that owns the route table (use_gated too).
at::Tensor matmul(const char* op, const at::Tensor& x, const at::Tensor& weight, const at::Tensor* bias,
                  const c10::optional<at::Tensor>& q_scale, const MatmulShape& s, cudaStream_t stream);

}  // namespace cuda_binding
}  // namespace dsinf
