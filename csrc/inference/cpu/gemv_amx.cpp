// int8 weights x bf16 activations on AMX tiles: dsinf_cpu_gemv_amx (API in cpu_kernels.h), the path the binding
// takes for them at 2 <= M <= 16 (cpu_binding_ops.cpp: amx_gemv) where the CPU has AMX-BF16 and the OS grants the
// tiles (dsinf_cpu_host_amx, which the binding's AMX rule for torch's bf16 GEMM reads too).
//
// Why: from M = 2 the vdpbf16ps GEMV is bound by its multiply-adds (each int8 weight widened, then 1 x M
// products on 32-lane vectors), not by memory: on an Intel Xeon with AMX (2 threads) int8 4096x11008 at M = 8 ran
// at 0.13 TFLOP/s, a third of what reading the weight allows, and slower than torch's bf16 GEMM on bf16 weights
// twice the size (which runs on AMX). A tile multiply does 16 x 16 x 32 of them per instruction.
//
//   C^T = W . x^T per block of 16 output rows: A = 16 weight rows x 32 k, widened exactly to bf16 (an int8 has at
//   most 8 significant bits) into 1 KiB of an L1 buffer, row-major as stored (no transpose); B = x^T in the pair
//   layout the tiles take (16 k-pairs x M columns of 2 bf16), packed once per call; C = 16 rows x M columns of
//   fp32, accumulated over all of K. Products of two bf16 are exact in fp32 and the sums are fp32, as on the
//   vdpbf16ps path; the scale, the bias and the single rounding are the epilogue's, as in gemv.cpp.
//
// A task owns blocks of 32 rows (two A and two C tiles) and walks K 64 at a time (one 64-byte line per weight row:
// two k-tiles, so B takes two tiles too: 2 C + 4 A + 2 B = the 8 tiles). k past K is zero in both the widened line
// (a masked load: the last row's tail is not read) and the x pack. Rows past N are computed from whatever the buffer
// holds and never stored. Results do not depend on the thread count (each output is one task's).
#include <algorithm>

#include "cpu_simd.h"

#if defined(__linux__)
#include <sys/syscall.h>  // dsinf_cpu_host_amx: arch_prctl
#include <unistd.h>
#endif

#if defined(__AVX512BF16__) && defined(__x86_64__) && defined(__linux__) && \
    (!defined(__clang__) || (defined(__AMX_TILE__) && defined(__AMX_BF16__)))
#define DSINF_HAVE_AMX 1
#if !defined(__AMX_TILE__) || !defined(__AMX_BF16__)
// The build's flags (avx512_bf16's exact -m flags, or -march=native on a CPU without AMX) do not enable AMX, and
// the tile intrinsics are always-inline functions of that target: this file's functions take it, and run only
// where dsinf_cpu_host_amx() found the tiles. (clang has no such pragma: there only a build for AMX has the kernel.)
#pragma GCC target("amx-tile,amx-bf16")
#endif
#endif

namespace dsinf_cpu {
namespace {

constexpr int64_t kAmxMaxM = 16;  // one C tile's columns

#ifdef DSINF_HAVE_AMX

constexpr int64_t kRows = 32;       // output rows per task block: two 16-row tiles
// Bytes ahead in each weight row (8 steps of 64), into L1: without it the step ran 1.3-1.4x slower; 1-4 KiB ahead
// or into L2 only ran slower than 512 into L1 (int8 4096x11008, M = 8, 2 threads).
constexpr int64_t kPrefetch = 512;

// ldtilecfg's 64-byte operand (palette 1).
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles: 0-1 C (16 rows x M fp32), 2-5 A (16 rows x 32 bf16), 6-7 B (16 k-pairs x M pairs).
TileConfig tile_config(int64_t M) {
  TileConfig c;
  for (int t = 0; t < 8; ++t) c.rows[t] = 16;
  c.colsb[0] = c.colsb[1] = uint16_t(M * 4);
  for (int t = 2; t < 6; ++t) c.colsb[t] = 64;
  c.colsb[6] = c.colsb[7] = uint16_t(M * 4);
  return c;
}

// 64 int8 at src (n_live of them valid, the rest read as zeros) -> 64 bf16 at dst. Each quarter is sign-extended
// straight from memory (vpmovsxbd's load form: no extract shuffles), converted exactly to fp32, and pairs of
// quarters rounded (exactly) to bf16.
inline void widen_line(bf16_t* dst, const int8_t* src, int64_t n_live) {
  alignas(64) int8_t tail[64];
  if (n_live < 64) {  // the row's last line: only its live bytes are read
    _mm512_store_si512(tail, _mm512_maskz_loadu_epi8((__mmask64(1) << n_live) - 1, src));
    src = tail;
  }
  __m512 f[4];
  for (int q = 0; q < 4; ++q)
    f[q] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src) + q)));
  _mm512_store_si512(dst, (__m512i)_mm512_cvtne2ps_pbh(f[1], f[0]));
  _mm512_store_si512(dst + 32, (__m512i)_mm512_cvtne2ps_pbh(f[3], f[2]));
}

