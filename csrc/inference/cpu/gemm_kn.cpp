// GEMM over a [K, N] weight in place, in fp32: dsinf_cpu_gemm_kn (API in cpu_kernels.h).
//
//   y[m * ldy + n] = sum_k x[m * ldx + k] * W(k, n)      0 <= m < M, 0 <= n < N; x, y fp32;
//   W(k, n) = w[k * ldw + n], fp32 or a 16-bit float widened to fp32 as its panel is copied
//
// Why it exists: past the GEMV an AMD host runs fp32 on oneDNN's GEMM (cpu_binding_ops.cpp), whose fast
// path wants the weight as [N, K]. Handed DeepSpeed's [K, N] weight (a transposed view) it ran at 0.66-0.94x
// of its [N, K] speed (Zen 5, 2 threads, M = 16..512; at M = 128 289 against 423 GFLOP/s on 4096x12288, the
// fused-QKV shape; docs/PERFORMANCE.md, "CPU: an fp32 GEMM for [K, N] weights"). Here vectors run along n, so
// a row of a [K, N] weight is exactly what the register tile wants: no transpose anywhere. A 16-bit weight
// widens to fp32 in the same copy (where the library's path widened it into blocks for oneDNN first).
//
// Blocking (BLIS-style, sizes for a 48 KiB L1 / 1 MiB L2 core):
//   x is copied once into panels of MR rows, [K/KC][ceil(M/MR)][KC][MR] (rows past M zero), so a tile
//   reads its MR broadcasts from one short contiguous run per k.
//   Parallel over units of 4 column panels (256 columns with AVX-512; of one panel where N < 16 panels, so a
//   narrow output still spreads over threads): the split is fixed by the shape, never by the thread count,
//   and each output sums its k in order, so results do not depend on the threads. Units of one panel ran
//   up to 11% slower on wide outputs; narrow ones (N < 1024) run 0.40-1.03x of oneDNN's either way (4096x64 ..
//   4096x512, M = 16..512: too few panels to keep both threads on the math), so the binding leaves them to it.
//   Per panel, per KC slice of k: the first row tile reads the KC weight rows from memory and copies them
//   into a KC x NR fp32 buffer as it multiplies (KC x NR x 4 = 64 KiB with AVX-512, L2-resident; 16-bit
//   weights widen there, in registers), every other row tile of x reads that buffer. The weight is read from
//   memory once per call.
//   The MR x NR output tile stays in registers over a KC slice; it is loaded and stored between slices.
// Register tile MR x NV vectors: AVX-512 6 x 4 zmm (24 accumulators + 4 weight vectors + 1 broadcast of
// 32 registers), AVX2 6 x 2 ymm (12 + 2 + 1 of 16), scalar 6 x 4. Of 6x4, 8x3 and 12x2 zmm tiles, 6x4 ran
// fastest (385 against 356 GFLOP/s, 4096x12288, M = 128). Copying the panel as the first tile reads it ran
// 1-4% faster than copying it before; software prefetch of the next panel or block, into L1 or L2, ran 1-14%
// slower. What is left against the 537 GFLOP/s the two cores' FMAs reach: the tile alone, over a panel
// already copied, ran at 81-83% of it, and the weight's one read from memory (201 MB at 25-36 GB/s) is not
// fully hidden behind the math.
// Ragged edges (M not a multiple of MR, N of NR) run the same tile on a zero-padded copy.
#include <algorithm>
#include <cstring>

#include "cpu_simd.h"

