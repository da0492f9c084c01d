// The direct search kernels for AVX-512 CPUs: scores computed in registers and folded into the
// running minimum without ever being stored.
//
// The fp32 micro-kernel holds a 14-row x 32-code tile of z.e in 28 zmm accumulators: for each of
// the D dimensions it loads two vectors of 16 packed codes, broadcasts each row's z value and
// issues 28 FMAs, then turns the tile into scores (one FMA with the bias) and folds them into each
// row's 16 lanes of (best score, code) with a compare and two blends; for the top-k search it
// compares them with each row's k-th best and offers only the rare scores below it (topk.h). The codebook is walked in
// blocks that stay in L2 while every 14-row group of the thread's rows goes through them
// (for_each_block), so z comes from L1 and the codes from L2. This reaches a larger share of the FMA peak than a BLAS call
// per tile (MKL runs at about 60 % of it on AMD cores) and has no score tile to write and read back.
//
// The bf16 micro-kernel is the same tile with vdpbf16ps (AVX512-BF16) in place of the FMA: each
// instruction multiplies two dimensions of bf16 exactly and adds both products to the fp32
// accumulator, so it does the work of two FMAs and the D loop runs over D / 2 pairs.
//
// Compiled natively with per-function target attributes, or against SIMDe for tests (simd.h).
#include "search_isa.h"

#include "simd.h"
#include "topk.h"

#include <cstring>
#include <limits>

namespace fastvq {
namespace avx512 {

#ifdef FASTVQ_X86_KERNELS

namespace {

// Folds one row's 32 scores of panel codes [code, code + 32) into its 16 lanes; _OQ: NaN is never less.
FASTVQ_TARGET("avx512f")
inline void fold_row(__m512 score_low, __m512 score_high, __m512i code_low, __m512i code_high, float* lane_best,
                     int32_t* lane_index) {
  __m512 best = _mm512_loadu_ps(lane_best);
  __m512i index = _mm512_loadu_si512(lane_index);
  __mmask16 better = _mm512_cmp_ps_mask(score_low, best, _CMP_LT_OQ);
  best = _mm512_mask_blend_ps(better, best, score_low);
  index = _mm512_mask_blend_epi32(better, index, code_low);
  better = _mm512_cmp_ps_mask(score_high, best, _CMP_LT_OQ);
  best = _mm512_mask_blend_ps(better, best, score_high);
  index = _mm512_mask_blend_epi32(better, index, code_high);
  _mm512_storeu_ps(lane_best, best);
  _mm512_storeu_si512(lane_index, index);
}

FASTVQ_TARGET("avx512f")
inline __m512i panel_codes(int64_t panel, int64_t half) {
  const __m512i lane_ids = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  return _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(panel * kPanelCodes + half * 16)), lane_ids);
}

// What a register tile's scores go into: each row's 16 lanes of (best score, code) ...
struct LaneFold {
  float* lane_best;
  int32_t* lane_index;

  FASTVQ_TARGET("avx512f")
  inline void operator()(int r, __m512 low, __m512 high, int64_t panel) const {
    fold_row(low, high, panel_codes(panel, 0), panel_codes(panel, 1), lane_best + r * kLanes, lane_index + r * kLanes);
  }
};

// ... or each row's one running (best score, first code reaching it), for the nearest-code search: one
// compare of the panel's 32 scores with the row's best, and only in a panel holding a lower score (about
// ln(K / 32) + 1 panels per row) a scalar pass over the survivors, inline: a call there would make the
// compiler spill the tile's live accumulators around it.
struct RowArgminFold {
  float* row_best;
  int32_t* row_index;

