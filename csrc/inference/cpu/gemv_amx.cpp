// int8 weights x bf16 activations on AMX tiles: dsinf_cpu_gemv_amx (API in cpu_kernels.h), the path the binding
// takes for them at 2 <= M <= 256 (cpu_binding_ops.cpp: amx_gemv) where the CPU has AMX-BF16 and the OS grants the
// tiles (dsinf_cpu_host_amx, which the binding's AMX rule for torch's bf16 GEMM reads too). Three kernels: up to
// M = 16 (one C tile's columns) and to 32 (two) each weight line is widened and multiplied at once; past 32 the
// weight is widened into panels that every 16 rows of x reuse ("M > 16: x in chunks of 16 rows").
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
// Up to M = 16 a task owns blocks of 32 rows (two A and two C tiles) and walks K 64 at a time (one 64-byte line per
// weight row: two k-tiles, so B takes two tiles too: 2 C + 4 A + 2 B = the 8 tiles). k past K is zero in both the
// widened line (a masked load: the last row's tail is not read) and the x pack. Rows past N are computed from
// whatever the buffer holds and never stored. Results do not depend on the thread count (each output is one
// task's). Past M = 16, dequantize + torch's GEMM (the path otherwise) pays for a bf16 copy of the weight each call:
// at M = 17-128 it took 1.6-3.8x the time of the kernels past 16 (below).
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
inline void widen_line(bf16_t* lo, bf16_t* hi, const int8_t* src, int64_t n_live) {
  alignas(64) int8_t tail[64];
  if (n_live < 64) {  // the row's last line: only its live bytes are read
    _mm512_store_si512(tail, _mm512_maskz_loadu_epi8((__mmask64(1) << n_live) - 1, src));
    src = tail;
  }
  __m512 f[4];
  for (int q = 0; q < 4; ++q)
    f[q] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src) + q)));
  _mm512_store_si512(lo, (__m512i)_mm512_cvtne2ps_pbh(f[1], f[0]));
  _mm512_store_si512(hi, (__m512i)_mm512_cvtne2ps_pbh(f[3], f[2]));
}

// x [M, K] bf16 -> the B tiles' pair layout, per chunk of `width` rows of x (width = M up to 16, else 16):
// xp[c][kp][j][2] = (x[c * width + j][2kp], x[c * width + j][2kp + 1]) for kp < Kp / 2, zeros past M and past K.
// Serial: over two threads it ran no faster at M = 256, K = 14336 (7 MiB) and slower at M = 17 (standalone).
void pack_x(const bf16_t* x, int64_t M, int64_t ldx, int64_t K, int64_t Kp, int64_t width, bf16_t* xp) {
  const int64_t pairs = Kp / 2, n = (M + width - 1) / width * pairs;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t m0 = i / pairs * width, k0 = i % pairs * 2;
    bf16_t* dst = xp + i * width * 2;
    for (int64_t j = 0; j < width; ++j)
      for (int64_t h = 0; h < 2; ++h)
        dst[j * 2 + h] = m0 + j < M && k0 + h < K ? x[(m0 + j) * ldx + k0 + h] : bf16_t{0};
  }
}

struct AmxArgs {
  const int8_t* w;
  int64_t K, N, M;
  const bf16_t* xp;  // pack_x: Kp / 2 pair rows of M * 4 bytes up to M = 16, else of 64 bytes per chunk of 16 rows
  int64_t Kp;
  const float* scale;
  int64_t rows_per_group;
  const float* bias;  // fp32 [N] or null
  void* out;
  dsinf_dtype out_dtype;
  int64_t ldo;
};

