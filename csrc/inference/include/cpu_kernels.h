// C-style launcher API of the dsinf CPU kernels (csrc/inference/cpu/*.cpp).
//
// Plain C types only: raw pointers, sizes, enums. No torch / ATen / c10 / pybind header may reach the
// kernel sources, so they compile in about a second each; only csrc/inference/binding/cpu_binding_ops.cpp
// sees both this header and ATen.
//
// Threading: kernels never use OpenMP themselves. Each launcher takes a `dsinf_parallel_fn`; the
// binding passes one backed by at::parallel_for, so kernels share torch's intra-op pool and honour
// torch.set_num_threads. Passing NULL runs the launcher serially on the calling thread (used by
// standalone tests). `body(ctx, b, e)` must be safe to run concurrently on disjoint [b, e) ranges;
// the implementation may call it once for the whole range.
//
// Element types: float32, float16 and bfloat16 are passed as raw bits (`void*`), tagged with a
// `dsinf_dtype`. Every launcher accumulates in float32 and rounds to a 16-bit output once, with
// round-to-nearest-even (the same rounding as torch's `.to(dtype)`).
//
// Every launcher returns DSINF_OK, or DSINF_UNSUPPORTED for a dtype/layout combination it does not
// implement (the binding validates arguments first, so a non-OK status is a binding bug, not a user
// error). Launchers never allocate through torch; the few scratch buffers they need (activations
// converted to fp32, RoPE tables) are small and come from the C++ heap.
#pragma once

#include <stdint.h>

#if defined(__GNUC__)
// Hidden: the binding of the same .so links these directly, and two dsinf CPU binaries (say a
// prebuilt and a JIT one) can never bind each other's symbols.
#define DSINF_CPU_API __attribute__((visibility("hidden")))
#else
#define DSINF_CPU_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

typedef void (*dsinf_parallel_body)(void* ctx, int64_t begin, int64_t end);
// Runs body(ctx, b, e) over disjoint sub-ranges covering [begin, end); each sub-range holds at least
// `grain` items where possible (grain <= 0: let the implementation choose).
typedef void (*dsinf_parallel_fn)(int64_t begin, int64_t end, int64_t grain, dsinf_parallel_body body, void* ctx);

typedef enum dsinf_dtype { DSINF_F32 = 0, DSINF_F16 = 1, DSINF_BF16 = 2, DSINF_I8 = 3 } dsinf_dtype;

typedef enum dsinf_status { DSINF_OK = 0, DSINF_UNSUPPORTED = 1 } dsinf_status;

// A weight W(k, n) of logical shape [K, N], stored contiguously.
//   layout_nk = 1: stored [N, K] (nn.Linear layout), W(k, n) = data[n * K + k]
//   layout_nk = 0: stored [K, N],                    W(k, n) = data[k * N + n]
// dtype DSINF_I8 (weight-only int8): layout_nk must be 1, and W(k, n) = data[n*K + k] * scale[n / (N / groups)]
// with `scale` float32 [groups], groups dividing N (groups == N: per channel).
typedef struct dsinf_weight {
  const void* data;
  dsinf_dtype dtype;
  int layout_nk;
  int64_t K, N;
  const float* scale;  // DSINF_I8 only
  int64_t groups;      // DSINF_I8 only
} dsinf_weight;

// Small-M ("decode") matmul, GEMV-style: streams every weight byte once from memory, parallel over
// blocks of output columns n, and keeps all M rows of x in registers / L1 against each weight block.
//   out[m * ldo + n] = round_out( sum_k x[m * ldx + k] * W(k, n)  (+ bias[n]) ),  0 <= m < M, 0 <= n < N
// x: x_dtype (F32/F16/BF16); w: same dtype as x, or I8 with any x_dtype; bias: x_dtype [N] or NULL;
// out_dtype: DSINF_F32 or x_dtype. Cost grows with M (the weight is re-read from L2 per row block):
// the binding switches to a BLAS GEMM above a measured M (see cpu_binding_ops.cpp). M == 0 is a no-op.
DSINF_CPU_API dsinf_status dsinf_cpu_gemv(const void* x, dsinf_dtype x_dtype, int64_t M, int64_t ldx,
                                          const dsinf_weight* w, const void* bias, void* out,
                                          dsinf_dtype out_dtype, int64_t ldo, dsinf_parallel_fn pf);

// 1 when this build's dsinf_cpu_gemv multiplies bf16 x on vdpbf16ps (bf16 [N, K] weights, and int8 weights
// widened to bf16 from M = 2), else 0: it moves the binding's bf16 crossovers (cpu_binding_ops.cpp).
DSINF_CPU_API int dsinf_cpu_gemv_dpbf16(void);

// 1 on an AMD CPU (x86-64 CPUID vendor, read once), else 0: the GEMVs' prefetch and the binding's fp32 GEMM
// choices were measured per vendor.
DSINF_CPU_API int dsinf_cpu_host_amd(void);

