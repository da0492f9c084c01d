// The AVX-512 search kernels compiled against SIMDe's portable intrinsics (simd.h), for the
// test-only build FASTVQ_SIMDE=1 (setup.py): fastvq._C then runs them, slowly, on CPUs without
// AVX-512F or AVX512-BF16, so that the whole search path (packing, the bf16 dispatch, the codebook
// split) can be tested there by the ordinary test suite. Never shipped: it is slower than the
// BLAS tiles.
#define FASTVQ_SIMDE
#include "search_avx512.cpp"
