// Registers linear_layer and vector_matmul (and their lean entries) on CUDA; their bodies are in
// cuda_binding_ops.cpp. This file and cuda_binding_norm_mlp.cpp are the only ones that include
// torch/library.h (cuda_binding.h says why).
#include <torch/library.h>

#include "cuda_ops.h"
#include "define_ops.h"

// Schemas are defined from Python (dsinf.library, from the op specs) before this library is loaded.
// One line per op; cuda_binding_norm_mlp.cpp registers the others.
TORCH_LIBRARY_IMPL(dsinf, CUDA, m) {
  using dsinf::kCudaDtypes;
  namespace cb = dsinf::cuda_binding;
  dsinf::impl_per_dtype(m, "linear_layer", &cb::linear_layer, kCudaDtypes);
  dsinf::impl_per_dtype(m, "linear_layer_lean", &cb::linear_layer_lean, kCudaDtypes);
  dsinf::impl_per_dtype(m, "vector_matmul_lean", &cb::vector_matmul_lean, kCudaDtypes);
  dsinf::impl_per_dtype(m, "vector_matmul", &cb::vector_matmul, kCudaDtypes);
}
