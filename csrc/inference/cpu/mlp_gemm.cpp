// Gated MLP pieces of rms_mlp_gemm, torch-free (helpers: cpu_simd.h; types: cpu_kernels.h).
//
// Launchers (the binding declares them itself). `activation` is DeepSpeed's ActivationFuncType value:
// 3 = GATED_GELU (exact erf GELU, as DeepSpeed's gated kernel), 4 = GATED_SILU; anything else -> UNSUPPORTED.
//
//   extern "C" dsinf_status dsinf_cpu_gated_gemv(const void* x, dsinf_dtype x_dtype, int64_t M, int64_t ldx,
//                                                const dsinf_weight* w, int activation, void* out, int64_t ldo,
//                                                dsinf_parallel_fn pf);
//       Decode (small M) gate/up projection with the activation in its epilogue:
//         t[m, n]   = sum_k x[m, k] * W(k, n)  (* scale[n / (2I / G)] for int8),  W logical [K, 2I] (w->N = 2I)
//         out[m, j] = round( act(t[m, I + j]) * t[m, j] ),  0 <= j < I   (up = first half, gate = second)
//       x: F32/F16/BF16 [M, K] (row stride ldx); w: same float dtype in either layout, or I8 [2I, K];
//       out: x_dtype [M, I] (row stride ldo). The [M, 2I] product never exists: output j computes the dot
//       products of weight rows j and I + j together ([N, K]) or walks up and gate column stripes side by
//       side ([K, N]) and writes only act(gate) * up. M == 0 is a no-op.
//
//   extern "C" dsinf_status dsinf_cpu_gated_act(const void* src, dsinf_dtype src_dtype, int64_t M, int64_t I,
//                                               int64_t lds, int activation, void* out, dsinf_dtype out_dtype,
//                                               int64_t ldo, dsinf_parallel_fn pf);
//       Large-M epilogue after a GEMM into a [M, 2I] buffer (fp32 or the activation dtype):
//         out[m * ldo + j] = round( act(src[m * lds + I + j]) * src[m * lds + j] )
//
// Parallel split is fixed by the shapes, never by the thread count, so results are reproducible.
#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_simd.h"

