// Soft assignments on CPU: softmax(logits) @ values, the hard (Gumbel-)argmax and the row log-sum-exp,
// and the backward's sums, flash-attention style: nothing of size N x K is ever held.
//
// The operands come prepared by fastvq/backends/soft_codebook.py (SoftCodebook: keys, per-code term
// c, values; prepared rows zq and per-row term r, all in the work dtype), so every metric's logit is a
// function of the dot product s = zq . k (see Operands::logits) and the chain rule back to the caller's
// tensors stays in Python. The rows are transposed once, a row tile at a time (the size of z), so that every
// product below is "C += A B" with B row-major and the columns contiguous: the keys and values are read in
// place, never copied, a code tile of them staying in cache while a row tile streams past.
//
// Forward: threads split the row tiles; per row a running maximum, sum of exp(logit - max) and weighted
// sum of values, rescaled when the maximum grows. Backward: threads split the code tiles (each owns its
// codes' sums: no race, no atomics), the probabilities recomputed from the saved log-sum-exp, the per-row
// sums kept per thread and added in thread order. The fp32 products and exponentials have AVX-512 and AVX2 + FMA
// kernels, chosen per call (soft_isa, FASTVQ_CPU_SEARCH); fp64 and other CPUs take plain blocked loops. bf16
// operands (zq and keys in bf16, the rest fp32) take vdpbf16ps for the logit products on AVX512-BF16 CPUs under
// `auto` and `avx512-bf16` (soft_bf16_products); everything else, and every other choice, runs on them widened to fp32.
#include "../fastvq.h"
#include "parallel.h"
#include "search_isa.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
// The AVX2 + FMA kernels are compiled for every x86-64 build (per-function target attributes) and chosen at
// run time; the AVX-512 ones where the build targets AVX-512F.
#define FASTVQ_SOFT_AVX2 1
#define FASTVQ_AVX2_TARGET __attribute__((target("avx2,fma")))
#endif
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

