// Private helpers of the CPU kernels (csrc/inference/cpu/*.cpp): element types, scalar conversions, a
// thin float-vector layer, and the parallel_for trampoline. Not part of the launcher API.
//
// One vector layer, picked at compile time from the compiler's macros:
//   AVX-512F                 -> vf = __m512 (kW = 16)
//   AVX2 + FMA + F16C        -> vf = __m256 (kW = 8)
//   anything else (aarch64)  -> vf = float  (kW = 1), plain C++
// Kernels are written once against vzero / vset1 / vfma / vload<T> / vstore<T> / vsum, so the three
// paths share every loop and every tail; only these few wrappers differ per ISA.
//
// Loads widen to fp32 in registers: bf16 -> fp32 is a 16-bit left shift, fp16 -> fp32 is F16C
// (vcvtph2ps), int8 -> int32 -> fp32 is vpmovsxbd + vcvtdq2ps. Stores round fp32 -> bf16/fp16 to nearest
// even, NaN -> quiet NaN, exactly like torch's `.to(dtype)` (so a kernel output equals the reference's
// single final rounding of the same fp32 value).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <new>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu_kernels.h"

#if defined(__AVX512F__)
#define DSINF_SIMD_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define DSINF_SIMD_AVX2 1
#endif
#if DSINF_SIMD_AVX512 || DSINF_SIMD_AVX2
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12's AVX-512 headers trip -Wmaybe-uninitialized on their own _mm512_undefined_*() (GCC PR105593).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#else
#include <immintrin.h>
#endif
#endif

namespace dsinf_cpu {

// Software prefetch into L2 (prefetcht1 on x86; a no-op where the compiler has none).
inline void prefetch_l2(const void* p) { __builtin_prefetch(p, 0, 2); }

// L2 prefetch of p[k, k + n), one per 64-byte line, for a loop stepping n elements at a time: a step shorter than
// a line prefetches only on the steps that start one. Prefetches never fault, so p may run past its array.
template <class T>
inline void prefetch_l2_lines(const T* p, int64_t k, int64_t n) {
  constexpr int64_t kLine = 64 / int64_t(sizeof(T));
  if (n < kLine) {
    if (k % kLine != 0) return;
    n = 1;
  }
  for (int64_t j = 0; j < n; j += kLine) prefetch_l2(p + k + j);
}

// 16-bit floats travel as raw bits; distinct types so overloads pick the right widening.
struct bf16_t {
  uint16_t bits;
};
struct fp16_t {
  uint16_t bits;
};

// ---------------------------------------------------------------- scalar conversions

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float to_f32(float v) { return v; }
inline float to_f32(int8_t v) { return float(v); }
inline float to_f32(bf16_t v) { return bits_to_float(uint32_t(v.bits) << 16); }
inline float to_f32(fp16_t v) {
  const uint32_t h = v.bits;
  const uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (mant << 13));  // inf / nan
  if (exp == 0) {
    if (mant == 0) return bits_to_float(sign);
    exp = 113;  // subnormal: renormalise
    while (!(mant & 0x400u)) {
      mant <<= 1;
      --exp;
    }
    return bits_to_float(sign | (exp << 23) | ((mant & 0x3ffu) << 13));
  }
  return bits_to_float(sign | ((exp + 112) << 23) | (mant << 13));
}

template <class T>
inline T from_f32(float v);
template <>
inline float from_f32<float>(float v) {
  return v;
}
template <>
inline bf16_t from_f32<bf16_t>(float v) {
  if (std::isnan(v)) return bf16_t{0x7fc0};
  uint32_t u = float_to_bits(v);
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return bf16_t{uint16_t(u >> 16)};
}
template <>
inline fp16_t from_f32<fp16_t>(float v) {
  // Round to nearest even (F. Giesen's float_to_half_fast3_rtne), incl. subnormals and overflow to inf.
  uint32_t u = float_to_bits(v);
  const uint32_t sign = (u >> 16) & 0x8000u;
  u &= 0x7fffffffu;
  uint16_t o;
  if (u >= (143u << 23)) {  // >= 65536: inf, or nan
    o = u > 0x7f800000u ? 0x7e00 : 0x7c00;
  } else if (u < (113u << 23)) {  // half subnormal or zero: let the fp adder round
    const float magic = bits_to_float(126u << 23);  // 0.5
    o = uint16_t(float_to_bits(bits_to_float(u) + magic) - (126u << 23));
  } else {
    const uint32_t mant_odd = (u >> 13) & 1u;
    u += (uint32_t(15 - 127) << 23) + 0xfffu + mant_odd;
    o = uint16_t(u >> 13);
  }
  return fp16_t{uint16_t(o | sign)};
}