// The epilogue of output rows [n0, n0 + 32): acc holds C as the tiles store it, [chunk of 16 x rows][32 rows][16]
// fp32, so it is read across tile rows (stride 16) and each row's scale and bias are read once per block.
void store_block(const AmxArgs& a, int64_t n0, const float* acc) {
  const int64_t rows = std::min(kRows, a.N - n0);
  alignas(64) float sc[kRows], bs[kRows], tmp[kRows];
  for (int64_t r = 0; r < rows; ++r) {
    sc[r] = a.scale[(n0 + r) / a.rows_per_group];
    bs[r] = a.bias ? a.bias[n0 + r] : 0.f;
  }
  for (int64_t m = 0; m < a.M; ++m) {
    const float* cm = acc + (m / 16) * kRows * 16 + m % 16;
    for (int64_t r = 0; r < rows; ++r) tmp[r] = cm[r * 16] * sc[r] + bs[r];
    with_float_type(a.out_dtype, a.out, [&](auto* o) { store_row(o + m * a.ldo + n0, tmp, rows); });
  }
}

// One 64-k step of rows [n0, n0 + rows): each row's 64-byte line at k widened into `a_buf` (32 rows x 64 bf16, 4 KiB:
// L1), with a prefetch of the same row kPrefetch bytes ahead - 32 row streams, which the hardware prefetchers alone
// do not keep ahead of.
inline void widen_step(const AmxArgs& a, int64_t n0, int64_t rows, int64_t k, bf16_t* a_buf) {
  for (int64_t r = 0; r < rows; ++r) {
    const int8_t* src = a.w + (n0 + r) * a.K + k;
    __builtin_prefetch(src + kPrefetch, 0, 3);
    widen_line(a_buf + r * 64, a_buf + r * 64 + 32, src, a.K - k);
  }
}

// Output rows [n0, n0 + 32) over all of K, 64 k at a time (widen_step).
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
    widen_step(a, n0, rows, k, a_buf);
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
  store_block(a, n0, cbuf);
}

// ---- M > 16: x in chunks of 16 rows ----------------------------------------------------------------------------
// Past one C tile's 16 columns x is packed once per call per chunk of 16 rows (pack_x, width 16):
// [chunk][k pair][16][2], so each B tile is one contiguous KiB. Two chunks (M <= 32) run amx_block's step with 2 x 2
// C tiles. Past that the weight is widened once per 32-row block and K slice into a tile-ordered panel ([k-tile][32
// rows][32 bf16], so each A tile is one contiguous KiB) and multiplied against every chunk of x while it sits in
// L1: C stays in the tiles over the slice, two row halves x two chunks (4 C, 2 A, 2 B: 8 tiles), and goes to an fp32
// accumulator [chunk][32 rows][16] between slices.

// C tiles 0-3 past M = 16: rows 0-15 and 16-31 of chunk c, then of chunk c + 1, to and from an fp32
// [chunk][32 rows][16] buffer at c0 (chunk c's); `two`: chunk c + 1 is there too. The tile intrinsics are
// statements (asm), one per line.
inline void zero_c() {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
}
inline void load_c(const float* c0, bool two) {
  _tile_loadd(0, c0, 64);
  _tile_loadd(1, c0 + 256, 64);
  if (two) {
    _tile_loadd(2, c0 + 512, 64);
    _tile_loadd(3, c0 + 768, 64);
  }
}
inline void store_c(float* c0, bool two) {
  _tile_stored(0, c0, 64);
  _tile_stored(1, c0 + 256, 64);
  if (two) {
    _tile_stored(2, c0 + 512, 64);
    _tile_stored(3, c0 + 768, 64);
  }
}

// Past M = 16 (two chunks, or panels) tiles 0-3 C (16 rows x 16 fp32), 4-5 A (16 rows x 32 bf16), 6-7 B (16
// k-pairs x 16 pairs): all 16 x 64 bytes.
TileConfig chunk_config() {
  TileConfig c;
  for (int t = 0; t < 8; ++t) {
    c.rows[t] = 16;
    c.colsb[t] = 64;
  }
  return c;
}

