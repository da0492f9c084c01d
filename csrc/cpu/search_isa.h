// The AVX-512 direct search kernels: plain C++ interface (no ATen), see search_cpu_avx512.cpp.
#pragma once

#include <cstdint>

namespace fastvq {
namespace avx512 {

// Codes per packed panel, and rows per register tile of the micro-kernels.
constexpr int64_t kPanelCodes = 32;
constexpr int64_t kTileRows = 14;
// Score lanes kept per row: one zmm register of fp32.
constexpr int64_t kLanes = 16;

// Whether this build has the kernels (x86-64 with GCC or Clang) and the CPU runs AVX-512F
// (available) and AVX512-BF16 as well (bf16_available).
bool available();
bool bf16_available();

// Scores rows [0, num_rows) of `z_tile` (row-major [num_rows, dim] fp32, num_rows a multiple of
// kTileRows, the data 64-byte aligned) against every code of `panels` and folds them into the
// per-row lane state. `panels` is [num_panels][dim][kPanelCodes] fp32, 64-byte aligned: code
// 32 p + j at dim d lives at panels[(p dim + d) 32 + j]. The score of code k is
// bias[k] + scale * z.e_k (bias = +inf for the padding codes past K, so they never win). Lane j of
// row r keeps in lane_best[16 r + j] / lane_index[16 r + j] the lowest score of codes j, j + 16,
// j + 32, ... (numbered from the first code of `panels`) and the first code that reached it
// (strict <: NaN never wins).
void fold_scores(const float* z_tile, int64_t num_rows, int64_t dim, const float* panels, const float* bias,
                 int64_t num_panels, float scale, float* lane_best, int32_t* lane_index);

// The same for bf16 inputs with vdpbf16ps: bf16 x bf16 products are exact and accumulate in fp32,
// two dimensions per instruction. Everything holds raw bf16 bits (uint16) with the dimensions
// in pairs, an odd last dimension padded with zero: `z_tile` is [num_rows][2 dim_pairs], `panels`
// [num_panels][dim_pairs][kPanelCodes][2] (code 32 p + j at dims 2 q, 2 q + 1 lives at
// panels[((p dim_pairs + q) 32 + j) 2 + {0, 1}]). The score of code k is bias[k] + scale[k] z.e_k:
// a scale per code, which lets cosine divide by the norm of the exact bf16 code.
void fold_scores_bf16(const uint16_t* z_tile, int64_t num_rows, int64_t dim_pairs, const uint16_t* panels,
                      const float* bias, const float* scale, int64_t num_panels, float* lane_best,
                      int32_t* lane_index);

// The top-k search's fp32 kernel: the same scores offered to each row's best k pairs (topk.h),
// rows [r k, r k + k) of `best` / `index` (+inf / -1 where not filled yet); codes are numbered from
// the first code of `panels` and offered in ascending order.
void topk_scores(const float* z_tile, int64_t num_rows, int64_t dim, const float* panels, const float* bias,
                 int64_t num_panels, float scale, int64_t k, float* best, int32_t* index);

}  // namespace avx512
}  // namespace fastvq
