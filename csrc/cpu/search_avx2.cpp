// The direct search kernel for AVX2 + FMA CPUs without AVX-512 (AMD Zen 1-3, Intel Haswell to
// Alder Lake): the AVX-512 kernel's design (search_avx512.cpp) in 16 ymm registers.
//
// The micro-kernel holds a 6-row x 16-code tile of z.e in 12 ymm accumulators (the classic AVX2
// GEMM tile: 12 accumulators, 2 code vectors and 1 broadcast fill the 16 registers, and 12
// independent FMAs cover two FMA pipes of 4-cycle latency). Per dimension it loads the two code
// vectors, broadcasts each row's z value from memory and issues 12 FMAs; per panel it turns the
// tile into scores (one FMA with the bias) and folds them into each row's 16 lanes of (best score,
// code), or for the top-k search offers them to each row's best k. Codes are walked in L2-sized
// blocks that every row tile goes through (for_each_block).
//
// Compiled natively with per-function target attributes, or against SIMDe for tests (simd.h).
#include "search_isa.h"

#include "simd.h"
#include "topk.h"

namespace fastvq {
namespace avx2 {

#ifdef FASTVQ_X86_KERNELS

namespace {

// One half (8 codes) of a panel's scores folded into 8 of a row's lanes; _OQ: NaN is never less.
FASTVQ_TARGET("avx2,fma")
inline void fold_half(__m256 score, __m256i codes, float* lane_best, int32_t* lane_index) {
  const __m256 best = _mm256_loadu_ps(lane_best);
  const __m256 index = _mm256_castsi256_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(lane_index)));
  const __m256 better = _mm256_cmp_ps(score, best, _CMP_LT_OQ);
  _mm256_storeu_ps(lane_best, _mm256_blendv_ps(best, score, better));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(lane_index),
                      _mm256_castps_si256(_mm256_blendv_ps(index, _mm256_castsi256_ps(codes), better)));
}

// What a register tile's scores go into: each row's 16 lanes of (best score, code) ...
struct LaneFold {
  float* lane_best;
  int32_t* lane_index;

  FASTVQ_TARGET("avx2,fma")
  inline void operator()(int r, __m256 low, __m256 high, __m256i code_low, __m256i code_high, int32_t) const {
    fold_half(low, code_low, lane_best + r * kLanes, lane_index + r * kLanes);
    fold_half(high, code_high, lane_best + r * kLanes + 8, lane_index + r * kLanes + 8);
  }
};

// A row's rare panel with a score below its k-th best, out of line so that the six rows' common case
// (one compare, no survivor) stays small in the unrolled tile.
__attribute__((noinline)) void offer_survivors(float* row_best, int32_t* row_index, int64_t k, const float* scores,
                                               uint32_t survivors, int32_t first_code) {
  topk_offer_masked(row_best, row_index, k, scores, survivors, first_code);
}

// ... or each row's best k (topk.h): one compare of the panel's 16 scores with the row's k-th best,
// and only the scores below it (rare after the first panels) offered one by one.
struct TopkFold {
  float* best;
  int32_t* index;
  int64_t k;

  FASTVQ_TARGET("avx2,fma")
  inline void operator()(int r, __m256 low, __m256 high, __m256i, __m256i, int32_t code) const {
    float* row_best = best + r * k;
    const __m256 threshold = _mm256_set1_ps(row_best[k - 1]);
    const uint32_t survivors = static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(low, threshold, _CMP_LT_OQ))) |
                               static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(high, threshold, _CMP_LT_OQ)))
                                   << 8;
    if (__builtin_expect(survivors == 0, 1)) return;
    alignas(32) float scores[kPanelCodes];
    _mm256_store_ps(scores, low);
    _mm256_store_ps(scores + 8, high);
    offer_survivors(row_best, index + r * k, k, scores, survivors, code);
  }
};