  FASTVQ_TARGET("avx512f")
  inline void operator()(int r, __m512 low, __m512 high, int64_t panel) const {
    const __m512 threshold = _mm512_set1_ps(row_best[r]);
    uint32_t below = static_cast<uint32_t>(_mm512_cmp_ps_mask(low, threshold, _CMP_LT_OQ)) |
                     static_cast<uint32_t>(_mm512_cmp_ps_mask(high, threshold, _CMP_LT_OQ)) << 16;
    if (__builtin_expect(below == 0, 1)) return;
    alignas(64) float scores[kPanelCodes];
    _mm512_store_ps(scores, low);
    _mm512_store_ps(scores + 16, high);
    // Survivors in code order, strictly lower only: the first of equal scores stays (NaN never survived).
    float best = row_best[r];
    int32_t index = row_index[r];
    while (below != 0) {
      const int j = lowest_set_bit(below);
      below &= below - 1;
      if (scores[j] < best) {
        best = scores[j];
        index = static_cast<int32_t>(panel * kPanelCodes) + j;
      }
    }
    row_best[r] = best;
    row_index[r] = index;
  }
};

// A row's rare panel with a score below its k-th best, out of line so that the fourteen rows' common
// case (one compare, no survivor) stays small in the unrolled tile.
__attribute__((noinline)) void offer_survivors(float* row_best, int32_t* row_index, int64_t k, const float* scores,
                                               uint32_t survivors, int32_t first_code) {
  topk_offer_masked(row_best, row_index, k, scores, survivors, first_code);
}

// A row's k <= 16 best (score, code) pairs to and from registers; lanes past k read as (+inf, -1).
// SIMDe has no masked loads and stores, and copies through memory instead.
FASTVQ_TARGET("avx512f")
inline void load_short_list(const float* row_best, const int32_t* row_index, int64_t k, __m512& best,
                            __m512i& index) {
#ifdef FASTVQ_SIMDE
  alignas(64) float scores[16];
  alignas(64) int32_t codes[16];
  for (int64_t j = 0; j < 16; ++j) {
    scores[j] = j < k ? row_best[j] : std::numeric_limits<float>::infinity();
    codes[j] = j < k ? row_index[j] : -1;
  }
  best = _mm512_load_ps(scores);
  index = _mm512_load_si512(codes);
#else
  const __mmask16 listed = static_cast<__mmask16>((1u << k) - 1);
  best = _mm512_mask_loadu_ps(_mm512_set1_ps(std::numeric_limits<float>::infinity()), listed, row_best);
  index = _mm512_mask_loadu_epi32(_mm512_set1_epi32(-1), listed, row_index);
#endif
}

FASTVQ_TARGET("avx512f")
inline void store_short_list(__m512 best, __m512i index, int64_t k, float* row_best, int32_t* row_index) {
#ifdef FASTVQ_SIMDE
  alignas(64) float scores[16];
  alignas(64) int32_t codes[16];
  _mm512_store_ps(scores, best);
  _mm512_store_si512(codes, index);
  for (int64_t j = 0; j < k; ++j) {
    row_best[j] = scores[j];
    row_index[j] = codes[j];
  }
#else
  const __mmask16 listed = static_cast<__mmask16>((1u << k) - 1);
  _mm512_mask_storeu_ps(row_best, listed, best);
  _mm512_mask_storeu_epi32(row_index, listed, index);
#endif
}

// offer_survivors for k <= 16, without a data-dependent branch: the row's list sits in one register
// (lanes past k hold +inf and what falls off the end, so all 16 lanes stay ascending) and each
// survivor s goes in with lane i's left neighbour (lane 0's: -inf): lane i becomes
// min(best[i], max(best[i - 1], s)), which keeps the lanes at or below s (on a tie the earlier, lower
// code stays first), puts s in the first lane above it and moves the lanes above that up one. The
// codes follow the same masks off the scores' critical path. Survivors are never NaN (they passed an
// ordered <). One no longer below the k-th best lands past lane k - 1, or nowhere, and changes nothing.
FASTVQ_TARGET("avx512f")
__attribute__((noinline)) void offer_survivors_in_register(float* row_best, int32_t* row_index, int64_t k,
                                                           const float* scores, uint32_t survivors,
                                                           int32_t first_code) {
  __m512 best;
  __m512i index;
  load_short_list(row_best, row_index, k, best, index);
  // Lane 0 takes the second operand's lane 0 (index 16), lane i the list's lane i - 1.
  const __m512i left_lane = _mm512_setr_epi32(16, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14);
  const __m512 below_all = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const __m512i no_code = _mm512_set1_epi32(-1);
  // min and max in their masked form: GCC 12 warns that the plain ones read an undefined source.
  constexpr __mmask16 kAllLanes = 0xffff;
  while (survivors != 0) {
    const int j = lowest_set_bit(survivors);
    survivors &= survivors - 1;
    const __m512 score = _mm512_set1_ps(scores[j]);
    const __m512 left = _mm512_permutex2var_ps(best, left_lane, below_all);
    const __mmask16 moved = _mm512_cmp_ps_mask(best, score, _CMP_GT_OQ);
    const __mmask16 slot = static_cast<__mmask16>(moved & _mm512_cmp_ps_mask(left, score, _CMP_LE_OQ));
    best = _mm512_maskz_min_ps(kAllLanes, best, _mm512_maskz_max_ps(kAllLanes, left, score));
    index = _mm512_mask_mov_epi32(index, moved, _mm512_permutex2var_epi32(index, left_lane, no_code));
    index = _mm512_mask_mov_epi32(index, slot, _mm512_set1_epi32(first_code + j));
  }
  store_short_list(best, index, k, row_best, row_index);
}

// ... or each row's best k (topk.h): one compare of the panel's 32 scores with the row's k-th best,
// and only the scores below it (rare after the first panels) offered one by one.
struct TopkFold {
  float* best;
  int32_t* index;
  int64_t k;