namespace dsinf_cpu {
namespace {

constexpr int kGatedGelu = 3;  // DeepSpeed ActivationFuncType.GATED_GELU
constexpr int kGatedSilu = 4;  // DeepSpeed ActivationFuncType.GATED_SILU

inline float gated(int activation, float gate, float up) {
  const float a = activation == kGatedSilu ? gate / (1.0f + std::exp(-gate))
                                           : 0.5f * gate * (1.0f + std::erf(gate * 0.70710678118654752f));
  return a * up;
}

#if DSINF_SIMD_AVX512
constexpr int kRows = 4;  // rows of x per tile: 4 weight rows x 4 = 16 zmm accumulators
#else
constexpr int kRows = 3;  // 16 ymm: 12 accumulators + 4 weight vectors
#endif

// ---------------------------------------------------------------- [N, K]: paired dot products

// res[r * MR + m] = sum_k w[r][k] * x[m * ldx + k] for the 4 weight rows (up j, up j+1, gate I+j, gate I+j+1).
// `stream` (the first row block of x; the others find the rows in cache): each row prefetches, into L2, the same
// k of the unit two ahead (4 rows further), one per 64-byte line, as the plain GEMV's tiles do (gemv.cpp,
// prefetch_ahead): the 4 row streams start afresh at every unit. Past the last row a prefetch is a no-op.
template <class TW, int MR>
void dot4(const TW* const (&w)[4], int64_t K, const float* x, int64_t ldx, float* res, bool stream) {
  vf a[4][MR];
  for (int r = 0; r < 4; ++r)
    for (int m = 0; m < MR; ++m) a[r][m] = vzero();
  int64_t k = 0;
  for (; k + kW <= K; k += kW) {
    if (stream)
      for (int r = 0; r < 4; ++r) prefetch_l2_lines(w[r] + 4 * K, k, kW);
    vf wv[4];
    for (int r = 0; r < 4; ++r) wv[r] = vload(w[r] + k);
    for (int m = 0; m < MR; ++m) {
      const vf xv = vload(x + m * ldx + k);
      for (int r = 0; r < 4; ++r) a[r][m] = vfma(wv[r], xv, a[r][m]);
    }
  }
  if (k < K) {
    vf wv[4];
    for (int r = 0; r < 4; ++r) wv[r] = vload_part(w[r] + k, K - k);
    for (int m = 0; m < MR; ++m) {
      const vf xv = vload_part(x + m * ldx + k, K - k);
      for (int r = 0; r < 4; ++r) a[r][m] = vfma(wv[r], xv, a[r][m]);
    }
  }
  for (int r = 0; r < 4; ++r)
    for (int m = 0; m < MR; ++m) res[r * MR + m] = vsum(a[r][m]);
}

template <class TW>
void dot4_rows(const TW* const (&w)[4], int64_t K, const float* x, int64_t ldx, int mr, float* res, bool stream) {
  switch (mr) {
    case 1: dot4<TW, 1>(w, K, x, ldx, res, stream); break;
    case 2: dot4<TW, 2>(w, K, x, ldx, res, stream); break;
    case 3: dot4<TW, 3>(w, K, x, ldx, res, stream); break;
#if DSINF_SIMD_AVX512
    case 4: dot4<TW, 4>(w, K, x, ldx, res, stream); break;
#endif
    default: break;
  }
}

struct GatedOut {
  void* out;
  dsinf_dtype dtype;
  int64_t ldo;
  int activation;
  void put(int64_t m, int64_t j, float gate, float up) const {
    const float v = gated(activation, gate, up);
    with_float_type(dtype, out, [&](auto* o) {
      using T = std::remove_pointer_t<decltype(o)>;
      o[m * ldo + j] = from_f32<T>(v);
    });
  }
};

// Units are pairs of outputs (j, j + 1); an odd I's last unit repeats row j and stores one output.
template <class TW>
void gated_nk(const float* x, int64_t M, int64_t ldx, const TW* w, int64_t K, int64_t I, const float* scale,
              int64_t rows_per_group, const GatedOut& out, dsinf_parallel_fn pf) {
  const int64_t units = (I + 1) / 2;
  const int64_t grain = std::max<int64_t>(1, (int64_t(64) << 10) / std::max<int64_t>(1, 4 * K * int64_t(sizeof(TW))));
  parallel_for(pf, units, grain, [&](int64_t ub, int64_t ue) {
    float res[4 * kRows];
    for (int64_t u = ub; u < ue; ++u) {
      const int64_t j = 2 * u;
      const int pair = j + 1 < I ? 2 : 1;
      const int64_t rows[4] = {j, j + pair - 1, I + j, I + j + pair - 1};
      const TW* const wr[4] = {w + rows[0] * K, w + rows[1] * K, w + rows[2] * K, w + rows[3] * K};
      float s[4] = {1.0f, 1.0f, 1.0f, 1.0f};
      if (scale)
        for (int r = 0; r < 4; ++r) s[r] = scale[rows[r] / rows_per_group];
      for (int64_t m0 = 0; m0 < M; m0 += kRows) {
        const int mr = int(std::min<int64_t>(kRows, M - m0));
        dot4_rows(wr, K, x + m0 * ldx, ldx, mr, res, m0 == 0);
        for (int m = 0; m < mr; ++m)
          for (int p = 0; p < pair; ++p) out.put(m0 + m, j + p, res[(2 + p) * mr + m] * s[2 + p], res[p * mr + m] * s[p]);
      }
    }
  });
}

// ---------------------------------------------------------------- [K, N]: up and gate stripes side by side

// For each column c < nc: up[m][c] += sum_{i<KB} x[m][i] * wu[i*ld + c], gate likewise with wg
// (KB weight rows of both halves per pass, so each accumulator vector is loaded and stored once per KB rows).
template <class TW, int KB>
void axpy_up_gate(const TW* wu, const TW* wg, int64_t ld, int64_t nc, const float* x, int64_t ldx, int64_t M,
                  float* up, float* gate, int64_t ldacc) {
  for (int64_t c = 0; c < nc; c += kW) {
    const int64_t n = std::min<int64_t>(kW, nc - c);
    vf u[KB], g[KB];
    for (int i = 0; i < KB; ++i) {
      u[i] = n == kW ? vload(wu + i * ld + c) : vload_part(wu + i * ld + c, n);
      g[i] = n == kW ? vload(wg + i * ld + c) : vload_part(wg + i * ld + c, n);
    }
    for (int64_t m = 0; m < M; ++m) {
      float* au = up + m * ldacc + c;  // rows padded to whole vectors: see ldacc
      float* ag = gate + m * ldacc + c;
      vf vu = vload(au), vg = vload(ag);
      for (int i = 0; i < KB; ++i) {
        const vf xv = vset1(x[m * ldx + i]);
        vu = vfma(xv, u[i], vu);
        vg = vfma(xv, g[i], vg);
      }
      vstore(au, vu);
      vstore(ag, vg);
    }
  }
}

// Tasks are stripes of sw output columns: a task streams its sw-wide run of every weight row from both
// halves ([K, 2I] rows: up columns c0.., gate columns I + c0..), with M x sw fp32 accumulators per half in L1/L2.
template <class TW>
void gated_kn(const float* x, int64_t M, int64_t ldx, const TW* w, int64_t K, int64_t I, const GatedOut& out,
              dsinf_parallel_fn pf) {
  const int64_t N = 2 * I;
  int64_t sw = std::min<int64_t>(2048, std::max<int64_t>(64, 4096 / std::max<int64_t>(M, 1)));
  sw = std::min(sw, std::max<int64_t>(kW, (I + 15) / 16));  // >= 16 tasks when I allows it
  sw = (sw + kW - 1) / kW * kW;
  const int64_t stripes = (I + sw - 1) / sw;
  const int64_t ldacc = sw + kW;  // a whole extra vector: tails load/store full vectors
  parallel_for(pf, stripes, 1, [&](int64_t sb, int64_t se) {
    AlignedBuffer<float> acc(size_t(2 * M * ldacc));
    AlignedBuffer<float> row(static_cast<size_t>(sw));
    float* up = acc.data();
    float* gate = up + M * ldacc;
    for (int64_t st = sb; st < se; ++st) {
      const int64_t c0 = st * sw, nc = std::min(sw, I - c0);
      std::fill(acc.data(), acc.data() + 2 * M * ldacc, 0.0f);
      int64_t k = 0;
      for (; k + 4 <= K; k += 4)
        axpy_up_gate<TW, 4>(w + k * N + c0, w + k * N + I + c0, N, nc, x + k, ldx, M, up, gate, ldacc);
      for (; k < K; ++k) axpy_up_gate<TW, 1>(w + k * N + c0, w + k * N + I + c0, N, nc, x + k, ldx, M, up, gate, ldacc);
      for (int64_t m = 0; m < M; ++m) {
        for (int64_t c = 0; c < nc; ++c) row.data()[c] = gated(out.activation, gate[m * ldacc + c], up[m * ldacc + c]);
        with_float_type(out.dtype, out.out, [&](auto* o) { store_row(o + m * out.ldo + c0, row.data(), nc); });
      }
    }
  });
}

}  // namespace
}  // namespace dsinf_cpu