template <typename Fold>
FASTVQ_TARGET("avx2,fma")
void fold_tile(const float* z, int64_t dim, const float* panels, const float* bias, int64_t first_panel,
               int64_t num_panels, float scale, const Fold& fold) {
  const __m256 scale_v = _mm256_set1_ps(scale);
  const __m256i lane_ids = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t p = first_panel; p < first_panel + num_panels; ++p) {
    const float* panel = panels + p * dim * kPanelCodes;
    __m256 low[kTileRows], high[kTileRows];
#pragma GCC unroll 6
    for (int r = 0; r < kTileRows; ++r) {
      low[r] = _mm256_setzero_ps();
      high[r] = _mm256_setzero_ps();
    }
    for (int64_t d = 0; d < dim; ++d) {
      const __m256 codes_low = _mm256_load_ps(panel + d * kPanelCodes);
      const __m256 codes_high = _mm256_load_ps(panel + d * kPanelCodes + 8);
#pragma GCC unroll 6
      for (int r = 0; r < kTileRows; ++r) {
        const __m256 value = _mm256_broadcast_ss(z + r * dim + d);
        low[r] = _mm256_fmadd_ps(value, codes_low, low[r]);
        high[r] = _mm256_fmadd_ps(value, codes_high, high[r]);
      }
    }
    const int32_t code = static_cast<int32_t>(p * kPanelCodes);
    const __m256 bias_low = _mm256_loadu_ps(bias + p * kPanelCodes);
    const __m256 bias_high = _mm256_loadu_ps(bias + p * kPanelCodes + 8);
    const __m256i code_low = _mm256_add_epi32(_mm256_set1_epi32(code), lane_ids);
    const __m256i code_high = _mm256_add_epi32(_mm256_set1_epi32(code + 8), lane_ids);
#pragma GCC unroll 6
    for (int r = 0; r < kTileRows; ++r) {
      // bias + scale z.e rounds once, as the BLAS path's bias + (-2 z.e) does.
      fold(r, _mm256_fmadd_ps(low[r], scale_v, bias_low), _mm256_fmadd_ps(high[r], scale_v, bias_high), code_low,
           code_high, code);
    }
  }
}

}  // namespace

bool available() {
  static const bool supported = FASTVQ_CPU_SUPPORTS("avx2") && FASTVQ_CPU_SUPPORTS("fma");
  return supported;
}

void fold_scores(const float* z_tile, int64_t num_rows, int64_t dim, const float* panels, const float* bias,
                 int64_t num_panels, float scale, float* lane_best, int32_t* lane_index) {
  const int64_t panel_bytes = dim * kPanelCodes * static_cast<int64_t>(sizeof(float));
  for_each_block(num_panels, panel_bytes, num_rows, kTileRows, [&](int64_t first, int64_t count, int64_t row) {
    fold_tile(z_tile + row * dim, dim, panels, bias, first, count, scale,
              LaneFold{lane_best + row * kLanes, lane_index + row * kLanes});
  });
}

void topk_scores(const float* z_tile, int64_t num_rows, int64_t dim, const float* panels, const float* bias,
                 int64_t num_panels, float scale, int64_t k, float* best, int32_t* index) {
  const int64_t panel_bytes = dim * kPanelCodes * static_cast<int64_t>(sizeof(float));
  for_each_block(num_panels, panel_bytes, num_rows, kTileRows, [&](int64_t first, int64_t count, int64_t row) {
    fold_tile(z_tile + row * dim, dim, panels, bias, first, count, scale, TopkFold{best + row * k, index + row * k, k});
  });
}

#else

bool available() { return false; }

void fold_scores(const float*, int64_t, int64_t, const float*, const float*, int64_t, float, float*, int32_t*) {}
void topk_scores(const float*, int64_t, int64_t, const float*, const float*, int64_t, float, int64_t, float*, int32_t*) {}

#endif

}  // namespace avx2
}  // namespace fastvq