  FASTVQ_TARGET("avx512f")
  inline void operator()(int r, __m512 low, __m512 high, int64_t panel) const {
    float* row_best = best + r * k;
    const __m512 threshold = _mm512_set1_ps(row_best[k - 1]);
    const uint32_t survivors = static_cast<uint32_t>(_mm512_cmp_ps_mask(low, threshold, _CMP_LT_OQ)) |
                               static_cast<uint32_t>(_mm512_cmp_ps_mask(high, threshold, _CMP_LT_OQ)) << 16;
    if (__builtin_expect(survivors == 0, 1)) return;
    alignas(64) float scores[kPanelCodes];
    _mm512_store_ps(scores, low);
    _mm512_store_ps(scores + 16, high);
    const int32_t first_code = static_cast<int32_t>(panel * kPanelCodes);
    if (k <= 16) {
      offer_survivors_in_register(row_best, index + r * k, k, scores, survivors, first_code);
    } else {
      offer_survivors(row_best, index + r * k, k, scores, survivors, first_code);
    }
  }
};

template <typename Fold>
FASTVQ_TARGET("avx512f")
void fold_tile(const float* z, int64_t dim, const float* panels, const float* bias, int64_t first_panel,
               int64_t num_panels, float scale, const Fold& fold) {
  const __m512 scale_v = _mm512_set1_ps(scale);
  for (int64_t p = first_panel; p < first_panel + num_panels; ++p) {
    const float* panel = panels + p * dim * kPanelCodes;
    __m512 low[kTileRows], high[kTileRows];
#pragma GCC unroll 14
    for (int r = 0; r < kTileRows; ++r) {
      low[r] = _mm512_setzero_ps();
      high[r] = _mm512_setzero_ps();
    }
    for (int64_t d = 0; d < dim; ++d) {
      const __m512 codes_low = _mm512_load_ps(panel + d * kPanelCodes);
      const __m512 codes_high = _mm512_load_ps(panel + d * kPanelCodes + 16);
#pragma GCC unroll 14
      for (int r = 0; r < kTileRows; ++r) {
        const __m512 value = _mm512_set1_ps(z[r * dim + d]);
        low[r] = _mm512_fmadd_ps(value, codes_low, low[r]);
        high[r] = _mm512_fmadd_ps(value, codes_high, high[r]);
      }
    }
    const __m512 bias_low = _mm512_loadu_ps(bias + p * kPanelCodes);
    const __m512 bias_high = _mm512_loadu_ps(bias + p * kPanelCodes + 16);
#pragma GCC unroll 14
    for (int r = 0; r < kTileRows; ++r) {
      // bias + scale z.e rounds once, as the BLAS path's bias + (-2 z.e) does.
      fold(r, _mm512_fmadd_ps(low[r], scale_v, bias_low), _mm512_fmadd_ps(high[r], scale_v, bias_high), p);
    }
  }
}

FASTVQ_TARGET("avx512f,avx512bf16")
void fold_tile_bf16(const uint16_t* z, int64_t dim_pairs, const uint16_t* panels, const float* bias,
                    const float* scale, int64_t first_panel, int64_t num_panels, float* lane_best,
                    int32_t* lane_index) {
  const int64_t row_stride = 2 * dim_pairs;
  for (int64_t p = first_panel; p < first_panel + num_panels; ++p) {
    const uint16_t* panel = panels + p * dim_pairs * kPanelCodes * 2;
    __m512 low[kTileRows], high[kTileRows];
#pragma GCC unroll 14
    for (int r = 0; r < kTileRows; ++r) {
      low[r] = _mm512_setzero_ps();
      high[r] = _mm512_setzero_ps();
    }
    for (int64_t q = 0; q < dim_pairs; ++q) {
      const __m512bh codes_low = (__m512bh)_mm512_loadu_si512(panel + q * kPanelCodes * 2);
      const __m512bh codes_high = (__m512bh)_mm512_loadu_si512(panel + q * kPanelCodes * 2 + 32);
#pragma GCC unroll 14
      for (int r = 0; r < kTileRows; ++r) {
        int32_t pair;
        std::memcpy(&pair, z + r * row_stride + 2 * q, sizeof(pair));
        const __m512bh value = (__m512bh)_mm512_set1_epi32(pair);
        low[r] = _mm512_dpbf16_ps(low[r], value, codes_low);
        high[r] = _mm512_dpbf16_ps(high[r], value, codes_high);
      }
    }
    const __m512 scale_low = _mm512_loadu_ps(scale + p * kPanelCodes);
    const __m512 scale_high = _mm512_loadu_ps(scale + p * kPanelCodes + 16);
    const __m512 bias_low = _mm512_loadu_ps(bias + p * kPanelCodes);
    const __m512 bias_high = _mm512_loadu_ps(bias + p * kPanelCodes + 16);
    const LaneFold fold{lane_best, lane_index};
#pragma GCC unroll 14
    for (int r = 0; r < kTileRows; ++r) {
      fold(r, _mm512_fmadd_ps(low[r], scale_low, bias_low), _mm512_fmadd_ps(high[r], scale_high, bias_high), p);
    }
  }
}

}  // namespace