namespace fastvq {
namespace {

constexpr int64_t kRowTile = 64;
constexpr int64_t kCodeTile = 128;
// The register block of the products: 4 rows x 32 columns (two AVX-512 / four AVX2 fp32 vectors a row).
constexpr int64_t kBlockRows = 4;
constexpr int64_t kBlockCols = 32;
// fastvq/backends/soft_codebook.py's EUCLIDEAN_EPS: the squared distance is clamped there before its root.
constexpr double kEuclideanEps = 1e-8;

enum Metric : int64_t { kDot = 0, kL2 = 1, kEuclidean = 2 };  // cosine is dot on normalised operands

// The kernels' instruction set, chosen per call from FASTVQ_CPU_SEARCH (the search's switch, read at every call):
// `auto`, `avx512` and `avx512-bf16` take the fastest this build and CPU run, `avx2` the AVX2 + FMA kernels,
// `blas` the plain blocked loops (which the compiler vectorises for the build's target).
enum class SoftIsa { kGeneric, kAvx2, kAvx512 };

SoftIsa soft_isa() {
  const char* choice = std::getenv("FASTVQ_CPU_SEARCH");
  const std::string name = choice == nullptr || *choice == '\0' ? "auto" : choice;
  TORCH_CHECK_VALUE(name == "auto" || name == "avx512-bf16" || name == "avx512" || name == "avx2" || name == "blas",
                    "FASTVQ_CPU_SEARCH must be auto, avx512-bf16, avx512, avx2 or blas, got '", name, "'");
  if (name == "blas") return SoftIsa::kGeneric;
#if defined(FASTVQ_SOFT_AVX2)
  const bool avx2 = avx2::available();
#else
  const bool avx2 = false;
#endif
  TORCH_CHECK_VALUE(name != "avx2" || avx2, "FASTVQ_CPU_SEARCH=avx2 but this CPU (or this build) does not run it");
  if (name == "avx2") return SoftIsa::kAvx2;
#if defined(__AVX512F__)
  return SoftIsa::kAvx512;
#else
  return avx2 ? SoftIsa::kAvx2 : SoftIsa::kGeneric;
#endif
}

// Whether bf16 operands take the AVX512-BF16 logit products: under `auto` and `avx512-bf16` on a CPU that runs
// them, as the search's bf16 kernel (search_common.h); otherwise they are widened to fp32.
bool soft_bf16_products() {
#if defined(__AVX512F__)
  const char* choice = std::getenv("FASTVQ_CPU_SEARCH");
  const std::string name = choice == nullptr || *choice == '\0' ? "auto" : choice;
  return (name == "auto" || name == "avx512-bf16") && avx512::bf16_available();
#else
  return false;
#endif
}

// C[m, n] (+)= A[m, k] B[k, n]: A at any strides (one element is broadcast at a time), B and C row-major.
template <typename T>
void gemm_generic(int64_t m, int64_t n, int64_t k, const T* a, int64_t a_row, int64_t a_col, const T* b, int64_t ldb,
                  T* c, int64_t ldc, bool accumulate) {
  int64_t col = 0;
  for (; col + kBlockCols <= n; col += kBlockCols) {
    int64_t row = 0;
    for (; row + kBlockRows <= m; row += kBlockRows) {
      T acc[kBlockRows][kBlockCols];
      for (int64_t r = 0; r < kBlockRows; ++r)
        for (int64_t j = 0; j < kBlockCols; ++j) acc[r][j] = accumulate ? c[(row + r) * ldc + col + j] : T(0);
      for (int64_t p = 0; p < k; ++p) {
        const T* b_row = b + p * ldb + col;
        for (int64_t r = 0; r < kBlockRows; ++r) {
          const T a_value = a[(row + r) * a_row + p * a_col];
#pragma omp simd
          for (int64_t j = 0; j < kBlockCols; ++j) acc[r][j] += a_value * b_row[j];
        }
      }
      for (int64_t r = 0; r < kBlockRows; ++r)
        for (int64_t j = 0; j < kBlockCols; ++j) c[(row + r) * ldc + col + j] = acc[r][j];
    }
    for (; row < m; ++row) {
      T acc[kBlockCols];
      for (int64_t j = 0; j < kBlockCols; ++j) acc[j] = accumulate ? c[row * ldc + col + j] : T(0);
      for (int64_t p = 0; p < k; ++p) {
        const T a_value = a[row * a_row + p * a_col];
        const T* b_row = b + p * ldb + col;
#pragma omp simd
        for (int64_t j = 0; j < kBlockCols; ++j) acc[j] += a_value * b_row[j];
      }
      for (int64_t j = 0; j < kBlockCols; ++j) c[row * ldc + col + j] = acc[j];
    }
  }
  if (col == n) return;
  for (int64_t row = 0; row < m; ++row) {
    T* c_row = c + row * ldc;
    if (!accumulate)
      for (int64_t j = col; j < n; ++j) c_row[j] = T(0);
    for (int64_t p = 0; p < k; ++p) {
      const T a_value = a[row * a_row + p * a_col];
      const T* b_row = b + p * ldb;
#pragma omp simd
      for (int64_t j = col; j < n; ++j) c_row[j] += a_value * b_row[j];
    }
  }
}

#if defined(__AVX512F__)
// The fp32 product on AVX-512: a block of kRows rows x 32 columns (two 16-float vectors, masked for a
// ragged column count) accumulated in registers over the whole k. The accumulators are named variables,
// not an array: GCC keeps an array of vectors on the stack and stores it at every step.
template <int kRows>
inline void gemm_block(int64_t k, const float* a, int64_t a_row, int64_t a_col, const float* b, int64_t ldb,
                       float* c, int64_t ldc, __mmask16 mask0, __mmask16 mask1, bool accumulate) {
  static_assert(kRows == 1 || kRows == 4 || kRows == 8, "the blocks are 8 rows, then 4, then 1");
#define FASTVQ_ROW(r)                                                                                 \
  __m512 acc##r##0 = _mm512_setzero_ps(), acc##r##1 = _mm512_setzero_ps();                            \
  if (kRows > r && accumulate) {                                                                      \
    acc##r##0 = _mm512_maskz_loadu_ps(mask0, c + r * ldc);                                            \
    acc##r##1 = _mm512_maskz_loadu_ps(mask1, c + r * ldc + 16);                                       \
  }
  FASTVQ_ROW(0) FASTVQ_ROW(1) FASTVQ_ROW(2) FASTVQ_ROW(3) FASTVQ_ROW(4) FASTVQ_ROW(5) FASTVQ_ROW(6) FASTVQ_ROW(7)
#undef FASTVQ_ROW
  for (int64_t p = 0; p < k; ++p) {
    const __m512 b0 = _mm512_maskz_loadu_ps(mask0, b + p * ldb);
    const __m512 b1 = _mm512_maskz_loadu_ps(mask1, b + p * ldb + 16);
#define FASTVQ_FMA(r)                                                        \
  if (kRows > r) {                                                           \
    const __m512 a_value = _mm512_set1_ps(a[r * a_row + p * a_col]);         \
    acc##r##0 = _mm512_fmadd_ps(a_value, b0, acc##r##0);                     \
    acc##r##1 = _mm512_fmadd_ps(a_value, b1, acc##r##1);                     \
  }
    FASTVQ_FMA(0) FASTVQ_FMA(1) FASTVQ_FMA(2) FASTVQ_FMA(3) FASTVQ_FMA(4) FASTVQ_FMA(5) FASTVQ_FMA(6) FASTVQ_FMA(7)
#undef FASTVQ_FMA
  }
#define FASTVQ_STORE(r)                                          \
  if (kRows > r) {                                               \
    _mm512_mask_storeu_ps(c + r * ldc, mask0, acc##r##0);        \
    _mm512_mask_storeu_ps(c + r * ldc + 16, mask1, acc##r##1);   \
  }
  FASTVQ_STORE(0) FASTVQ_STORE(1) FASTVQ_STORE(2) FASTVQ_STORE(3)
  FASTVQ_STORE(4) FASTVQ_STORE(5) FASTVQ_STORE(6) FASTVQ_STORE(7)
#undef FASTVQ_STORE
}

template <int kRows>
inline void gemm_rows(int64_t n, int64_t k, const float* a, int64_t a_row, int64_t a_col, const float* b,
                      int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  for (int64_t col = 0; col < n; col += 32) {
    const int64_t width = std::min<int64_t>(32, n - col);
    const __mmask16 mask0 = static_cast<__mmask16>(width >= 16 ? 0xFFFFu : (1u << width) - 1u);
    const __mmask16 mask1 = static_cast<__mmask16>(width >= 32 ? 0xFFFFu : width > 16 ? (1u << (width - 16)) - 1u : 0u);
    gemm_block<kRows>(k, a, a_row, a_col, b + col, ldb, c + col, ldc, mask0, mask1, accumulate);
  }
}

void gemm_avx512(int64_t m, int64_t n, int64_t k, const float* a, int64_t a_row, int64_t a_col, const float* b,
                 int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  int64_t row = 0;
  // 8 rows: 16 accumulators of the 32 registers, and the tiles' 64 rows and 128 codes split without a rest.
  for (; row + 8 <= m; row += 8)
    gemm_rows<8>(n, k, a + row * a_row, a_row, a_col, b, ldb, c + row * ldc, ldc, accumulate);
  for (; row + 4 <= m; row += 4)
    gemm_rows<4>(n, k, a + row * a_row, a_row, a_col, b, ldb, c + row * ldc, ldc, accumulate);
  for (; row < m; ++row) gemm_rows<1>(n, k, a + row * a_row, a_row, a_col, b, ldb, c + row * ldc, ldc, accumulate);
}
#endif

#if defined(__AVX512F__)
#define FASTVQ_BF16_TARGET __attribute__((target("avx512f,avx512bf16")))
// The logit products of bf16 operands: C[m, n] = A B over `pairs` pairs of dimensions, each pair one 32-bit word
// of two bf16 (the lower dimension in the low half), A's row r at a[r lda ..], B's pair row q at b[q ldb ..], C
// row-major fp32. vdpbf16ps multiplies the bf16 exactly and adds both products to the fp32 accumulator, as the
// search's bf16 kernel does; a block of kRows rows x 32 columns is accumulated in registers over all the pairs.
template <int kRows>
FASTVQ_BF16_TARGET inline void pair_block(int64_t pairs, const uint32_t* a, int64_t lda, const uint32_t* b,
                                          int64_t ldb, float* c, int64_t ldc, __mmask16 mask0, __mmask16 mask1) {
  static_assert(kRows == 1 || kRows == 4 || kRows == 8, "the blocks are 8 rows, then 4, then 1");
#define FASTVQ_ROW(r) __m512 acc##r##0 = _mm512_setzero_ps(), acc##r##1 = _mm512_setzero_ps();
  FASTVQ_ROW(0) FASTVQ_ROW(1) FASTVQ_ROW(2) FASTVQ_ROW(3) FASTVQ_ROW(4) FASTVQ_ROW(5) FASTVQ_ROW(6) FASTVQ_ROW(7)
#undef FASTVQ_ROW
  for (int64_t q = 0; q < pairs; ++q) {
    const __m512bh b0 = (__m512bh)_mm512_maskz_loadu_epi32(mask0, b + q * ldb);
    const __m512bh b1 = (__m512bh)_mm512_maskz_loadu_epi32(mask1, b + q * ldb + 16);
#define FASTVQ_DOT(r)                                                                           \
  if (kRows > r) {                                                                              \
    const __m512bh a_pair = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(a[r * lda + q]));  \
    acc##r##0 = _mm512_dpbf16_ps(acc##r##0, a_pair, b0);                                        \
    acc##r##1 = _mm512_dpbf16_ps(acc##r##1, a_pair, b1);                                        \
  }
    FASTVQ_DOT(0) FASTVQ_DOT(1) FASTVQ_DOT(2) FASTVQ_DOT(3) FASTVQ_DOT(4) FASTVQ_DOT(5) FASTVQ_DOT(6) FASTVQ_DOT(7)
#undef FASTVQ_DOT
  }
#define FASTVQ_STORE(r)                                          \
  if (kRows > r) {                                               \
    _mm512_mask_storeu_ps(c + r * ldc, mask0, acc##r##0);        \
    _mm512_mask_storeu_ps(c + r * ldc + 16, mask1, acc##r##1);   \
  }
  FASTVQ_STORE(0) FASTVQ_STORE(1) FASTVQ_STORE(2) FASTVQ_STORE(3)
  FASTVQ_STORE(4) FASTVQ_STORE(5) FASTVQ_STORE(6) FASTVQ_STORE(7)
#undef FASTVQ_STORE
}

template <int kRows>
FASTVQ_BF16_TARGET void pair_rows(int64_t n, int64_t pairs, const uint32_t* a, int64_t lda, const uint32_t* b,
                                  int64_t ldb, float* c, int64_t ldc) {
  for (int64_t col = 0; col < n; col += 32) {
    const int64_t width = std::min<int64_t>(32, n - col);
    const __mmask16 mask0 = static_cast<__mmask16>(width >= 16 ? 0xFFFFu : (1u << width) - 1u);
    const __mmask16 mask1 = static_cast<__mmask16>(width >= 32 ? 0xFFFFu : width > 16 ? (1u << (width - 16)) - 1u : 0u);
    pair_block<kRows>(pairs, a, lda, b + col, ldb, c + col, ldc, mask0, mask1);
  }
}

void gemm_bf16_pairs(int64_t m, int64_t n, int64_t pairs, const uint32_t* a, int64_t lda, const uint32_t* b,
                     int64_t ldb, float* c, int64_t ldc) {
  int64_t row = 0;
  for (; row + 8 <= m; row += 8) pair_rows<8>(n, pairs, a + row * lda, lda, b, ldb, c + row * ldc, ldc);
  for (; row + 4 <= m; row += 4) pair_rows<4>(n, pairs, a + row * lda, lda, b, ldb, c + row * ldc, ldc);
  for (; row < m; ++row) pair_rows<1>(n, pairs, a + row * lda, lda, b, ldb, c + row * ldc, ldc);
}
#endif

// x [rows, cols] of bf16 bits as pairs of dimensions (one 32-bit word each, an odd last dimension padded with a
// zero bf16), row-major [rows][pairs], or with `transposed` a row tile at a time as tile_transposed lays floats out:
// tile t's rows r0 .. r0 + n - 1 become the block [pairs, n] at offset r0 * pairs.
std::vector<uint32_t> bf16_pairs(const uint16_t* x, int64_t rows, int64_t cols, bool transposed) {
  const int64_t pairs = (cols + 1) / 2;
  std::vector<uint32_t> out(static_cast<size_t>(rows * pairs));
  for (int64_t r0 = 0; r0 < rows; r0 += kRowTile) {
    const int64_t tile_rows = std::min(kRowTile, rows - r0);
    uint32_t* block = out.data() + r0 * pairs;
    for (int64_t i = 0; i < tile_rows; ++i) {
      const uint16_t* row = x + (r0 + i) * cols;
      for (int64_t q = 0; q < pairs; ++q) {
        const uint32_t high = 2 * q + 1 < cols ? row[2 * q + 1] : 0u;
        block[transposed ? q * tile_rows + i : i * pairs + q] = uint32_t{row[2 * q]} | high << 16;
      }
    }
  }
  return out;
}

#if defined(FASTVQ_SOFT_AVX2)
// The fp32 product on AVX2 + FMA: a block of kRows rows x 16 columns (two 8-float vectors, masked for a ragged
// column count): 12 accumulators, the two columns' vectors and the broadcast fit the 16 registers.
template <int kRows>
FASTVQ_AVX2_TARGET inline void gemm_block_avx2(int64_t k, const float* a, int64_t a_row, int64_t a_col,
                                               const float* b, int64_t ldb, float* c, int64_t ldc, __m256i mask0,
                                               __m256i mask1, bool accumulate) {
  static_assert(kRows == 1 || kRows == 6, "the blocks are 6 rows, and 1 for the rest");
#define FASTVQ_ROW(r)                                                      \
  __m256 acc##r##0 = _mm256_setzero_ps(), acc##r##1 = _mm256_setzero_ps(); \
  if (kRows > r && accumulate) {                                           \
    acc##r##0 = _mm256_maskload_ps(c + r * ldc, mask0);                    \
    acc##r##1 = _mm256_maskload_ps(c + r * ldc + 8, mask1);                \
  }
  FASTVQ_ROW(0) FASTVQ_ROW(1) FASTVQ_ROW(2) FASTVQ_ROW(3) FASTVQ_ROW(4) FASTVQ_ROW(5)
#undef FASTVQ_ROW
  for (int64_t p = 0; p < k; ++p) {
    const __m256 b0 = _mm256_maskload_ps(b + p * ldb, mask0);
    const __m256 b1 = _mm256_maskload_ps(b + p * ldb + 8, mask1);
#define FASTVQ_FMA(r)                                                \
  if (kRows > r) {                                                   \
    const __m256 a_value = _mm256_set1_ps(a[r * a_row + p * a_col]); \
    acc##r##0 = _mm256_fmadd_ps(a_value, b0, acc##r##0);             \
    acc##r##1 = _mm256_fmadd_ps(a_value, b1, acc##r##1);             \
  }
    FASTVQ_FMA(0) FASTVQ_FMA(1) FASTVQ_FMA(2) FASTVQ_FMA(3) FASTVQ_FMA(4) FASTVQ_FMA(5)
#undef FASTVQ_FMA
  }
#define FASTVQ_STORE(r)                                        \
  if (kRows > r) {                                             \
    _mm256_maskstore_ps(c + r * ldc, mask0, acc##r##0);        \
    _mm256_maskstore_ps(c + r * ldc + 8, mask1, acc##r##1);    \
  }
  FASTVQ_STORE(0) FASTVQ_STORE(1) FASTVQ_STORE(2) FASTVQ_STORE(3) FASTVQ_STORE(4) FASTVQ_STORE(5)
#undef FASTVQ_STORE
}

template <int kRows>
FASTVQ_AVX2_TARGET void gemm_rows_avx2(int64_t n, int64_t k, const float* a, int64_t a_row, int64_t a_col,
                                       const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t col = 0; col < n; col += 16) {
    const int width = static_cast<int>(std::min<int64_t>(16, n - col));
    const __m256i mask0 = _mm256_cmpgt_epi32(_mm256_set1_epi32(width), lanes);
    const __m256i mask1 = _mm256_cmpgt_epi32(_mm256_set1_epi32(width - 8), lanes);
    gemm_block_avx2<kRows>(k, a, a_row, a_col, b + col, ldb, c + col, ldc, mask0, mask1, accumulate);
  }
}

FASTVQ_AVX2_TARGET void gemm_avx2(int64_t m, int64_t n, int64_t k, const float* a, int64_t a_row, int64_t a_col,
                                  const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  int64_t row = 0;
  for (; row + 6 <= m; row += 6)
    gemm_rows_avx2<6>(n, k, a + row * a_row, a_row, a_col, b, ldb, c + row * ldc, ldc, accumulate);
  for (; row < m; ++row)
    gemm_rows_avx2<1>(n, k, a + row * a_row, a_row, a_col, b, ldb, c + row * ldc, ldc, accumulate);
}
#endif

template <typename T>
void gemm(SoftIsa, int64_t m, int64_t n, int64_t k, const T* a, int64_t a_row, int64_t a_col, const T* b, int64_t ldb,
          T* c, int64_t ldc, bool accumulate) {
  gemm_generic<T>(m, n, k, a, a_row, a_col, b, ldb, c, ldc, accumulate);
}

template <>
void gemm<float>(SoftIsa isa, int64_t m, int64_t n, int64_t k, const float* a, int64_t a_row, int64_t a_col,
                 const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate) {
#if defined(__AVX512F__)
  if (isa == SoftIsa::kAvx512) return gemm_avx512(m, n, k, a, a_row, a_col, b, ldb, c, ldc, accumulate);
#endif
#if defined(FASTVQ_SOFT_AVX2)
  if (isa == SoftIsa::kAvx2) return gemm_avx2(m, n, k, a, a_row, a_col, b, ldb, c, ldc, accumulate);
#endif
  gemm_generic<float>(m, n, k, a, a_row, a_col, b, ldb, c, ldc, accumulate);
}

// x [rows, cols] (row-major) transposed one row tile at a time: tile t's rows r0 .. r0 + n - 1 become the block
// [cols, n] at offset r0 * cols, so a tile's columns are contiguous (a whole-matrix transpose would put them
// N floats apart, every one in the same cache set).
template <typename T>
std::vector<T> tile_transposed(const T* x, int64_t rows, int64_t cols) {
  std::vector<T> out(static_cast<size_t>(rows * cols));
  for (int64_t r0 = 0; r0 < rows; r0 += kRowTile) {
    const int64_t tile_rows = std::min(kRowTile, rows - r0);
    T* block = out.data() + r0 * cols;
    for (int64_t i = 0; i < tile_rows; ++i)
      for (int64_t d = 0; d < cols; ++d) block[d * tile_rows + i] = x[(r0 + i) * cols + d];
  }
  return out;
}

// The operands every pass reads, and the logits of one (code tile, row tile) from their products.
template <typename T>
struct Operands {
  int64_t num_rows, num_codes, dim, value_dim;
  const T* zq;          // [N, D]
  std::vector<T> zq_t;  // tile_transposed(zq)
  const T* keys;        // [K, D]
  const T* code_term;   // [K]
  const T* row_term;    // [N]
  const T* values;      // [K, Dv]
  Metric metric;
  T inverse_temperature;
  SoftIsa isa;  // the fp32 kernels' instruction set (soft_isa())
  // bf16 operands (T = float only): zq and keys are their widened copies; with bf16_products the logit products
  // run on their bf16 pairs (bf16_pairs: keys [K][pairs], zq tile-transposed; zq_t then stays empty).
  at::Tensor widened_zq, widened_keys;
  bool bf16_products = false;
  int64_t dim_pairs = 0;
  std::vector<uint32_t> key_pairs, zq_pairs_t;

  // tile[j, i] <- logit of (row r0 + i, code c0 + j), from the products zq . k already in it; with
  // `scale` (euclidean only) also 1 / (2 |z - e|), 0 where the squared distance was clamped.
  void logits(T* tile, T* scale, int64_t c0, int64_t codes, int64_t r0, int64_t rows) const {
    for (int64_t j = 0; j < codes; ++j) {
      T* line = tile + j * rows;
      const T c = code_term[c0 + j];
      const T* r = row_term + r0;
      if (metric == kDot) {
#pragma omp simd
        for (int64_t i = 0; i < rows; ++i) line[i] = (line[i] - c) * inverse_temperature;
      } else if (metric == kL2) {
#pragma omp simd
        for (int64_t i = 0; i < rows; ++i) line[i] = (T(2) * line[i] - r[i] - c) * inverse_temperature;
      } else {
        const T eps = static_cast<T>(kEuclideanEps);
        for (int64_t i = 0; i < rows; ++i) {
          const T squared = r[i] + c - T(2) * line[i];
          const T distance = std::sqrt(std::max(squared, eps));  // std::max keeps a NaN first argument
          if (scale != nullptr) scale[j * rows + i] = squared <= eps ? T(0) : T(0.5) / distance;
          line[i] = -distance * inverse_temperature;
        }
      }
    }
  }

  // Products then logits of a (code tile, row tile): tile [codes, rows].
  void tile_logits(T* tile, T* scale, int64_t c0, int64_t codes, int64_t r0, int64_t rows) const {
#if defined(__AVX512F__)
    if constexpr (std::is_same_v<T, float>) {
      if (bf16_products) {
        gemm_bf16_pairs(codes, rows, dim_pairs, key_pairs.data() + c0 * dim_pairs, dim_pairs,
                        zq_pairs_t.data() + r0 * dim_pairs, rows, tile, rows);
        return logits(tile, scale, c0, codes, r0, rows);
      }
    }
#endif
    gemm<T>(isa, codes, rows, dim, keys + c0 * dim, dim, 1, zq_t.data() + r0 * dim, rows, tile, rows, false);
    logits(tile, scale, c0, codes, r0, rows);
  }
};

// Philox-4x32-10 exactly as fastvq/_philox.py and Triton's tl.philox compute it.
inline void philox(uint64_t seed, uint32_t counter[4]) {
  uint32_t key0 = static_cast<uint32_t>(seed), key1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint64_t product_a = uint64_t{counter[0]} * 0xD2511F53u;
    const uint64_t product_b = uint64_t{counter[2]} * 0xCD9E8D57u;
    const uint32_t c0 = static_cast<uint32_t>(product_b >> 32) ^ counter[1] ^ key0;
    const uint32_t c2 = static_cast<uint32_t>(product_a >> 32) ^ counter[3] ^ key1;
    counter[0] = c0;
    counter[1] = static_cast<uint32_t>(product_b);
    counter[2] = c2;
    counter[3] = static_cast<uint32_t>(product_a);
    key0 += 0x9E3779B9u;
    key1 += 0xBB67AE85u;
  }
}

// The Gumbel noise of (row, code): output code mod 4 of Philox at counter (code >> 2, row low, row high, 0),
// as the float32 -log(-log(u)), u = (2 (bits >> 9) + 1) / 2^24 (fastvq/_philox.py's gumbel_noise).
inline float gumbel(uint64_t seed, int64_t row, int64_t code) {
  const uint64_t row_bits = static_cast<uint64_t>(row);
  uint32_t counter[4] = {static_cast<uint32_t>(code >> 2), static_cast<uint32_t>(row_bits),
                         static_cast<uint32_t>(row_bits >> 32), 0u};
  philox(seed, counter);
  const float uniform = static_cast<float>((counter[code & 3] >> 9) * 2u + 1u) * 0x1p-24f;
  return -std::log(-std::log(uniform));
}

// line[i] <- exp(line[i] - shift[i]) for i < n: the kernels' exponentials, one per logit.
template <typename T>
inline void exp_shifted(SoftIsa, T* line, const T* shift, int64_t n) {
  for (int64_t i = 0; i < n; ++i) line[i] = std::exp(line[i] - shift[i]);
}

#if defined(__AVX512F__)
// fp32 exp on AVX-512 (Cephes' expf: exp(x) = 2^n exp(r), |r| <= ln 2 / 2, a degree-7 polynomial; within
// 2 ulp of the correctly rounded value). The clamp keeps r finite for -inf (exp 0) and +inf (exp inf), and
// passes NaN through (max/min return their second operand when one is NaN); scalef scales by 2^n with the
// IEEE overflow and underflow.
inline __m512 exp_ps(__m512 x) {
  x = _mm512_min_ps(_mm512_set1_ps(89.0f), _mm512_max_ps(_mm512_set1_ps(-104.0f), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

inline void exp_shifted_avx512(float* line, const float* shift, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 mask = static_cast<__mmask16>(n - i >= 16 ? 0xFFFFu : (1u << (n - i)) - 1u);
    const __m512 x = _mm512_sub_ps(_mm512_maskz_loadu_ps(mask, line + i), _mm512_maskz_loadu_ps(mask, shift + i));
    _mm512_mask_storeu_ps(line + i, mask, exp_ps(x));
  }
}
#endif

#if defined(FASTVQ_SOFT_AVX2)
// fp32 exp on AVX2, the same Cephes polynomial as exp_ps; 2^n is built in the exponent bits, so the result is 0
// below -87.3 (where AVX-512's scalef gives denormals) and +inf above 88 (never reached here: the arguments are
// logits minus their maximum or log-sum-exp). NaN passes through the clamp and the polynomial.
FASTVQ_AVX2_TARGET inline __m256 exp256_ps(__m256 x) {
  const __m256 low = _mm256_set1_ps(-87.33654f), high = _mm256_set1_ps(88.0f);
  const __m256 below = _mm256_cmp_ps(x, low, _CMP_LT_OQ), above = _mm256_cmp_ps(x, high, _CMP_GT_OQ);
  x = _mm256_min_ps(high, _mm256_max_ps(low, x));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i power = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 result = _mm256_mul_ps(p, _mm256_castsi256_ps(power));
  return _mm256_blendv_ps(_mm256_blendv_ps(result, _mm256_setzero_ps(), below),
                          _mm256_set1_ps(std::numeric_limits<float>::infinity()), above);
}

FASTVQ_AVX2_TARGET void exp_shifted_avx2(float* line, const float* shift, int64_t n) {
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t i = 0; i < n; i += 8) {
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(8, n - i))), lanes);
    const __m256 x = _mm256_sub_ps(_mm256_maskload_ps(line + i, mask), _mm256_maskload_ps(shift + i, mask));
    _mm256_maskstore_ps(line + i, mask, exp256_ps(x));
  }
}
#endif

template <>
inline void exp_shifted<float>(SoftIsa isa, float* line, const float* shift, int64_t n) {
#if defined(__AVX512F__)
  if (isa == SoftIsa::kAvx512) return exp_shifted_avx512(line, shift, n);
#endif
#if defined(FASTVQ_SOFT_AVX2)
  if (isa == SoftIsa::kAvx2) return exp_shifted_avx2(line, shift, n);
#endif
  for (int64_t i = 0; i < n; ++i) line[i] = std::exp(line[i] - shift[i]);
}

// tile_maximum[i] <- the maximum of itself and tile[j, i] over the tile's codes j, NaN where any of them is NaN
// (a NaN logit reaches the row's sums, as with a plain max fold that propagates NaN); branch-free, so that it
// vectorises.
template <typename T>
void fold_tile_maximum(const T* tile, int64_t codes, int64_t rows, T* tile_maximum, T* nan_seen) {
  std::fill(nan_seen, nan_seen + rows, T(0));
  for (int64_t j = 0; j < codes; ++j) {
    const T* line = tile + j * rows;
    for (int64_t i = 0; i < rows; ++i) {
      tile_maximum[i] = line[i] > tile_maximum[i] ? line[i] : tile_maximum[i];
      nan_seen[i] = line[i] != line[i] ? T(1) : nan_seen[i];
    }
  }
  for (int64_t i = 0; i < rows; ++i)
    if (nan_seen[i] != T(0)) tile_maximum[i] = std::numeric_limits<T>::quiet_NaN();
}

// One row tile's running softmax of soft_quantize, a code tile of logits at a time: the maximum, the sum of
// exp(logit - max), the weighted sum of values (kept in the output) and the hard choice. Shared by
// soft_quantize's forward and the fused soft_quantize + entropy forward.
template <typename T>
struct SoftRowTile {
  const Operands<T>& ops;
  bool hard, noisy;
  uint64_t seed;
  std::vector<T> maximum, total, best, shift, rescale, tile_maximum, nan_seen;
  std::vector<int64_t> best_index;
  int64_t r0 = 0, rows = 0;
  T* weighted = nullptr;

  SoftRowTile(const Operands<T>& operands, bool hard_choice, bool with_noise, uint64_t noise_seed)
      : ops(operands), hard(hard_choice), noisy(with_noise), seed(noise_seed), maximum(kRowTile), total(kRowTile),
        best(kRowTile), shift(kRowTile), rescale(kRowTile), nan_seen(kRowTile), best_index(kRowTile) {}

  void begin(int64_t row_start, int64_t row_count, T* soft) {
    const T negative_infinity = -std::numeric_limits<T>::infinity();
    r0 = row_start, rows = row_count;
    weighted = soft + r0 * ops.value_dim;  // the running weighted sums live in the output
    std::fill(weighted, weighted + rows * ops.value_dim, T(0));
    std::fill(maximum.begin(), maximum.end(), negative_infinity);
    std::fill(best.begin(), best.end(), negative_infinity);
    std::fill(total.begin(), total.end(), T(0));
    std::fill(best_index.begin(), best_index.end(), 0);
  }

  // tile [codes, rows]: the logits of codes c0 .. c0 + codes - 1, overwritten by their exponentials.
  void add(T* tile, int64_t c0, int64_t codes) {
    const T negative_infinity = -std::numeric_limits<T>::infinity();
    const int64_t value_dim = ops.value_dim;
    if (hard) {
      // Codes in order and a strict '>': the lowest index wins ties; a NaN score never wins.
      for (int64_t j = 0; j < codes; ++j)
        for (int64_t i = 0; i < rows; ++i) {
          T score = tile[j * rows + i];
          if (noisy) score += static_cast<T>(gumbel(seed, r0 + i, c0 + j));
          if (score > best[i]) best[i] = score, best_index[i] = c0 + j;
        }
    }
    tile_maximum = maximum;
    fold_tile_maximum(tile, codes, rows, tile_maximum.data(), nan_seen.data());
    for (int64_t i = 0; i < rows; ++i) {
      // The safe shift keeps a row whose logits are all -inf so far at a zero sum, not exp(nan).
      shift[i] = tile_maximum[i] == negative_infinity ? T(0) : tile_maximum[i];
      rescale[i] = std::exp(maximum[i] - shift[i]);
      maximum[i] = tile_maximum[i];
      total[i] *= rescale[i];
    }
    for (int64_t j = 0; j < codes; ++j) {
      T* line = tile + j * rows;
      exp_shifted(ops.isa, line, shift.data(), rows);
      for (int64_t i = 0; i < rows; ++i) total[i] += line[i];
    }
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t v = 0; v < value_dim; ++v) weighted[i * value_dim + v] *= rescale[i];
    // weighted [rows, Dv] += p [rows, codes] values [codes, Dv], p read from the tile's columns.
    gemm<T>(ops.isa, rows, value_dim, codes, tile, 1, rows, ops.values + c0 * value_dim, value_dim, weighted, value_dim,
            true);
  }

  void finish(int64_t* indices, T* lse) {
    const T negative_infinity = -std::numeric_limits<T>::infinity();
    const int64_t value_dim = ops.value_dim;
    for (int64_t i = 0; i < rows; ++i) {
      for (int64_t v = 0; v < value_dim; ++v) weighted[i * value_dim + v] /= total[i];
      const T safe_shift = maximum[i] == negative_infinity ? T(0) : maximum[i];
      lse[r0 + i] = total[i] > 0 ? safe_shift + std::log(total[i]) : std::numeric_limits<T>::quiet_NaN();
      if (hard) indices[r0 + i] = best_index[i];
    }
  }
};

template <typename T>
void forward(const Operands<T>& ops, bool hard, bool noisy, uint64_t seed, T* soft, int64_t* indices, T* lse) {
  const int64_t num_rows = ops.num_rows;
  const int64_t row_tiles = (num_rows + kRowTile - 1) / kRowTile;
  fastvq::parallel_for(0, row_tiles, 1, [&](int64_t tile_begin, int64_t tile_end) {
    std::vector<T> tile(static_cast<size_t>(kCodeTile * kRowTile));
    SoftRowTile<T> state(ops, hard, noisy, seed);
    for (int64_t row_tile = tile_begin; row_tile < tile_end; ++row_tile) {
      const int64_t r0 = row_tile * kRowTile, rows = std::min(kRowTile, num_rows - r0);
      state.begin(r0, rows, soft);
      for (int64_t c0 = 0; c0 < ops.num_codes; c0 += kCodeTile) {
        const int64_t codes = std::min(kCodeTile, ops.num_codes - c0);
        ops.tile_logits(tile.data(), nullptr, c0, codes, r0, rows);
        state.add(tile.data(), c0, codes);
      }
      state.finish(indices, lse);
    }
  });
}

// out[x] = tile[x] * factor for x < n: the fused op's logits at each of its two temperatures from the
// temperature-1 logits (the same product the separate ops round: (s - c) / T is (s - c) * (1 / T)).
template <typename T>
inline void scaled_copy(const T* tile, int64_t n, T factor, T* out) {
#pragma omp simd
  for (int64_t x = 0; x < n; ++x) out[x] = tile[x] * factor;
}

template <typename T>
struct GradOutputs {
  T* weighted_keys;  // [N, D] or null: sum_k w k
  T* row_sums;       // [N] or null
  T* weighted_rows;  // [K, D] or null: sum_n w zq
  T* code_sums;      // [K] or null
  T* grad_values;    // [K, Dv] or null: sum_n p g
};

// soft_quantize's per-logit gradient: dL/dlogit = p (g V^T - delta), p = exp(logit - lse), delta = <g, soft> -
// grad_lse. The logits are the tile's times logit_scale (1 where the operands carry the temperature).
template <typename T>
struct SoftTerms {
  const T* grad_soft;  // g [N, Dv]
  const T* delta;      // [N]
  const T* lse;        // [N]
  T logit_scale, inverse_temperature;
};

// The entropies' per-logit gradient: dL/dlogit = p (-a_n max(logit, lowest) + c_k + constant_n), with a the
// row entropy's gradient, c the mean probabilities' gradient / N and constant_n = grad_lse + a_n m_n -
// sum_k p c_k (m the mean logit; see fastvq/backends/torch/soft_quantize.py's soft_entropy_backward).
template <typename T>
struct EntropyTerms {
  const T* grad_entropy;   // a [N]
  const T* code_weights;   // c [K]
  const T* row_constant;   // constant [N]
  const T* lse;            // [N]
  T logit_scale, inverse_temperature;
};

// The backward's sums of w = dL/ds, s the operands' logit (times euclidean's scale): soft_quantize's, the
// entropies', or both (the fused op: one tile of products, two temperatures, the two weights added).
template <typename T>
void backward(const Operands<T>& ops, const SoftTerms<T>* soft, const EntropyTerms<T>* entropy, GradOutputs<T> out) {
  const int64_t num_rows = ops.num_rows, dim = ops.dim, value_dim = ops.value_dim;
  const std::vector<T> grad_t = soft ? tile_transposed(soft->grad_soft, num_rows, value_dim) : std::vector<T>();
  const T lowest = std::numeric_limits<T>::lowest();
  const int64_t code_tiles = (ops.num_codes + kCodeTile - 1) / kCodeTile;
  const int threads = at::get_num_threads();
  // Per-thread row sums (rows are shared by every code tile), added in thread order at the end.
  const bool row_grad = out.weighted_keys != nullptr;
  const bool weights_needed = row_grad || out.weighted_rows != nullptr;
  const size_t row_block = static_cast<size_t>(num_rows * (dim + 1));
  std::vector<T> thread_row_sums(row_grad ? row_block * threads : 0, T(0));
  // at::parallel_for, not fastvq::parallel_for: the row sums are per thread (at::get_thread_num()) and added in
  // thread order, so each thread must own one fixed share of the code tiles.
  at::parallel_for(0, code_tiles, 1, [&](int64_t tile_begin, int64_t tile_end) {
    std::vector<T> logits(static_cast<size_t>(kCodeTile * kRowTile)), probs(logits.size()), grads(logits.size());
    std::vector<T> scale(logits.size()), bracket(kRowTile);
    T* my_rows = row_grad ? thread_row_sums.data() + row_block * at::get_thread_num() : nullptr;
    for (int64_t code_tile = tile_begin; code_tile < tile_end; ++code_tile) {
      const int64_t c0 = code_tile * kCodeTile, codes = std::min(kCodeTile, ops.num_codes - c0);
      for (int64_t r0 = 0; r0 < num_rows; r0 += kRowTile) {
        const int64_t rows = std::min(kRowTile, num_rows - r0);
        ops.tile_logits(logits.data(), ops.metric == kEuclidean ? scale.data() : nullptr, c0, codes, r0, rows);
        if (soft != nullptr) {
          scaled_copy(logits.data(), codes * rows, soft->logit_scale, probs.data());
          for (int64_t j = 0; j < codes; ++j) exp_shifted(ops.isa, probs.data() + j * rows, soft->lse + r0, rows);
          if (out.grad_values != nullptr)
            gemm<T>(ops.isa, codes, value_dim, rows, probs.data(), rows, 1, soft->grad_soft + r0 * value_dim, value_dim,
                    out.grad_values + c0 * value_dim, value_dim, true);
          if (weights_needed) {
            // g V^T per (code, row), then w = p (g V^T - delta) / T.
            gemm<T>(ops.isa, codes, rows, value_dim, ops.values + c0 * value_dim, value_dim, 1,
                    grad_t.data() + r0 * value_dim, rows, grads.data(), rows, false);
            const T* row_delta = soft->delta + r0;
            for (int64_t j = 0; j < codes; ++j)
              for (int64_t i = 0; i < rows; ++i) {
                const T prob = probs[j * rows + i];
                const T bracket_value = grads[j * rows + i] - row_delta[i];
                grads[j * rows + i] = prob == T(0) ? T(0) : prob * bracket_value * soft->inverse_temperature;
              }
          }
        }
        if (!weights_needed) continue;
        if (entropy != nullptr) {
          for (int64_t j = 0; j < codes; ++j) {
            T* line = logits.data() + j * rows;
            if (entropy->logit_scale != T(1)) scaled_copy(line, rows, entropy->logit_scale, line);
            // Floored, an excluded code's -inf logit times its zero probability is 0, not nan.
            for (int64_t i = 0; i < rows; ++i)
              bracket[i] = -entropy->grad_entropy[r0 + i] * std::max(line[i], lowest) +
                           entropy->code_weights[c0 + j] + entropy->row_constant[r0 + i];
            exp_shifted(ops.isa, line, entropy->lse + r0, rows);
            T* weights = grads.data() + j * rows;
            for (int64_t i = 0; i < rows; ++i) {
              // A zero probability (an excluded code) gives a zero weight even where the floored bracket
              // overflowed: 0 * inf would be nan.
              const T weight = line[i] == T(0) ? T(0) : line[i] * bracket[i] * entropy->inverse_temperature;
              weights[i] = soft != nullptr ? weights[i] + weight : weight;
            }
          }
        }
        for (int64_t j = 0; j < codes; ++j) {
          T code_sum = 0;
          for (int64_t i = 0; i < rows; ++i) {
            if (ops.metric == kEuclidean) grads[j * rows + i] *= scale[j * rows + i];
            code_sum += grads[j * rows + i];
          }
          if (out.code_sums != nullptr) out.code_sums[c0 + j] += code_sum;
        }
        if (row_grad) {
          T* keys_sum = my_rows + r0 * dim;
          gemm<T>(ops.isa, rows, dim, codes, grads.data(), 1, rows, ops.keys + c0 * dim, dim, keys_sum, dim, true);
          T* sums = my_rows + num_rows * dim + r0;
          for (int64_t j = 0; j < codes; ++j)
            for (int64_t i = 0; i < rows; ++i) sums[i] += grads[j * rows + i];
        }
        if (out.weighted_rows != nullptr)
          gemm<T>(ops.isa, codes, dim, rows, grads.data(), rows, 1, ops.zq + r0 * dim, dim,
                  out.weighted_rows + c0 * dim, dim, true);
      }
    }
  });
  if (!row_grad) return;
  for (int thread = 0; thread < threads; ++thread) {
    const T* sums = thread_row_sums.data() + row_block * thread;
    for (int64_t x = 0; x < num_rows * dim; ++x) out.weighted_keys[x] += sums[x];
    for (int64_t i = 0; i < num_rows; ++i) out.row_sums[i] += sums[num_rows * dim + i];
  }
}

// The entropies of p = softmax(logits): per row the entropy and log-sum-exp, per code the batch sum of p.
// A first pass per row tile carries the online softmax and A = sum exp(logit - max) (logit - max), which give
// lse and H = log(total) - A / total; a second, threads splitting the code tiles (a code's sum is one
// thread's), adds exp(logit - shift - log(total)) per code, as the PyTorch path does. The entropies' logits
// are the operands' times logit_scale. With `soft` (the fused op) the first pass also carries soft_quantize's
// softmax of the same products at its own temperature: one product per tile for both.
template <typename T>
struct SoftOutputs {
  bool hard;
  T logit_scale;
  T* soft;           // [N, Dv]
  int64_t* indices;  // [N] or null
  T* lse;            // [N]
};

template <typename T>
void entropy_forward(const Operands<T>& ops, T logit_scale, T* row_entropy, T* code_sums, T* lse,
                     const SoftOutputs<T>* soft_out = nullptr) {
  const int64_t num_rows = ops.num_rows;
  const T negative_infinity = -std::numeric_limits<T>::infinity(), lowest = std::numeric_limits<T>::lowest();
  std::vector<T> final_shift(num_rows), log_total(num_rows);
  const int64_t row_tiles = (num_rows + kRowTile - 1) / kRowTile;
  fastvq::parallel_for(0, row_tiles, 1, [&](int64_t tile_begin, int64_t tile_end) {
    std::vector<T> tile(static_cast<size_t>(kCodeTile * kRowTile));
    std::vector<T> maximum(kRowTile), total(kRowTile), centred_sum(kRowTile), shift(kRowTile), tile_maximum;
    std::vector<T> soft_tile(soft_out ? tile.size() : 0), centred(kRowTile), weights(kRowTile), nan_seen(kRowTile);
    SoftRowTile<T> soft_state(ops, soft_out && soft_out->hard, false, 0);
    for (int64_t row_tile = tile_begin; row_tile < tile_end; ++row_tile) {
      const int64_t r0 = row_tile * kRowTile, rows = std::min(kRowTile, num_rows - r0);
      std::fill(maximum.begin(), maximum.end(), negative_infinity);
      std::fill(total.begin(), total.end(), T(0));
      std::fill(centred_sum.begin(), centred_sum.end(), T(0));
      std::fill(shift.begin(), shift.end(), T(0));
      if (soft_out) soft_state.begin(r0, rows, soft_out->soft);
      for (int64_t c0 = 0; c0 < ops.num_codes; c0 += kCodeTile) {
        const int64_t codes = std::min(kCodeTile, ops.num_codes - c0);
        ops.tile_logits(tile.data(), nullptr, c0, codes, r0, rows);
        if (soft_out) {
          scaled_copy(tile.data(), codes * rows, soft_out->logit_scale, soft_tile.data());
          soft_state.add(soft_tile.data(), c0, codes);
        }
        if (logit_scale != T(1)) scaled_copy(tile.data(), codes * rows, logit_scale, tile.data());
        tile_maximum = maximum;
        fold_tile_maximum(tile.data(), codes, rows, tile_maximum.data(), nan_seen.data());
        for (int64_t i = 0; i < rows; ++i) {
          const T new_shift = tile_maximum[i] == negative_infinity ? T(0) : tile_maximum[i];
          const T rescale = std::exp(maximum[i] - new_shift);
          // Moving the shift from s0 to s1 adds (s0 - s1) * total to the carried sum before the rescale.
          centred_sum[i] = (centred_sum[i] + (shift[i] - new_shift) * total[i]) * rescale;
          total[i] *= rescale;
          shift[i] = new_shift;
          maximum[i] = tile_maximum[i];
        }
        for (int64_t j = 0; j < codes; ++j) {
          const T* line = tile.data() + j * rows;
          // exp(max(x, lowest)) is exp(x): the floor only turns an excluded code's -inf into a finite centred value.
          for (int64_t i = 0; i < rows; ++i) {
            centred[i] = std::max(line[i] - shift[i], lowest);
            weights[i] = line[i];
          }
          exp_shifted(ops.isa, weights.data(), shift.data(), rows);
          for (int64_t i = 0; i < rows; ++i) {
            centred_sum[i] += weights[i] * centred[i];
            total[i] += weights[i];
          }
        }
      }
      for (int64_t i = 0; i < rows; ++i) {
        lse[r0 + i] = total[i] > 0 ? shift[i] + std::log(total[i]) : std::numeric_limits<T>::quiet_NaN();
        log_total[r0 + i] = std::log(total[i]);
        row_entropy[r0 + i] = log_total[r0 + i] - centred_sum[i] / total[i];
        final_shift[r0 + i] = shift[i];
      }
      if (soft_out) soft_state.finish(soft_out->indices, soft_out->lse);
    }
  });
  const int64_t code_tiles = (ops.num_codes + kCodeTile - 1) / kCodeTile;
  fastvq::parallel_for(0, code_tiles, 1, [&](int64_t tile_begin, int64_t tile_end) {
    std::vector<T> tile(static_cast<size_t>(kCodeTile * kRowTile));
    for (int64_t code_tile = tile_begin; code_tile < tile_end; ++code_tile) {
      const int64_t c0 = code_tile * kCodeTile, codes = std::min(kCodeTile, ops.num_codes - c0);
      for (int64_t r0 = 0; r0 < num_rows; r0 += kRowTile) {
        const int64_t rows = std::min(kRowTile, num_rows - r0);
        ops.tile_logits(tile.data(), nullptr, c0, codes, r0, rows);
        if (logit_scale != T(1)) scaled_copy(tile.data(), codes * rows, logit_scale, tile.data());
        for (int64_t j = 0; j < codes; ++j) {
          T* line = tile.data() + j * rows;
          for (int64_t i = 0; i < rows; ++i) line[i] -= final_shift[r0 + i];
          exp_shifted(ops.isa, line, log_total.data() + r0, rows);
          T sum = 0;
          for (int64_t i = 0; i < rows; ++i) sum += line[i];
          code_sums[c0 + j] += sum;
        }
      }
    }
  });
}

// sum_k p[n, k] c_k per row (the entropies' backward needs it before its weights), threads splitting row tiles.
template <typename T>
void expected_code_weight(const Operands<T>& ops, T logit_scale, const T* lse, const T* code_weights, T* expected) {
  const int64_t num_rows = ops.num_rows;
  const int64_t row_tiles = (num_rows + kRowTile - 1) / kRowTile;
  fastvq::parallel_for(0, row_tiles, 1, [&](int64_t tile_begin, int64_t tile_end) {
    std::vector<T> tile(static_cast<size_t>(kCodeTile * kRowTile));
    for (int64_t row_tile = tile_begin; row_tile < tile_end; ++row_tile) {
      const int64_t r0 = row_tile * kRowTile, rows = std::min(kRowTile, num_rows - r0);
      std::fill(expected + r0, expected + r0 + rows, T(0));
      for (int64_t c0 = 0; c0 < ops.num_codes; c0 += kCodeTile) {
        const int64_t codes = std::min(kCodeTile, ops.num_codes - c0);
        ops.tile_logits(tile.data(), nullptr, c0, codes, r0, rows);
        if (logit_scale != T(1)) scaled_copy(tile.data(), codes * rows, logit_scale, tile.data());
        for (int64_t j = 0; j < codes; ++j) {
          T* line = tile.data() + j * rows;
          exp_shifted(ops.isa, line, lse + r0, rows);
          for (int64_t i = 0; i < rows; ++i) expected[r0 + i] += line[i] * code_weights[c0 + j];
        }
      }
    }
  });
}

void check_operands(const at::Tensor& zq, const at::Tensor& keys, const at::Tensor& code_term,
                    const at::Tensor& row_term, const at::Tensor& values, int64_t metric) {
  TORCH_CHECK(zq.dim() == 2 && keys.dim() == 2 && values.dim() == 2, "soft_quantize: zq, keys, values must be 2-D");
  TORCH_CHECK(zq.size(1) == keys.size(1) && values.size(0) == keys.size(0) && code_term.numel() == keys.size(0) &&
                  row_term.numel() == zq.size(0),
              "soft_quantize: operand shapes disagree");
  const auto work = code_term.scalar_type();
  const bool bf16_operands =
      zq.scalar_type() == at::kBFloat16 && keys.scalar_type() == at::kBFloat16 && work == at::kFloat;
  TORCH_CHECK((bf16_operands || (zq.scalar_type() == work && keys.scalar_type() == work)) &&
                  values.scalar_type() == work && row_term.scalar_type() == work,
              "soft_quantize: the prepared operands must share one work dtype (zq and keys may both be bfloat16 "
              "where it is float32)");
  TORCH_CHECK(work == at::kFloat || work == at::kDouble, "soft_quantize: the work dtype is float32 or float64, got ",
              work);
  TORCH_CHECK(metric >= kDot && metric <= kEuclidean, "soft_quantize: metric id must be 0 (dot), 1 (l2) or "
              "2 (euclidean), got ", metric);
}

template <typename T>
Operands<T> operands(const at::Tensor& zq, const at::Tensor& keys, const at::Tensor& code_term,
                     const at::Tensor& row_term, const at::Tensor& values, int64_t metric, double inverse_temperature) {
  Operands<T> ops;
  ops.num_rows = zq.size(0);
  ops.num_codes = keys.size(0);
  ops.dim = zq.size(1);
  ops.value_dim = values.size(1);
  ops.isa = soft_isa();
  const bool bf16_operands = keys.scalar_type() == at::kBFloat16;
  if (bf16_operands) {
    ops.widened_zq = zq.to(at::kFloat);
    ops.widened_keys = keys.to(at::kFloat);
    ops.bf16_products = soft_bf16_products();
  }
  ops.zq = (bf16_operands ? ops.widened_zq : zq).template data_ptr<T>();
  ops.keys = (bf16_operands ? ops.widened_keys : keys).template data_ptr<T>();
  if (ops.bf16_products) {
    ops.dim_pairs = (ops.dim + 1) / 2;
    const auto bits = [](const at::Tensor& x) { return reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()); };
    ops.key_pairs = bf16_pairs(bits(keys), ops.num_codes, ops.dim, false);
    ops.zq_pairs_t = bf16_pairs(bits(zq), ops.num_rows, ops.dim, true);
  } else {
    ops.zq_t = tile_transposed(ops.zq, ops.num_rows, ops.dim);
  }
  ops.code_term = code_term.data_ptr<T>();
  ops.row_term = row_term.data_ptr<T>();
  ops.values = values.data_ptr<T>();
  ops.metric = static_cast<Metric>(metric);
  ops.inverse_temperature = static_cast<T>(inverse_temperature);
  return ops;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> soft_quantize_cpu(
    const at::Tensor& zq, const at::Tensor& keys, const at::Tensor& code_term, const at::Tensor& row_term,
    const at::Tensor& values, int64_t metric, double inverse_temperature, const std::optional<at::Tensor>& seed,
    bool return_hard) {
  const SerialTorchOps serial_torch_ops;  // PyTorch's own ops inline, this op's loops on all threads (parallel.h)
  check_operands(zq, keys, code_term, row_term, values, metric);
  const auto zq_c = zq.contiguous(), keys_c = keys.contiguous(), values_c = values.contiguous();
  const auto code_c = code_term.contiguous(), row_c = row_term.contiguous();
  const int64_t num_rows = zq.size(0);
  at::Tensor soft = at::empty({num_rows, values.size(1)}, values.options());
  at::Tensor indices = at::empty({return_hard ? num_rows : 0}, values.options().dtype(at::kLong));
  at::Tensor lse = at::empty({num_rows}, values.options());
  const bool noisy = seed.has_value();
  const uint64_t seed_value = noisy ? static_cast<uint64_t>(seed->item<int64_t>()) : 0;
  if (num_rows == 0) return {soft, indices, lse};
  AT_DISPATCH_FLOATING_TYPES(code_term.scalar_type(), "soft_quantize_cpu", [&] {
    const auto ops = operands<scalar_t>(zq_c, keys_c, code_c, row_c, values_c, metric, inverse_temperature);
    forward<scalar_t>(ops, return_hard, noisy, seed_value, soft.data_ptr<scalar_t>(),
                      return_hard ? indices.data_ptr<int64_t>() : nullptr, lse.data_ptr<scalar_t>());
  });
  return {soft, indices, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> soft_quantize_backward_cpu(
    const at::Tensor& grad_soft, const at::Tensor& delta, const at::Tensor& lse, const at::Tensor& zq,
    const at::Tensor& keys, const at::Tensor& code_term, const at::Tensor& row_term, const at::Tensor& values,
    int64_t metric, double inverse_temperature, bool rows_grad, bool codes_grad, bool values_grad) {
  check_operands(zq, keys, code_term, row_term, values, metric);
  const int64_t num_rows = zq.size(0), num_codes = keys.size(0), dim = zq.size(1), value_dim = values.size(1);
  TORCH_CHECK(grad_soft.dim() == 2 && grad_soft.size(0) == num_rows && grad_soft.size(1) == value_dim &&
                  delta.numel() == num_rows && lse.numel() == num_rows,
              "soft_quantize_backward: grad_soft must be [N, Dv], delta and lse [N]");
  const auto work = code_term.scalar_type();
  TORCH_CHECK(grad_soft.scalar_type() == work && delta.scalar_type() == work && lse.scalar_type() == work,
              "soft_quantize_backward: grad_soft, delta and lse must be in the work dtype");
  const auto options = code_term.options();
  at::Tensor weighted_keys = at::zeros({rows_grad ? num_rows : 0, dim}, options);
  at::Tensor row_sums = at::zeros({rows_grad ? num_rows : 0}, options);
  at::Tensor weighted_rows = at::zeros({codes_grad ? num_codes : 0, dim}, options);
  at::Tensor code_sums = at::zeros({codes_grad ? num_codes : 0}, options);
  at::Tensor grad_values = at::zeros({values_grad ? num_codes : 0, value_dim}, options);
  if (num_rows == 0 || (!rows_grad && !codes_grad && !values_grad))
    return {weighted_keys, row_sums, weighted_rows, code_sums, grad_values};
  const auto zq_c = zq.contiguous(), keys_c = keys.contiguous(), values_c = values.contiguous();
  const auto code_c = code_term.contiguous(), row_c = row_term.contiguous();
  const auto grad_c = grad_soft.contiguous(), delta_c = delta.contiguous(), lse_c = lse.contiguous();
  AT_DISPATCH_FLOATING_TYPES(code_term.scalar_type(), "soft_quantize_backward_cpu", [&] {
    const auto ops = operands<scalar_t>(zq_c, keys_c, code_c, row_c, values_c, metric, inverse_temperature);
    GradOutputs<scalar_t> out{rows_grad ? weighted_keys.data_ptr<scalar_t>() : nullptr,
                              rows_grad ? row_sums.data_ptr<scalar_t>() : nullptr,
                              codes_grad ? weighted_rows.data_ptr<scalar_t>() : nullptr,
                              codes_grad ? code_sums.data_ptr<scalar_t>() : nullptr,
                              values_grad ? grad_values.data_ptr<scalar_t>() : nullptr};
    const SoftTerms<scalar_t> terms{grad_c.data_ptr<scalar_t>(), delta_c.data_ptr<scalar_t>(),
                                    lse_c.data_ptr<scalar_t>(), scalar_t(1), ops.inverse_temperature};
    backward<scalar_t>(ops, &terms, nullptr, out);
  });
  return {weighted_keys, row_sums, weighted_rows, code_sums, grad_values};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> soft_entropy_cpu(
    const at::Tensor& zq, const at::Tensor& keys, const at::Tensor& code_term, const at::Tensor& row_term,
    int64_t metric, double inverse_temperature) {
  const SerialTorchOps serial_torch_ops;  // PyTorch's own ops inline, this op's loops on all threads (parallel.h)
  // The entropies read no values: a [K, 1] stand-in in the work dtype.
  const at::Tensor no_values = code_term.unsqueeze(1);
  check_operands(zq, keys, code_term, row_term, no_values, metric);
  const int64_t num_rows = zq.size(0);
  const auto options = code_term.options();
  at::Tensor row_entropy = at::empty({num_rows}, options), lse = at::empty({num_rows}, options);
  at::Tensor code_sums = at::zeros({keys.size(0)}, options);
  if (num_rows == 0) return {row_entropy, code_sums, lse};
  const auto zq_c = zq.contiguous(), keys_c = keys.contiguous();
  const auto code_c = code_term.contiguous(), row_c = row_term.contiguous();
  AT_DISPATCH_FLOATING_TYPES(code_term.scalar_type(), "soft_entropy_cpu", [&] {
    const auto ops = operands<scalar_t>(zq_c, keys_c, code_c, row_c, no_values, metric, inverse_temperature);
    entropy_forward<scalar_t>(ops, scalar_t(1), row_entropy.data_ptr<scalar_t>(), code_sums.data_ptr<scalar_t>(),
                              lse.data_ptr<scalar_t>());
  });
  return {row_entropy, code_sums, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> soft_entropy_backward_cpu(
    const at::Tensor& grad_entropy, const at::Tensor& code_weights, const at::Tensor& row_constant,
    const at::Tensor& lse, const at::Tensor& zq, const at::Tensor& keys, const at::Tensor& code_term,
    const at::Tensor& row_term, int64_t metric, double inverse_temperature, bool rows_grad, bool codes_grad) {
  // The entropies read no values: a [K, 1] stand-in in the work dtype.
  const at::Tensor no_values = code_term.unsqueeze(1);
  check_operands(zq, keys, code_term, row_term, no_values, metric);
  const int64_t num_rows = zq.size(0), num_codes = keys.size(0), dim = zq.size(1);
  TORCH_CHECK(grad_entropy.numel() == num_rows && row_constant.numel() == num_rows && lse.numel() == num_rows &&
                  code_weights.numel() == num_codes,
              "soft_entropy_backward: grad_entropy, row_constant and lse must be [N], code_weights [K]");
  const auto work = code_term.scalar_type();
  TORCH_CHECK(grad_entropy.scalar_type() == work && code_weights.scalar_type() == work &&
                  row_constant.scalar_type() == work && lse.scalar_type() == work,
              "soft_entropy_backward: the row and code terms must be in the work dtype");
  const auto options = code_term.options();
  at::Tensor weighted_keys = at::zeros({rows_grad ? num_rows : 0, dim}, options);
  at::Tensor row_sums = at::zeros({rows_grad ? num_rows : 0}, options);
  at::Tensor weighted_rows = at::zeros({codes_grad ? num_codes : 0, dim}, options);
  at::Tensor code_sums = at::zeros({codes_grad ? num_codes : 0}, options);
  if (num_rows == 0 || (!rows_grad && !codes_grad)) return {weighted_keys, row_sums, weighted_rows, code_sums};
  const auto zq_c = zq.contiguous(), keys_c = keys.contiguous();
  const auto code_c = code_term.contiguous(), row_c = row_term.contiguous(), lse_c = lse.contiguous();
  const auto entropy_c = grad_entropy.contiguous(), weights_c = code_weights.contiguous();
  const auto row_constant_c = row_constant.contiguous();
  AT_DISPATCH_FLOATING_TYPES(code_term.scalar_type(), "soft_entropy_backward_cpu", [&] {
    const auto ops = operands<scalar_t>(zq_c, keys_c, code_c, row_c, no_values, metric, inverse_temperature);
    std::vector<scalar_t> constant(static_cast<size_t>(num_rows));
    expected_code_weight<scalar_t>(ops, scalar_t(1), lse_c.data_ptr<scalar_t>(), weights_c.data_ptr<scalar_t>(),
                                   constant.data());
    const auto* given = row_constant_c.data_ptr<scalar_t>();
    for (int64_t i = 0; i < num_rows; ++i) constant[i] = given[i] - constant[i];
    const EntropyTerms<scalar_t> terms{entropy_c.data_ptr<scalar_t>(), weights_c.data_ptr<scalar_t>(),
                                       constant.data(), lse_c.data_ptr<scalar_t>(), scalar_t(1),
                                       ops.inverse_temperature};
    GradOutputs<scalar_t> out{rows_grad ? weighted_keys.data_ptr<scalar_t>() : nullptr,
                              rows_grad ? row_sums.data_ptr<scalar_t>() : nullptr,
                              codes_grad ? weighted_rows.data_ptr<scalar_t>() : nullptr,
                              codes_grad ? code_sums.data_ptr<scalar_t>() : nullptr, nullptr};
    backward<scalar_t>(ops, nullptr, &terms, out);
  });
  return {weighted_keys, row_sums, weighted_rows, code_sums};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> soft_quantize_entropy_cpu(
    const at::Tensor& zq, const at::Tensor& keys, const at::Tensor& code_term, const at::Tensor& row_term,
    const at::Tensor& values, int64_t metric, double inverse_temperature, double entropy_inverse_temperature,
    bool return_hard) {
  const SerialTorchOps serial_torch_ops;  // PyTorch's own ops inline, this op's loops on all threads (parallel.h)
  check_operands(zq, keys, code_term, row_term, values, metric);
  const int64_t num_rows = zq.size(0);
  const auto options = code_term.options();
  at::Tensor soft = at::empty({num_rows, values.size(1)}, options);
  at::Tensor indices = at::empty({return_hard ? num_rows : 0}, options.dtype(at::kLong));
  at::Tensor lse = at::empty({num_rows}, options), row_entropy = at::empty({num_rows}, options);
  at::Tensor code_sums = at::zeros({keys.size(0)}, options), entropy_lse = at::empty({num_rows}, options);
  if (num_rows == 0) return {soft, indices, lse, row_entropy, code_sums, entropy_lse};
  const auto zq_c = zq.contiguous(), keys_c = keys.contiguous(), values_c = values.contiguous();
  const auto code_c = code_term.contiguous(), row_c = row_term.contiguous();
  AT_DISPATCH_FLOATING_TYPES(code_term.scalar_type(), "soft_quantize_entropy_cpu", [&] {
    // The operands at temperature 1: each part scales the one tile of logits by its own 1 / T.
    const auto ops = operands<scalar_t>(zq_c, keys_c, code_c, row_c, values_c, metric, 1.0);
    const SoftOutputs<scalar_t> soft_out{return_hard, static_cast<scalar_t>(inverse_temperature),
                                         soft.data_ptr<scalar_t>(),
                                         return_hard ? indices.data_ptr<int64_t>() : nullptr, lse.data_ptr<scalar_t>()};
    entropy_forward<scalar_t>(ops, static_cast<scalar_t>(entropy_inverse_temperature),
                              row_entropy.data_ptr<scalar_t>(), code_sums.data_ptr<scalar_t>(),
                              entropy_lse.data_ptr<scalar_t>(), &soft_out);
  });
  return {soft, indices, lse, row_entropy, code_sums, entropy_lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> soft_quantize_entropy_backward_cpu(
    const at::Tensor& grad_soft, const at::Tensor& delta, const at::Tensor& lse, const at::Tensor& grad_entropy,
    const at::Tensor& code_weights, const at::Tensor& row_constant, const at::Tensor& entropy_lse,
    const at::Tensor& zq, const at::Tensor& keys, const at::Tensor& code_term, const at::Tensor& row_term,
    const at::Tensor& values, int64_t metric, double inverse_temperature, double entropy_inverse_temperature,
    bool rows_grad, bool codes_grad, bool values_grad) {
  check_operands(zq, keys, code_term, row_term, values, metric);
  const int64_t num_rows = zq.size(0), num_codes = keys.size(0), dim = zq.size(1), value_dim = values.size(1);
  TORCH_CHECK(grad_soft.dim() == 2 && grad_soft.size(0) == num_rows && grad_soft.size(1) == value_dim &&
                  delta.numel() == num_rows && lse.numel() == num_rows && grad_entropy.numel() == num_rows &&
                  row_constant.numel() == num_rows && entropy_lse.numel() == num_rows &&
                  code_weights.numel() == num_codes,
              "soft_quantize_entropy_backward: grad_soft must be [N, Dv], code_weights [K], the row terms [N]");
  for (const at::Tensor* term : {&grad_soft, &delta, &lse, &grad_entropy, &code_weights, &row_constant,
                                 &entropy_lse})
    TORCH_CHECK(term->scalar_type() == code_term.scalar_type(),
                "soft_quantize_entropy_backward: the gradient terms must be in the work dtype");
  const auto options = code_term.options();
  at::Tensor weighted_keys = at::zeros({rows_grad ? num_rows : 0, dim}, options);
  at::Tensor row_sums = at::zeros({rows_grad ? num_rows : 0}, options);
  at::Tensor weighted_rows = at::zeros({codes_grad ? num_codes : 0, dim}, options);
  at::Tensor code_sums = at::zeros({codes_grad ? num_codes : 0}, options);
  at::Tensor grad_values = at::zeros({values_grad ? num_codes : 0, value_dim}, options);
  if (num_rows == 0 || (!rows_grad && !codes_grad && !values_grad))
    return {weighted_keys, row_sums, weighted_rows, code_sums, grad_values};
  const auto zq_c = zq.contiguous(), keys_c = keys.contiguous(), values_c = values.contiguous();
  const auto code_c = code_term.contiguous(), row_c = row_term.contiguous();
  const auto grad_c = grad_soft.contiguous(), delta_c = delta.contiguous(), lse_c = lse.contiguous();
  const auto entropy_c = grad_entropy.contiguous(), weights_c = code_weights.contiguous();
  const auto row_constant_c = row_constant.contiguous(), entropy_lse_c = entropy_lse.contiguous();
  AT_DISPATCH_FLOATING_TYPES(code_term.scalar_type(), "soft_quantize_entropy_backward_cpu", [&] {
    const auto ops = operands<scalar_t>(zq_c, keys_c, code_c, row_c, values_c, metric, 1.0);
    const auto soft_scale = static_cast<scalar_t>(inverse_temperature);
    const auto entropy_scale = static_cast<scalar_t>(entropy_inverse_temperature);
    std::vector<scalar_t> constant(static_cast<size_t>(num_rows));
    const bool weights_needed = rows_grad || codes_grad;
    if (weights_needed) {
      expected_code_weight<scalar_t>(ops, entropy_scale, entropy_lse_c.data_ptr<scalar_t>(),
                                     weights_c.data_ptr<scalar_t>(), constant.data());
      const auto* given = row_constant_c.data_ptr<scalar_t>();
      for (int64_t i = 0; i < num_rows; ++i) constant[i] = given[i] - constant[i];
    }
    const SoftTerms<scalar_t> soft_terms{grad_c.data_ptr<scalar_t>(), delta_c.data_ptr<scalar_t>(),
                                         lse_c.data_ptr<scalar_t>(), soft_scale, soft_scale};
    const EntropyTerms<scalar_t> entropy_terms{entropy_c.data_ptr<scalar_t>(), weights_c.data_ptr<scalar_t>(),
                                               constant.data(), entropy_lse_c.data_ptr<scalar_t>(), entropy_scale,
                                               entropy_scale};
    GradOutputs<scalar_t> out{rows_grad ? weighted_keys.data_ptr<scalar_t>() : nullptr,
                              rows_grad ? row_sums.data_ptr<scalar_t>() : nullptr,
                              codes_grad ? weighted_rows.data_ptr<scalar_t>() : nullptr,
                              codes_grad ? code_sums.data_ptr<scalar_t>() : nullptr,
                              values_grad ? grad_values.data_ptr<scalar_t>() : nullptr};
    backward<scalar_t>(ops, &soft_terms, weights_needed ? &entropy_terms : nullptr, out);
  });
  return {weighted_keys, row_sums, weighted_rows, code_sums, grad_values};
}

}  // namespace fastvq
