// CPU implementations of the dsinf:: ops (schemas and semantics: the op specs, dsinf/ops/<op>.py), registered by
// cpu_binding.cpp (cpu_ops.h declares them; it says why the binding is two files).
//
// With cpu_binding.cpp, the only translation unit of the CPU module that sees ATen. It validates (validate.h
// and op_rules.h, same wording as dsinf/checks.py), picks a path by M = B*S, and hands raw pointers to the
// torch-free kernels (cpu_kernels.h) together with a parallel_for backed by at::parallel_for (torch's OpenMP
// pool; this file must be compiled and linked with -fopenmp, or at::parallel_for silently runs serially).
//
//   int8 x bf16, AMX      int8 weights with bf16 x at 2 <= M <= 256 on our AMX tiles where the host has them
//                         (amx_gemv), whichever side of the route below M falls.
//   M <= gemv_max_m(...)  decode: our GEMV streams the weight once (fp32/bf16/fp16/int8, both layouts),
//                         writing the final dtype with the bias, or fp32 for the QKV epilogue.
//   larger M              fp32 sgemm (at::mm_out / at::addmm_out, MKL) one cache-sized block of output
//                         columns at a time, straight into its column slice of the fp32 result: fp32
//                         weights in place; 16-bit / int8 weights widened (dequantized) into one reused
//                         buffer, with x.to(fp32), then bias + rounding once (dsinf_cpu_bias_cast).
//                         On an AMD host oneDNN's fp32 GEMM instead (onednn_fp32_gemm): fp32 weights in
//                         one call, widened blocks each into a fresh result copied into their slice; float
//                         [K, N] weights there (16-bit ones widened in its panels, no widened copy) on our
//                         GEMM (kn_gemm, gemm_kn.cpp) where it ran faster.
//                         Without native bf16 GEMM (AVX2) this is far faster than torch's bf16 mm and
//                         keeps fp32 accumulation (docs/PERFORMANCE.md).
//                         bf16 activations on a host with native bf16 dot products (native_bf16_gemm):
//                         torch's bf16 GEMM instead, bf16 out (fp32 accumulation, rounded once).
//   do_flash_attn         [M, N] from either path (fp32, or bf16 from the native GEMM), then
//                         dsinf_cpu_qkv_rope: bias + RoPE + per-head split + transpose + rounding in one
//                         pass, into the final owned tensors.
//
// Outputs are always fresh tensors from the torch allocator.
#include <ATen/Config.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <tuple>
#include <vector>

#include "aten_ops.h"
#include "cpu_kernels.h"
#include "cpu_ops.h"
#include "op_rules.h"
#include "routes.h"
#include "validate.h"

#if AT_PARALLEL_OPENMP && !defined(_OPENMP)
// at::parallel_for is an inline template: without -fopenmp here it compiles to a serial loop and every
// kernel runs on one core. (Linking -fopenmp reuses the libgomp.so.1 torch already loaded: same soname.)
#warning "cpu_binding_ops.cpp: compile and link with -fopenmp, or the dsinf CPU kernels run single-threaded"
#endif

namespace dsinf {
namespace cpu_binding {
namespace {

void aten_parallel_for(int64_t begin, int64_t end, int64_t grain, dsinf_parallel_body body, void* ctx) {
  at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) { body(ctx, b, e); });
}
constexpr dsinf_parallel_fn kParallel = &aten_parallel_for;

dsinf_dtype to_dsinf(c10::ScalarType t) {
  switch (t) {
    case c10::ScalarType::Float: return DSINF_F32;
    case c10::ScalarType::Half: return DSINF_F16;
    case c10::ScalarType::BFloat16: return DSINF_BF16;
    default: return DSINF_I8;  // validate.h admits only these four
  }
}

void check_status(dsinf_status st, const char* op, const char* what) {
  TORCH_CHECK(st == DSINF_OK, op, ": internal error: CPU kernel ", what, " rejected its arguments");
}

// The large-M GEMM of bf16 activations on a host with native bf16 dot products (avx512_bf16): torch's bf16 GEMM
// (oneDNN: vdpbf16ps, fp32 accumulation, rounded once to bf16 with the bias) ran 2.3-3.0x faster than the fp32
// path (widen + MKL sgemm) on a Zen 4 host, 2 threads, M = 32..512, K x N from 256x1376 to 4096x14336, and HF's
// bf16 first token at batch 8 was 1.7x dsinf's (docs/PERFORMANCE.md, "CPU bf16 prefill"). Its output is bf16, so
// a fused epilogue's input (the QKV + RoPE and gated epilogues) is rounded there once more, as on CUDA, where
// cuBLAS writes the act dtype. Decided at run time from the host, not from this binary's ISA level: the GEMM is
// torch's, so a portable (AVX2) prebuilt binary on such a host takes it too. Other hosts keep the fp32 path (on
// an AVX2 host torch's bf16 GEMM ran 2-5x slower than it; AVX-512 without bf16 is unmeasured), as does fp16 (no
// native fp16 dot product below avx512_fp16). dsinf_cpu_native_bf16_override (dsinf.routes.bf16_gemm) picks
// either path whatever the host, for the tests (both paths on any host) and for measuring.
bool host_has_native_bf16() {
#if AT_MKLDNN_ENABLED() && defined(__x86_64__) && defined(__GNUC__)
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") != 0;
  }();
  return has;
#else
  return false;
#endif
}

std::atomic<int64_t> g_native_bf16_override{-1};  // -1: the host's choice; 0 / 1: the fp32 path / native

bool native_bf16_gemm() {
  const int64_t o = g_native_bf16_override.load(std::memory_order_relaxed);
  return o < 0 ? host_has_native_bf16() : o != 0;
}

// Whether torch's native bf16 GEMM runs on AMX tiles here: the CPU's AMX-BF16 tiles, their state saved by the OS and,
// on Linux, granted (dsinf_cpu_host_amx, gemv_amx.cpp, asks once as oneDNN does; where it is refused - a small signal
// stack - oneDNN keeps its AVX-512 code and this rule the vdpbf16ps one). There it is many times faster than
// vdpbf16ps at small M, and our GEMV's lead ends sooner (native_bf16_gemv_max_m). dsinf_cpu_amx_bf16_override
// (dsinf.routes.amx_bf16) picks either rule whatever the host, for the tests.
bool host_has_amx_bf16() {
#if AT_MKLDNN_ENABLED()
  return dsinf_cpu_host_amx() != 0;  // read once there
#else
  return false;
#endif
}

std::atomic<int64_t> g_amx_bf16_override{-1};  // -1: the host's choice; 0 / 1: the vdpbf16ps rule / the AMX rule

bool amx_bf16() {
  const int64_t o = g_amx_bf16_override.load(std::memory_order_relaxed);
  return o < 0 ? host_has_amx_bf16() : o != 0;
}

