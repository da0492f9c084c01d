// The AVX-512 direct search kernel: plain C++ interface (no ATen), see search_cpu_avx512.cpp.
#pragma once

#include <cstdint>

namespace fastvq {
namespace avx512 {

// Codes per packed panel, and rows per register tile of the micro-kernel.
constexpr int64_t kPanelCodes = 32;
constexpr int64_t kTileRows = 14;
// Score lanes kept per row: one zmm register of fp32.
constexpr int64_t kLanes = 16;

// Whether this build has the kernel (x86-64 with GCC or Clang) and the CPU runs AVX-512F.
bool available();

// Scores rows [0, num_rows) of `z_tile` (row-major [num_rows, dim] fp32, num_rows a multiple of
// kTileRows, the data 64-byte aligned) against every code of `panels` and folds them into the
// per-row lane state. `panels` is [num_panels][dim][kPanelCodes] fp32, 64-byte aligned: code
// 32 p + j at dim d lives at panels[(p dim + d) 32 + j]. The score of code k is
// bias[k] + scale * z.e_k (bias = +inf for the padding codes past K, so they never win). Lane j of
// row r keeps in lane_best[16 r + j] / lane_index[16 r + j] the lowest score of codes j, j + 16,
// j + 32, ... and the first code that reached it (strict <: NaN never wins).
void fold_scores(const float* z_tile, int64_t num_rows, int64_t dim, const float* panels, const float* bias,
                 int64_t num_panels, float scale, float* lane_best, int32_t* lane_index);

}  // namespace avx512
}  // namespace fastvq
