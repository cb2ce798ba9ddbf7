// Small-M matmul for decode: dsinf_cpu_gemv (API in cpu_kernels.h).
//
//   out[m, n] = round_out( sum_k x[m, k] * W(k, n) * scale[n / (N/G)]  (+ bias[n]) ),  fp32 accumulation
//
// At decode sizes (M = B*S up to ~16) a matmul is memory-bound: each weight element is used M times, so
// the job is to stream the weight exactly once at full DRAM bandwidth, widening it to fp32 in registers
// (bf16: 16-bit shift, fp16: F16C, int8: sign-extend + convert; the int8 scale is one multiply per
// output, since a whole weight row shares it). MKL sgemm does not stream the weight once at these M
// (on our 2-core box its M=4 costs several times its M=1). Two layouts, both split into a fixed set of
// tasks run through the binding's parallel_for (so results do not depend on the thread count):
//
//   [N, K] (nn.Linear, and every int8 weight): "dot" tiles. kNR weight rows x kMR rows of x, kNR*kMR
//          vector accumulators along k, horizontal sums at the end. With several row blocks of x, K is
//          walked in blocks (kKC, kKCBytes below) so each is fetched once and re-read from L1 by every row
//          block (16-bit / int8 blocks converted in registers by each, kConvertInTile; widened once into
//          an L1 buffer for the vdpbf16ps tile and on scalar builds).
//   [K, N] (transposed_mode=False): "axpy" stripes. A task owns up to 4096 adjacent output columns and
//          a chunk of K, walking 8 weight rows at a time and adding x[m, k..k+7] * W[k..k+7, cols] into
//          fp32 accumulators in L1 (long contiguous runs per weight row, which the prefetchers follow).
//
// x is copied once per call into an fp32 buffer on a 64-byte line with a padded row stride (M*K floats,
// small at these M).
// On AVX-512-BF16, bf16 x with a bf16 [N, K] weight stays bf16 and uses vdpbf16ps on raw pairs (products
// of two bf16 are exact in fp32; the sum is fp32), 32 multiply-adds per instruction with no widening; from
// M = 2 an int8 weight joins it, widened exactly to bf16 one K block at a time (fp32 FMAs bound it there).
// Tails (K or N not a multiple of the vector width) go through zero-padded partial loads, so any shape
// works, K = 67 included.
#include <algorithm>

#include "cpu_simd.h"

namespace dsinf_cpu {
namespace {

#if DSINF_SIMD_AVX512
// 32 zmm registers: 16 accumulators + 4 weight vectors + 1 x vector.
constexpr int kNR = 4, kMR = 4;    // [N, K] tile: weight rows x rows of x
constexpr int kMRConvert = 4;      // ... with int8 / 16-bit weights converted in registers (kConvertInTile)
#else
// 16 ymm registers (AVX2): 12 accumulators + 4 weight vectors; x comes in as FMA memory operands.
// (In L1, 4x3 ran ~72 GFLOP/s on one Zen 3 core, 4x2 ~62, 4x1 ~37.) Scalar: same shape.
constexpr int kNR = 4, kMR = 3;
// A weight converted in registers needs registers of its own, which the 4x3 tile has not left: on AVX2 such
// weights run in blocks of at most 2 rows of x. M = 3 as 2 + 1 against one block of 3: 1.06-1.33x (Zen 4, 2
// threads, 4096x4096 / 4096x14336, int8 and fp16 weights; docs/PERFORMANCE.md, "CPU: weights converted in
// the tile").
#if DSINF_SIMD_AVX2
constexpr int kMRConvert = 2;
#else
constexpr int kMRConvert = kMR;
#endif
#endif
// Whether int8 / 16-bit weights are converted to fp32 in the tile's registers when x has several row blocks
// (each block converting the K block's weights again, from L1) rather than widened once into an L1 buffer that
// every block reads. In registers: 1.22-2.11x at M = 5..16 on AVX-512 (1.16-1.41x to M = 24, 0.85-1.31x at
// 32), and with blocks of 2 rows 1.06-1.84x at M = 3..16 on AVX2 except 0.82x on int8 4096x4096 at M = 16
// (Zen 4, 2 threads, int8 weights with fp32 / fp16 x and fp16 weights, 4096x4096, 4096x14336, 14336x4096; the
// same docs section). The widening store and reload cost more than converting again. Scalar builds
// (unmeasured) keep the buffer.
#if DSINF_SIMD_AVX512 || DSINF_SIMD_AVX2
constexpr bool kConvertInTile = true;
#else
constexpr bool kConvertInTile = false;
#endif
constexpr int64_t kTN = 4 * kW;  // narrowest [K, N] stripe
// Enough weight bytes per parallel task to amortise a fork (a few microseconds).
constexpr int64_t kGrainBytes = 64 << 10;

// Applies the int8 scale and the bias, rounds, and writes out[m, n0 : n0 + cnt].
struct OutRow {
  void* out;
  dsinf_dtype dtype;
  int64_t ldo;
  const float* bias;   // fp32 [N] or null
  const float* scale;  // int8 only: [G], else null
  int64_t rows_per_group;

