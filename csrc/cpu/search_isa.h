// The direct search kernels' entry points, one set per vector instruction set: plain C++ (no ATen).
// fastvq::avx2 is defined in search_avx2.cpp, fastvq::avx512 in search_avx512.cpp; search.cpp and
// topk.cpp pick one at run time (search_common.h), and tests/csrc/simd_harness.cpp checks each
// against a float64 brute force.
#pragma once

#include <cstdint>

// What every instruction set's kernels define, in its own namespace (the layouts are per ISA, through
// its kPanelCodes):
//
// available(): whether this build has the kernels (x86-64 with GCC or Clang) and the CPU runs the ISA.
//
// fold_scores: scores rows [0, num_rows) of `z_tile` (row-major [num_rows, dim] fp32, num_rows a
// multiple of kTileRows, the data aligned to the vector width) against every code of `panels` and folds
// them into the per-row lane state. `panels` is [num_panels][dim][kPanelCodes] fp32, aligned to the
// vector width: code kPanelCodes p + j at dim d lives at panels[(p dim + d) kPanelCodes + j]. The score
// of code k is bias[k] + scale * z.e_k (bias = +inf for the padding codes past K, so they never win).
// Lane j of row r keeps in lane_best[kLanes r + j] / lane_index[kLanes r + j] the lowest score of codes
// j, j + kLanes, j + 2 kLanes, ... (numbered from the first code of `panels`) and the first code that
// reached it (strict <: NaN never wins).
//
// topk_scores: the top-k search's kernel: the same scores offered to each row's best k pairs (topk.h),
// rows [r k, r k + k) of `best` / `index` (+inf / -1 where not filled yet); codes are numbered from the
// first code of `panels` and offered in ascending order.
#define FASTVQ_DIRECT_SEARCH_ENTRY_POINTS                                                                           \
  bool available();                                                                                                 \
  void fold_scores(const float* z_tile, int64_t num_rows, int64_t dim, const float* panels, const float* bias,     \
                   int64_t num_panels, float scale, float* lane_best, int32_t* lane_index);                          \
  void topk_scores(const float* z_tile, int64_t num_rows, int64_t dim, const float* panels, const float* bias,     \
                   int64_t num_panels, float scale, int64_t k, float* best, int32_t* index);

namespace fastvq {

// AVX2 + FMA: a 6-row x 16-code register tile (two ymm registers of codes per dimension).
namespace avx2 {

constexpr int64_t kPanelCodes = 16;
constexpr int64_t kTileRows = 6;
// Score lanes kept per row, as in the AVX-512 kernel and the BLAS tiles' fold.
constexpr int64_t kLanes = 16;

FASTVQ_DIRECT_SEARCH_ENTRY_POINTS

}  // namespace avx2

// AVX-512F: a 14-row x 32-code register tile; and AVX512-BF16 for bf16 inputs.
namespace avx512 {

constexpr int64_t kPanelCodes = 32;
constexpr int64_t kTileRows = 14;
// Score lanes kept per row: one zmm register of fp32.
constexpr int64_t kLanes = 16;

FASTVQ_DIRECT_SEARCH_ENTRY_POINTS

// fold_scores' scores folded into one running (best score, first code reaching it) per row instead of
// lanes: row_best[r] / row_index[r] change only for a score strictly below row_best[r] (NaN never), to
// the lowest such score and the first code reaching it, codes numbered from the first code of `panels`.
// Started from (+inf, -1), a row ends with its lowest score and the lowest code with that score, or
// (+inf, -1) where no score is below +inf: the lanes of fold_scores merged by value, ties to the lower code.
void argmin_scores(const float* z_tile, int64_t num_rows, int64_t dim, const float* panels, const float* bias,
                   int64_t num_panels, float scale, float* row_best, int32_t* row_index);

// Whether the CPU runs AVX512-BF16 as well.
bool bf16_available();

// fold_scores for bf16 inputs with vdpbf16ps: bf16 x bf16 products are exact and accumulate in fp32,
// two dimensions per instruction. Everything holds raw bf16 bits (uint16) with the dimensions in pairs,
// an odd last dimension padded with zero: `z_tile` is [num_rows][2 dim_pairs], `panels`
// [num_panels][dim_pairs][kPanelCodes][2] (code 32 p + j at dims 2 q, 2 q + 1 lives at
// panels[((p dim_pairs + q) 32 + j) 2 + {0, 1}]). The score of code k is bias[k] + scale[k] z.e_k: a
// scale per code, which lets cosine divide by the norm of the exact bf16 code.
void fold_scores_bf16(const uint16_t* z_tile, int64_t num_rows, int64_t dim_pairs, const uint16_t* panels,
                      const float* bias, const float* scale, int64_t num_panels, float* lane_best,
                      int32_t* lane_index);

}  // namespace avx512
}  // namespace fastvq

#undef FASTVQ_DIRECT_SEARCH_ENTRY_POINTS
