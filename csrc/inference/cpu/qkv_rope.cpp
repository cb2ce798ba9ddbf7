// Fused-QKV epilogue: dsinf_cpu_qkv_rope (API in cpu_kernels.h).
//
// One pass over the GEMM output src [B*S, N] (fp32, or bf16 from the binding's native bf16 GEMM),
// N = (H + 2*KV) * D, row = [Q | K | V]:
//   t = src[b*S + s, j*D : (j+1)*D] (+ bias[j*D : (j+1)*D])          for head slot j < H + 2*KV
//   RoPE on q and k slots (j < H + KV), dims >= rotary_dim pass through:
//     rotate_half (NeoX/Llama): pairs (i, i + rd/2);  GPT-J: pairs (2i, 2i + 1);  i < rd/2
//     (a, b) -> (a*cos - b*sin, b*cos + a*sin),  angle = (seq_offset + s) * theta^(-2i/rd)
//   dst = q_out[b, j, s, :] | k_out[b, j-H, s, :] | v_out[b, j-H-KV, s, :]  (each [B, heads, S, D]),
//   rounded to the output dtype once.
// That replaces the eager chain (bias add, split, three reshape/transpose copies, ~10 RoPE element-wise
// ops over q and k, stack) with one read of src and one write of the outputs.
//
// cos/sin are tabulated once per call per (s, i) - in double, rounded to float, exactly like
// dsinf.reference.rope_cos_sin - and stored "expanded" to rd floats per position with the sign of sin
// folded in, so both pair styles become out = t * cos_e + partner(t) * sin_e with contiguous loads:
//   rotate_half: cos_e = [c | c], sin_e = [-s | s], partner(t) = [t_hi | t_lo]
//   GPT-J:       cos_e = [c0 c0 c1 c1 ...], sin_e = [-s0 s0 -s1 s1 ...], partner(t) = t with each pair swapped
// Work is parallel over (row, head slot) units, so decode (B*S = 1) still spreads over threads.
#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_simd.h"