  void put(int64_t m, int64_t n0, const float* v, int64_t cnt) const {
    constexpr int64_t kChunk = 256;
    float tmp[kChunk];
    for (int64_t c0 = 0; c0 < cnt; c0 += kChunk) {
      const int64_t nc = std::min(kChunk, cnt - c0);
      for (int64_t i = 0; i < nc; ++i) {
        const int64_t n = n0 + c0 + i;
        float t = v[c0 + i];
        if (scale) t *= scale[n / rows_per_group];
        if (bias) t += bias[n];
        tmp[i] = t;
      }
      with_float_type(dtype, out, [&](auto* o) { store_row(o + m * ldo + n0 + c0, tmp, nc); });
    }
  }
};

size_t elem_size(dsinf_dtype t) { return t == DSINF_F32 ? 4 : (t == DSINF_I8 ? 1 : 2); }

// A row stride (in elements) >= n, a multiple of 64 bytes, and not a multiple of 4 KiB (L1 set aliasing).
int64_t padded_stride(int64_t n, size_t elem_bytes) {
  const int64_t line = int64_t(64 / elem_bytes);
  int64_t ld = (std::max<int64_t>(n, 1) + line - 1) / line * line;
  if ((ld * int64_t(elem_bytes)) % 4096 == 0) ld += line;
  return ld;
}

// ---------------------------------------------------------------- [N, K]: dot tiles

// L2 prefetch of what the tile two tiles (2 * kNR rows) ahead reads at [k, k + n), one per 64-byte line (a step
// shorter than a line prefetches on the steps that start one). Past the last row it is a harmless no-op
// (prefetches never fault). Why: one core's hardware prefetchers keep too few lines in flight on a tile's 4
// concurrent row streams, each new at every tile. Measured on a Zen 4 guest, 2 threads, 4096x4096 /
// 4096x11008 / 11008x4096 [N, K], in-process A/B (docs/PERFORMANCE.md, "CPU GEMV: prefetching the next tiles"):
// fp32 M = 1 1.07-1.26x, M = 8 1.09-1.19x; bf16 (the vdpbf16ps tile) M = 1 1.08-1.54x, M = 8 1.17-1.27x; fp16
// weights at M = 1 1.10-1.45x; int8 at M = 1 +12-16% single-threaded at K = 4096. In a tile only where it
// streams the weight from memory (`stream`), not from the L1 buffer of widened blocks, and only in the first
// row block of x (the others re-read it from L1); a widened block (int8 for the vdpbf16ps tile, scalar builds)
// prefetches the same block two tiles ahead before it is widened (measured when fp16 / int8 weights were still
// widened for the fp32 tiles: M = 8 1.02-1.26x, M = 16 0.99-1.16x).
//
// On an Intel Xeon with AMX (2 threads, docs/PERFORMANCE.md, "the [N, K] prefetch on long fp32 rows") the same
// prefetch ran bf16, int8 and fp32 M = 1..4 on rows of up to 22 KiB 0.97-1.53x as fast as none (under 1.0 once
// in 26), but fp32 rows of 11008 (43 KiB; two tiles 344 KiB ahead) 0.92-0.99x: MKL / ours at M = 1 0.90x with it,
// 0.98-0.99x without, 0.95-0.96x one tile ahead. So off AMD hosts a tile of more than kPrefetchTileBytes does
// not prefetch.
constexpr int64_t kPrefetchTileBytes = 128 << 10;

bool prefetch_tiles(int64_t row_bytes) {
  return dsinf_cpu_host_amd() != 0 || kNR * row_bytes <= kPrefetchTileBytes;
}

template <class TW, int NR>
inline void prefetch_ahead(const TW* w, int64_t ldw, int64_t k, int64_t n) {
  for (int r = 0; r < NR; ++r) prefetch_l2_lines(w + (r + 2 * kNR) * ldw, k, n);
}

// acc[r * kMR + m] += sum_{k < kc} w[r * ldw + k] * x[m * ldx + k],  r < NR, m < MR  (vector accumulators,
// summed horizontally at the very end).
// Never inlined: inlined into gemv_nk's loop, GCC 12 kept the accumulator array in memory and stored every
// accumulator to the stack on every step (a 512-bit store takes two cycles on Zen 4), which made M = 2..16 run
// at a fraction of the FMA rate (docs/PERFORMANCE.md, "CPU decode at batch 8"). Its own function keeps them
// in registers; a call per tile and K block costs nothing next to the loop. `stream`: w is the weight in memory
// and is prefetched (prefetch_ahead, prefetch_tiles above).
template <class TW, int NR, int MR>
__attribute__((noinline)) void dot_tile(const TW* w, int64_t ldw, int64_t kc, const float* x, int64_t ldx, vf* acc,
                                        bool stream) {
  vf a[NR][MR];
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) a[r][m] = acc[r * kMR + m];
  int64_t k = 0;
  if constexpr (MR == 1) {
    // One row of x: NR dependent FMA chains would be latency-bound (4 cycles each), which matters when
    // the weight is in L3 or widened from int8/16-bit; a second set of chains doubles the throughput.
    vf b[NR];
    for (int r = 0; r < NR; ++r) b[r] = vzero();
    for (; k + 2 * kW <= kc; k += 2 * kW) {
      if (stream) prefetch_ahead<TW, NR>(w, ldw, k, 2 * kW);
      const vf x0 = vload(x + k), x1 = vload(x + k + kW);
      for (int r = 0; r < NR; ++r) a[r][0] = vfma(vload(w + r * ldw + k), x0, a[r][0]);
      for (int r = 0; r < NR; ++r) b[r] = vfma(vload(w + r * ldw + k + kW), x1, b[r]);
    }
    for (int r = 0; r < NR; ++r) a[r][0] = vadd(a[r][0], b[r]);
  }
  for (; k + kW <= kc; k += kW) {
    if (stream) prefetch_ahead<TW, NR>(w, ldw, k, kW);
    vf wv[NR];
    for (int r = 0; r < NR; ++r) wv[r] = vload(w + r * ldw + k);
    for (int m = 0; m < MR; ++m) {
      const vf xv = vload(x + m * ldx + k);
      for (int r = 0; r < NR; ++r) a[r][m] = vfma(wv[r], xv, a[r][m]);
    }
  }
  if (k < kc) {
    const int64_t rem = kc - k;
    vf wv[NR];
    for (int r = 0; r < NR; ++r) wv[r] = vload_part(w + r * ldw + k, rem);
    for (int m = 0; m < MR; ++m) {
      const vf xv = vload_part(x + m * ldx + k, rem);
      for (int r = 0; r < NR; ++r) a[r][m] = vfma(wv[r], xv, a[r][m]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) acc[r * kMR + m] = a[r][m];
}

#if DSINF_SIMD_AVX512 && defined(__AVX512BF16__)
// bf16 x bf16 with vdpbf16ps: each instruction multiplies 32 bf16 pairs and adds them, pairwise, into
// 16 fp32 lanes. Same contract as dot_tile; x stays bf16 (kc is a multiple of 32 except at the end of K).
// Not inlined, and its tail a masked load (zeros past kc) rather than a memcpy: inlined into gemv_nk's loop
// (or with a library call in it), GCC 12 kept the accumulators in memory, storing all 16 to the stack on
// every step or reloading each x row per weight row, and M = 2..8 ran at a fifth to a half of the vdpbf16ps
// rate (docs/PERFORMANCE.md, "CPU decode at batch 8"). A call per tile and K block costs nothing next to it.
template <class TW, int NR, int MR>
__attribute__((noinline)) void dot_tile(const bf16_t* w, int64_t ldw, int64_t kc, const bf16_t* x, int64_t ldx,
                                        vf* acc, bool stream) {
  static_assert(std::is_same<TW, bf16_t>::value, "vdpbf16ps tile is bf16 x bf16");
  __m512 a[NR][MR];
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) a[r][m] = acc[r * kMR + m];
  int64_t k = 0;
  // x rows outer, one weight vector at a time inner: MR + NR loads per NR * MR products. (Weight vectors
  // outer made GCC reload each weight vector once per row of x.)
  for (; k + 32 <= kc; k += 32) {
    if (stream) prefetch_ahead<bf16_t, NR>(w, ldw, k, 32);
    __m512i xv[MR];
    for (int m = 0; m < MR; ++m) xv[m] = _mm512_loadu_si512(x + m * ldx + k);
    for (int r = 0; r < NR; ++r) {
      const __m512i wv = _mm512_loadu_si512(w + r * ldw + k);
      for (int m = 0; m < MR; ++m) a[r][m] = _mm512_dpbf16_ps(a[r][m], (__m512bh)xv[m], (__m512bh)wv);
    }
  }
  if (k < kc) {
    const __mmask32 live = __mmask32((uint64_t(1) << (kc - k)) - 1);  // kc - k < 32
    __m512i xv[MR];
    for (int m = 0; m < MR; ++m) xv[m] = _mm512_maskz_loadu_epi16(live, x + m * ldx + k);
    for (int r = 0; r < NR; ++r) {
      const __m512i wv = _mm512_maskz_loadu_epi16(live, w + r * ldw + k);
      for (int m = 0; m < MR; ++m) a[r][m] = _mm512_dpbf16_ps(a[r][m], (__m512bh)xv[m], (__m512bh)wv);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) acc[r * kMR + m] = a[r][m];
}
#define DSINF_HAVE_DPBF16 1

// dst[i] = bf16(src[i]) for n int8 elements: exact, since an int8 has at most 8 significant bits. Feeds the
// vdpbf16ps tile above from int8 weights when x is bf16 (the products int8 * bf16 are then exact in fp32, as
// on the fp32 path). Tails are masked loads and stores.
inline void widen_row(bf16_t* dst, const int8_t* src, int64_t n) {
  auto convert = [](__m256i v) {  // 32 int8 -> 32 bf16
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(v)));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(v, 1)));
    return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);  // lo -> elements 0..15, hi -> 16..31
  };
  int64_t i = 0;
  for (; i + 32 <= n; i += 32)
    _mm512_storeu_si512(dst + i, convert(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
  if (i < n) {
    const __mmask32 live = __mmask32((uint64_t(1) << (n - i)) - 1);
    _mm512_mask_storeu_epi16(dst + i, live, convert(_mm256_maskz_loadu_epi8(live, src + i)));
  }
}
#endif

// dst[i] = fp32(src[i]) for n elements (the widening of the fp32 tiles).
template <class TW>
inline void widen_row(float* dst, const TW* src, int64_t n) {
  load_row(dst, src, n);
}

// Runtime row count of x (1..kMR) -> compile-time tile.
template <class TW, int NR, class TX>
inline void dot_rows(const TW* w, int64_t ldw, int64_t kc, const TX* x, int64_t ldx, int mr, vf* acc, bool stream) {
  switch (mr) {
    case 1: dot_tile<TW, NR, 1>(w, ldw, kc, x, ldx, acc, stream); break;
    case 2: dot_tile<TW, NR, 2>(w, ldw, kc, x, ldx, acc, stream); break;
    case 3: dot_tile<TW, NR, 3>(w, ldw, kc, x, ldx, acc, stream); break;
#if DSINF_SIMD_AVX512
    case 4: dot_tile<TW, NR, 4>(w, ldw, kc, x, ldx, acc, stream); break;
#endif
    default: break;
  }
}

// Rows of x are split into ceil(M / mr) blocks of near-equal size (M = 4 -> 2 + 2, not 3 + 1: a
// one-row tile has half the independent FMA chains); mr is kMR, or kMRConvert for weights converted in the tile.
struct RowBlocks {
  int64_t count, base, extra;
  RowBlocks(int64_t M, int64_t mr) : count((M + mr - 1) / mr), base(0), extra(0) {
    if (count) {
      base = M / count;
      extra = M % count;
    }
  }
  int64_t start(int64_t c) const { return c * base + std::min(c, extra); }
  int size(int64_t c) const { return int(base + (c < extra ? 1 : 0)); }
};

// All row blocks of x against nr (<= kNR) weight rows of stride ldw, over kc columns. `stream`: w is the weight
// in memory (not the L1 buffer of a widened block) and prefetch_tiles allows it, so the first row block
// prefetches the tiles ahead.
template <class TW, class TX>
inline void dot_all_rows(const TW* w, int64_t ldw, int nr, int64_t kc, const TX* x, int64_t ldx,
                         const RowBlocks& rb, vf* acc, bool stream) {
  for (int64_t c = 0; c < rb.count; ++c) {
    const TX* xc = x + rb.start(c) * ldx;
    const int mr = rb.size(c);
    vf* a = acc + c * kNR * kMR;
    const bool first = stream && c == 0;
    if (nr == kNR) {
      dot_rows<TW, kNR>(w, ldw, kc, xc, ldx, mr, a, first);
    } else {
      for (int r = 0; r < nr; ++r) dot_rows<TW, 1>(w + r * ldw, ldw, kc, xc, ldx, mr, a + r * kMR, first);
    }
  }
}

// When x has several row blocks (M > kMR), K is walked in blocks of kKC so that the tile's weight block
// (kNR x kKC) is fetched from memory once and re-read from L1 by every row block, 16-bit and int8 blocks
// converted again by each (kConvertInTile) or, for the vdpbf16ps tile and scalar builds, widened once into an
// L1 buffer. (Without the K blocks, M=4 cost 2x and M=16 6x the time of M=1 single-threaded; the weight tile
// was re-streamed from L2.) A block is kKC elements of a weight widened into the buffer, and kKCBytes of a
// weight row read in place, at most kKCMax elements (its x rows, fp32 for weights converted in the tile, stay
// 16 KiB per row block): 512 fp32 elements, 1024 of bf16, fp16 or int8. Against 512 for all (Zen 5 guest, 2
// threads, 4096x4096 [N, K], 2026-12-06): bf16 on the vdpbf16ps tile at M = 8 1.02-1.16 ms against 1.21-1.37;
// int8 weights with fp32 x 0.84-0.85 against 0.94-0.95 at M = 8, 8-13% less at 16; fp16 7-10% / 3-6% less;
// 2048 for int8 measured the same as 1024. An AVX2 build (same host): fp16 6% faster at M = 8, int8 2-5% slower.
// int8 widened to bf16 keeps 512: 1024 cost its M = 4 12%.
constexpr int64_t kKC = 512;
constexpr int64_t kKCBytes = 2048, kKCMax = 1024;

// A vector as a Scratch element (a bare __m256 template argument would drop its alignment attribute).
struct vbox {
  vf v;
};

template <class TW, class TX>
void gemv_nk(const TX* x, int64_t M, int64_t ldx, const TW* w, int64_t K, int64_t N, const OutRow& out,
             dsinf_parallel_fn pf) {
  // The element type the tiles read: fp32 for fp32 x, bf16 for bf16 x (the vdpbf16ps tile). A weight of
  // another type is converted to it in the fp32 tile's registers (kConvertInTile; scalar builds with one row
  // block) or widened one K block at a time into an L1 buffer: for fp32 x on a scalar build when several row
  // blocks share the block, for bf16 x (int8 weights) always.
  using TB = typename std::conditional<std::is_same<TX, float>::value, float, TX>::type;
  constexpr bool kWiden = !std::is_same<TW, TB>::value;
  constexpr bool kInTile = kWiden && std::is_same<TB, float>::value && kConvertInTile;
  const RowBlocks rb(M, kInTile ? kMRConvert : kMR);
  const int64_t mchunks = rb.count;
  const bool widen = kWiden && !kInTile && (mchunks > 1 || !std::is_same<TB, float>::value);
  const int64_t KC = widen ? kKC : mchunks > 1 ? std::min(kKCMax, kKCBytes / int64_t(sizeof(TW))) : std::max<int64_t>(K, 1);
  const int64_t units = (N + kNR - 1) / kNR;
  const int64_t grain = std::max<int64_t>(1, kGrainBytes / std::max<int64_t>(1, kNR * K * int64_t(sizeof(TW))));
  const bool prefetch = prefetch_tiles(K * int64_t(sizeof(TW)));
  // Results of kOutUnits consecutive tiles are gathered per row of x and written out together.
  constexpr int64_t kOutUnits = 16;
  parallel_for(pf, units, grain, [&](int64_t ub, int64_t ue) {
    const size_t nacc = size_t(mchunks * kNR * kMR);
    Scratch<vbox, 8 * kNR * kMR> accv(nacc);
    vf* acc = &accv.data()->v;
    const int64_t ldwb = padded_stride(KC, sizeof(TB));
    AlignedBuffer<TB> wbuf(widen ? size_t(kNR * ldwb) : 0);
    Scratch<float, 32 * kOutUnits * kNR> res(size_t(M * kOutUnits * kNR));  // [M][kOutUnits * kNR]
    for (int64_t g0 = ub; g0 < ue; g0 += kOutUnits) {
      const int64_t g1 = std::min(ue, g0 + kOutUnits);
      for (int64_t u = g0; u < g1; ++u) {
        const int64_t n0 = u * kNR;
        const int nr = int(std::min<int64_t>(kNR, N - n0));
        const TW* wt = w + n0 * K;
        for (size_t i = 0; i < nacc; ++i) acc[i] = vzero();
        for (int64_t kb = 0; kb < K; kb += KC) {
          const int64_t kc = std::min(KC, K - kb);
          if constexpr (kWiden) {
            if (widen) {
              if (prefetch) prefetch_ahead<TW, kNR>(wt, K, kb, kc);  // the block two tiles ahead, as the tiles do
              for (int r = 0; r < nr; ++r) widen_row(wbuf.data() + r * ldwb, wt + r * K + kb, kc);
              dot_all_rows(static_cast<const TB*>(wbuf.data()), ldwb, nr, kc, x + kb, ldx, rb, acc, false);
              continue;
            }
          }
          if constexpr (std::is_same<TW, TB>::value || std::is_same<TB, float>::value)  // else widen is set
            dot_all_rows(wt + kb, K, nr, kc, x + kb, ldx, rb, acc, prefetch);
        }
        for (int64_t c = 0; c < rb.count; ++c)
          for (int mi = 0; mi < rb.size(c); ++mi) {
            float* rr = res.data() + (rb.start(c) + mi) * kOutUnits * kNR + (u - g0) * kNR;
            const vf* a = acc + c * kNR * kMR + mi;
            if (nr == 4 && kNR == 4)
              vsum4(a[0], a[kMR], a[2 * kMR], a[3 * kMR], rr);
            else
              for (int r = 0; r < nr; ++r) rr[r] = vsum(a[r * kMR]);
          }
      }
      const int64_t c0 = g0 * kNR, cnt = std::min(g1 * kNR, N) - c0;
      for (int64_t m = 0; m < M; ++m) out.put(m, c0, res.data() + m * kOutUnits * kNR, cnt);
    }
  });
}

// ---------------------------------------------------------------- [K, N]: axpy stripes

// acc[m * ldacc + c] += sum_{j < KB} x[m * ldx + j] * w[j * ldw + c],  c < nc, m < M
// KB weight rows are combined per pass, so each accumulator vector is loaded and stored once per KB
// rows (the accumulators live in L1: M * ldacc floats).
template <class TW, int KB>
inline void axpy_rows(const TW* w, int64_t ldw, int64_t nc, const float* x, int64_t ldx, int64_t M, float* acc,
                      int64_t ldacc) {
  int64_t c = 0;
  for (; c + kW <= nc; c += kW) {
    vf wv[KB];
    for (int j = 0; j < KB; ++j) wv[j] = vload(w + j * ldw + c);
    for (int64_t m = 0; m < M; ++m) {
      float* a = acc + m * ldacc + c;
      vf av = vload(a);
      for (int j = 0; j < KB; ++j) av = vfma(vset1(x[m * ldx + j]), wv[j], av);
      vstore(a, av);
    }
  }
  if (c < nc) {
    const int64_t rem = nc - c;
    vf wv[KB];
    for (int j = 0; j < KB; ++j) wv[j] = vload_part(w + j * ldw + c, rem);
    for (int64_t m = 0; m < M; ++m) {
      float* a = acc + m * ldacc + c;  // padded to a whole vector: see ldacc
      vf av = vload(a);
      for (int j = 0; j < KB; ++j) av = vfma(vset1(x[m * ldx + j]), wv[j], av);
      vstore(a, av);
    }
  }
}

// Tasks are (stripe of sw adjacent output columns) x (chunk of K rows). A task walks its rows 8 at a
// time, reading a contiguous sw-element run from each. Measured single-threaded at K=N=4096 fp32, M=1:
// sw=64 (one register tile per row) 7-10 GB/s - the prefetchers do not follow short strided runs -
// sw=1024 ~18 GB/s, sw=4096 (whole rows) 23-25 GB/s, the same as the [N, K] kernel. So stripes are as
// wide as keeps the M x sw fp32 accumulators within kKnAccFloats (128 KiB: L2), whole rows where they fit,
// and of equal widths (a ragged last stripe left one thread with most of the work); the parallelism comes
// from splitting K instead: >= 16 tasks of >= 256 rows, partial sums (M x N floats per chunk, tiny next to
// the weight) added in k order afterwards. On an Intel Xeon with AMX (2 threads, 3 rotating weights,
// docs/PERFORMANCE.md, "the [K, N] GEMV's stripes"), against the earlier 8192-float budget capped at 4096
// columns (512 columns at M = 16: 2 KiB runs), MKL's time / ours at M = 8 / 16 went from 0.78-1.53 /
// 0.70-1.15 to 1.13-1.60 / 0.99-1.49 (4096x4096, 4096x11008, 11008x4096, 4096x12288).
constexpr int64_t kKnAccFloats = 32768;

template <class TW>
void gemv_kn(const float* x, int64_t M, int64_t ldx, const TW* w, int64_t K, int64_t N, const OutRow& out,
             dsinf_parallel_fn pf) {
  const int64_t widest = std::max<int64_t>(256, kKnAccFloats / std::max<int64_t>(M, 1));
  const int64_t fewest = (N + widest - 1) / widest;  // stripes; then sw as even as whole vectors allow
  const int64_t sw = ((N + fewest - 1) / fewest + kW - 1) / kW * kW, stripes = (N + sw - 1) / sw;
  int64_t ksplit = std::max<int64_t>(1, std::min<int64_t>((16 + stripes - 1) / stripes, K / 256));
  const int64_t kchunk = (K + ksplit - 1) / ksplit;
  ksplit = kchunk > 0 ? (K + kchunk - 1) / kchunk : 1;
  AlignedBuffer<float> partial(ksplit > 1 ? size_t(ksplit * M * N) : 0);
  const int64_t ldacc = padded_stride(sw, sizeof(float));  // accumulator rows off the weight rows' L1 sets
  parallel_for(pf, stripes * ksplit, 1, [&](int64_t ub, int64_t ue) {
    AlignedBuffer<float> acc(size_t(M * ldacc));
    for (int64_t u = ub; u < ue; ++u) {
      const int64_t stripe = u / ksplit, ks = u % ksplit;
      const int64_t n0 = stripe * sw, nc = std::min(sw, N - n0);
      const int64_t k0 = ks * kchunk, k1 = std::min(K, k0 + kchunk);
      std::fill(acc.data(), acc.data() + M * ldacc, 0.0f);
      const TW* wc = w + n0;
      int64_t k = k0;
      for (; k + 8 <= k1; k += 8) axpy_rows<TW, 8>(wc + k * N, N, nc, x + k, ldx, M, acc.data(), ldacc);
      for (; k < k1; ++k) axpy_rows<TW, 1>(wc + k * N, N, nc, x + k, ldx, M, acc.data(), ldacc);
      for (int64_t m = 0; m < M; ++m) {
        if (ksplit == 1)
          out.put(m, n0, acc.data() + m * ldacc, nc);
        else
          std::memcpy(partial.data() + (ks * M + m) * N + n0, acc.data() + m * ldacc, size_t(nc) * sizeof(float));
      }
    }
  });
  if (ksplit == 1) return;
  constexpr int64_t kChunk = 1024;
  const int64_t chunks = (N + kChunk - 1) / kChunk;
  parallel_for(pf, M * chunks, 4, [&](int64_t ub, int64_t ue) {
    float sum[kChunk];
    for (int64_t u = ub; u < ue; ++u) {
      const int64_t m = u / chunks, c0 = (u % chunks) * kChunk, nc = std::min(kChunk, N - c0);
      std::memcpy(sum, partial.data() + m * N + c0, size_t(nc) * sizeof(float));
      for (int64_t ks = 1; ks < ksplit; ++ks) {
        const float* p = partial.data() + (ks * M + m) * N + c0;
        for (int64_t i = 0; i < nc; ++i) sum[i] += p[i];
      }
      out.put(m, c0, sum, nc);
    }
  });
}



}  // namespace
}  // namespace dsinf_cpu

