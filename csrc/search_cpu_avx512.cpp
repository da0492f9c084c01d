// The direct search kernel for AVX-512 CPUs: scores computed in registers and folded into the
// running minimum without ever being stored.
//
// The micro-kernel holds a 14-row x 32-code tile of z.e in 28 zmm accumulators: for each of the D
// dimensions it loads two vectors of 16 packed codes, broadcasts each row's z value and issues 28
// FMAs, then turns the tile into scores (one FMA with the bias) and folds them into each row's 16
// lanes of (best score, code) with a compare and two blends. The codebook is walked in blocks that
// stay in L2 while every 14-row group of the thread's rows goes through them, so z comes from L1
// and the codes from L2. This reaches a larger share of the FMA peak than a BLAS call per tile
// (MKL runs at about 60 % of it on AMD cores) and has no score tile to write and read back.
//
// The functions carry their own target attribute and the file includes no ATen header, so one
// build runs on every x86-64 CPU: fastvq uses the kernel only where available() says the CPU has
// AVX-512F, and the BLAS tile path everywhere else.
#include "search_cpu_avx512.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define FASTVQ_AVX512_KERNEL 1
#define FASTVQ_TARGET_AVX512 __attribute__((target("avx512f")))
#endif

namespace fastvq {
namespace avx512 {

#ifdef FASTVQ_AVX512_KERNEL

namespace {

// Panels per codebook block: about 256 KiB of codes, a quarter of a current core's L2.
int64_t panels_per_block(int64_t dim) {
  const int64_t panel_bytes = dim * kPanelCodes * static_cast<int64_t>(sizeof(float));
  const int64_t panels = (256 * 1024) / panel_bytes;
  return panels > 0 ? panels : 1;
}

FASTVQ_TARGET_AVX512 void fold_tile(const float* z, int64_t dim, const float* panels, const float* bias,
                                    int64_t num_panels, int32_t first_code, float scale, float* lane_best,
                                    int32_t* lane_index) {
  const __m512 scale_v = _mm512_set1_ps(scale);
  const __m512i lane_ids = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t p = 0; p < num_panels; ++p) {
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
    const int32_t code = first_code + static_cast<int32_t>(p * kPanelCodes);
    const __m512 bias_low = _mm512_loadu_ps(bias + p * kPanelCodes);
    const __m512 bias_high = _mm512_loadu_ps(bias + p * kPanelCodes + 16);
    const __m512i code_low = _mm512_add_epi32(_mm512_set1_epi32(code), lane_ids);
    const __m512i code_high = _mm512_add_epi32(_mm512_set1_epi32(code + 16), lane_ids);
#pragma GCC unroll 14
    for (int r = 0; r < kTileRows; ++r) {
      __m512 best = _mm512_loadu_ps(lane_best + r * kLanes);
      __m512i index = _mm512_loadu_si512(lane_index + r * kLanes);
      // bias - 2 z.e rounds once, as the BLAS path's bias + (-2 z.e) does; _OQ: NaN is never less.
      const __m512 score_low = _mm512_fmadd_ps(low[r], scale_v, bias_low);
      __mmask16 better = _mm512_cmp_ps_mask(score_low, best, _CMP_LT_OQ);
      best = _mm512_mask_blend_ps(better, best, score_low);
      index = _mm512_mask_blend_epi32(better, index, code_low);
      const __m512 score_high = _mm512_fmadd_ps(high[r], scale_v, bias_high);
      better = _mm512_cmp_ps_mask(score_high, best, _CMP_LT_OQ);
      best = _mm512_mask_blend_ps(better, best, score_high);
      index = _mm512_mask_blend_epi32(better, index, code_high);
      _mm512_storeu_ps(lane_best + r * kLanes, best);
      _mm512_storeu_si512(lane_index + r * kLanes, index);
    }
  }
}

}  // namespace

bool available() {
  static const bool supported = __builtin_cpu_supports("avx512f");
  return supported;
}

void fold_scores(const float* z_tile, int64_t num_rows, int64_t dim, const float* panels, const float* bias,
                 int64_t num_panels, float scale, float* lane_best, int32_t* lane_index) {
  const int64_t block = panels_per_block(dim);
  for (int64_t first = 0; first < num_panels; first += block) {
    const int64_t count = num_panels - first < block ? num_panels - first : block;
    for (int64_t row = 0; row < num_rows; row += kTileRows) {
      fold_tile(z_tile + row * dim, dim, panels + first * dim * kPanelCodes, bias + first * kPanelCodes, count,
                static_cast<int32_t>(first * kPanelCodes), scale, lane_best + row * kLanes,
                lane_index + row * kLanes);
    }
  }
}

#else

bool available() { return false; }

void fold_scores(const float*, int64_t, int64_t, const float*, const float*, int64_t, float, float*, int32_t*) {}

#endif

}  // namespace avx512
}  // namespace fastvq