// ---------------------------------------------------------------- vector layer

#if DSINF_SIMD_AVX512
constexpr int kW = 16;
using vf = __m512;
inline vf vzero() { return _mm512_setzero_ps(); }
inline vf vset1(float a) { return _mm512_set1_ps(a); }
inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
inline vf vdiv(vf a, vf b) { return _mm512_div_ps(a, b); }
inline vf vmin(vf a, vf b) { return _mm512_min_ps(a, b); }
inline vf vmax(vf a, vf b) { return _mm512_max_ps(a, b); }  // a NaN a gives b
inline vf vround(vf a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vf vpow2i(vf n) {  // 2^n for an integral n in [-126, 127]: n + 127 in the exponent field
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
}
inline float vsum(vf a) { return _mm512_reduce_add_ps(a); }
// out[0..3] = vsum(a0..a3), interleaving the four reductions (10 shuffles/adds instead of 4 x 8).
inline void vsum4(vf a0, vf a1, vf a2, vf a3, float* out) {
  const __m512 t01 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
  const __m512 t23 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
  const __m512d d01 = _mm512_castps_pd(t01), d23 = _mm512_castps_pd(t23);
  const __m512 t = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(d01, d23)),
                                 _mm512_castpd_ps(_mm512_unpackhi_pd(d01, d23)));  // per 128-bit lane: 4 sums
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(t),
                                 _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(t), 1)));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
}
inline vf vswap_pairs(vf a) { return _mm512_permute_ps(a, 0xB1); }  // [1,0,3,2,...]
inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
inline vf vload(const bf16_t* p) {
  const __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
}
inline vf vload(const fp16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline vf vload(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline void vstore(float* p, vf v) { _mm512_storeu_ps(p, v); }
inline void vstore(bf16_t* p, vf v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
}
inline void vstore(fp16_t* p, vf v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
#elif DSINF_SIMD_AVX2
constexpr int kW = 8;
using vf = __m256;
inline vf vzero() { return _mm256_setzero_ps(); }
inline vf vset1(float a) { return _mm256_set1_ps(a); }
inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
inline vf vdiv(vf a, vf b) { return _mm256_div_ps(a, b); }
inline vf vmin(vf a, vf b) { return _mm256_min_ps(a, b); }
inline vf vmax(vf a, vf b) { return _mm256_max_ps(a, b); }  // a NaN a gives b
inline vf vround(vf a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vf vpow2i(vf n) {  // 2^n for an integral n in [-126, 127]: n + 127 in the exponent field
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
inline float vsum(vf a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline void vsum4(vf a0, vf a1, vf a2, vf a3, float* out) {
  const __m256 t01 = _mm256_add_ps(_mm256_unpacklo_ps(a0, a1), _mm256_unpackhi_ps(a0, a1));
  const __m256 t23 = _mm256_add_ps(_mm256_unpacklo_ps(a2, a3), _mm256_unpackhi_ps(a2, a3));
  const __m256d d01 = _mm256_castps_pd(t01), d23 = _mm256_castps_pd(t23);
  const __m256 t = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(d01, d23)),
                                 _mm256_castpd_ps(_mm256_unpackhi_pd(d01, d23)));  // per 128-bit lane: 4 sums
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1)));
}
inline vf vswap_pairs(vf a) { return _mm256_permute_ps(a, 0xB1); }
inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
inline vf vload(const bf16_t* p) {
  const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
}
inline vf vload(const fp16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline vf vload(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline void vstore(float* p, vf v) { _mm256_storeu_ps(p, v); }
inline void vstore(bf16_t* p, vf v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
}
inline void vstore(fp16_t* p, vf v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
#else
constexpr int kW = 1;
using vf = float;
inline vf vzero() { return 0.0f; }
inline vf vset1(float a) { return a; }
inline vf vfma(vf a, vf b, vf c) { return std::fma(a, b, c); }
inline vf vmul(vf a, vf b) { return a * b; }
inline vf vadd(vf a, vf b) { return a + b; }
inline vf vdiv(vf a, vf b) { return a / b; }
inline vf vmin(vf a, vf b) { return a < b ? a : b; }
inline vf vmax(vf a, vf b) { return a > b ? a : b; }  // a NaN a gives b, as maxps
inline vf vround(vf a) { return std::nearbyint(a); }
inline vf vpow2i(vf n) { return std::ldexp(1.0f, int(n)); }
inline float vsum(vf a) { return a; }
inline void vsum4(vf a0, vf a1, vf a2, vf a3, float* out) {
  out[0] = a0;
  out[1] = a1;
  out[2] = a2;
  out[3] = a3;
}
inline vf vswap_pairs(vf a) { return a; }  // unused: pair kernels need kW >= 2
template <class T>
inline vf vload(const T* p) {
  return to_f32(*p);
}
template <class T>
inline void vstore(T* p, vf v) {
  *p = from_f32<T>(v);
}
#endif

// e^x, every lane: 2^n * e^r with n = round(x / ln 2) and r = x - n ln 2 in [-ln 2 / 2, ln 2 / 2] (ln 2 in two
// parts, so r is exact), e^r = 1 + r + r^2 p(r) with Cephes' expf polynomial: within 2 ulp of expf. x is
// clamped to [-87.3, 89]: below, 2^n stays a normal float (e^-87.3 ~ 1.2e-38 for anything smaller); above
// 88.38, n = 128 puts all ones in the exponent field, +inf, as expf overflows by 88.72 (so silu(x) of a very
// negative x is -0, not x / 1.7e38).
// Why not std::exp: it is a call per element, which the compiler cannot vectorize without -ffast-math; the
// gated epilogue spent ~1.7 ns per element in it, about 5x torch's vectorized silu.
inline vf vexp(vf x) {
  x = vmin(vmax(x, vset1(-87.3f)), vset1(89.0f));
  const vf n = vround(vmul(x, vset1(1.44269504088896341f)));
  vf r = vfma(n, vset1(-0.693359375f), x);
  r = vfma(n, vset1(2.12194440e-4f), r);
  vf p = vset1(1.9875691500e-4f);
  p = vfma(p, r, vset1(1.3981999507e-3f));
  p = vfma(p, r, vset1(8.3334519073e-3f));
  p = vfma(p, r, vset1(4.1665795894e-2f));
  p = vfma(p, r, vset1(1.6666665459e-1f));
  p = vfma(p, r, vset1(5.0000001201e-1f));
  return vmul(vfma(p, vmul(r, r), vadd(r, vset1(1.0f))), vpow2i(n));
}
// silu(x) = x / (1 + e^-x); a NaN x stays NaN (it is the numerator).
inline vf vsilu(vf x) { return vdiv(x, vadd(vset1(1.0f), vexp(vmul(x, vset1(-1.0f))))); }

// Tails: fewer than kW elements, zero-padded (zero bits are 0.0 in every element type).
template <class T>
inline vf vload_part(const T* p, int64_t n) {
  T tmp[kW];
  std::memset(static_cast<void*>(tmp), 0, sizeof(tmp));
  std::memcpy(static_cast<void*>(tmp), p, size_t(n) * sizeof(T));
  return vload(tmp);
}
template <class T>
inline void vstore_part(T* p, vf v, int64_t n) {
  T tmp[kW];
  vstore(tmp, v);
  std::memcpy(static_cast<void*>(p), tmp, size_t(n) * sizeof(T));
}

// out[i] = from_f32(src[i]) for n elements.
template <class T>
inline void store_row(T* out, const float* src, int64_t n) {
  int64_t i = 0;
  for (; i + kW <= n; i += kW) vstore(out + i, vload(src + i));
  if (i < n) vstore_part(out + i, vload_part(src + i, n - i), n - i);
}
// dst[i] = to_f32(src[i]) for n elements.
template <class T>
inline void load_row(float* dst, const T* src, int64_t n) {
  int64_t i = 0;
  for (; i + kW <= n; i += kW) vstore(dst + i, vload(src + i));
  if (i < n) vstore_part(dst + i, vload_part(src + i, n - i), n - i);
}

// Calls f(T*) for a runtime float dtype (F32/F16/BF16) on a void pointer; returns false otherwise.
template <class F>
inline bool with_float_type(dsinf_dtype t, void* p, F&& f) {
  switch (t) {
    case DSINF_F32: f(static_cast<float*>(p)); return true;
    case DSINF_F16: f(static_cast<fp16_t*>(p)); return true;
    case DSINF_BF16: f(static_cast<bf16_t*>(p)); return true;
    default: return false;
  }
}

// Whether t is a float dtype (not int8), and its bytes per element.
inline bool float_dtype(dsinf_dtype t) { return t == DSINF_F32 || t == DSINF_F16 || t == DSINF_BF16; }
inline size_t elem_bytes(dsinf_dtype t) { return t == DSINF_F32 ? 4 : 2; }

// dst[i] = to_f32(x[i]) for a runtime float dtype; false for a non-float dtype.
inline bool load_row_any(float* dst, const void* x, dsinf_dtype t, int64_t n) {
  switch (t) {
    case DSINF_F32: std::memcpy(dst, x, size_t(n) * sizeof(float)); return true;
    case DSINF_F16: load_row(dst, static_cast<const fp16_t*>(x), n); return true;
    case DSINF_BF16: load_row(dst, static_cast<const bf16_t*>(x), n); return true;
    default: return false;
  }
}

// ---------------------------------------------------------------- threading

// Zero-filled heap memory for n T's, its first element on a 64-byte boundary (a cache line, one zmm). The
// kernels read their scratch rows (x widened to fp32, weights widened per K block, accumulators) with
// full-width vector loads from row strides that are multiples of 64 bytes; std::vector's 16-byte alignment
// put those rows wherever malloc did, and where that was off a line every load straddled two: fp32 [N, K]
// 4096x4096 at M = 8 took 3.1 ms instead of 2.0 (Zen 5 guest, 2 threads), depending on the process
// (docs/PERFORMANCE.md, "CPU: scratch rows on cache lines").
template <class T>
class AlignedBuffer {
 public:
  explicit AlignedBuffer(size_t n = 0) {
    static_assert(std::is_trivially_copyable<T>::value, "scratch holds plain values");
    if (n) {
      p_ = static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(kAlign)));
      std::memset(static_cast<void*>(p_), 0, n * sizeof(T));
    }
  }
  ~AlignedBuffer() {
    if (p_) ::operator delete(p_, std::align_val_t(kAlign));
  }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  AlignedBuffer(AlignedBuffer&& o) noexcept : p_(o.p_) { o.p_ = nullptr; }
  AlignedBuffer& operator=(AlignedBuffer&& o) noexcept {
    std::swap(p_, o.p_);
    return *this;
  }
  T* data() { return p_; }
  const T* data() const { return p_; }

  static constexpr size_t kAlign = 64;

 private:
  T* p_ = nullptr;
};

// Zero-filled scratch memory (like std::vector<T>(n)), on the stack up to kInline elements: a decode-sized
// call (64 x 64) costs about as much as its few heap allocations otherwise did. Either way 64-byte aligned.
template <class T, size_t kInline>
class Scratch {
 public:
  explicit Scratch(size_t n) : heap_(n <= kInline ? 0 : n) {
    if (n <= kInline) {
      std::memset(static_cast<void*>(inline_), 0, n * sizeof(T));
      p_ = inline_;
    } else {
      p_ = heap_.data();
    }
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  T* data() { return p_; }

 private:
  alignas(64) T inline_[kInline];
  AlignedBuffer<T> heap_;
  T* p_;
};

// Runs f(begin, end) over [0, n) through the binding's parallel_for (serially when pf is null or the
// range is at most one grain). f must not throw.
template <class F>
inline void parallel_for(dsinf_parallel_fn pf, int64_t n, int64_t grain, const F& f) {
  if (n <= 0) return;
  if (pf == nullptr || n <= grain) {
    f(int64_t(0), n);
    return;
  }
  pf(0, n, grain < 1 ? 1 : grain, [](void* ctx, int64_t b, int64_t e) { (*static_cast<const F*>(ctx))(b, e); },
     const_cast<void*>(static_cast<const void*>(&f)));
}

}  // namespace dsinf_cpu