// x [M, K] bf16 -> xp[kp][m][2] = (x[m][2kp], x[m][2kp+1]) for kp < Kp / 2, zeros past K.
void pack_x(const bf16_t* x, int64_t M, int64_t ldx, int64_t K, int64_t Kp, bf16_t* xp) {
  for (int64_t kp = 0; kp < Kp / 2; ++kp)
    for (int64_t m = 0; m < M; ++m)
      for (int j = 0; j < 2; ++j) {
        const int64_t k = 2 * kp + j;
        xp[(kp * M + m) * 2 + j] = k < K ? x[m * ldx + k] : bf16_t{0};
      }
}

struct AmxArgs {
  const int8_t* w;
  int64_t K, N, M;
  const bf16_t* xp;  // pack_x, Kp / 2 pair rows of M * 4 bytes
  int64_t Kp;
  const float* scale;
  int64_t rows_per_group;
  const float* bias;  // fp32 [N] or null
  void* out;
  dsinf_dtype out_dtype;
  int64_t ldo;
};

// Output rows [n0, n0 + 32) over all of K, 64 k at a time: each row's 64-byte line widened into `a_buf` (32 rows x
// 64 bf16, 4 KiB: L1), with a prefetch of the same row kPrefetch bytes ahead - 32 row streams, which the hardware
// prefetchers alone do not keep ahead of.
void amx_block(const AmxArgs& a, int64_t n0, bf16_t* a_buf) {
  alignas(64) float cbuf[kRows * 16];
  // A last block of fewer rows leaves the buffer's other rows as they were: their outputs are never stored.
  const int64_t rows = std::min(kRows, a.N - n0);
  const int64_t bstride = a.M * 4;
  _tile_zero(0);
  _tile_zero(1);
  for (int64_t k = 0; k < a.Kp; k += 64) {
    // The widening (12 vector instructions per line) is what bounds a step: alone, without the tiles or the weight's
    // read, it ran within 10-20% of the whole. Widening the next step into a second buffer while the tiles read this
    // one gained nothing.
    for (int64_t r = 0; r < rows; ++r) {
      const int8_t* src = a.w + (n0 + r) * a.K + k;
      __builtin_prefetch(src + kPrefetch, 0, 3);
      widen_line(a_buf + r * 64, src, a.K - k);
    }
    const bf16_t* b = a.xp + k * a.M;  // pair row k / 2: M pairs of 2 bf16 each
    _tile_loadd(6, b, bstride);
    _tile_loadd(7, b + 32 * a.M, bstride);
    _tile_loadd(2, a_buf, 128);  // rows 0-15, k 0-31
    _tile_loadd(3, a_buf + 32, 128);  // rows 0-15, k 32-63
    _tile_loadd(4, a_buf + 16 * 64, 128);
    _tile_loadd(5, a_buf + 16 * 64 + 32, 128);
    _tile_dpbf16ps(0, 2, 6);
    _tile_dpbf16ps(0, 3, 7);
    _tile_dpbf16ps(1, 4, 6);
    _tile_dpbf16ps(1, 5, 7);
  }
  _tile_stored(0, cbuf, 64);
  _tile_stored(1, cbuf + 16 * 16, 64);
  float tmp[kRows];
  for (int64_t m = 0; m < a.M; ++m) {
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t n = n0 + r;
      float t = cbuf[r * 16 + m] * a.scale[n / a.rows_per_group];
      if (a.bias) t += a.bias[n];
      tmp[r] = t;
    }
    with_float_type(a.out_dtype, a.out, [&](auto* o) { store_row(o + m * a.ldo + n0, tmp, rows); });
  }
}