// The fp32 GEMM past the GEMV: oneDNN's (torch's mkldnn::_linear_pointwise, the op torch's own frozen CPU
// linears run) or MKL's (at::mm / at::addmm, what F.linear runs). On a Zen 4 host (2 threads, M = 17..512, K x
// N from 256x768 to 14336x4096, both layouts) oneDNN's ran 1.08-2.65x faster than MKL's, whose AMD code path
// is not its best (docs/PERFORMANCE.md, "CPU fp32 GEMM: oneDNN on AMD"); on Intel hosts MKL is Intel's own and
// oneDNN is unmeasured, so they keep MKL. The op is looked up once (cpu_binding.cpp: onednn_linear_available);
// a torch without it keeps MKL. It computes in fp32 unless the user lowered
// torch.backends.mkldnn.matmul.fp32_precision, as torch's own oneDNN path does.
// dsinf_cpu_onednn_fp32_override (dsinf.routes.fp32_gemm) picks either whatever the host.
bool host_is_amd() { return dsinf_cpu_host_amd() != 0; }

bool host_prefers_onednn_fp32() {
#if AT_MKLDNN_ENABLED()
  return host_is_amd();
#else
  return false;
#endif
}

std::atomic<int64_t> g_onednn_fp32_override{-1};  // -1: the host's choice; 0 / 1: MKL / oneDNN

bool onednn_fp32_gemm() {
  const int64_t o = g_onednn_fp32_override.load(std::memory_order_relaxed);
  return (o < 0 ? host_prefers_onednn_fp32() : o != 0) && onednn_linear_available();
}

// Past the GEMV, a float [K, N] weight in place (DeepSpeed's layout) on our GEMM (gemm_kn.cpp) rather
// than the library's: on an AMD host oneDNN reads a [K, N] weight below its [N, K] speed (a transposed view it
// copies), while ours reads it in place once. Through vector_matmul_fp32, oneDNN's time / ours (Zen 5,
// 2 threads, an AVX-512 build, 12 shapes K x N from 1024x4096 to 14336x4096; `python -m bench.kn_gemm`,
// docs/PERFORMANCE.md, "CPU: an fp32 GEMM for [K, N] weights"):
//   M = 16..64    1.05-1.61x on all 12 (earlier runs: 4096x1024 at M = 16 0.82x and 0.95x)
//   M = 128       1.02-1.37x, except 4096x1024 0.96x (and 4096x4096 0.84-1.06x over four runs): ties
//   M = 256..512  N >= 2K (4096x8192 .. 4096x14336, 1024x4096): 1.00-1.31x; else 0.89-1.01x
// so ours up to M = 128, and up to M = 512 for N >= 2K (at M = 2048 and 4096 ours read 0.83-0.98x, a review
// measured), for N >= 1024: narrower outputs ran 0.40-1.03x (4096x64 .. 4096x512). The same rule serves 16-bit
// [K, N] weights past the GEMV (fp16 activations; bf16 without the native bf16 GEMM), which the library's path
// widens into fp32 blocks for oneDNN while ours widens them in its panels: fp16, the same 12 shapes, ours over
// that path 1.68-2.49x at M = 32, 1.54-1.86x at 64, 1.11-1.45x at 128 (two runs), 1.05-1.23x for N >= 2K at 512
// (0.92-1.21x otherwise; `python -m bench.kn_gemm --dtype fp16`; the fp16 GEMV takes M <= 24). Where fp32 runs
// on oneDNN:
// an AMD host, or oneDNN forced (routes.fp32_gemm). An AVX2 build (6 x 2 ymm tile) is unmeasured: it keeps the
// library, as MKL hosts do. dsinf_cpu_kn_gemm_override (dsinf.routes.kn_gemm) forces either for any M past the
// GEMV.
constexpr int64_t kKnGemmMaxM = 128, kKnGemmWideMaxM = 512, kKnGemmMinN = 1024;
constexpr int64_t kKnGemvMaxM = 16;  // the fp32 [K, N] GEMV's crossover where ours is the GEMM past it (gemv_max_m)
std::atomic<int64_t> g_kn_gemm_override{-1};  // -1: the host's choice; 0 / 1: the library's / ours
std::atomic<int64_t> g_kn_gemm_calls{0};      // GEMMs run on ours (tests: the path that ran)

bool kn_gemm_host() {
  static const bool tuned = dsinf_cpu_gemm_kn_simd() == 512;
  return tuned && onednn_fp32_gemm();
}

bool kn_gemm(int64_t M, int64_t K, int64_t N) {
  const int64_t o = g_kn_gemm_override.load(std::memory_order_relaxed);
  if (o >= 0) return o != 0;
  return kn_gemm_host() && N >= kKnGemmMinN && (M <= kKnGemmMaxM || (N >= 2 * K && M <= kKnGemmWideMaxM));
}

// int8 weights with bf16 x on AMX tiles (gemv_amx.cpp) for 2 <= M <= 256 where the host has AMX
// (dsinf_cpu_amx_ready: an avx512_bf16 build on Linux, the CPU's AMX-BF16, the tile state granted), ahead of the
// route table: the vdpbf16ps GEMV is bound by its multiply-adds from M = 2, the tiles by widening the weight, and
// past M = 16 dequantize + torch's GEMM pays a bf16 copy of the weight per call. On an Intel Xeon with AMX (2
// threads; docs/PERFORMANCE.md, "CPU: int8 on AMX tiles" and "int8 prefill on AMX tiles"), GEMV time / the tiles'
// at M = 2 1.17-1.34x, 4 1.56-1.79x, 8 2.29-2.65x, 16 3.38-4.11x (4096x4096, 4096x11008, 11008x4096, 4096x14336);
// dequantize + GEMM / the tiles' at M = 17-128 1.64-3.80x, 256 1.09-1.29x, 512 0.80-0.88x, 1024 0.56-0.69x
// (4096x4096, 4096x14336, 14336x4096), so M > 256 dequantizes. At M = 1 the GEMV streams the weight at memory speed
// and the tiles' widening would be the slower. dsinf_cpu_amx_gemv_override (dsinf.routes.amx_gemv) forces the
// tiles off, or on at every M from 2 (past 256 too: the measurement of this rule), for the tests and probes;
// dsinf_cpu_amx_gemv_calls counts the calls.
constexpr int64_t kAmxMinM = 2, kAmxGemvMaxM = 16, kAmxMaxM = 256;
std::atomic<int64_t> g_amx_gemv_override{-1};  // -1: the host's choice; 0 / 1: the other paths / the tiles
std::atomic<int64_t> g_amx_gemv_calls{0};

// Whether the tiles take int8 x bf16 at all here: this build and host run them (read once in gemv_amx.cpp) and
// they are not forced off.
bool amx_tiles() {
  return g_amx_gemv_override.load(std::memory_order_relaxed) != 0 && dsinf_cpu_amx_ready() != 0;
}

bool amx_gemv(int64_t M, c10::ScalarType act, const MatmulShape& s) {
  if (!s.int8 || act != c10::ScalarType::BFloat16 || M < kAmxMinM) return false;
  if (M > kAmxMaxM && g_amx_gemv_override.load(std::memory_order_relaxed) < 0) return false;  // the host's rule
  return amx_tiles();
}

