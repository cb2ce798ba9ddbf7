// Registers rms_norm, pre_rms_norm and rms_mlp_gemm on CUDA; their bodies are in
// cuda_binding_ops_norm_mlp.cpp (cuda_binding.h says why the files are split so).
#include <torch/library.h>

#include "cuda_ops.h"
#include "define_ops.h"

// Schemas are defined from Python (dsinf.library, from the op specs) before this library is loaded.
// One line per op; cuda_binding.cpp registers the others.
TORCH_LIBRARY_IMPL(dsinf, CUDA, m) {
  namespace cb = dsinf::cuda_binding;
  m.impl("rms_norm", &cb::rms_norm);
  m.impl("pre_rms_norm", &cb::pre_rms_norm);
  dsinf::impl_per_dtype(m, "rms_mlp_gemm", &cb::rms_mlp_gemm, dsinf::kCudaDtypes);
}
