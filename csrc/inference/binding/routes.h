// The route table: per (activation dtype, weight layout, K, N), the span of M = B*S, min_m <= M <= max_m, run on
// our GEMV rather than the binding's ATen path (cuBLAS / MKL); max_m = 0: ATen for every M. min_m is 1 unless
// ATen measured faster at the smallest Ms and ours above them: on an Intel Xeon MKL's fp32 GEMV edges ours at
// M = 1 on a wide [K, N] weight (0.95-0.97x) where ours leads 1.4-1.8x at M = 2..16, and a largest M alone
// would have sent them all to MKL. Measured per device by dsinf/routes.py, persisted there, and pushed into the
// module once when it loads (and again after a tuning); an absent shape keeps the binding's compiled crossover
// (1 <= M <= its max). The gated layouts key rms_mlp_gemm's gate|up (K = hidden, N = 2I): the span on the
// gated kernel (act(gate) * up in its epilogue), outside which the gate|up runs as a matmul (routed by its
// plain key) followed by the gated epilogue. The int8-gemm layout keys an int8 matmul above the GEMV's range
// (CUDA): the span on the binding's int8 GEMM, outside which it dequantizes for cuBLAS (measured by
// dsinf/routes.py at prompt sizes, like the others).
//
// Read on every matmul call, so reading is one atomic pointer load (acquire) and a binary search over a
// handful of entries; an empty table is one load and a null check. A set publishes a new immutable table
// with one atomic store: a reader holds either the old table or the new one, never a half-written one.
// A published table is never freed, since a reader on another thread may still be searching it; a set
// equal to a table published before republishes that one, so memory grows with the distinct tables only
// (a tuning sets a few per shape; a benchmark that forces one route around each call alternates two).
//
// The route is read inside the custom op's C++ body, so under torch.compile and CUDA-graph capture it is
// taken when the op runs (at capture for a graph, which then replays that route).
//
// Both bindings include this header and both modules are loaded RTLD_GLOBAL into one process: everything
// here has internal linkage (each module owns its table), and the C entry points carry the variant in
// their names (dsinf_cpu_routes_set / dsinf_cuda_routes_set, ...), defined by DSINF_ROUTE_API below.
#pragma once

#include <c10/core/ScalarType.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <tuple>
#include <utility>
#include <vector>

