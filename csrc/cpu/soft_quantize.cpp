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
// sums kept per thread and added in thread order.
#include "../fastvq.h"
#include "parallel.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <cmath>
#include <cstdint>
#include <limits>
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

// C[m, n] (+)= A[m, k] B[k, n]: A at any strides (one element is broadcast at a time), B and C row-major.
template <typename T>
void gemm(int64_t m, int64_t n, int64_t k, const T* a, int64_t a_row, int64_t a_col, const T* b, int64_t ldb, T* c,
          int64_t ldc, bool accumulate) {
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
  static_assert(kRows == 1 || kRows == 6, "the blocks are 6 rows, and 1 for the rest");
#define FASTVQ_ROW(r)                                                                                 \
  __m512 acc##r##0 = _mm512_setzero_ps(), acc##r##1 = _mm512_setzero_ps();                            \
  if (kRows > r && accumulate) {                                                                      \
    acc##r##0 = _mm512_maskz_loadu_ps(mask0, c + r * ldc);                                            \
    acc##r##1 = _mm512_maskz_loadu_ps(mask1, c + r * ldc + 16);                                       \
  }
  FASTVQ_ROW(0) FASTVQ_ROW(1) FASTVQ_ROW(2) FASTVQ_ROW(3) FASTVQ_ROW(4) FASTVQ_ROW(5)
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
    FASTVQ_FMA(0) FASTVQ_FMA(1) FASTVQ_FMA(2) FASTVQ_FMA(3) FASTVQ_FMA(4) FASTVQ_FMA(5)
#undef FASTVQ_FMA
  }