// Whether this binary's GEMV has the vdpbf16ps tile for bf16 x (bf16 weights, and int8 weights widened to bf16),
// as the kernels report it. A portable (AVX2) build on an avx512_bf16 host takes the native bf16 GEMM past its
// GEMV, but its GEMV widens to fp32.
bool gemv_dpbf16() {
  static const bool has = dsinf_cpu_gemv_dpbf16() != 0;
  return has;
}

// bf16 activations on the native bf16 GEMM (native_bf16_gemm) cross sooner. `python -m dsinf.routes --tune` on a
// Zen 4 host (2 threads; K x N 256x768 to 4096x11008, both layouts) measured ATen / ours at M = 8 (M = 16):
//   [N, K], vdpbf16ps tile   1.10-1.66x on 5 of 6 shapes (0.73-1.00x); 256x4096 0.97-0.99x in three runs, so a
//                            short K with a wide N keeps 4 (4096x256: 1.02-1.18x)
//   int8, widened to bf16    1.13-1.95x on all 6 (1.09-1.34x from K*N = 2^24 and on 256x768 / 688x256;
//                            0.76-0.96x on 256x1376 / 256x4096)
//   [K, N] (fp32 axpy)       1.27-1.52x from K*N = 2^20 (0.73-0.76x); 0.93-0.98x on 256x768 and 256x1376
//   fp32 widening GEMV       [N, K] 0.72-0.93x on 4 of 6; int8 0.63-0.91x from K*N = 2^20, 1.11-1.45x below
//   (docs/PERFORMANCE.md, "CPU decode at batch 8"; the last two rows from "CPU bf16 prefill"). Each class
// takes its lowest. int8 on the fp32 tiles since they convert the weights in registers (kConvertInTile):
// 1.56-1.67x at M = 8 (0.98-1.04x at 16) on an avx512 build, 1.33-1.55x (0.68-0.82x) on an avx2 build, 4096x4096,
// 14336x4096, 4096x14336, 1024x4096 ("CPU: weights converted in the tile"), so 8 at every size.
// Where that GEMM runs on AMX tiles (amx_bf16), [N, K] weights cross at 4 and int8 at 8, each halved for K <= 256
// with N >= 4096; int8 at 16 where it runs on our own AMX tiles (below). The same tuning on
// an Intel Xeon with AMX (2 threads; 8 shapes, 256x768 to 4096x14336; docs/PERFORMANCE.md, "CPU: an Intel host
// with AMX") measured ATen / ours at M = 4 (M = 8):
//   [N, K], vdpbf16ps tile   1.35-1.69x on 6 of 6 from K = 1024 (0.76-0.99x: 0.87x on 4096x4096 in the bench);
//                            256x4096 0.93x at M = 4 (1.49x at 2)
//   int8, widened to bf16    our GEMV up to 8 on 7 of 8 (at 16: 0.69-0.97x; 11008x4096 1.07x); 256x4096 0.93x at 8
//   [K, N]                   1.03-1.31x at M = 8 on all 8 (0.51-0.76x at 16): as without AMX
// The portable build's widening GEMV on such a host is unmeasured; the AMX rule is no higher than its own. Where
// int8 itself runs on AMX tiles (amx_gemv) it keeps them to their last M, 16, where they took 0.24-0.32x the time
// of dequantize + torch's GEMM (the 4 shapes of amx_gemv's note).
int64_t native_bf16_gemv_max_m(const MatmulShape& s) {
  const int64_t KN = s.K * s.N;
  const bool short_wide = s.K <= 256 && s.N >= 4096;
  if (amx_bf16() && s.int8 && amx_tiles()) return kAmxGemvMaxM;
  if (amx_bf16() && (s.int8 || s.weight_nk)) return (s.int8 ? 8 : 4) / (short_wide ? 2 : 1);
  if (s.int8) return gemv_dpbf16() && KN >= (int64_t(1) << 24) ? 16 : 8;
  if (s.weight_nk) return gemv_dpbf16() && !short_wide ? 8 : 4;
  return KN >= (int64_t(1) << 20) ? 8 : 4;
}

// Largest M that runs on our GEMV rather than BLAS, for a shape the route table (routes.h) does not list:
// MKL parallelises small M poorly, while our GEMV splits evenly over threads and streams the weight once,
// until the FMA units bound it. fp32's crossover falls with the output width N (and a short K): below ~1024
// columns MKL's small-M kernels catch up sooner. Measured per shape (docs/PERFORMANCE.md, "CPU GEMV / GEMM
// crossover"): at M = 32, [N,K] fp32 lost to MKL on 12 of 15 shapes, by up to 36%. The rule takes the lowest
// crossover seen over two hosts (AVX2 Zen 3 at 4096x4096; AVX-512 Zen 4 over 24 shapes, K and N from 256 to
// 14336, whose runs of one shape spread by up to 30%); a measured route (DSINF_ROUTES=measure, python -m
// dsinf.routes --tune) finds a shape's own. DSINF_CPU_FORCE_PATH=1 / 2 (compile-time, for measuring only)
// forces GEMV / GEMM. Where fp32 past the GEMV is oneDNN's GEMM (onednn_fp32_gemm, an AMD host) it crosses
// sooner: oneDNN streams an [N, K] weight at DRAM speed even at M = 1 (ATen / ours 0.91-1.02x); at M = 16 it beat
// our GEMV on every shape measured on a Zen 4 (0.71-0.93x; [K, N] 0.77-0.92x), at M = 8 on 2 of 4 [N, K] shapes
// (0.88-1.07x; [K, N] 1.65-2.17x ours). Zen 4, 2 threads (docs/PERFORMANCE.md, "CPU fp32 GEMM: oneDNN on AMD"). A
// cap of 4 for [N, K] cost the Llama-shaped model 20% of its batch-8 decode end to end, so 8 for both layouts,
// except fp32 [K, N] where our own GEMM runs past the GEMV (16; gemv_max_m says why).
// int8 weights (fp32 FMAs; MKL: 24) cross at 16 on oneDNN, whose GEMM runs their widened blocks at its speed
// (kWidenedColumns): past-the-GEMV / GEMV at M = 8 / 16 / 32 on 4096x4096, 14336x4096, 4096x14336, 11008x4096
// (the last with fp32 activations only), the GEMV converting the weights in its tile: fp32 activations 1.17-1.93x
// / 0.82-1.29x / 0.69-0.94x, fp16 1.56-1.89x / 0.87-1.40x / 0.67-0.96x. Zen 4, 2 threads (docs/PERFORMANCE.md,
// "CPU: weights converted in the tile"). The gated kernel keeps 24 (gated_max_m).
constexpr int64_t kInt8MaxM = 24, kInt8MaxMOnednn = 16;
int64_t gemv_max_m(const MatmulShape& s, c10::ScalarType act, bool gated = false) {
#if defined(DSINF_CPU_FORCE_PATH) && DSINF_CPU_FORCE_PATH == 1
  return INT64_MAX;
#elif defined(DSINF_CPU_FORCE_PATH) && DSINF_CPU_FORCE_PATH == 2
  return 0;
#endif
  if (act == c10::ScalarType::BFloat16 && native_bf16_gemm()) return native_bf16_gemv_max_m(s);
  if (s.int8) return onednn_fp32_gemm() ? kInt8MaxMOnednn : kInt8MaxM;
  if (act == c10::ScalarType::Float) {
    // oneDNN's GEMM is at least as fast as MKL's: its cap only lowers the MKL rule. Where our [K, N] GEMM runs
    // past the GEMV instead (kn_gemm), the GEMV keeps ahead of it to M = 16: our GEMM / the GEMV at M = 16
    // 1.19-1.74x on 9 of 12 shapes, 0.94-0.97x (ties) on the three of at most 4M values; at 24 1.05-1.39x and
    // 0.82-0.84x (Zen 5, 2 threads; `python -m bench.kn_gemm --gemv`, docs/PERFORMANCE.md, "CPU: the GEMV
    // against the [K, N] GEMM"). There the GEMV beat oneDNN's [K, N] GEMM at M = 16 too (1.1-2.3x), where on the
    // Zen 4 host that set 8 oneDNN's had won (0.77-0.92x); [N, K] keeps 8 (oneDNN 0.78-0.89x of the GEMV at
    // M = 16 on Zen 5 too). rms_mlp_gemm's gate|up keeps 8 there: its gated kernel at M = 9..16 ran 0.80-0.89x
    // of the matmul path (our GEMM + the gated epilogue) on 4096x22016 and 4096x28672 (Zen 5, 2 threads).
    const int64_t onednn_cap = !onednn_fp32_gemm() ? INT64_MAX
                               : !gated && !s.weight_nk && kn_gemm(kKnGemvMaxM, s.K, s.N) ? kKnGemvMaxM : 8;
    int64_t mkl;
    if (s.weight_nk)
      mkl = s.N <= 256 || s.K <= 256 ? 8 : 16;  // K = 256: 0.97-1.05x at M = 16, ties
    else  // [K, N] from N = 1024: 24 on the Zen hosts, but an Intel Xeon's MKL (2 threads) beat the GEMV at 24
      mkl = s.N >= 1024 ? 16 : (s.N <= 256 && s.K >= 2048 ? 4 : 8);  // on all 6 shapes (0.78-0.97x; 16: 1.08-1.24x)
    return std::min(mkl, onednn_cap);
  }
  return s.weight_nk ? 16 : 24;
}

