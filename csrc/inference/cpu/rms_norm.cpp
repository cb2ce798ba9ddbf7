// RMSNorm and residual-add + RMSNorm, torch-free (helpers: cpu_simd.h; types: cpu_kernels.h).
//
// Launchers (the binding declares them itself; x, residual, gamma, out, res_out contiguous [rows, H] / [H],
// all of `dtype` F32, F16 or BF16; rows == 0 or H == 0 is a no-op):
//
//   extern "C" dsinf_status dsinf_cpu_rms_norm(const void* x, const void* gamma, dsinf_dtype dtype,
//                                              int64_t rows, int64_t H, float epsilon, void* out,
//                                              dsinf_parallel_fn pf);
//       out[r, i] = round(x[r, i] * rsqrt(mean_i(x[r, i]^2) + epsilon) * gamma[i])
//
//   extern "C" dsinf_status dsinf_cpu_pre_rms_norm(const void* x, const void* residual, const void* gamma,
//                                                  dsinf_dtype dtype, int64_t rows, int64_t H, float epsilon,
//                                                  void* out, void* res_out, dsinf_parallel_fn pf);
//       res_out[r, i] = round(x[r, i] + residual[r, i])       (sum in fp32, rounded to dtype)
//       out[r, :]     = rms_norm(res_out[r, :])               (the norm reads the rounded sum, like DeepSpeed)
//
// fp32 accumulation of the sum of squares (vector lanes, summed at the end of the row), one rounding per
// output. One pass over memory per row: x and residual are read once; the second sweep (scale and
// store) re-reads the row just touched - x, or res_out for pre_rms_norm - from L1/L2, not DRAM.
// Parallel over rows; a row is never split, so results do not depend on the thread count. With few
// rows (decode: 1..8) and a long row the work is tiny (microseconds) and runs on the calling thread.
#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_simd.h"

namespace dsinf_cpu {
namespace {

// Rows per parallel task: about 64 KB of row data per task amortises a fork.
int64_t rms_grain(int64_t H, size_t elem) {
  return std::max<int64_t>(1, (int64_t(64) << 10) / std::max<int64_t>(1, H * int64_t(elem)));
}

template <class T>
float sum_squares(const T* x, int64_t H) {
  vf a0 = vzero(), a1 = vzero();
  int64_t i = 0;
  for (; i + 2 * kW <= H; i += 2 * kW) {
    const vf v0 = vload(x + i), v1 = vload(x + i + kW);
    a0 = vfma(v0, v0, a0);
    a1 = vfma(v1, v1, a1);
  }
  for (; i + kW <= H; i += kW) {
    const vf v = vload(x + i);
    a0 = vfma(v, v, a0);
  }
  if (i < H) {
    const vf v = vload_part(x + i, H - i);
    a1 = vfma(v, v, a1);
  }
  return vsum(vadd(a0, a1));
}

// out[i] = round(x[i] * inv * g[i]), g in fp32.
template <class T>
void scale_row(const T* x, const float* g, float inv, int64_t H, T* out) {
  const vf s = vset1(inv);
  int64_t i = 0;
  for (; i + kW <= H; i += kW) vstore(out + i, vmul(vmul(vload(x + i), s), vload(g + i)));
  if (i < H) vstore_part(out + i, vmul(vmul(vload_part(x + i, H - i), s), vload_part(g + i, H - i)), H - i);
}

// res[i] = round(x[i] + r[i]).
template <class T>
void add_row(const T* x, const T* r, int64_t H, T* res) {
  int64_t i = 0;
  for (; i + kW <= H; i += kW) vstore(res + i, vadd(vload(x + i), vload(r + i)));
  if (i < H) vstore_part(res + i, vadd(vload_part(x + i, H - i), vload_part(r + i, H - i)), H - i);
}

inline float inv_rms(float sum_sq, int64_t H, float epsilon) {
  return 1.0f / std::sqrt(sum_sq / float(H) + epsilon);
}

template <class T>
void rms_norm_rows(const T* x, const T* residual, const float* g, int64_t rows, int64_t H, float epsilon, T* out,
                   T* res_out, dsinf_parallel_fn pf) {
  parallel_for(pf, rows, rms_grain(H, sizeof(T)), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const T* src = x + r * H;
      if (residual) {
        // The rounded sum is what gets normalised: write it, then both sweeps read it back from L1.
        add_row(src, residual + r * H, H, res_out + r * H);
        src = res_out + r * H;
      }
      scale_row(src, g, inv_rms(sum_squares(src, H), H, epsilon), H, out + r * H);
    }
  });
}

dsinf_status rms_norm_any(const void* x, const void* residual, const void* gamma, dsinf_dtype dtype, int64_t rows,
                          int64_t H, float epsilon, void* out, void* res_out, dsinf_parallel_fn pf) {
  if (dtype != DSINF_F32 && dtype != DSINF_F16 && dtype != DSINF_BF16) return DSINF_UNSUPPORTED;
  if (residual && !res_out) return DSINF_UNSUPPORTED;
  if (rows <= 0 || H <= 0) return DSINF_OK;
  AlignedBuffer<float> g(static_cast<size_t>(H));
  load_row_any(g.data(), gamma, dtype, H);
  with_float_type(dtype, out, [&](auto* o) {
    using T = std::remove_pointer_t<decltype(o)>;
    rms_norm_rows(static_cast<const T*>(x), static_cast<const T*>(residual), g.data(), rows, H, epsilon, o,
                  static_cast<T*>(res_out), pf);
  });
  return DSINF_OK;
}

}  // namespace
}  // namespace dsinf_cpu

extern "C" DSINF_CPU_API dsinf_status dsinf_cpu_rms_norm(const void* x, const void* gamma, dsinf_dtype dtype,
                                                         int64_t rows, int64_t H, float epsilon, void* out,
                                                         dsinf_parallel_fn pf) {
  return dsinf_cpu::rms_norm_any(x, nullptr, gamma, dtype, rows, H, epsilon, out, nullptr, pf);
}

extern "C" DSINF_CPU_API dsinf_status dsinf_cpu_pre_rms_norm(const void* x, const void* residual, const void* gamma,
                                                             dsinf_dtype dtype, int64_t rows, int64_t H,
                                                             float epsilon, void* out, void* res_out,
                                                             dsinf_parallel_fn pf) {
  if (residual == nullptr) return DSINF_UNSUPPORTED;
  return dsinf_cpu::rms_norm_any(x, residual, gamma, dtype, rows, H, epsilon, out, res_out, pf);
}
