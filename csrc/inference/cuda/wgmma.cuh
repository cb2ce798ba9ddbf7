// Warpgroup MMA (sm_90a): the PTX wrappers the int8 GEMM's Hopper kernel (gemm_int8.cu) uses. Compiled only
// into sm_90a code (__CUDA_ARCH_FEAT_SM90_ALL); see the PTX ISA, "Asynchronous Warpgroup Level Matrix
// Multiply-Accumulate Instructions", for the fragment layouts this code relies on:
//   A from registers (per warp of the warpgroup, rows 16 w .. 16 w + 15 of the 64): the m16n8k16 A layout,
//     a0 = (row g, k 2t..2t+1), a1 = (row g+8, k 2t..2t+1), a2 = (row g, k 2t+8..9), a3 = (row g+8, k 2t+8..9);
//   D (64 x N, fp32): d[4j + e] = (row 16 w + g + 8 (e >> 1), column 8 j + 2 t + (e & 1));
//   B from shared memory through a matrix descriptor (wgmma_desc_k128b).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace dsinf {
namespace cuda {
namespace detail {

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// Descriptor of a K-major operand in the 128-byte swizzle: rows (here: tokens) of 64 16-bit k (128 bytes), the
// 16-byte chunk c of row r stored at chunk c ^ (r % 8), 8-row atoms of 1024 bytes one after another (stride
// byte offset 1024; the leading byte offset is unused by this layout). `addr` is the shared address of the
// atom row 0 plus 32 bytes per k16 step; the tile itself must be 1024-byte aligned.
__device__ __forceinline__ uint64_t wgmma_desc_k128b(uint32_t addr) {
  return static_cast<uint64_t>((addr & 0x3FFFFu) >> 4) | (uint64_t{1} << 16) | (uint64_t{1024 >> 4} << 32) |
         (uint64_t{1} << 62);
}

// Orders this thread's earlier register writes (the A fragment, the accumulators) before the next wgmma.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N>  // wait until at most N committed groups of this warpgroup are pending
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}

// D (64 x N fp32) += A (64 x 16, registers) * B (16 x N, shared memory, K-major: N rows of k), T = half / bf16.
// The operand lists are spelled out once per N: the D registers, then A's four and the descriptor.
#define DSINF_WGMMA_OPS_N64                                                                                           \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                                           \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36"
#define DSINF_WGMMA_OPS_N128                                                                                          \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                                           \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "                                  \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "                                  \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68"
#define DSINF_WGMMA_D32(d)                                                                                            \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),                     \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),               \
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),             \
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define DSINF_WGMMA_D64(d)                                                                                            \
  DSINF_WGMMA_D32(d),                                                                                                 \
  "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),             \
  "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),             \
  "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),             \
  "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
#define DSINF_WGMMA(T, TYPE, N, OPS, D)                                                                               \
  template <>                                                                                                         \
  struct Wgmma<T, N> {                                                                                                \
    static __device__ __forceinline__ void run(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc) {            \
      asm volatile("wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TYPE "." TYPE " " OPS ", 1, 1, 1, 0;"            \
                   : D(d)                                                                                             \
                   : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc));                                          \
    }                                                                                                                 \
  };

template <typename T, int N>
struct Wgmma;
DSINF_WGMMA(__half, "f16", 64, DSINF_WGMMA_OPS_N64, DSINF_WGMMA_D32)
DSINF_WGMMA(__half, "f16", 128, DSINF_WGMMA_OPS_N128, DSINF_WGMMA_D64)
DSINF_WGMMA(__nv_bfloat16, "bf16", 64, DSINF_WGMMA_OPS_N64, DSINF_WGMMA_D32)
DSINF_WGMMA(__nv_bfloat16, "bf16", 128, DSINF_WGMMA_OPS_N128, DSINF_WGMMA_D64)
#undef DSINF_WGMMA
#undef DSINF_WGMMA_D64
#undef DSINF_WGMMA_D32
#undef DSINF_WGMMA_OPS_N128
#undef DSINF_WGMMA_OPS_N64
#endif  // __CUDA_ARCH_FEAT_SM90_ALL

}  // namespace detail
}  // namespace cuda
}  // namespace dsinf