bool available() {
  static const bool supported = FASTVQ_CPU_SUPPORTS("avx512f");
  return supported;
}

bool bf16_available() {
  static const bool supported = available() && FASTVQ_CPU_SUPPORTS("avx512bf16");
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

void argmin_scores(const float* z_tile, int64_t num_rows, int64_t dim, const float* panels, const float* bias,
                   int64_t num_panels, float scale, float* row_best, int32_t* row_index) {
  const int64_t panel_bytes = dim * kPanelCodes * static_cast<int64_t>(sizeof(float));
  for_each_block(num_panels, panel_bytes, num_rows, kTileRows, [&](int64_t first, int64_t count, int64_t row) {
    fold_tile(z_tile + row * dim, dim, panels, bias, first, count, scale,
              RowArgminFold{row_best + row, row_index + row});
  });
}

void topk_scores(const float* z_tile, int64_t num_rows, int64_t dim, const float* panels, const float* bias,
                 int64_t num_panels, float scale, int64_t k, float* best, int32_t* index) {
  const int64_t panel_bytes = dim * kPanelCodes * static_cast<int64_t>(sizeof(float));
  for_each_block(num_panels, panel_bytes, num_rows, kTileRows, [&](int64_t first, int64_t count, int64_t row) {
    fold_tile(z_tile + row * dim, dim, panels, bias, first, count, scale, TopkFold{best + row * k, index + row * k, k});
  });
}

void fold_scores_bf16(const uint16_t* z_tile, int64_t num_rows, int64_t dim_pairs, const uint16_t* panels,
                      const float* bias, const float* scale, int64_t num_panels, float* lane_best,
                      int32_t* lane_index) {
  const int64_t panel_bytes = dim_pairs * kPanelCodes * 2 * static_cast<int64_t>(sizeof(uint16_t));
  for_each_block(num_panels, panel_bytes, num_rows, kTileRows, [&](int64_t first, int64_t count, int64_t row) {
    fold_tile_bf16(z_tile + row * 2 * dim_pairs, dim_pairs, panels, bias, scale, first, count,
                   lane_best + row * kLanes, lane_index + row * kLanes);
  });
}

#else

bool available() { return false; }
bool bf16_available() { return false; }

void fold_scores(const float*, int64_t, int64_t, const float*, const float*, int64_t, float, float*, int32_t*) {}
void argmin_scores(const float*, int64_t, int64_t, const float*, const float*, int64_t, float, float*, int32_t*) {}
void fold_scores_bf16(const uint16_t*, int64_t, int64_t, const uint16_t*, const float*, const float*, int64_t,
                      float*, int32_t*) {}
void topk_scores(const float*, int64_t, int64_t, const float*, const float*, int64_t, float, int64_t, float*, int32_t*) {}

#endif

}  // namespace avx512
}  // namespace fastvq
