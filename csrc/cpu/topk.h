// A row's best k (score, code) pairs, kept sorted for the top-k search: plain C++ (no ATen), shared
// by the direct kernels (search_avx2.cpp, search_avx512.cpp) and the BLAS tiles.
//
// best[0..k) ascends; a pair enters only if its score is strictly below best[k - 1], and after
// every pair of equal score already there, so a search that feeds codes in ascending order keeps
// the lower index first on ties. Slots not yet filled hold (+inf, -1): a NaN or +inf score never
// enters (NaN < x is false), and the caller fills what is left after the search.
#pragma once

#include <cstdint>

namespace fastvq {

template <typename acc_t, typename index_t>
inline void topk_insert(acc_t* best, index_t* index, int64_t k, acc_t score, index_t code) {
  int64_t slot = k - 1;
  while (slot > 0 && best[slot - 1] > score) {
    best[slot] = best[slot - 1];
    index[slot] = index[slot - 1];
    --slot;
  }
  best[slot] = score;
  index[slot] = code;
}

// Offers `count` scores of codes first_code, first_code + 1, ... (in that order) to a row.
template <typename acc_t, typename index_t>
inline void topk_offer(acc_t* best, index_t* index, int64_t k, const acc_t* scores, int64_t count, index_t first_code) {
  for (int64_t j = 0; j < count; ++j) {
    if (scores[j] < best[k - 1]) topk_insert(best, index, k, scores[j], static_cast<index_t>(first_code + j));
  }
}

// The position of the lowest set bit of a nonzero mask (C++17: no std::countr_zero).
inline int lowest_set_bit(uint32_t mask) {
#if defined(__GNUC__) || defined(__clang__)
  return __builtin_ctz(mask);
#else
  int position = 0;
  while ((mask & 1u) == 0) {
    mask >>= 1;
    ++position;
  }
  return position;
#endif
}

// Offers the scores of codes first_code + j for the set bits j of `candidates`, lowest bit first (so
// in ascending code order): a direct kernel's survivors of one vector compare of a panel's scores with
// the row's k-th best. Each is compared again, with the k-th best that the ones before it left.
template <typename acc_t, typename index_t>
inline void topk_offer_masked(acc_t* best, index_t* index, int64_t k, const acc_t* scores, uint32_t candidates,
                              index_t first_code) {
  while (candidates != 0) {
    const int j = lowest_set_bit(candidates);
    candidates &= candidates - 1;
    if (scores[j] < best[k - 1]) topk_insert(best, index, k, scores[j], static_cast<index_t>(first_code + j));
  }
}

}  // namespace fastvq
