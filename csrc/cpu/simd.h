// Where the x86 search kernels get their intrinsics from.
//
// In fastvq._C every kernel function carries its own target attribute (FASTVQ_TARGET) and is
// called only where FASTVQ_CPU_SUPPORTS says the CPU runs that instruction set, so one build runs
// on every x86-64 CPU and picks its kernels at run time. The kernel files include no ATen header.
//
// With FASTVQ_SIMDE defined (test builds only: tests/backends/test_simd_kernels.py and setup.py's
// FASTVQ_SIMDE=1), the same source is compiled against SIMDe's portable implementations of the
// intrinsics instead, as plain C++: AVX-512F and AVX512-BF16 code then runs, slowly, on any CPU,
// which is how CI machines without those instruction sets check the kernels' arithmetic, layout
// and folding. SIMDe's vdpbf16ps adds each pair of products before accumulating, where the
// hardware accumulates them one after the other and flushes denormals, so the emulation proves
// everything but the last bits of rounding.
#pragma once

#if defined(FASTVQ_SIMDE)
#ifndef SIMDE_NO_NATIVE
#define SIMDE_NO_NATIVE
#endif
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#include <simde/x86/fma.h>
typedef simde__mmask8 __mmask8;
typedef simde__mmask16 __mmask16;
#define FASTVQ_X86_KERNELS 1
#define FASTVQ_TARGET(isa)
#define FASTVQ_CPU_SUPPORTS(isa) true
#elif defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define FASTVQ_X86_KERNELS 1
#define FASTVQ_TARGET(isa) __attribute__((target(isa)))
#define FASTVQ_CPU_SUPPORTS(isa) __builtin_cpu_supports(isa)
#endif

#include <cstdint>

namespace fastvq {

// How every direct kernel walks the codebook: in blocks of panels of about 256 KiB (a quarter to a
// half of a current core's L2), every register tile of rows going through a block before the next
// one, so that the codes come from L2 and the rows from L1. Calls tile(first_panel, panels, row).
template <typename Tile>
inline void for_each_block(int64_t num_panels, int64_t panel_bytes, int64_t num_rows, int64_t tile_rows, Tile tile) {
  const int64_t block = panel_bytes < 256 * 1024 ? (256 * 1024) / panel_bytes : 1;
  for (int64_t first = 0; first < num_panels; first += block) {
    const int64_t count = num_panels - first < block ? num_panels - first : block;
    for (int64_t row = 0; row < num_rows; row += tile_rows) tile(first, count, row);
  }
}

}  // namespace fastvq