#endif  // DSINF_HAVE_AMX

}  // namespace
}  // namespace dsinf_cpu

// CPUID for AMX-BF16 / AMX-TILE, XCR0 for the OS saving tile state, and on Linux the tile data permission, which
// the kernel hands out only on request (arch_prctl ARCH_REQ_XCOMP_PERM, once per process; oneDNN asks the same):
// a tile instruction without it faults.
extern "C" int dsinf_cpu_host_amx(void) {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool has = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(1), "c"(0));
    if (!(c >> 27 & 1)) return false;  // OSXSAVE: xgetbv is allowed
    __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(7), "c"(0));
    if (!(d >> 22 & 1) || !(d >> 24 & 1)) return false;  // AMX-BF16, AMX-TILE
    unsigned lo = 0, hi = 0;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if ((lo >> 17 & 3) != 3) return false;  // XTILECFG, XTILEDATA
#if defined(__linux__)
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
#else
    return true;
#endif
  }();
  return has ? 1 : 0;
#else
  return 0;
#endif
}

extern "C" int dsinf_cpu_amx_ready(void) {
#ifdef DSINF_HAVE_AMX
  return dsinf_cpu_host_amx();
#else
  return 0;
#endif
}

extern "C" dsinf_status dsinf_cpu_gemv_amx(const void* x, int64_t M, int64_t ldx, const dsinf_weight* w,
                                           const void* bias, void* out, dsinf_dtype out_dtype, int64_t ldo,
                                           dsinf_parallel_fn pf) {
#ifdef DSINF_HAVE_AMX
  using namespace dsinf_cpu;
  if (M < 1 || M > kAmxMaxM || w->dtype != DSINF_I8 || !w->layout_nk || w->scale == nullptr || w->groups <= 0 ||
      w->N % w->groups != 0 || !(out_dtype == DSINF_F32 || out_dtype == DSINF_BF16) || !dsinf_cpu_host_amx())
    return DSINF_UNSUPPORTED;
  const int64_t K = w->K, N = w->N;
  if (N <= 0) return DSINF_OK;
  const int64_t Kp = std::max<int64_t>(64, (K + 63) / 64 * 64);  // whole 64-k steps
  AlignedBuffer<bf16_t> xp(size_t(Kp * M));
  pack_x(static_cast<const bf16_t*>(x), M, ldx, K, Kp, xp.data());
  Scratch<float, 4096> bias_f(bias ? size_t(N) : 0);
  if (bias) load_row(bias_f.data(), static_cast<const bf16_t*>(bias), N);
  const AmxArgs a{static_cast<const int8_t*>(w->data), K, N, M, xp.data(), Kp, w->scale, N / w->groups,
                  bias ? bias_f.data() : nullptr, out, out_dtype, ldo};
  const TileConfig cfg = tile_config(M);
  parallel_for(pf, (N + kRows - 1) / kRows, 1, [&](int64_t b, int64_t e) {
    AlignedBuffer<bf16_t> a_buf(size_t(kRows * 64));
    _tile_loadconfig(&cfg);  // per thread: the configuration is thread state
    for (int64_t blk = b; blk < e; ++blk) amx_block(a, blk * kRows, a_buf.data());
    _tile_release();
  });
  return DSINF_OK;
#else
  (void)x, (void)M, (void)ldx, (void)w, (void)bias, (void)out, (void)out_dtype, (void)ldo, (void)pf;
  return DSINF_UNSUPPORTED;
#endif
}