// Largest M for rms_mlp_gemm's gate|up on the gated kernel (fp32 FMAs over widened weights and x), above which
// it runs as a matmul (routed by its plain key) + the gated epilogue: the plain GEMV's crossover, except for bf16
// x where this binary's GEMV has the vdpbf16ps tile and the host the native bf16 GEMM past it. There
// `python -m dsinf.routes --tune 256x688 4096x14336 --mlp` (Zen 4, 2 threads) measured the matmul path's time
// over the gated kernel's (< 1: the matmul path faster) at M = 1, 2, 4, 8: bf16 0.93-1.00x, 0.86-0.98x,
// 0.69-0.88x, 0.75-0.76x; int8 0.70x (the Llama shape; 1.07x on the small one), 1.09-1.14x, 0.94-0.99x,
// 0.77-0.78x (docs/PERFORMANCE.md, "CPU decode at batch 8"). A cap that kept int8's M = 2 would keep its M = 1
// too, 30% slower on the Llama shape: the gated kernel is not used. On an Intel Xeon with AMX (amx_bf16; 2
// threads, 4096x14336, 4096x11008, 2048x8192, two runs; docs/PERFORMANCE.md, "int8 prefill on AMX tiles") the same
// tuning read int8 the other way: matmul / gated at M = 1 1.00-1.26x, 2 1.14-1.41x (the matmul on our AMX tiles),
// 4 1.01-1.14x, 8 0.68-0.70x, so there bf16 int8 keeps the gated kernel to 4. int8 with fp32 arithmetic keeps 24
// on oneDNN too, where its plain matmul crosses at 16: on Llama-3-8B's gate|up (4096x28672) the matmul path took
// 1.42x / 1.50x / 1.24x / 1.12x the gated kernel's time at M = 8 / 16 / 24 / 32 (Zen 4, 2 threads; "CPU: widened
// blocks of 128 columns").
constexpr int64_t kAmxGatedInt8MaxM = 4;
int64_t gated_max_m(const MatmulShape& s, c10::ScalarType act) {
  const bool native_bf16 = act == c10::ScalarType::BFloat16 && native_bf16_gemm();
  if (native_bf16 && s.int8 && gemv_dpbf16() && amx_bf16()) return kAmxGatedInt8MaxM;
  if (native_bf16 && s.weight_nk && gemv_dpbf16()) return 0;
#if !(defined(DSINF_CPU_FORCE_PATH) && DSINF_CPU_FORCE_PATH)
  if (s.int8 && !native_bf16) return kInt8MaxM;
#endif
  return gemv_max_m(s, act, /*gated=*/true);
}

// gemv_max_m of a route-table key (dsinf/routes.py reports it for the shapes it has not measured); a gated key
// (rms_mlp_gemm's gate|up) takes gated_max_m. The CPU module has no int8 GEMM
// (its int8 matmul above the GEMV widens the weights into one reused block for MKL): its int8-gemm keys are 0.
int64_t default_route(int64_t dtype, int64_t layout, int64_t K, int64_t N) {
  if (layout == routes::kInt8GemmKey) return 0;
  const int64_t plain = routes::plain_layout(layout);
  MatmulShape s{};
  s.K = K;
  s.N = N;
  s.int8 = plain == routes::kInt8;
  s.weight_nk = plain != routes::kKN;
  const c10::ScalarType act = dtype == routes::kFp32   ? c10::ScalarType::Float
                              : dtype == routes::kBf16 ? c10::ScalarType::BFloat16
                                                       : c10::ScalarType::Half;
  return plain != layout ? gated_max_m(s, act) : gemv_max_m(s, act);
}

dsinf_weight make_weight(const MatmulShape& s, const at::Tensor& weight, const c10::optional<at::Tensor>& q_scale) {
  dsinf_weight w{};
  w.data = weight.data_ptr();
  w.dtype = to_dsinf(weight.scalar_type());
  w.layout_nk = s.weight_nk ? 1 : 0;
  w.K = s.K;
  w.N = s.N;
  if (s.int8) {
    w.scale = q_scale->data_ptr<float>();
    w.groups = s.groups;
  }
  return w;
}

// Output columns per block of a large-M GEMM that walks W a block at a time: about `bytes` of weight at
// `elem` bytes per element, a multiple of `multiple` columns (at least `multiple`), at most N.
int64_t column_block(int64_t N, int64_t K, int64_t bytes, int64_t elem, int64_t multiple = 64) {
  const int64_t fit = bytes / std::max<int64_t>(1, elem * K);
  return std::min<int64_t>(N, std::max<int64_t>(multiple, fit / multiple * multiple));
}