extern "C" DSINF_CPU_API dsinf_status dsinf_cpu_gated_gemv(const void* x, dsinf_dtype x_dtype, int64_t M,
                                                           int64_t ldx, const dsinf_weight* w, int activation,
                                                           void* out, int64_t ldo, dsinf_parallel_fn pf) {
  using namespace dsinf_cpu;
  const bool int8_w = w->dtype == DSINF_I8;
  if (!float_dtype(x_dtype) || !(w->dtype == x_dtype || int8_w) || w->N % 2 != 0 ||
      (activation != kGatedGelu && activation != kGatedSilu) ||
      (int8_w && (!w->layout_nk || w->scale == nullptr || w->groups <= 0 || w->N % w->groups != 0)))
    return DSINF_UNSUPPORTED;
  const int64_t K = w->K, I = w->N / 2;
  if (M <= 0 || I <= 0) return DSINF_OK;
  const GatedOut o{out, x_dtype, ldo, activation};

  // x widened once to fp32 (M * K floats: small at decode M); row stride padded off 4 KiB multiples so the
  // x rows and the weight rows of a tile do not share L1 sets.
  int64_t ldxf = (std::max<int64_t>(K, 1) + 15) / 16 * 16;
  if ((ldxf * 4) % 4096 == 0) ldxf += 16;
  AlignedBuffer<float> xbuf(size_t(M * ldxf));
  for (int64_t m = 0; m < M; ++m)
    load_row_any(xbuf.data() + m * ldxf, static_cast<const char*>(x) + size_t(m * ldx) * elem_bytes(x_dtype), x_dtype,
                 K);
  const float* xf = xbuf.data();
  if (int8_w) {
    gated_nk(xf, M, ldxf, static_cast<const int8_t*>(w->data), K, I, w->scale, w->N / w->groups, o, pf);
    return DSINF_OK;
  }
  with_float_type(w->dtype, const_cast<void*>(w->data), [&](auto* wd) {
    using TW = std::remove_pointer_t<decltype(wd)>;
    if (w->layout_nk) gated_nk(xf, M, ldxf, static_cast<const TW*>(wd), K, I, nullptr, 1, o, pf);
    else gated_kn(xf, M, ldxf, static_cast<const TW*>(wd), K, I, o, pf);
  });
  return DSINF_OK;
}