namespace dsinf_cpu {
namespace {

struct RopeTables {
  AlignedBuffer<float> cos_e, sin_e;  // [S, rd]
};

void build_tables(const dsinf_qkv_layout& L, RopeTables& t, dsinf_parallel_fn pf) {
  const int64_t rd = L.rotary_dim, half = rd / 2, S = L.S;
  t.cos_e = AlignedBuffer<float>(size_t(S * rd));
  t.sin_e = AlignedBuffer<float>(size_t(S * rd));
  std::vector<double> inv_freq(static_cast<size_t>(half));
  for (int64_t i = 0; i < half; ++i) inv_freq[size_t(i)] = std::pow(L.rope_theta, -2.0 * double(i) / double(rd));
  parallel_for(pf, S, std::max<int64_t>(1, 2048 / std::max<int64_t>(1, half)), [&](int64_t b, int64_t e) {
    for (int64_t s = b; s < e; ++s) {
      const double pos = double(L.seq_offset + s);
      float* ce = t.cos_e.data() + s * rd;
      float* se = t.sin_e.data() + s * rd;
      for (int64_t i = 0; i < half; ++i) {
        const double angle = pos * inv_freq[size_t(i)];
        const float c = float(std::cos(angle)), sn = float(std::sin(angle));
        if (L.rotate_half) {
          ce[i] = ce[i + half] = c;
          se[i] = -sn;
          se[i + half] = sn;
        } else {
          ce[2 * i] = ce[2 * i + 1] = c;
          se[2 * i] = -sn;
          se[2 * i + 1] = sn;
        }
      }
    }
  });
}

// o[0:rd] = rope(t[0:rd]) with expanded tables ce/se (see the file comment).
inline void rope_rotate_half(const float* t, const float* ce, const float* se, int64_t rd, float* o) {
  const int64_t half = rd / 2;
  int64_t i = 0;
  for (; i + kW <= half; i += kW) {
    const vf a = vload(t + i), b = vload(t + half + i);
    vstore(o + i, vfma(b, vload(se + i), vmul(a, vload(ce + i))));
    vstore(o + half + i, vfma(a, vload(se + half + i), vmul(b, vload(ce + half + i))));
  }
  for (; i < half; ++i) {
    const float a = t[i], b = t[half + i];
    o[i] = a * ce[i] + b * se[i];
    o[half + i] = b * ce[half + i] + a * se[half + i];
  }
}

inline void rope_pairs(const float* t, const float* ce, const float* se, int64_t rd, float* o) {
  int64_t i = 0;
  if (kW >= 2) {  // kW is even: a vector holds whole pairs
    for (; i + kW <= rd; i += kW) {
      const vf v = vload(t + i);
      vstore(o + i, vfma(vswap_pairs(v), vload(se + i), vmul(v, vload(ce + i))));
    }
  }
  for (; i < rd; i += 2) {
    const float a = t[i], b = t[i + 1];
    o[i] = a * ce[i] + b * se[i];
    o[i + 1] = b * ce[i + 1] + a * se[i + 1];
  }
}

template <class T>
void qkv_impl(const void* src, dsinf_dtype src_dtype, int64_t lds, const float* bias, const dsinf_qkv_layout& L,
              const RopeTables& tab, T* q_out, T* k_out, T* v_out, dsinf_parallel_fn pf) {
  const int64_t H = L.heads, KV = L.kv_heads, D = L.head_dim, S = L.S, rd = L.rotary_dim;
  const int64_t slots = H + 2 * KV;
  const int64_t units = L.B * S * slots;
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(1, D));
  parallel_for(pf, units, grain, [&](int64_t ub, int64_t ue) {
    AlignedBuffer<float> buf(size_t(2 * D));
    float* t = buf.data();
    float* o = t + D;
    for (int64_t u = ub; u < ue; ++u) {
      const int64_t m = u / slots, j = u % slots;
      const int64_t b = m / S, s = m % S;
      const float* in;
      if (src_dtype == DSINF_F32) {
        in = static_cast<const float*>(src) + m * lds + j * D;
      } else {  // 16-bit: widened into t
        load_row_any(t, static_cast<const char*>(src) + (m * lds + j * D) * elem_bytes(src_dtype), src_dtype, D);
        in = t;
      }
      if (bias) {
        const float* bj = bias + j * D;
        int64_t i = 0;
        for (; i + kW <= D; i += kW) vstore(t + i, vadd(vload(in + i), vload(bj + i)));
        for (; i < D; ++i) t[i] = in[i] + bj[i];
        in = t;
      }
      T* dst;
      if (j < H) dst = q_out + ((b * H + j) * S + s) * D;
      else if (j < H + KV) dst = k_out + ((b * KV + (j - H)) * S + s) * D;
      else dst = v_out + ((b * KV + (j - H - KV)) * S + s) * D;
      if (rd > 0 && j < H + KV) {
        const float* ce = tab.cos_e.data() + s * rd;
        const float* se = tab.sin_e.data() + s * rd;
        if (L.rotate_half) rope_rotate_half(in, ce, se, rd, o);
        else rope_pairs(in, ce, se, rd, o);
        store_row(dst, o, rd);
        if (rd < D) store_row(dst + rd, in + rd, D - rd);
      } else {
        store_row(dst, in, D);
      }
    }
  });
}

}  // namespace
}  // namespace dsinf_cpu

extern "C" dsinf_status dsinf_cpu_qkv_rope(const void* src, dsinf_dtype src_dtype, int64_t lds, const void* bias,
                                           const dsinf_qkv_layout* layout, dsinf_dtype out_dtype, void* q_out,
                                           void* k_out, void* v_out, dsinf_parallel_fn pf) {
  using namespace dsinf_cpu;
  const dsinf_qkv_layout& L = *layout;
  if (L.rotary_dim < 0 || L.rotary_dim % 2 || L.rotary_dim > L.head_dim) return DSINF_UNSUPPORTED;
  if (!float_dtype(src_dtype)) return DSINF_UNSUPPORTED;
  if (L.B * L.S == 0 || L.head_dim == 0) return DSINF_OK;
  const int64_t N = (L.heads + 2 * L.kv_heads) * L.head_dim;
  AlignedBuffer<float> bias_f(bias ? size_t(N) : 0);
  if (bias) {
    if (!load_row_any(bias_f.data(), bias, out_dtype, N)) return DSINF_UNSUPPORTED;
  }
  RopeTables tab;
  if (L.rotary_dim > 0) build_tables(L, tab, pf);
  const float* bf = bias ? bias_f.data() : nullptr;
  const bool ok = with_float_type(out_dtype, q_out, [&](auto* q) {
    using T = std::remove_pointer_t<decltype(q)>;
    qkv_impl(src, src_dtype, lds, bf, L, tab, q, static_cast<T*>(k_out), static_cast<T*>(v_out), pf);
  });
  return ok ? DSINF_OK : DSINF_UNSUPPORTED;
}