// Blocks of weights widened before the GEMM (16-bit / int8 into fp32, int8 into bf16 for the native bf16 GEMM)
// are multiples of 128 columns. oneDNN's GEMM ran blocks of 64 or 192 columns far slower than 128 or 256 (the
// same widened weights, M = 32 / 128: 11008x4096 27.7 / 113 ms in blocks of 64, 22.2 / 82 in 128, 29.2 / 113 in
// 192, 22.1 / 73 in 256), and rows of K > 4096 had made 4 MiB blocks 64 or 192 columns wide. The op, int8
// weights with fp32 activations on oneDNN, 64-multiples -> 128-multiples, M = 32 / 128 (Zen 4 guest, 2 threads,
// docs/PERFORMANCE.md, "CPU: widened blocks of 128 columns"): 11008x4096 3.44x / 1.61x, 14336x4096 1.47x /
// 1.12x, 13824x5120 1.40x / 1.07x, 5120x13824 1.23x / 1.13x, 28672x8192 1.93x / 1.20x; blocks already a
// multiple of 128 (4096x4096, 4096x11008) unchanged; MKL 0.95-1.09x. int8 with bf16 activations on the native
// bf16 GEMM: 11008x4096 (320 -> 256 columns) 1.08x / 1.09x.
constexpr int64_t kWidenedColumns = 128;

// x2d [M, K] (contiguous, bf16) @ W -> bf16 [M, N] (+ bias) on torch's bf16 GEMM: bf16 weights in place; int8
// weights dequantized to bf16 (in fp32, rounded once) one block of output columns at a time into one reused
// buffer of about 8 MiB, each block multiplied straight into its column slice of the result.
at::Tensor native_bf16_matmul(const char* op, const MatmulShape& s, const at::Tensor& x2d, const at::Tensor& weight,
                              const dsinf_weight& w, const at::Tensor* bias) {
  const int64_t M = s.M(), K = s.K, N = s.N;
  at::Tensor out = aten::empty({M, N}, x2d.options());
  auto gemm = [&](at::Tensor& y, const at::Tensor& w_kn, int64_t n0, int64_t nb) {
    if (bias)
      aten::addmm_out(y, nb == N ? *bias : bias->narrow(0, n0, nb), x2d, w_kn);
    else
      aten::mm_out(y, x2d, w_kn);
  };
  if (!s.int8) {
    gemm(out, s.weight_nk ? weight.t() : weight, 0, N);
    return out;
  }
  const int64_t block = column_block(N, K, int64_t(8) << 20, 2, kWidenedColumns);
  at::Tensor wbuf = aten::empty({block * std::max<int64_t>(K, 1)}, x2d.options());
  for (int64_t n0 = 0; n0 < N; n0 += block) {
    const int64_t nb = std::min(block, N - n0);
    check_status(dsinf_cpu_weight_widen(&w, n0, n0 + nb, wbuf.data_ptr(), DSINF_BF16, kParallel), op, "weight_widen");
    at::Tensor y = nb == N ? out : out.narrow(1, n0, nb);
    gemm(y, wbuf.narrow(0, 0, nb * K).view({nb, K}).t(), n0, nb);
  }
  return out;
}

// The columns of an fp32 weight MKL multiplies in place per call (matmul below): blocks of about 16 MiB of
// weight (1024 columns at K = 4096), or all of N in one call. On a Zen 3 (MKL's AMD code path, 2 threads,
// M = 48..512) blocks of 256..1024 columns ran 6-35% faster than one call; on an earlier AVX-512 Xeon 1024
// columns ran like one call and 256 13-18% slower. On an Intel Xeon with AMX (2 threads, M = 32..512;
// docs/PERFORMANCE.md, "fp32 [K, N] weights on MKL in one call") one call over a [K, N] weight ran 0.98-1.26x
// as fast as the blocks (4096x4096 .. 11008x4096; under 1.0 in one of 36): a column block of a [K, N] weight is
// K rows of a few KiB, each on its own page, where a block of an [N, K] weight is one contiguous range; those
// ran 0.98-1.18x as fast as one call at M = 32 and down to 0.88x at M = 512, and keep their blocks, except at
// M <= 2, where MKL multiplies on its GEMV and one call over an [N, K] weight ran 1.065-1.10x as fast as the
// blocks (4096x4096, 4096x11008, 11008x4096, weight copies past twice the L3; M = 4 0.97-1.01x, M = 8..32
// 0.84-0.96x; docs/PERFORMANCE.md, "fifty-sixth round"). The route sends M <= 2 here where MKL's GEMV beats ours.
int64_t mkl_in_place_block(int64_t M, int64_t N, int64_t K, bool weight_nk) {
  const bool blocks = host_is_amd() || (weight_nk && M > 2);
  return blocks ? column_block(N, K, int64_t(16) << 20, 4) : N;
}