#define FASTVQ_STORE(r)                                          \
  if (kRows > r) {                                               \
    _mm512_mask_storeu_ps(c + r * ldc, mask0, acc##r##0);        \
    _mm512_mask_storeu_ps(c + r * ldc + 16, mask1, acc##r##1);   \
  }
  FASTVQ_STORE(0) FASTVQ_STORE(1) FASTVQ_STORE(2) FASTVQ_STORE(3) FASTVQ_STORE(4) FASTVQ_STORE(5)
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

template <>
void gemm<float>(int64_t m, int64_t n, int64_t k, const float* a, int64_t a_row, int64_t a_col, const float* b,
                 int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  int64_t row = 0;
  for (; row + 6 <= m; row += 6)
    gemm_rows<6>(n, k, a + row * a_row, a_row, a_col, b, ldb, c + row * ldc, ldc, accumulate);
  for (; row < m; ++row) gemm_rows<1>(n, k, a + row * a_row, a_row, a_col, b, ldb, c + row * ldc, ldc, accumulate);
}
#endif

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
    gemm<T>(codes, rows, dim, keys + c0 * dim, dim, 1, zq_t.data() + r0 * dim, rows, tile, rows, false);
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
inline void exp_shifted(T* line, const T* shift, int64_t n) {
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

template <>
inline void exp_shifted<float>(float* line, const float* shift, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 mask = static_cast<__mmask16>(n - i >= 16 ? 0xFFFFu : (1u << (n - i)) - 1u);
    const __m512 x = _mm512_sub_ps(_mm512_maskz_loadu_ps(mask, line + i), _mm512_maskz_loadu_ps(mask, shift + i));
    _mm512_mask_storeu_ps(line + i, mask, exp_ps(x));
  }
}
#endif

template <typename T>
inline T nan_max(T a, T b) {
  if (a != a || b != b) return std::numeric_limits<T>::quiet_NaN();
  return std::max(a, b);
}

template <typename T>
void forward(const Operands<T>& ops, bool hard, bool noisy, uint64_t seed, T* soft, int64_t* indices, T* lse) {
  const int64_t num_rows = ops.num_rows, value_dim = ops.value_dim;
  const T negative_infinity = -std::numeric_limits<T>::infinity();
  const int64_t row_tiles = (num_rows + kRowTile - 1) / kRowTile;
  fastvq::parallel_for(0, row_tiles, 1, [&](int64_t tile_begin, int64_t tile_end) {
    std::vector<T> tile(static_cast<size_t>(kCodeTile * kRowTile));
    std::vector<T> maximum(kRowTile), total(kRowTile), best(kRowTile), shift(kRowTile), rescale(kRowTile);
    std::vector<int64_t> best_index(kRowTile);
    for (int64_t row_tile = tile_begin; row_tile < tile_end; ++row_tile) {
      const int64_t r0 = row_tile * kRowTile, rows = std::min(kRowTile, num_rows - r0);
      T* weighted = soft + r0 * value_dim;  // the running weighted sums live in the output
      std::fill(weighted, weighted + rows * value_dim, T(0));
      std::fill(maximum.begin(), maximum.end(), negative_infinity);
      std::fill(best.begin(), best.end(), negative_infinity);
      std::fill(total.begin(), total.end(), T(0));
      std::fill(best_index.begin(), best_index.end(), 0);
      for (int64_t c0 = 0; c0 < ops.num_codes; c0 += kCodeTile) {
        const int64_t codes = std::min(kCodeTile, ops.num_codes - c0);
        ops.tile_logits(tile.data(), nullptr, c0, codes, r0, rows);
        if (hard) {
          // Codes in order and a strict '>': the lowest index wins ties; a NaN score never wins.
          for (int64_t j = 0; j < codes; ++j)
            for (int64_t i = 0; i < rows; ++i) {
              T score = tile[j * rows + i];
              if (noisy) score += static_cast<T>(gumbel(seed, r0 + i, c0 + j));
              if (score > best[i]) best[i] = score, best_index[i] = c0 + j;
            }
        }
        std::vector<T> tile_maximum(maximum);
        for (int64_t j = 0; j < codes; ++j)
          for (int64_t i = 0; i < rows; ++i) tile_maximum[i] = nan_max(tile_maximum[i], tile[j * rows + i]);
        for (int64_t i = 0; i < rows; ++i) {
          // The safe shift keeps a row whose logits are all -inf so far at a zero sum, not exp(nan).
          shift[i] = tile_maximum[i] == negative_infinity ? T(0) : tile_maximum[i];
          rescale[i] = std::exp(maximum[i] - shift[i]);
          maximum[i] = tile_maximum[i];
          total[i] *= rescale[i];
        }
        for (int64_t j = 0; j < codes; ++j) {
          T* line = tile.data() + j * rows;
          exp_shifted(line, shift.data(), rows);
          for (int64_t i = 0; i < rows; ++i) total[i] += line[i];
        }
        for (int64_t i = 0; i < rows; ++i)
          for (int64_t v = 0; v < value_dim; ++v) weighted[i * value_dim + v] *= rescale[i];
        // weighted [rows, Dv] += p [rows, codes] values [codes, Dv], p read from the tile's columns.
        gemm<T>(rows, value_dim, codes, tile.data(), 1, rows, ops.values + c0 * value_dim, value_dim, weighted,
                value_dim, true);
      }
      for (int64_t i = 0; i < rows; ++i) {
        for (int64_t v = 0; v < value_dim; ++v) weighted[i * value_dim + v] /= total[i];
        const T safe_shift = maximum[i] == negative_infinity ? T(0) : maximum[i];
        lse[r0 + i] = total[i] > 0 ? safe_shift + std::log(total[i]) : std::numeric_limits<T>::quiet_NaN();
        if (hard) indices[r0 + i] = best_index[i];
      }
    }
  });
}

template <typename T>
struct GradOutputs {
  T* weighted_keys;  // [N, D] or null: sum_k w k
  T* row_sums;       // [N] or null
  T* weighted_rows;  // [K, D] or null: sum_n w zq
  T* code_sums;      // [K] or null
  T* grad_values;    // [K, Dv] or null: sum_n p g
};

// The entropies' per-logit gradient: dL/dlogit = p (-a_n max(logit, lowest) + c_k + constant_n), with a the
// row entropy's gradient, c the mean probabilities' gradient / N and constant_n = grad_lse + a_n m_n -
// sum_k p c_k (m the mean logit; see fastvq/backends/torch/soft_quantize.py's soft_entropy_backward).
template <typename T>
struct EntropyTerms {
  const T* grad_entropy;   // a [N]
  const T* code_weights;   // c [K]
  const T* row_constant;   // constant [N]
};

// The backward's sums of w = dL/dlogit / T (times euclidean's scale): soft_quantize's, p (g V^T - delta),
// or with `entropy` the entropies'.
template <typename T>
void backward(const Operands<T>& ops, const T* grad_soft, const T* delta, const T* lse, GradOutputs<T> out,
              const EntropyTerms<T>* entropy = nullptr) {
  const int64_t num_rows = ops.num_rows, dim = ops.dim, value_dim = ops.value_dim;
  const std::vector<T> grad_t = entropy ? std::vector<T>() : tile_transposed(grad_soft, num_rows, value_dim);
  const T lowest = std::numeric_limits<T>::lowest();
  const int64_t code_tiles = (ops.num_codes + kCodeTile - 1) / kCodeTile;
  const int threads = at::get_num_threads();
  // Per-thread row sums (rows are shared by every code tile), added in thread order at the end.
  const bool row_grad = out.weighted_keys != nullptr;
  const size_t row_block = static_cast<size_t>(num_rows * (dim + 1));
  std::vector<T> thread_row_sums(row_grad ? row_block * threads : 0, T(0));
  // at::parallel_for, not fastvq::parallel_for: the row sums are per thread (at::get_thread_num()) and added in
  // thread order, so each thread must own one fixed share of the code tiles.
  at::parallel_for(0, code_tiles, 1, [&](int64_t tile_begin, int64_t tile_end) {
    std::vector<T> probs(static_cast<size_t>(kCodeTile * kRowTile)), grads(probs.size()), scale(probs.size());
    T* my_rows = row_grad ? thread_row_sums.data() + row_block * at::get_thread_num() : nullptr;
    for (int64_t code_tile = tile_begin; code_tile < tile_end; ++code_tile) {
      const int64_t c0 = code_tile * kCodeTile, codes = std::min(kCodeTile, ops.num_codes - c0);
      for (int64_t r0 = 0; r0 < num_rows; r0 += kRowTile) {
        const int64_t rows = std::min(kRowTile, num_rows - r0);
        ops.tile_logits(probs.data(), ops.metric == kEuclidean ? scale.data() : nullptr, c0, codes, r0, rows);
        if (entropy != nullptr) {
          // Floored, an excluded code's -inf logit times its zero probability is 0, not nan.
          for (int64_t j = 0; j < codes; ++j)
            for (int64_t i = 0; i < rows; ++i) {
              const T logit = probs[j * rows + i];
              grads[j * rows + i] = -entropy->grad_entropy[r0 + i] * std::max(logit, lowest) +
                                    entropy->code_weights[c0 + j] + entropy->row_constant[r0 + i];
            }
        }
        for (int64_t j = 0; j < codes; ++j) exp_shifted(probs.data() + j * rows, lse + r0, rows);
        if (out.grad_values != nullptr)
          gemm<T>(codes, value_dim, rows, probs.data(), rows, 1, grad_soft + r0 * value_dim, value_dim,
                  out.grad_values + c0 * value_dim, value_dim, true);
        if (out.weighted_keys == nullptr && out.weighted_rows == nullptr) continue;
        // g V^T per (code, row), then w = p (g V^T - delta) / T (times euclidean's scale).
        if (entropy == nullptr)
          gemm<T>(codes, rows, value_dim, ops.values + c0 * value_dim, value_dim, 1, grad_t.data() + r0 * value_dim,
                  rows, grads.data(), rows, false);
        const T* row_delta = entropy == nullptr ? delta + r0 : nullptr;
        for (int64_t j = 0; j < codes; ++j) {
          T code_sum = 0;
          for (int64_t i = 0; i < rows; ++i) {
            const T bracket = row_delta ? grads[j * rows + i] - row_delta[i] : grads[j * rows + i];
            // A zero probability (an excluded code) gives a zero weight even where the entropies' floored
            // bracket overflowed: 0 * inf would be nan.
            const T prob = probs[j * rows + i];
            T weight = prob == T(0) ? T(0) : prob * bracket * ops.inverse_temperature;
            if (ops.metric == kEuclidean) weight *= scale[j * rows + i];
            grads[j * rows + i] = weight;
            code_sum += weight;
          }
          if (out.code_sums != nullptr) out.code_sums[c0 + j] += code_sum;
        }
        if (row_grad) {
          T* keys_sum = my_rows + r0 * dim;
          gemm<T>(rows, dim, codes, grads.data(), 1, rows, ops.keys + c0 * dim, dim, keys_sum, dim, true);
          T* sums = my_rows + num_rows * dim + r0;
          for (int64_t j = 0; j < codes; ++j)
            for (int64_t i = 0; i < rows; ++i) sums[i] += grads[j * rows + i];
        }
        if (out.weighted_rows != nullptr)
          gemm<T>(codes, dim, rows, grads.data(), rows, 1, ops.zq + r0 * dim, dim, out.weighted_rows + c0 * dim, dim,
                  true);
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
// thread's), adds exp(logit - shift - log(total)) per code, as the PyTorch path does.
template <typename T>
void entropy_forward(const Operands<T>& ops, T* row_entropy, T* code_sums, T* lse) {
  const int64_t num_rows = ops.num_rows;
  const T negative_infinity = -std::numeric_limits<T>::infinity(), lowest = std::numeric_limits<T>::lowest();
  std::vector<T> final_shift(num_rows), log_total(num_rows);
  const int64_t row_tiles = (num_rows + kRowTile - 1) / kRowTile;
  fastvq::parallel_for(0, row_tiles, 1, [&](int64_t tile_begin, int64_t tile_end) {
    std::vector<T> tile(static_cast<size_t>(kCodeTile * kRowTile));
    std::vector<T> maximum(kRowTile), total(kRowTile), centred_sum(kRowTile), shift(kRowTile), tile_maximum;
    for (int64_t row_tile = tile_begin; row_tile < tile_end; ++row_tile) {
      const int64_t r0 = row_tile * kRowTile, rows = std::min(kRowTile, num_rows - r0);
      std::fill(maximum.begin(), maximum.end(), negative_infinity);
      std::fill(total.begin(), total.end(), T(0));
      std::fill(centred_sum.begin(), centred_sum.end(), T(0));
      std::fill(shift.begin(), shift.end(), T(0));
      for (int64_t c0 = 0; c0 < ops.num_codes; c0 += kCodeTile) {
        const int64_t codes = std::min(kCodeTile, ops.num_codes - c0);
        ops.tile_logits(tile.data(), nullptr, c0, codes, r0, rows);
        tile_maximum = maximum;
        for (int64_t j = 0; j < codes; ++j)
          for (int64_t i = 0; i < rows; ++i) tile_maximum[i] = nan_max(tile_maximum[i], tile[j * rows + i]);
        for (int64_t i = 0; i < rows; ++i) {
          const T new_shift = tile_maximum[i] == negative_infinity ? T(0) : tile_maximum[i];
          const T rescale = std::exp(maximum[i] - new_shift);
          // Moving the shift from s0 to s1 adds (s0 - s1) * total to the carried sum before the rescale.
          centred_sum[i] = (centred_sum[i] + (shift[i] - new_shift) * total[i]) * rescale;
          total[i] *= rescale;
          shift[i] = new_shift;
          maximum[i] = tile_maximum[i];
        }
        for (int64_t j = 0; j < codes; ++j)
          for (int64_t i = 0; i < rows; ++i) {
            const T centred = std::max(tile[j * rows + i] - shift[i], lowest);
            const T weight = std::exp(centred);
            centred_sum[i] += weight * centred;
            total[i] += weight;
          }
      }
      for (int64_t i = 0; i < rows; ++i) {
        lse[r0 + i] = total[i] > 0 ? shift[i] + std::log(total[i]) : std::numeric_limits<T>::quiet_NaN();
        log_total[r0 + i] = std::log(total[i]);
        row_entropy[r0 + i] = log_total[r0 + i] - centred_sum[i] / total[i];
        final_shift[r0 + i] = shift[i];
      }
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
        for (int64_t j = 0; j < codes; ++j) {
          T sum = 0;
          for (int64_t i = 0; i < rows; ++i)
            sum += std::exp(tile[j * rows + i] - final_shift[r0 + i] - log_total[r0 + i]);
          code_sums[c0 + j] += sum;
        }
      }
    }
  });
}

// sum_k p[n, k] c_k per row (the entropies' backward needs it before its weights), threads splitting row tiles.
template <typename T>
void expected_code_weight(const Operands<T>& ops, const T* lse, const T* code_weights, T* expected) {
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
        for (int64_t j = 0; j < codes; ++j)
          for (int64_t i = 0; i < rows; ++i)
            expected[r0 + i] += std::exp(tile[j * rows + i] - lse[r0 + i]) * code_weights[c0 + j];
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
  TORCH_CHECK(zq.scalar_type() == keys.scalar_type() && keys.scalar_type() == values.scalar_type() &&
                  code_term.scalar_type() == keys.scalar_type() && row_term.scalar_type() == keys.scalar_type(),
              "soft_quantize: the prepared operands must share one work dtype");
  TORCH_CHECK(keys.scalar_type() == at::kFloat || keys.scalar_type() == at::kDouble,
              "soft_quantize: the work dtype is float32 or float64, got ", keys.scalar_type());
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
  ops.zq = zq.data_ptr<T>();
  ops.zq_t = tile_transposed(ops.zq, ops.num_rows, ops.dim);
  ops.keys = keys.data_ptr<T>();
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
  AT_DISPATCH_FLOATING_TYPES(keys.scalar_type(), "soft_quantize_cpu", [&] {
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
  TORCH_CHECK(grad_soft.scalar_type() == keys.scalar_type() && delta.scalar_type() == keys.scalar_type() &&
                  lse.scalar_type() == keys.scalar_type(),
              "soft_quantize_backward: grad_soft, delta and lse must be in the work dtype");
  const auto options = keys.options();
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
  AT_DISPATCH_FLOATING_TYPES(keys.scalar_type(), "soft_quantize_backward_cpu", [&] {
    const auto ops = operands<scalar_t>(zq_c, keys_c, code_c, row_c, values_c, metric, inverse_temperature);
    GradOutputs<scalar_t> out{rows_grad ? weighted_keys.data_ptr<scalar_t>() : nullptr,
                              rows_grad ? row_sums.data_ptr<scalar_t>() : nullptr,
                              codes_grad ? weighted_rows.data_ptr<scalar_t>() : nullptr,
                              codes_grad ? code_sums.data_ptr<scalar_t>() : nullptr,
                              values_grad ? grad_values.data_ptr<scalar_t>() : nullptr};
    backward<scalar_t>(ops, grad_c.data_ptr<scalar_t>(), delta_c.data_ptr<scalar_t>(), lse_c.data_ptr<scalar_t>(),
                       out);
  });
  return {weighted_keys, row_sums, weighted_rows, code_sums, grad_values};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> soft_entropy_cpu(
    const at::Tensor& zq, const at::Tensor& keys, const at::Tensor& code_term, const at::Tensor& row_term,
    int64_t metric, double inverse_temperature) {
  const SerialTorchOps serial_torch_ops;  // PyTorch's own ops inline, this op's loops on all threads (parallel.h)
  check_operands(zq, keys, code_term, row_term, keys, metric);
  const int64_t num_rows = zq.size(0);
  const auto options = keys.options();
  at::Tensor row_entropy = at::empty({num_rows}, options), lse = at::empty({num_rows}, options);
  at::Tensor code_sums = at::zeros({keys.size(0)}, options);
  if (num_rows == 0) return {row_entropy, code_sums, lse};
  const auto zq_c = zq.contiguous(), keys_c = keys.contiguous();
  const auto code_c = code_term.contiguous(), row_c = row_term.contiguous();
  AT_DISPATCH_FLOATING_TYPES(keys.scalar_type(), "soft_entropy_cpu", [&] {
    const auto ops = operands<scalar_t>(zq_c, keys_c, code_c, row_c, keys_c, metric, inverse_temperature);
    entropy_forward<scalar_t>(ops, row_entropy.data_ptr<scalar_t>(), code_sums.data_ptr<scalar_t>(),
                              lse.data_ptr<scalar_t>());
  });
  return {row_entropy, code_sums, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> soft_entropy_backward_cpu(
    const at::Tensor& grad_entropy, const at::Tensor& code_weights, const at::Tensor& row_constant,
    const at::Tensor& lse, const at::Tensor& zq, const at::Tensor& keys, const at::Tensor& code_term,
    const at::Tensor& row_term, int64_t metric, double inverse_temperature, bool rows_grad, bool codes_grad) {
  check_operands(zq, keys, code_term, row_term, keys, metric);
  const int64_t num_rows = zq.size(0), num_codes = keys.size(0), dim = zq.size(1);
  TORCH_CHECK(grad_entropy.numel() == num_rows && row_constant.numel() == num_rows && lse.numel() == num_rows &&
                  code_weights.numel() == num_codes,
              "soft_entropy_backward: grad_entropy, row_constant and lse must be [N], code_weights [K]");
  TORCH_CHECK(grad_entropy.scalar_type() == keys.scalar_type() && code_weights.scalar_type() == keys.scalar_type() &&
                  row_constant.scalar_type() == keys.scalar_type() && lse.scalar_type() == keys.scalar_type(),
              "soft_entropy_backward: the row and code terms must be in the work dtype");
  const auto options = keys.options();
  at::Tensor weighted_keys = at::zeros({rows_grad ? num_rows : 0, dim}, options);
  at::Tensor row_sums = at::zeros({rows_grad ? num_rows : 0}, options);
  at::Tensor weighted_rows = at::zeros({codes_grad ? num_codes : 0, dim}, options);
  at::Tensor code_sums = at::zeros({codes_grad ? num_codes : 0}, options);
  if (num_rows == 0 || (!rows_grad && !codes_grad)) return {weighted_keys, row_sums, weighted_rows, code_sums};
  const auto zq_c = zq.contiguous(), keys_c = keys.contiguous();
  const auto code_c = code_term.contiguous(), row_c = row_term.contiguous(), lse_c = lse.contiguous();
  const auto entropy_c = grad_entropy.contiguous(), weights_c = code_weights.contiguous();
  const auto row_constant_c = row_constant.contiguous();
  AT_DISPATCH_FLOATING_TYPES(keys.scalar_type(), "soft_entropy_backward_cpu", [&] {
    const auto ops = operands<scalar_t>(zq_c, keys_c, code_c, row_c, keys_c, metric, inverse_temperature);
    std::vector<scalar_t> constant(static_cast<size_t>(num_rows));
    expected_code_weight<scalar_t>(ops, lse_c.data_ptr<scalar_t>(), weights_c.data_ptr<scalar_t>(), constant.data());
    const auto* given = row_constant_c.data_ptr<scalar_t>();
    for (int64_t i = 0; i < num_rows; ++i) constant[i] = given[i] - constant[i];
    EntropyTerms<scalar_t> terms{entropy_c.data_ptr<scalar_t>(), weights_c.data_ptr<scalar_t>(), constant.data()};
    GradOutputs<scalar_t> out{rows_grad ? weighted_keys.data_ptr<scalar_t>() : nullptr,
                              rows_grad ? row_sums.data_ptr<scalar_t>() : nullptr,
                              codes_grad ? weighted_rows.data_ptr<scalar_t>() : nullptr,
                              codes_grad ? code_sums.data_ptr<scalar_t>() : nullptr, nullptr};
    backward<scalar_t>(ops, nullptr, nullptr, lse_c.data_ptr<scalar_t>(), out, &terms);
  });
  return {weighted_keys, row_sums, weighted_rows, code_sums};
}

}  // namespace fastvq