// int8 weights ([N, K], as dsinf_cpu_gemv's) x bf16 x on AMX tiles, any M >= 1: out as dsinf_cpu_gemv's with
// out_dtype F32 or BF16 and a bf16 bias (or NULL). The binding takes it for 2 <= M <= 256 where
// dsinf_cpu_amx_ready(): the vdpbf16ps GEMV is bound by its multiply-adds there, and dequantize + GEMM by the
// weight's bf16 copy. DSINF_UNSUPPORTED where this build (below avx512_bf16, or not Linux x86-64) or the host (no
// AMX-BF16, or the OS refused the tile state) has no AMX.
DSINF_CPU_API dsinf_status dsinf_cpu_gemv_amx(const void* x, int64_t M, int64_t ldx, const dsinf_weight* w,
                                              const void* bias, void* out, dsinf_dtype out_dtype, int64_t ldo,
                                              dsinf_parallel_fn pf);
// 1 when dsinf_cpu_gemv_amx runs here (this build has it and dsinf_cpu_host_amx()), else 0.
DSINF_CPU_API int dsinf_cpu_amx_ready(void);
// 1 when this CPU has AMX-BF16 tiles and the OS grants their state (on Linux asked for the first time, as oneDNN
// asks), whatever this build is, else 0.
DSINF_CPU_API int dsinf_cpu_host_amx(void);

// Weight block -> float32 (for large-M GEMMs in fp32 BLAS) or bfloat16 (int8 weights only, for the
// binding's native bf16 GEMM). Converts output columns [n0, n1) of W, keeping the weight's own layout (int8
// weights are dequantized with their scale, in fp32, then rounded once to dst_dtype):
//   layout_nk: dst[(n - n0) * K + k] = W(k, n)        ([n1-n0, K], row stride K)
//   else:      dst[k * (n1 - n0) + (n - n0)] = W(k, n) ([K, n1-n0], row stride n1-n0)
DSINF_CPU_API dsinf_status dsinf_cpu_weight_widen(const dsinf_weight* w, int64_t n0, int64_t n1, void* dst,
                                                  dsinf_dtype dst_dtype, dsinf_parallel_fn pf);

// Epilogue of an fp32 GEMM: out[m * ldo + n] = round_out(src[m * lds + n] (+ bias[n])).
// bias: out_dtype [N] or NULL; out_dtype F32/F16/BF16. In place (out == src, F32) is allowed.
DSINF_CPU_API dsinf_status dsinf_cpu_bias_cast(const float* src, int64_t M, int64_t N, int64_t lds,
                                               const void* bias, void* out, dsinf_dtype out_dtype, int64_t ldo,
                                               dsinf_parallel_fn pf);

// GEMM over a weight stored [K, N] (DeepSpeed's layout), read in place, once, in fp32:
//   y[m * ldy + n] = sum_k x[m * ldx + k] * W(k, n),  0 <= m < M, 0 <= n < N,  W(k, n) = w[k * ldw + n]
// x, y: fp32; w: w_dtype F32/F16/BF16 (widened to fp32 exactly; I8 -> UNSUPPORTED). Each output sums k in
// order whatever the thread count (gemm_kn.cpp says how it blocks). K == 0 writes zeros; M == 0 or N == 0
// is a no-op.
DSINF_CPU_API dsinf_status dsinf_cpu_gemm_kn(const float* x, int64_t M, int64_t K, int64_t ldx, const void* w,
                                             dsinf_dtype w_dtype, int64_t ldw, int64_t N, float* y, int64_t ldy,
                                             dsinf_parallel_fn pf);

// The vector width, in bits, this build's dsinf_cpu_gemm_kn runs on: 512 (AVX-512), 256 (AVX2) or 0.
DSINF_CPU_API int dsinf_cpu_gemm_kn_simd(void);

typedef struct dsinf_qkv_layout {
  int64_t B, S;
  int64_t heads, kv_heads, head_dim;  // the fused row is [Q | K | V]: heads*D, kv_heads*D, kv_heads*D wide
  int64_t rotary_dim;                 // 0: no RoPE; else even and <= head_dim
  int rotate_half;                    // 1: NeoX/Llama pairs (i, i + rd/2); 0: GPT-J pairs (2i, 2i + 1)
  double rope_theta;
  int64_t seq_offset;                 // position of row s is seq_offset + s
} dsinf_qkv_layout;

// Fused-QKV epilogue, one pass over the GEMM output src [B*S, N] (row stride lds; src_dtype F32, or a 16-bit
// float from a GEMM that rounds its output):
//   row = src[b*S + s, :] (+ bias);  q_h = row[h*D : (h+1)*D],  k_j = row[(H + j)*D : ...],  v_j = row[(H + KV + j)*D : ...]
//   RoPE on q_h and k_j (pair frequency f_i = theta^(-2i/rd), angle (seq_offset + s) * f_i, computed in
//   double and rounded to float once per (s, i), like dsinf.reference), then
//   q_out[b, h, s, :], k_out[b, j, s, :], v_out[b, j, s, :] (all contiguous [B, heads, S, D]) = round_out(...).
// For the [3, B, H, S, D] form pass q_out = base, k_out = base + B*H*S*D, v_out = base + 2*B*H*S*D.
// bias: out_dtype [N] or NULL.
DSINF_CPU_API dsinf_status dsinf_cpu_qkv_rope(const void* src, dsinf_dtype src_dtype, int64_t lds, const void* bias,
                                              const dsinf_qkv_layout* layout, dsinf_dtype out_dtype, void* q_out,
                                              void* k_out, void* v_out, dsinf_parallel_fn pf);

#ifdef __cplusplus
}  // extern "C"
#endif