// x2d [M, K] (contiguous, act dtype) @ W -> [M, N]: with `for_epilogue`, without bias, for an epilogue that
// takes fp32 or the act dtype: fp32, or bf16 where the native bf16 GEMM ran (check the result's dtype); else
// the act dtype with `bias` (may be null) added before the single rounding.
at::Tensor matmul(const char* op, const MatmulShape& s, const at::Tensor& x2d, const at::Tensor& weight,
                  const dsinf_weight& w, const at::Tensor* bias, bool for_epilogue) {
  const int64_t M = s.M(), K = s.K, N = s.N;
  const c10::ScalarType act = x2d.scalar_type();
  const c10::ScalarType out_t = for_epilogue ? c10::ScalarType::Float : act;

  // The route is read first even where the tiles take the call: it records the side M falls on (binding.last()).
  const bool gemv = routes::use_gemv(M, act, s.int8, s.weight_nk, K, N, gemv_max_m(s, act));
  if (amx_gemv(M, act, s)) {  // int8 on our AMX tiles on either side of the route (the GEMV's, or dequantize + GEMM)
    at::Tensor out = aten::empty({M, N}, x2d.options().dtype(out_t));
    check_status(dsinf_cpu_gemv_amx(x2d.data_ptr(), M, K, &w, bias ? bias->data_ptr() : nullptr, out.data_ptr(),
                                    to_dsinf(out_t), N, kParallel),
                 op, "gemv_amx");
    g_amx_gemv_calls.fetch_add(1, std::memory_order_relaxed);
    return out;
  }
  if (gemv) {
    at::Tensor out = aten::empty({M, N}, x2d.options().dtype(out_t));
    check_status(dsinf_cpu_gemv(x2d.data_ptr(), to_dsinf(act), M, K, &w, bias ? bias->data_ptr() : nullptr,
                                out.data_ptr(), to_dsinf(out_t), N, kParallel),
                 op, "gemv");
    return out;
  }
  if (act == c10::ScalarType::BFloat16 && native_bf16_gemm()) return native_bf16_matmul(op, s, x2d, weight, w, bias);

  // fp32 sgemm one block of output columns at a time, each multiplied straight into its column slice of
  // y: fp32 weights in place (a view; mkl_in_place_block), 16-bit / int8 weights widened into one reused
  // buffer of about 4 MiB (cache-sized; columns per kWidenedColumns).
  // On oneDNN (onednn_fp32_gemm) fp32 weights in place are one call over all N (it blocks for itself); widened
  // blocks are each multiplied into a fresh result and copied into their slice (no out= form; the copy is
  // M x N x 4 bytes, under 1% of the GEMM).
  // Ours on a float [K, N] weight (kn_gemm; 16-bit weights widen in its panels, with no widened copy) multiplies
  // without the bias, which comes with the rounding below.
  const bool in_place = act == c10::ScalarType::Float && !s.int8;
  const bool ours_kn = !s.int8 && !s.weight_nk && K > 0 && kn_gemm(M, K, N);
  const bool onednn = K > 0 && onednn_fp32_gemm();  // K = 0: MKL's mm writes the zeros
  const at::Tensor xf = act == c10::ScalarType::Float ? x2d : x2d.to(c10::ScalarType::Float);
  const bool fuse_bias = in_place && !ours_kn && bias && !for_epilogue;
  at::Tensor y;
  if (ours_kn) {
    const at::Tensor xc = xf.stride(1) == 1 ? xf : xf.contiguous();
    y = aten::empty({M, N}, x2d.options().dtype(c10::ScalarType::Float));
    check_status(dsinf_cpu_gemm_kn(xc.data_ptr<float>(), M, K, xc.stride(0), weight.data_ptr(), w.dtype, N, N,
                                   y.data_ptr<float>(), N, kParallel),
                 op, "gemm_kn");
    g_kn_gemm_calls.fetch_add(1, std::memory_order_relaxed);
  } else if (onednn && in_place) {
    y = onednn_linear(xf, s.weight_nk ? weight : weight.t(), fuse_bias ? bias : nullptr);
  } else {
    y = aten::empty({M, N}, x2d.options().dtype(c10::ScalarType::Float));
    const int64_t block = in_place ? mkl_in_place_block(M, N, K, s.weight_nk)
                                     : column_block(N, K, int64_t(4) << 20, 4, kWidenedColumns);
    at::Tensor wbuf;
    if (!in_place) wbuf = aten::empty({block * std::max<int64_t>(K, 1)}, y.options());
    for (int64_t n0 = 0; n0 < N; n0 += block) {
      const int64_t nb = std::min(block, N - n0);
      at::Tensor blk;
      if (in_place) {
        blk = s.weight_nk ? weight.narrow(0, n0, nb).t() : weight.narrow(1, n0, nb);
      } else {
        check_status(dsinf_cpu_weight_widen(&w, n0, n0 + nb, wbuf.data_ptr(), DSINF_F32, kParallel), op,
                     "weight_widen");
        blk = s.weight_nk ? wbuf.narrow(0, 0, nb * K).view({nb, K}).t() : wbuf.narrow(0, 0, nb * K).view({K, nb});
      }
      at::Tensor ys = nb == N ? y : y.narrow(1, n0, nb);
      if (onednn)  // widened, so bias (if any) comes with the rounding below
        aten::copy_(ys, onednn_linear(xf, blk.t(), nullptr));
      else if (fuse_bias)
        aten::addmm_out(ys, bias->narrow(0, n0, nb), xf, blk);
      else
        aten::mm_out(ys, xf, blk);
    }
  }
  if (for_epilogue || fuse_bias) return y;
  if (act == c10::ScalarType::Float) {
    if (bias)
      check_status(dsinf_cpu_bias_cast(y.data_ptr<float>(), M, N, N, bias->data_ptr(), y.data_ptr(), DSINF_F32, N,
                                       kParallel),
                   op, "bias_cast");
    return y;
  }
  at::Tensor out = aten::empty({M, N}, x2d.options());
  check_status(dsinf_cpu_bias_cast(y.data_ptr<float>(), M, N, N, bias ? bias->data_ptr() : nullptr, out.data_ptr(),
                                   to_dsinf(act), N, kParallel),
               op, "bias_cast");
  return out;
}

std::vector<at::Tensor> empty_outputs(const std::vector<std::vector<int64_t>>& shapes, const at::Tensor& input) {
  std::vector<at::Tensor> outs;
  for (const auto& sh : shapes) outs.push_back(aten::empty(sh, input.options()));
  return outs;
}

}  // namespace

std::vector<at::Tensor> linear_layer(const char* op, c10::ScalarType act, const at::Tensor& input,
                                     const at::Tensor& weight, const c10::optional<at::Tensor>& bias, bool add_bias,
                                     bool do_flash_attn, int64_t num_heads, bool transposed_mode, double rope_theta,
                                     int64_t rotary_dim, bool rotate_half, int64_t num_kv, int64_t seq_offset,
                                     const c10::optional<at::Tensor>& q_scale) {
  const MatmulShape s = check_matmul(op, input, weight, act, transposed_mode, q_scale, -1);
  check_bias(op, bias, add_bias, input, s.N);
  QKVLayout q{};
  if (do_flash_attn) q = check_qkv(op, s.K, s.N, s.S, num_heads, num_kv, rotary_dim, rotate_half, rope_theta, seq_offset);
  check_no_grad(op, {{"input", &input}, {"weight", &weight}, {"bias", bias ? &*bias : nullptr}});
  const auto shapes = matmul_output_shapes(s, do_flash_attn ? &q : nullptr);
  if (s.M() == 0 || s.N == 0) return empty_outputs(shapes, input);

  const at::Tensor x2d = input.contiguous().view({s.M(), s.K});
  const dsinf_weight w = make_weight(s, weight, q_scale);
  const at::Tensor* b = add_bias ? &*bias : nullptr;
  if (!do_flash_attn) return {matmul(op, s, x2d, weight, w, b, /*for_epilogue=*/false).view({s.B, s.S, s.N})};

  const at::Tensor y = matmul(op, s, x2d, weight, w, nullptr, /*for_epilogue=*/true);
  std::vector<at::Tensor> outs = empty_outputs(shapes, input);
  char* base = static_cast<char*>(outs[0].data_ptr());
  const int64_t qbytes = s.B * q.heads * s.S * q.head_dim * int64_t(input.element_size());
  const int64_t kvbytes = s.B * q.kv_heads * s.S * q.head_dim * int64_t(input.element_size());
  void* q_out = base;
  void* k_out = q.gqa ? outs[1].data_ptr() : base + qbytes;
  void* v_out = q.gqa ? outs[2].data_ptr() : base + qbytes + kvbytes;
  const dsinf_qkv_layout L{s.B, s.S, q.heads, q.kv_heads, q.head_dim, q.rotary_dim, q.rotate_half ? 1 : 0,
                           q.rope_theta, q.seq_offset};
  check_status(dsinf_cpu_qkv_rope(y.data_ptr(), to_dsinf(y.scalar_type()), s.N, b ? b->data_ptr() : nullptr, &L,
                                  to_dsinf(act), q_out, k_out, v_out, kParallel),
               op, "qkv_rope");
  return outs;
}