namespace dsinf_cpu {
namespace {

constexpr int64_t kMR = 6;
#if DSINF_SIMD_AVX2
constexpr int64_t kNV = 2;
#else
constexpr int64_t kNV = 4;
#endif
constexpr int64_t kNR = kNV * kW;
constexpr int64_t kKC = 256;

// c[MR x NR tile, row stride ldc] (+)= ap[KC][MR] x panel[KC][NR]. With kCopy the panel is read from the
// weight (row stride ldw) and stored into bp; else it is read from bp. `first`: the tile starts at zero.
template <bool kCopy, class TW>
void tile(int64_t kc, const float* __restrict ap, const TW* __restrict w, int64_t ldw, float* __restrict bp,
          float* c, int64_t ldc, bool first) {
  vf acc[kMR][kNV];
  for (int64_t i = 0; i < kMR; ++i)
    for (int64_t j = 0; j < kNV; ++j) acc[i][j] = first ? vzero() : vload(c + i * ldc + j * kW);
  for (int64_t k = 0; k < kc; ++k) {
    vf b[kNV];
    for (int64_t j = 0; j < kNV; ++j) {
      if (kCopy) {
        b[j] = vload(w + k * ldw + j * kW);
        vstore(bp + k * kNR + j * kW, b[j]);
      } else {
        b[j] = vload(bp + k * kNR + j * kW);
      }
    }
    for (int64_t i = 0; i < kMR; ++i) {
      const vf a = vset1(ap[k * kMR + i]);
      for (int64_t j = 0; j < kNV; ++j) acc[i][j] = vfma(a, b[j], acc[i][j]);
    }
  }
  for (int64_t i = 0; i < kMR; ++i)
    for (int64_t j = 0; j < kNV; ++j) vstore(c + i * ldc + j * kW, acc[i][j]);
}

// x [M, K] -> panels [K/KC][P][kc][MR] (P = ceil(M/MR); rows past M zero: the buffer comes zeroed).
void pack_x(const float* x, int64_t M, int64_t K, int64_t ldx, float* xp, dsinf_parallel_fn pf) {
  const int64_t P = (M + kMR - 1) / kMR;
  parallel_for(pf, P, 1, [&](int64_t pb, int64_t pe) {
    for (int64_t p = pb; p < pe; ++p) {
      const int64_t rows = std::min(kMR, M - p * kMR);
      for (int64_t k0 = 0; k0 < K; k0 += kKC) {
        const int64_t kc = std::min(kKC, K - k0);
        float* dst = xp + k0 * P * kMR + p * kc * kMR;
        for (int64_t i = 0; i < rows; ++i) {
          const float* src = x + (p * kMR + i) * ldx + k0;
          for (int64_t k = 0; k < kc; ++k) dst[k * kMR + i] = src[k];
        }
      }
    }
  });
}

// Columns [n0, n0 + nr) of y (nr <= NR: one panel), all rows.
template <class TW>
void panel(const float* xp, int64_t M, int64_t K, const TW* w, int64_t ldw, float* y, int64_t ldy, int64_t n0,
           int64_t nr, float* bp) {
  const int64_t P = (M + kMR - 1) / kMR;
  float edge[kMR * kNR];  // a ragged tile's outputs, zero-padded
  for (int64_t k0 = 0; k0 < K; k0 += kKC) {
    const int64_t kc = std::min(kKC, K - k0);
    const bool first = k0 == 0;
    const float* xs = xp + k0 * P * kMR;
    const TW* wp = w + k0 * ldw + n0;
    if (nr < kNR) {  // ragged panel: copy it zero-padded, then every tile reads the copy
      for (int64_t k = 0; k < kc; ++k) {
        for (int64_t j = 0; j < nr; ++j) bp[k * kNR + j] = to_f32(wp[k * ldw + j]);
        std::memset(bp + k * kNR + nr, 0, size_t(kNR - nr) * sizeof(float));
      }
    }
    for (int64_t p = 0; p < P; ++p) {
      const int64_t mr = std::min(kMR, M - p * kMR);
      float* c = y + p * kMR * ldy + n0;
      const bool ragged = mr < kMR || nr < kNR;
      float* t = ragged ? edge : c;
      const int64_t ldt = ragged ? kNR : ldy;
      if (ragged && !first) {
        std::memset(edge, 0, sizeof(edge));
        for (int64_t i = 0; i < mr; ++i) std::memcpy(edge + i * kNR, c + i * ldy, size_t(nr) * sizeof(float));
      }
      if (p == 0 && nr == kNR)
        tile<true>(kc, xs + p * kc * kMR, wp, ldw, bp, t, ldt, first);
      else
        tile<false, TW>(kc, xs + p * kc * kMR, nullptr, 0, bp, t, ldt, first);
      if (ragged)
        for (int64_t i = 0; i < mr; ++i) std::memcpy(c + i * ldy, edge + i * kNR, size_t(nr) * sizeof(float));
    }
  }
}

}  // namespace
}  // namespace dsinf_cpu

extern "C" dsinf_status dsinf_cpu_gemm_kn(const float* x, int64_t M, int64_t K, int64_t ldx, const void* w,
                                          dsinf_dtype w_dtype, int64_t ldw, int64_t N, float* y, int64_t ldy,
                                          dsinf_parallel_fn pf) {
  using namespace dsinf_cpu;
  if (!float_dtype(w_dtype)) return DSINF_UNSUPPORTED;
  if (M <= 0 || N <= 0) return DSINF_OK;
  if (K <= 0) {
    for (int64_t m = 0; m < M; ++m) std::memset(y + m * ldy, 0, size_t(N) * sizeof(float));
    return DSINF_OK;
  }
  const int64_t P = (M + kMR - 1) / kMR;
  AlignedBuffer<float> xp(size_t(P * kMR * K));
  pack_x(x, M, K, ldx, xp.data(), pf);
  const int64_t unit = (N >= 16 * kNR ? 4 : 1) * kNR;  // columns per work unit
  const int64_t units = (N + unit - 1) / unit;
  with_float_type(w_dtype, const_cast<void*>(w), [&](auto* wt) {
    parallel_for(pf, units, 1, [&](int64_t ub, int64_t ue) {
      AlignedBuffer<float> bp(size_t(kKC * kNR));
      for (int64_t n0 = ub * unit; n0 < std::min(N, ue * unit); n0 += kNR)
        panel(xp.data(), M, K, wt, ldw, y, ldy, n0, std::min(kNR, N - n0), bp.data());
    });
  });
  return DSINF_OK;
}

extern "C" int dsinf_cpu_gemm_kn_simd(void) {
#if DSINF_SIMD_AVX512
  return 512;
#elif DSINF_SIMD_AVX2
  return 256;
#else
  return 0;
#endif
}