extern "C" DSINF_CPU_API dsinf_status dsinf_cpu_gated_act(const void* src, dsinf_dtype src_dtype, int64_t M,
                                                          int64_t I, int64_t lds, int activation, void* out,
                                                          dsinf_dtype out_dtype, int64_t ldo, dsinf_parallel_fn pf) {
  using namespace dsinf_cpu;
  if (!float_dtype(src_dtype) || !float_dtype(out_dtype) || (activation != kGatedGelu && activation != kGatedSilu))
    return DSINF_UNSUPPORTED;
  if (M <= 0 || I <= 0) return DSINF_OK;
  const char* sb = static_cast<const char*>(src);
  const size_t es = elem_bytes(src_dtype);
  const int64_t grain = std::max<int64_t>(1, 16384 / I);
  parallel_for(pf, M, grain, [&](int64_t b, int64_t e) {
    constexpr int64_t kChunk = 512;
    float up[kChunk], gate[kChunk];
    for (int64_t m = b; m < e; ++m) {
      const char* row = sb + size_t(m * lds) * es;
      for (int64_t c0 = 0; c0 < I; c0 += kChunk) {
        const int64_t n = std::min(kChunk, I - c0);
        load_row_any(up, row + size_t(c0) * es, src_dtype, n);
        load_row_any(gate, row + size_t(I + c0) * es, src_dtype, n);
        if (activation == kGatedSilu) {  // vectorized (vsilu); GELU's erf stays scalar
          int64_t c = 0;
          for (; c + kW <= n; c += kW) vstore(up + c, vmul(vsilu(vload(gate + c)), vload(up + c)));
          if (c < n) vstore_part(up + c, vmul(vsilu(vload_part(gate + c, n - c)), vload_part(up + c, n - c)), n - c);
        } else {
          for (int64_t c = 0; c < n; ++c) up[c] = gated(activation, gate[c], up[c]);
        }
        with_float_type(out_dtype, out, [&](auto* o) { store_row(o + m * ldo + c0, up, n); });
      }
    }
  });
  return DSINF_OK;
}
