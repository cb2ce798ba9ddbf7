// Conversions around the large-M path: dsinf_cpu_weight_widen, dsinf_cpu_bias_cast
// (API in cpu_kernels.h).
//
// Large M is compute-bound and runs in BLAS (through ATen, from the binding). On CPUs without native
// bf16/fp16 GEMM, torch's bf16 mm is 2-5x slower than widening to fp32 and calling sgemm (measured on our
// AVX2 box), and fp32 keeps the "accumulate in fp32, round once" contract. So 16-bit and int8 weights are
// widened here, one block of output columns at a time (the binding sizes the block to stay in cache and
// reuses one buffer), then the fp32 result is biased and rounded once by bias_cast. Where the binding runs
// bf16 activations on torch's native bf16 GEMM, int8 weights are widened to bf16 instead.
//
//   weight_widen (layout_nk): dst[(n - n0) * K + k] = W(k, n)   (int8: w[n, k] * scale[n / (N/G)])
//   weight_widen ([K, N]):    dst[k * (n1 - n0) + n - n0] = W(k, n)
//   bias_cast:                out[m * ldo + n] = round_out(src[m * lds + n] + bias[n])
#include <algorithm>
#include <vector>

#include "cpu_simd.h"

namespace dsinf_cpu {
namespace {

// dst[i] = round_D(to_f32(src[i]) * s) for n elements.
template <class T, class D>
inline void widen_scaled(D* dst, const T* src, int64_t n, float s) {
  const vf sv = vset1(s);
  int64_t i = 0;
  for (; i + kW <= n; i += kW) vstore(dst + i, vmul(vload(src + i), sv));
  if (i < n) vstore_part(dst + i, vmul(vload_part(src + i, n - i), sv), n - i);
}

template <class T, class D>
void rows_widen(const T* w, int64_t K, int64_t n0, int64_t n1, const float* scale, int64_t rows_per_group, D* dst,
                dsinf_parallel_fn pf) {
  const int64_t grain = std::max<int64_t>(1, (256 << 10) / std::max<int64_t>(1, K * 4));
  parallel_for(pf, n1 - n0, grain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t n = n0 + i;
      widen_scaled(dst + i * K, w + n * K, K, scale ? scale[n / rows_per_group] : 1.0f);  // x 1.0f is exact
    }
  });
}

template <class T>
void cols_widen(const T* w, int64_t K, int64_t N, int64_t n0, int64_t n1, float* dst, dsinf_parallel_fn pf) {
  const int64_t nb = n1 - n0;
  const int64_t grain = std::max<int64_t>(1, (256 << 10) / std::max<int64_t>(1, nb * 4));
  parallel_for(pf, K, grain, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) load_row(dst + k * nb, w + k * N + n0, nb);
  });
}

template <class T>
void bias_cast_impl(const float* src, int64_t M, int64_t N, int64_t lds, const T* bias, T* out, int64_t ldo,
                    dsinf_parallel_fn pf) {
  // Units of (row, chunk of columns) so that M = 1 still spreads over threads.
  constexpr int64_t kChunk = 2048;
  const int64_t chunks = (N + kChunk - 1) / kChunk;
  AlignedBuffer<float> bias_f(bias ? size_t(N) : 0);
  if (bias) {
    load_row(bias_f.data(), bias, N);
  }
  const float* bf = bias ? bias_f.data() : nullptr;
  parallel_for(pf, M * chunks, 8, [&](int64_t b, int64_t e) {
    float tmp[kChunk];
    for (int64_t u = b; u < e; ++u) {
      const int64_t m = u / chunks, c0 = (u % chunks) * kChunk;
      const int64_t cnt = std::min(kChunk, N - c0);
      const float* s = src + m * lds + c0;
      if (bf) {
        int64_t i = 0;
        for (; i + kW <= cnt; i += kW) vstore(tmp + i, vadd(vload(s + i), vload(bf + c0 + i)));
        for (; i < cnt; ++i) tmp[i] = s[i] + bf[c0 + i];
        s = tmp;
      }
      store_row(out + m * ldo + c0, s, cnt);
    }
  });
}

}  // namespace
}  // namespace dsinf_cpu

extern "C" dsinf_status dsinf_cpu_weight_widen(const dsinf_weight* w, int64_t n0, int64_t n1, void* dst,
                                               dsinf_dtype dst_dtype, dsinf_parallel_fn pf) {
  using namespace dsinf_cpu;
  if (n0 < 0 || n1 > w->N || n0 > n1) return DSINF_UNSUPPORTED;
  if (dst_dtype != DSINF_F32 && !(dst_dtype == DSINF_BF16 && w->dtype == DSINF_I8)) return DSINF_UNSUPPORTED;
  if (n0 == n1) return DSINF_OK;
  const int64_t K = w->K, N = w->N;
  switch (w->dtype) {
    case DSINF_I8: {
      if (!w->layout_nk || w->scale == nullptr || w->groups <= 0 || N % w->groups != 0) return DSINF_UNSUPPORTED;
      const auto* data = static_cast<const int8_t*>(w->data);
      if (dst_dtype == DSINF_BF16)
        rows_widen(data, K, n0, n1, w->scale, N / w->groups, static_cast<bf16_t*>(dst), pf);
      else
        rows_widen(data, K, n0, n1, w->scale, N / w->groups, static_cast<float*>(dst), pf);
      return DSINF_OK;
    }
    case DSINF_F32:
    case DSINF_F16:
    case DSINF_BF16: {
      float* out = static_cast<float*>(dst);
      auto run = [&](const auto* data) {
        if (w->layout_nk)
          rows_widen(data, K, n0, n1, nullptr, 1, out, pf);
        else
          cols_widen(data, K, N, n0, n1, out, pf);
      };
      if (w->dtype == DSINF_F32) run(static_cast<const float*>(w->data));
      else if (w->dtype == DSINF_F16) run(static_cast<const fp16_t*>(w->data));
      else run(static_cast<const bf16_t*>(w->data));
      return DSINF_OK;
    }
  }
  return DSINF_UNSUPPORTED;
}

extern "C" dsinf_status dsinf_cpu_bias_cast(const float* src, int64_t M, int64_t N, int64_t lds, const void* bias,
                                            void* out, dsinf_dtype out_dtype, int64_t ldo, dsinf_parallel_fn pf) {
  using namespace dsinf_cpu;
  if (M <= 0 || N <= 0) return DSINF_OK;
  const bool ok = with_float_type(out_dtype, out, [&](auto* o) {
    using T = std::remove_pointer_t<decltype(o)>;
    bias_cast_impl(src, M, N, lds, static_cast<const T*>(bias), o, ldo, pf);
  });
  return ok ? DSINF_OK : DSINF_UNSUPPORTED;
}
