// The AVX2 + FMA direct search kernel: plain C++ interface (no ATen), see search_cpu_avx2.cpp.
#pragma once

#include <cstdint>

namespace fastvq {
namespace avx2 {

// Codes per packed panel (two ymm registers of fp32), and rows per register tile.
constexpr int64_t kPanelCodes = 16;
constexpr int64_t kTileRows = 6;
// Score lanes kept per row, as in the AVX-512 kernel and the BLAS tiles' fold.
constexpr int64_t kLanes = 16;

// Whether this build has the kernel (x86-64 with GCC or Clang) and the CPU runs AVX2 and FMA.
bool available();

// Scores rows [0, num_rows) of `z_tile` (row-major [num_rows, dim] fp32, num_rows a multiple of
// kTileRows) against every code of `panels` and folds them into the per-row lane state.
// `panels` is [num_panels][dim][kPanelCodes] fp32, 32-byte aligned: code 16 p + j at dim d lives at
// panels[(p dim + d) 16 + j]. The score of code k is bias[k] + scale * z.e_k (bias = +inf for the
// padding codes past K). Lane j of row r keeps in lane_best[16 r + j] / lane_index[16 r + j] the
// lowest score of codes j, j + 16, j + 32, ... (numbered from the first code of `panels`) and the
// first code that reached it (strict <: NaN never wins).
void fold_scores(const float* z_tile, int64_t num_rows, int64_t dim, const float* panels, const float* bias,
                 int64_t num_panels, float scale, float* lane_best, int32_t* lane_index);

// The top-k search's kernel: the same scores offered to each row's best k pairs (topk.h), rows
// [r k, r k + k) of `best` / `index` (+inf / -1 where not filled yet); codes are numbered from the
// first code of `panels` and offered in ascending order.
void topk_scores(const float* z_tile, int64_t num_rows, int64_t dim, const float* panels, const float* bias,
                 int64_t num_panels, float scale, int64_t k, float* best, int32_t* index);

}  // namespace avx2
}  // namespace fastvq