// linear_layer's lean entry (dsinf/ops/spec.py LeanEntry; LinearOp's eager fast path): the same as
// linear_layer(input, weight, bias, add_bias=bias given, do_flash_attn=false, ...)[0], with four arguments
// and a Tensor result, which torch's Python op call parses in ~2 us less.
at::Tensor linear_layer_lean(const char* op, c10::ScalarType act, const at::Tensor& input, const at::Tensor& weight,
                             const c10::optional<at::Tensor>& bias, bool transposed_mode) {
  return linear_layer(op, act, input, weight, bias, bias.has_value(), false, 0, transposed_mode, 10000.0, -1, false,
                      -1, 0, c10::nullopt)[0];
}

at::Tensor vector_matmul(const char* op, c10::ScalarType act, const at::Tensor& input, const at::Tensor& weight,
                         bool /*async_op: work runs on the calling thread*/, const c10::optional<at::Tensor>& q_scale,
                         bool q_int8, bool transposed_mode) {
  const MatmulShape s = check_matmul(op, input, weight, act, transposed_mode, q_scale, q_int8 ? 1 : 0);
  check_no_grad(op, {{"input", &input}, {"weight", &weight}});
  if (s.M() == 0 || s.N == 0) return aten::empty({s.B, s.S, s.N}, input.options());
  const at::Tensor x2d = input.contiguous().view({s.M(), s.K});
  const dsinf_weight w = make_weight(s, weight, q_scale);
  return matmul(op, s, x2d, weight, w, nullptr, /*for_epilogue=*/false).view({s.B, s.S, s.N});
}

// vector_matmul's lean entry (dsinf/ops/spec.py LeanEntry; VectorMatMulOp's eager fast path): the same as
// vector_matmul(input, weight, async_op=false, q_scale, q_int8=q_scale given, transposed_mode), with the
// arguments a call needs in front, so a float [K, N] call passes two.
at::Tensor vector_matmul_lean(const char* op, c10::ScalarType act, const at::Tensor& input, const at::Tensor& weight,
                              bool transposed_mode, const c10::optional<at::Tensor>& q_scale) {
  return vector_matmul(op, act, input, weight, false, q_scale, q_scale.has_value(), transposed_mode);
}

namespace {

// ---- rms_norm, pre_rms_norm (kernels: cpu/rms_norm.cpp) -------------------------------------------------

extern "C" DSINF_CPU_API dsinf_status dsinf_cpu_rms_norm(const void* x, const void* gamma, dsinf_dtype dtype,
                                                         int64_t rows, int64_t H, float epsilon, void* out,
                                                         dsinf_parallel_fn pf);
extern "C" DSINF_CPU_API dsinf_status dsinf_cpu_pre_rms_norm(const void* x, const void* residual, const void* gamma,
                                                             dsinf_dtype dtype, int64_t rows, int64_t H,
                                                             float epsilon, void* out, void* res_out,
                                                             dsinf_parallel_fn pf);

}  // namespace

// One dtype-generic function each (the dtype is the input's), as DeepSpeed's.
at::Tensor rms_norm(const at::Tensor& vals, const at::Tensor& gamma, double epsilon) {
  const char* op = "rms_norm";
  const int64_t H = check_rms_norm(op, vals, gamma, epsilon), rows = rows_of(vals, H);
  check_no_grad(op, {{"vals", &vals}, {"gamma", &gamma}});
  at::Tensor out = aten::empty(vals.sizes(), vals.options());
  if (rows == 0 || H == 0) return out;
  const at::Tensor x = vals.contiguous(), g = gamma.contiguous();
  check_status(dsinf_cpu_rms_norm(x.data_ptr(), g.data_ptr(), to_dsinf(x.scalar_type()), rows, H, float(epsilon),
                                  out.data_ptr(), kParallel),
               op, "rms_norm");
  return out;
}

std::tuple<at::Tensor, at::Tensor> pre_rms_norm(const at::Tensor& vals, const at::Tensor& residual,
                                                const at::Tensor& gamma, double epsilon) {
  const char* op = "pre_rms_norm";
  const int64_t H = check_pre_rms_norm(op, vals, residual, gamma, epsilon), rows = rows_of(vals, H);
  check_no_grad(op, {{"vals", &vals}, {"residual", &residual}, {"gamma", &gamma}});
  at::Tensor out = aten::empty(vals.sizes(), vals.options()), res = aten::empty(vals.sizes(), vals.options());
  if (rows == 0 || H == 0) return {out, res};
  const at::Tensor x = vals.contiguous(), r = residual.contiguous(), g = gamma.contiguous();
  check_status(dsinf_cpu_pre_rms_norm(x.data_ptr(), r.data_ptr(), g.data_ptr(), to_dsinf(x.scalar_type()), rows, H, float(epsilon), out.data_ptr(), res.data_ptr(), kParallel),
               op, "pre_rms_norm");
  return {out, res};
}

namespace {

// ---- rms_mlp_gemm (kernels: cpu/mlp_gemm.cpp, rms_norm.cpp, the GEMV/GEMM path above) ---------------------

extern "C" DSINF_CPU_API dsinf_status dsinf_cpu_gated_gemv(const void* x, dsinf_dtype x_dtype, int64_t M,
                                                           int64_t ldx, const dsinf_weight* w, int activation,
                                                           void* out, int64_t ldo, dsinf_parallel_fn pf);
extern "C" DSINF_CPU_API dsinf_status dsinf_cpu_gated_act(const void* src, dsinf_dtype src_dtype, int64_t M,
                                                          int64_t I, int64_t lds, int activation, void* out,
                                                          dsinf_dtype out_dtype, int64_t ldo, dsinf_parallel_fn pf);

}  // namespace