namespace dsinf {
namespace routes {
namespace {

// Codes shared with dsinf/routes.py (DTYPE_CODES, LAYOUT_CODES).
enum DtypeCode : int64_t { kFp32 = 0, kFp16 = 1, kBf16 = 2 };
// int8 weights are always [N, K]; a gated code is its plain code + kGated. kInt8GemmKey keys the int8 matmul
// above the GEMV's range (K, N as its plain int8 key): the largest M on the int8 GEMM (CUDA), above it
// dequantize + cuBLAS; no cap (the GEMM takes any M).
enum LayoutCode : int64_t {
  kKN = 0, kNK = 1, kInt8 = 2, kGatedKN = 3, kGatedNK = 4, kGatedInt8 = 5, kInt8GemmKey = 6
};
constexpr int64_t kGated = kGatedKN - kKN;
// For gated keys kGemv / kAten are the gated kernel / matmul + act. kInt8Gemm: an int8 matmul above the GEMV's
// range that ran on the binding's int8 GEMM rather than dequantize + cuBLAS (not a table value: set by the binding).
enum Route : int64_t { kNoneYet = 0, kGemv = 1, kAten = 2, kInt8Gemm = 3 };

struct Entry {
  int64_t dtype, layout, K, N, min_m, max_m;
  std::tuple<int64_t, int64_t, int64_t, int64_t> key() const { return {dtype, layout, K, N}; }
  bool operator==(const Entry& o) const { return key() == o.key() && min_m == o.min_m && max_m == o.max_m; }
};

// A span of M: [min_m, max_m]; max_m = 0 is empty.
struct Span {
  int64_t min_m, max_m;
  bool has(int64_t M) const { return min_m <= M && M <= max_m; }
};

std::atomic<const std::vector<Entry>*> g_table{nullptr};

// Every table published so far (owned here, never freed: not even at exit, when another thread may still
// run a matmul), and the lock that serializes sets. Readers never take it.
std::mutex g_set_mutex;
std::vector<std::unique_ptr<const std::vector<Entry>>>& published() {
  static auto* tables = new std::vector<std::unique_ptr<const std::vector<Entry>>>();
  return *tables;
}
thread_local int64_t t_last_route = kNoneYet;  // for tests: which path this thread's last matmul took
thread_local int64_t t_last_gated = kNoneYet;  // ... and its last gate|up

int64_t dtype_code(c10::ScalarType act) {
  return act == c10::ScalarType::Float ? kFp32 : act == c10::ScalarType::Half ? kFp16 : kBf16;
}

int64_t layout_code(bool int8, bool weight_nk, bool gated = false) {
  return (int8 ? kInt8 : weight_nk ? kNK : kKN) + (gated ? kGated : 0);
}

// The plain code of a (possibly gated) layout code: the gate|up weight's own layout.
int64_t plain_layout(int64_t layout) {
  return layout >= kGatedKN && layout <= kGatedInt8 ? layout - kGated : layout;
}

// The table's span for (act, layout code, K, N), else [1, `compiled_default`].
Span span_of(c10::ScalarType act, int64_t layout, int64_t K, int64_t N, int64_t compiled_default) {
  const std::vector<Entry>* table = g_table.load(std::memory_order_acquire);
  if (table == nullptr) return {1, compiled_default};
  const Entry probe{dtype_code(act), layout, K, N, 0, 0};
  auto it = std::lower_bound(table->begin(), table->end(), probe,
                             [](const Entry& a, const Entry& b) { return a.key() < b.key(); });
  return it != table->end() && it->key() == probe.key() ? Span{it->min_m, it->max_m} : Span{1, compiled_default};
}

// true: run our GEMV for this M (and remember the route taken, for tests).
bool use_gemv(int64_t M, c10::ScalarType act, bool int8, bool weight_nk, int64_t K, int64_t N,
              int64_t compiled_default) {
  const bool gemv = span_of(act, layout_code(int8, weight_nk), K, N, compiled_default).has(M);
  t_last_route = gemv ? kGemv : kAten;
  return gemv;
}

// true: run rms_mlp_gemm's gate|up (K -> N = 2I) on the gated kernel for this M, false: matmul + gated epilogue.
bool use_gated(int64_t M, c10::ScalarType act, bool int8, bool weight_nk, int64_t K, int64_t N,
               int64_t compiled_default) {
  const bool gated = span_of(act, layout_code(int8, weight_nk, /*gated=*/true), K, N, compiled_default).has(M);
  t_last_gated = gated ? kGemv : kAten;
  return gated;
}

// true: run an int8 matmul above the GEMV's range on the int8 GEMM for this M (remembered for tests as
// kInt8Gemm), false: dequantize + cuBLAS. The CUDA binding's alone (the CPU module has no int8 GEMM).
[[maybe_unused]] bool use_int8_gemm(int64_t M, c10::ScalarType act, int64_t K, int64_t N, int64_t compiled_default) {
  const bool gemm = span_of(act, kInt8GemmKey, K, N, compiled_default).has(M);
  if (gemm) t_last_route = kInt8Gemm;
  return gemm;
}

// Replace the table with `n` rows of 6 int64 (dtype, layout, K, N, min_m, max_m); n == 0 clears it.
// Returns n, or -1 for a row with a bad code or size, or a span that is not 1 <= min_m <= max(max_m, 1), -2 for
// max_m above `gemv_cap` (gated keys: `gated_cap`; int8-gemm keys have no cap), -3 for a repeated key (the
// table is unchanged on error).
int64_t set(const int64_t* rows, int64_t n, int64_t gemv_cap, int64_t gated_cap) {
  if (n < 0 || (n > 0 && rows == nullptr)) return -1;
  std::vector<Entry> entries;
  entries.reserve(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    const int64_t* r = rows + 6 * i;
    const Entry e{r[0], r[1], r[2], r[3], r[4], r[5]};
    if (e.dtype < kFp32 || e.dtype > kBf16 || e.layout < kKN || e.layout > kInt8GemmKey || e.K < 1 || e.N < 1 ||
        e.max_m < 0 || e.min_m < 1 || e.min_m > std::max<int64_t>(e.max_m, 1))
      return -1;
    if (e.layout != kInt8GemmKey && e.max_m > (e.layout >= kGatedKN ? gated_cap : gemv_cap)) return -2;
    entries.push_back(e);
  }
  std::sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) { return a.key() < b.key(); });
  for (size_t i = 1; i < entries.size(); ++i)
    if (entries[i].key() == entries[i - 1].key()) return -3;
  if (entries.empty()) {
    g_table.store(nullptr, std::memory_order_release);
    return n;
  }
  std::lock_guard<std::mutex> lock(g_set_mutex);
  const std::vector<Entry>* table = nullptr;
  for (const auto& t : published())
    if (*t == entries) table = t.get();
  if (table == nullptr) {
    published().push_back(std::make_unique<const std::vector<Entry>>(std::move(entries)));
    table = published().back().get();
  }
  g_table.store(table, std::memory_order_release);
  return n;
}

}  // namespace
}  // namespace routes
}  // namespace dsinf

// The C entry points dsinf/routes.py calls through ctypes (the library is already loaded; dlopen of the same
// path returns its handle). `variant`: cpu | cuda; `gemv_cap` / `gated_cap`: the largest M the GEMV / the
// gated kernel accepts; `default_fn(dtype_code, layout_code, K, N) -> int64_t`: the compiled crossover of a
// shape absent from the table.
#define DSINF_ROUTE_API(variant, gemv_cap, gated_cap, default_fn)                                              \
  extern "C" __attribute__((visibility("default"))) int64_t dsinf_##variant##_routes_set(const int64_t* rows,   \
                                                                                       int64_t n) {           \
    return dsinf::routes::set(rows, n, (gemv_cap), (gated_cap));                                               \
  }                                                                                                            \
  extern "C" __attribute__((visibility("default"))) int64_t dsinf_##variant##_routes_gemv_cap() {              \
    return (gemv_cap);                                                                                         \
  }                                                                                                            \
  extern "C" __attribute__((visibility("default"))) int64_t dsinf_##variant##_routes_gated_cap() {             \
    return (gated_cap);                                                                                        \
  }                                                                                                            \
  extern "C" __attribute__((visibility("default"))) int64_t dsinf_##variant##_routes_default(                  \
      int64_t dtype, int64_t layout, int64_t K, int64_t N) {                                                   \
    return default_fn(dtype, layout, K, N);                                                                    \
  }                                                                                                            \
  extern "C" __attribute__((visibility("default"))) int64_t dsinf_##variant##_routes_last() {                  \
    return dsinf::routes::t_last_route;                                                                        \
  }                                                                                                            \
  extern "C" __attribute__((visibility("default"))) int64_t dsinf_##variant##_routes_last_gated() {            \
    return dsinf::routes::t_last_gated;                                                                        \
  }
