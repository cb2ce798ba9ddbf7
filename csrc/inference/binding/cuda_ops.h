// The CUDA binding's op entries: their declarations (op_entries.inc, shared with the CPU binding), all a
// registration needs (see cuda_binding.h for why the bodies and the registrations are in separate files).
// Bodies: cuda_binding_ops.cpp (linear_layer, vector_matmul), cuda_binding_ops_norm_mlp.cpp (the others).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <tuple>
#include <vector>

namespace dsinf {
namespace cuda_binding {

#include "op_entries.inc"

}  // namespace cuda_binding
}  // namespace dsinf