// 17 <= M <= 32: amx_block's step for two chunks of x: each 64-k line of 32 rows widened into `a_buf` as there, then
// per k-tile 2 A (row halves) x 2 B (chunks) into 4 C tiles that stay over all of K. Panels (below) ran 1.2-1.25x
// slower here (4096x4096, 14336x4096, 4096x14336): at these M the widening bounds the step, and a panel's C tiles go
// to memory and back every slice.
void amx_block_two_chunks(const AmxArgs& a, int64_t n0, bf16_t* a_buf) {
  alignas(64) float cbuf[2 * kRows * 16];
  const int64_t rows = std::min(kRows, a.N - n0), chunk_stride = a.Kp * 16;
  zero_c();
  for (int64_t k = 0; k < a.Kp; k += 64) {
    widen_step(a, n0, rows, k, a_buf);
    for (int64_t h = 0; h < 2; ++h) {  // k-tiles k .. k + 31 and k + 32 .. k + 63
      const bf16_t* b = a.xp + (k + 32 * h) * 16;  // pair row (k + 32h) / 2 of chunk 0
      _tile_loadd(4, a_buf + 32 * h, 128);  // rows 0-15
      _tile_loadd(5, a_buf + 16 * 64 + 32 * h, 128);  // rows 16-31
      _tile_loadd(6, b, 64);
      _tile_loadd(7, b + chunk_stride, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 5, 6);
      _tile_dpbf16ps(2, 4, 7);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  store_c(cbuf, true);
  store_block(a, n0, cbuf);
}

// k per slice: the panel being multiplied and the one being widened (2 x 32 rows x kSliceK bf16, 32 KiB) stay in L1
// while every chunk of x streams past them. 256 ran 5-20% faster than 512 at M = 17-256 (4096x4096, when the panels
// ran from 17), 128 no faster.
constexpr int64_t kSliceK = 256;

// Widens one K slice of a block's rows into a panel, a few 64-k lines per call, so the next slice's widening (vector
// units) runs between the current slice's tile multiplies (the AMX unit) rather than after them: apart, the panels
// took 1.1-1.3x longer at M = 32-256 (4096x4096, when the panels ran from 17).
struct PanelWidener {
  const AmxArgs& a;
  int64_t n0, rows;
  int64_t k0 = 0, lines_per_row = 0, next = 0, total = 0;
  bf16_t* panel = nullptr;

  void start(int64_t k0_, int64_t kc, bf16_t* p) {
    k0 = k0_;
    lines_per_row = kc / 64;
    next = 0;
    total = rows * lines_per_row;
    panel = p;
  }
  void run(int64_t n) {
    for (const int64_t end = std::min(total, next + n); next < end; ++next) {
      const int64_t r = next / lines_per_row, k = next % lines_per_row * 64;
      const int8_t* src = a.w + (n0 + r) * a.K + k0 + k;
      __builtin_prefetch(src + kSliceK, 0, 2);  // the same row's next slice, into L2
      bf16_t* t = panel + (k / 32) * kRows * 32 + r * 32;
      widen_line(t, t + kRows * 32, src, a.K - k0 - k);
    }
  }
  void finish() { run(total - next); }
};

// Output rows [n0, n0 + 32) for M > 32: `panels` holds two of 32 x kSliceK bf16, `acc` 32 x 16 fp32 per chunk of x.
// As up to M = 16, rows past N (a last block's) are computed from whatever the panel holds and never stored.
void amx_panel_block(const AmxArgs& a, int64_t n0, bf16_t* panels, float* acc) {
  const int64_t rows = std::min(kRows, a.N - n0), chunks = (a.M + 15) / 16, pairs = (chunks + 1) / 2;
  const int64_t chunk_stride = a.Kp * 16;  // bf16 per chunk of the packed x
  const int64_t panel_size = kRows * kSliceK;
  PanelWidener widen{a, n0, rows};
  widen.start(0, std::min(kSliceK, a.Kp), panels);
  widen.finish();
  for (int64_t k0 = 0, s = 0; k0 < a.Kp; k0 += kSliceK, ++s) {
    const int64_t kts = std::min(kSliceK, a.Kp - k0) / 32;
    const bf16_t* panel = panels + (s & 1) * panel_size;
    if (k0 + kSliceK < a.Kp)
      widen.start(k0 + kSliceK, std::min(kSliceK, a.Kp - k0 - kSliceK), panels + ((s + 1) & 1) * panel_size);
    else
      widen.start(0, 0, nullptr);
    const int64_t per_step = (widen.total + pairs * kts - 1) / (pairs * kts);
    for (int64_t c = 0; c < chunks; c += 2) {
      const bool two = c + 1 < chunks;
      float* c0 = acc + c * kRows * 16;
      if (k0 == 0)
        zero_c();
      else
        load_c(c0, two);
      const bf16_t* b0 = a.xp + c * chunk_stride + k0 * 16;  // pair row k0 / 2 of chunk c
      for (int64_t kt = 0; kt < kts; ++kt) {
        const bf16_t* p = panel + kt * kRows * 32;
        _tile_loadd(4, p, 64);  // rows 0-15
        _tile_loadd(5, p + 512, 64);  // rows 16-31
        _tile_loadd(6, b0 + kt * 512, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 5, 6);
        if (two) {
          _tile_loadd(7, b0 + chunk_stride + kt * 512, 64);
          _tile_dpbf16ps(2, 4, 7);
          _tile_dpbf16ps(3, 5, 7);
        }
        widen.run(per_step);
      }
      store_c(c0, two);
    }
    widen.finish();
  }
  store_block(a, n0, acc);
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
  if (M < 1 || w->dtype != DSINF_I8 || !w->layout_nk || w->scale == nullptr || w->groups <= 0 ||
      w->N % w->groups != 0 || !(out_dtype == DSINF_F32 || out_dtype == DSINF_BF16) || !dsinf_cpu_host_amx())
    return DSINF_UNSUPPORTED;
  const int64_t K = w->K, N = w->N;
  if (N <= 0) return DSINF_OK;
  const int64_t Kp = std::max<int64_t>(64, (K + 63) / 64 * 64);  // whole 64-k steps
  // Three kernels by M: one C tile's columns (amx_block), two (amx_block_two_chunks), more (amx_panel_block).
  const int64_t chunks = (M + 15) / 16;
  const bool chunked = chunks > 1, panels = chunks > 2;
  const int64_t width = chunked ? 16 : M;  // rows of x per chunk
  AlignedBuffer<bf16_t> xp(size_t(Kp * chunks * width));
  pack_x(static_cast<const bf16_t*>(x), M, ldx, K, Kp, width, xp.data());
  Scratch<float, 4096> bias_f(bias ? size_t(N) : 0);
  if (bias) load_row(bias_f.data(), static_cast<const bf16_t*>(bias), N);
  const AmxArgs a{static_cast<const int8_t*>(w->data), K, N, M, xp.data(), Kp, w->scale, N / w->groups,
                  bias ? bias_f.data() : nullptr, out, out_dtype, ldo};
  const TileConfig cfg = chunked ? chunk_config() : tile_config(M);
  parallel_for(pf, (N + kRows - 1) / kRows, 1, [&](int64_t b, int64_t e) {
    AlignedBuffer<bf16_t> a_buf(size_t(kRows * (panels ? 2 * kSliceK : 64)));
    AlignedBuffer<float> acc(size_t(panels ? chunks * kRows * 16 : 0));
    _tile_loadconfig(&cfg);  // per thread: the configuration is thread state
    for (int64_t blk = b; blk < e; ++blk)
      if (panels)
        amx_panel_block(a, blk * kRows, a_buf.data(), acc.data());
      else if (chunked)
        amx_block_two_chunks(a, blk * kRows, a_buf.data());
      else
        amx_block(a, blk * kRows, a_buf.data());
    _tile_release();
  });
  return DSINF_OK;
#else
  (void)x, (void)M, (void)ldx, (void)w, (void)bias, (void)out, (void)out_dtype, (void)ldo, (void)pf;
  return DSINF_UNSUPPORTED;
#endif
}