extern "C" int dsinf_cpu_gemv_dpbf16(void) {
#ifdef DSINF_HAVE_DPBF16
  return 1;
#else
  return 0;
#endif
}

extern "C" int dsinf_cpu_host_amd(void) {
#if defined(__x86_64__) && defined(__GNUC__)
  static const int amd = [] {
    __builtin_cpu_init();
    return __builtin_cpu_is("amd") != 0 ? 1 : 0;
  }();
  return amd;
#else
  return 0;
#endif
}

extern "C" dsinf_status dsinf_cpu_gemv(const void* x, dsinf_dtype x_dtype, int64_t M, int64_t ldx,
                                       const dsinf_weight* w, const void* bias, void* out, dsinf_dtype out_dtype,
                                       int64_t ldo, dsinf_parallel_fn pf) {
  using namespace dsinf_cpu;
  const bool float_x = x_dtype == DSINF_F32 || x_dtype == DSINF_F16 || x_dtype == DSINF_BF16;
  const bool int8_w = w->dtype == DSINF_I8;
  if (!float_x || !(w->dtype == x_dtype || int8_w) || !(out_dtype == DSINF_F32 || out_dtype == x_dtype) ||
      (int8_w && (!w->layout_nk || w->scale == nullptr || w->groups <= 0 || w->N % w->groups != 0)))
    return DSINF_UNSUPPORTED;
  const int64_t K = w->K, N = w->N;
  if (M <= 0 || N <= 0) return DSINF_OK;

  Scratch<float, 4096> bias_f(bias ? size_t(N) : 0);
  if (bias) load_row_any(bias_f.data(), bias, x_dtype, N);
  const OutRow o{out, out_dtype, ldo, bias ? bias_f.data() : nullptr, int8_w ? w->scale : nullptr,
                 int8_w ? N / w->groups : 1};

  // x is copied once (M * K elements: small at the M this kernel is used for) into rows whose stride
  // is not a multiple of 4 KiB. With K = 4096 fp32 rows 16 KiB apart, the x rows and the weight rows
  // of a tile all map to the same L1 sets, and M = 4 ran 3.5x slower than M = 2 from conflict misses.
  const char* xb = static_cast<const char*>(x);
  const size_t xsize = elem_size(x_dtype);
#ifdef DSINF_HAVE_DPBF16
  // bf16 x on the vdpbf16ps tile: bf16 weights in place; int8 weights widened to bf16 per K block from M = 2,
  // where the fp32 path's FMAs bound it (M = 1 streams the int8 weight at DRAM speed on the fp32 path).
  const bool dp_bf16 = w->dtype == DSINF_BF16 && w->layout_nk;
  const bool dp_int8 = int8_w && M >= 2;
  if (x_dtype == DSINF_BF16 && (dp_bf16 || dp_int8)) {
    const int64_t ldxp = padded_stride(K, 2);
    AlignedBuffer<bf16_t> xp(size_t(M * ldxp));
    for (int64_t m = 0; m < M; ++m) std::memcpy(xp.data() + m * ldxp, xb + size_t(m * ldx) * xsize, size_t(K) * 2);
    if (dp_bf16)
      gemv_nk(static_cast<const bf16_t*>(xp.data()), M, ldxp, static_cast<const bf16_t*>(w->data), K, N, o, pf);
    else
      gemv_nk(static_cast<const bf16_t*>(xp.data()), M, ldxp, static_cast<const int8_t*>(w->data), K, N, o, pf);
    return DSINF_OK;
  }
#endif
  const int64_t ldxf = padded_stride(K, sizeof(float));
  Scratch<float, 8192> xbuf(size_t(M * ldxf));
  for (int64_t m = 0; m < M; ++m) load_row_any(xbuf.data() + m * ldxf, xb + size_t(m * ldx) * xsize, x_dtype, K);
  const float* xf = xbuf.data();
  switch (w->dtype) {
    case DSINF_I8: gemv_nk(xf, M, ldxf, static_cast<const int8_t*>(w->data), K, N, o, pf); break;
    case DSINF_F32:
      if (w->layout_nk) gemv_nk(xf, M, ldxf, static_cast<const float*>(w->data), K, N, o, pf);
      else gemv_kn(xf, M, ldxf, static_cast<const float*>(w->data), K, N, o, pf);
      break;
    case DSINF_F16:
      if (w->layout_nk) gemv_nk(xf, M, ldxf, static_cast<const fp16_t*>(w->data), K, N, o, pf);
      else gemv_kn(xf, M, ldxf, static_cast<const fp16_t*>(w->data), K, N, o, pf);
      break;
    case DSINF_BF16:
      if (w->layout_nk) gemv_nk(xf, M, ldxf, static_cast<const bf16_t*>(w->data), K, N, o, pf);
      else gemv_kn(xf, M, ldxf, static_cast<const bf16_t*>(w->data), K, N, o, pf);
      break;
  }
  return DSINF_OK;
}