//   r, h = pre_rms_norm(input, residual)     one pass, both in the act dtype
//   a = act(gate) * up                        decode: the gated GEMV (the [M, 2I] product never exists);
//                                             larger M (the route table's gated key, else the GEMV
//                                             crossover): the matmul path into [M, 2I] (fp32, or bf16 from
//                                             the native bf16 GEMM), then gated_act
//   output = a @ W_out                        the GEMV / GEMM path of linear_layer
std::vector<at::Tensor> rms_mlp_gemm(const char* op, c10::ScalarType act, const at::Tensor& input,
                                     const at::Tensor& residual, const at::Tensor& weight_interm,
                                     const at::Tensor& weight_out, const at::Tensor& gamma, double epsilon,
                                     const c10::optional<at::Tensor>& q_scale,
                                     const c10::optional<at::Tensor>& q_scale1, bool q_int8, int64_t activation_type,
                                     bool transposed_mode) {
  const MLPShape s = check_rms_mlp_gemm(op, act, input, residual, weight_interm, weight_out, gamma, epsilon, q_scale,
                                        q_scale1, q_int8, activation_type, transposed_mode);
  check_no_grad(op, {{"input", &input}, {"residual", &residual}, {"weight_interm", &weight_interm},
                     {"weight_out", &weight_out}, {"gamma", &gamma}});
  at::Tensor res = aten::empty(input.sizes(), input.options());
  if (s.M == 0 || s.K == 0) return {aten::empty(input.sizes(), input.options()), res};
  const dsinf_dtype dt = to_dsinf(act);
  const at::Tensor x = input.contiguous(), r = residual.contiguous(), g = gamma.contiguous();
  at::Tensor h = aten::empty({s.M, s.K}, input.options());
  check_status(dsinf_cpu_pre_rms_norm(x.data_ptr(), r.data_ptr(), g.data_ptr(), dt, s.M, s.K, float(epsilon),
                                      h.data_ptr(), res.data_ptr(), kParallel),
               op, "pre_rms_norm");

  const MatmulShape si = s.interm, so = s.out;
  const dsinf_weight w1 = make_weight(si, weight_interm, q_scale);
  at::Tensor a = aten::empty({s.M, s.I}, input.options());
  if (routes::use_gated(s.M, act, si.int8, si.weight_nk, s.K, si.N, gated_max_m(si, act))) {
    check_status(dsinf_cpu_gated_gemv(h.data_ptr(), dt, s.M, s.K, &w1, s.activation, a.data_ptr(), s.I, kParallel), op,
                 "gated_gemv");
  } else {
    const at::Tensor t = matmul(op, si, h, weight_interm, w1, nullptr, /*for_epilogue=*/true);  // [M, 2I]
    check_status(dsinf_cpu_gated_act(t.data_ptr(), to_dsinf(t.scalar_type()), s.M, s.I, 2 * s.I, s.activation,
                                     a.data_ptr(), dt, s.I, kParallel),
                 op, "gated_act");
  }
  const dsinf_weight w2 = make_weight(so, weight_out, q_scale1);
  return {matmul(op, so, a, weight_out, w2, nullptr, /*for_epilogue=*/false).view(input.sizes()), res};
}

}  // namespace cpu_binding
}  // namespace dsinf

// The route table's C entry points (dsinf/routes.py): the CPU GEMV and gated GEMV accept any M.
DSINF_ROUTE_API(cpu, INT64_MAX, INT64_MAX, dsinf::cpu_binding::default_route)

// Which GEMM runs bf16 activations past the GEMV (dsinf/routes.py: Binding.native_bf16_gemm, bf16_gemm):
// whether it is torch's native bf16 GEMM now; and the override (-1: the host's choice, 0: the fp32 path,
// 1: native; any other value changes nothing), returning the override it replaced.
extern "C" __attribute__((visibility("default"))) int64_t dsinf_cpu_native_bf16_gemm() {
  return dsinf::cpu_binding::native_bf16_gemm() ? 1 : 0;
}
extern "C" __attribute__((visibility("default"))) int64_t dsinf_cpu_native_bf16_override(int64_t mode) {
  if (mode < -1 || mode > 1) return dsinf::cpu_binding::g_native_bf16_override.load();
  return dsinf::cpu_binding::g_native_bf16_override.exchange(mode);
}

// Whether the bf16 crossovers take the AMX rule (dsinf/routes.py: Binding.amx_bf16, amx_bf16): now, and the
// override (-1: the host's choice, 0: the vdpbf16ps rule, 1: the AMX rule; any other value changes nothing),
// returning the override it replaced.
extern "C" __attribute__((visibility("default"))) int64_t dsinf_cpu_amx_bf16() {
  return dsinf::cpu_binding::amx_bf16() ? 1 : 0;
}
extern "C" __attribute__((visibility("default"))) int64_t dsinf_cpu_amx_bf16_override(int64_t mode) {
  if (mode < -1 || mode > 1) return dsinf::cpu_binding::g_amx_bf16_override.load();
  return dsinf::cpu_binding::g_amx_bf16_override.exchange(mode);
}

// Which GEMM runs fp32 past the GEMV (dsinf/routes.py: Binding.onednn_fp32_gemm, fp32_gemm): whether it is
// oneDNN's now; the override (-1: the host's choice, 0: MKL, 1: oneDNN where torch has it; any other value
// changes nothing), returning the override it replaced (how many GEMMs oneDNN has run: cpu_binding.cpp).
extern "C" __attribute__((visibility("default"))) int64_t dsinf_cpu_onednn_fp32_gemm() {
  return dsinf::cpu_binding::onednn_fp32_gemm() ? 1 : 0;
}
extern "C" __attribute__((visibility("default"))) int64_t dsinf_cpu_onednn_fp32_override(int64_t mode) {
  if (mode < -1 || mode > 1) return dsinf::cpu_binding::g_onednn_fp32_override.load();
  return dsinf::cpu_binding::g_onednn_fp32_override.exchange(mode);
}

// Whether float [K, N] weights past the GEMV run on our GEMM (dsinf/routes.py: Binding.kn_gemm, kn_gemm): at some
// M on this host now (with the override: at every M past the GEMV); the override (-1: the host's choice, 0: the
// library's GEMM, 1: ours; any other value changes nothing), returning the override it replaced; how many GEMMs
// ours has run in this process.
extern "C" __attribute__((visibility("default"))) int64_t dsinf_cpu_kn_gemm() {
  return dsinf::cpu_binding::kn_gemm(1, 1, dsinf::cpu_binding::kKnGemmMinN) ? 1 : 0;
}
extern "C" __attribute__((visibility("default"))) int64_t dsinf_cpu_kn_gemm_override(int64_t mode) {
  if (mode < -1 || mode > 1) return dsinf::cpu_binding::g_kn_gemm_override.load();
  return dsinf::cpu_binding::g_kn_gemm_override.exchange(mode);
}
extern "C" __attribute__((visibility("default"))) int64_t dsinf_cpu_kn_gemm_calls() {
  return dsinf::cpu_binding::g_kn_gemm_calls.load();
}

// Whether int8 weights with bf16 x run on AMX tiles from M = 2 (dsinf/routes.py: Binding.amx_gemv, amx_gemv): on this
// host now; the override (-1: the host's choice, 0: never the tiles - the GEMV or dequantize + GEMM, as the route
// says -, 1: the tiles at every M from 2 where the host has them; any other value changes nothing), returning the
// override it replaced; how many matmuls the tiles have run in this process.
extern "C" __attribute__((visibility("default"))) int64_t dsinf_cpu_amx_gemv() {
  return dsinf::cpu_binding::amx_tiles() ? 1 : 0;
}
extern "C" __attribute__((visibility("default"))) int64_t dsinf_cpu_amx_gemv_override(int64_t mode) {
  if (mode < -1 || mode > 1) return dsinf::cpu_binding::g_amx_gemv_override.load();
  return dsinf::cpu_binding::g_amx_gemv_override.exchange(mode);
}
extern "C" __attribute__((visibility("default"))) int64_t dsinf_cpu_amx_gemv_calls() {
  return dsinf::cpu_binding::g_amx_gemv_calls.load();
}

// Whether this build's GEMV multiplies bf16 x on vdpbf16ps (Binding.gemv_dpbf16): it sets the bf16 crossovers
// on the native path and keeps rms_mlp_gemm's bf16 gate|up off the gated kernel.
extern "C" __attribute__((visibility("default"))) int64_t dsinf_cpu_gemv_has_dpbf16() {
  return dsinf::cpu_binding::gemv_dpbf16() ? 1 : 0;
}

