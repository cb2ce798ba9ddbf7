// Registration of per-dtype entry points, shared by both bindings; names no op.
//
// A binding implements each op once, dtype-generic, as
//   R op(const char* function_name, c10::ScalarType act, <the schema's arguments, in order>...)
// and registers it with one line per op:
//   dsinf::impl_per_dtype(m, "vector_matmul", &vector_matmul, dsinf::kFloatDtypes);
// which registers vector_matmul_fp32 / _fp16 / _bf16 (the functions dsinf.ops.spec defines from Python),
// each a kernel with the schema's exact C++ signature that calls op("vector_matmul_fp16", Half, args...).
// An op whose single function takes its dtype from the input is registered with a plain m.impl(name, &fn).
#pragma once

#include <c10/core/ScalarType.h>
#include <torch/library.h>

#include <cstddef>
#include <string>

namespace dsinf {

struct DtypeEntry {
  const char* suffix;  // "fp32" | "fp16" | "bf16" (dsinf.checks.FLOAT_DTYPES)
  c10::ScalarType scalar;
};

inline constexpr DtypeEntry kFloatDtypes[] = {
    {"fp32", c10::ScalarType::Float}, {"fp16", c10::ScalarType::Half}, {"bf16", c10::ScalarType::BFloat16}};
// The CUDA binding's: bf16 kernels need sm_80+, built only when every target has it (the build's
// -DDSINF_CUDA_BF16).
#if defined(DSINF_CUDA_BF16)
inline constexpr DtypeEntry kCudaDtypes[] = {kFloatDtypes[0], kFloatDtypes[1], kFloatDtypes[2]};
#else
inline constexpr DtypeEntry kCudaDtypes[] = {kFloatDtypes[0], kFloatDtypes[1]};
#endif

template <typename R, typename... Args, std::size_t N>
void impl_per_dtype(torch::Library& m, const char* op, R (*impl)(const char*, c10::ScalarType, Args...),
                    const DtypeEntry (&dtypes)[N]) {
  for (const DtypeEntry& d : dtypes) {
    const std::string name = std::string(op) + "_" + d.suffix;
    const c10::ScalarType act = d.scalar;
    m.impl(name.c_str(), [impl, act, name](Args... args) -> R { return impl(name.c_str(), act, args...); });
  }
}

}  // namespace dsinf
