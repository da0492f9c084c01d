// What the nearest-code search (search.cpp) and the top-k search (topk.cpp) share on CPU: the codebook
// as the searches score it (l2's centre search_center, cosine's unit rows, the biases, the direct
// kernels' panels), the row and score tiles and how they are sized, the BLAS tile product, the true
// distance recomputed from z - e, and the choice of kernel (FASTVQ_CPU_SEARCH); search.cpp's file
// comment describes the kernels. Only those two translation units include it: everything here is
// inline or a template, so both include it without a second definition.
#pragma once

#include "../fastvq.h"
#include "search_isa.h"
#include "parallel.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

// The Fortran BLAS entry points of the BLAS that libtorch_cpu links (MKL on x86-64 wheels). They
// are weak: where the torch build does not export them they resolve to null and the tile product
// goes through at::mm_out instead, which costs a dispatcher call per tile.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

namespace fastvq {

// Scores folded per step of the running minimum: one AVX-512 register of fp32 (two of AVX2).
constexpr int64_t kLanes = 16;
constexpr double kNormEps = 1e-12;  // F.normalize's eps, as in fastvq/backends/common.py
// Below this many multiply-adds a search runs on the calling thread: waking the pool costs more.
constexpr int64_t kParallelWork = int64_t{1} << 21;

// The kernels a search can run on: the BLAS tiles or one of the direct kernels.
enum class Kernel { Blas, Avx2, Avx512, Avx512Bf16 };

// Codes per panel and rows per register tile of a direct kernel, and register tiles per block.
struct DirectShape {
  int64_t panel_codes;
  int64_t tile_rows;
  int64_t tiles_per_block;
};

inline DirectShape direct_shape(Kernel kernel) {
  if (kernel == Kernel::Avx2) return {avx2::kPanelCodes, avx2::kTileRows, 16};
  return {avx512::kPanelCodes, avx512::kTileRows, 8};
}

struct TileShape {
  int64_t rows;
  int64_t codes;
};

// A thread's row tile [rows, D] plus its score tile [rows, codes] take about 1 MiB: about one core's
// L2 on current x86 servers, and always within the shared L3, so each tile's scores are folded
// while still cached. Wide code tiles amortise the GEMM's packing and the fold's lane merge; the
// rows shrink for small N so that every thread still gets a block.
inline TileShape tile_shape(int64_t num_rows, int64_t num_codes, int64_t dim, int64_t elem_size) {
  constexpr int64_t kTileBytes = 1024 * 1024;
  const int64_t codes = std::min<int64_t>(2048, (num_codes + kLanes - 1) / kLanes * kLanes);
  int64_t rows = kTileBytes / (elem_size * (codes + dim));
  const int64_t rows_per_thread = (num_rows + fastvq::num_threads() - 1) / fastvq::num_threads();
  rows = std::max<int64_t>(16, std::min({rows, int64_t{256}, rows_per_thread}));
  return {rows, codes};
}

// A direct kernel's rows per block: its register tiles share each L2 block of codes, fewer of them
// for small N so that every thread still gets a block. The codes are split in whole panels.
inline TileShape direct_tile_shape(int64_t num_rows, const DirectShape& shape) {
  const int64_t rows_per_thread = (num_rows + fastvq::num_threads() - 1) / fastvq::num_threads();
  const int64_t tiles = std::min(shape.tiles_per_block, (rows_per_thread + shape.tile_rows - 1) / shape.tile_rows);
  return {std::max<int64_t>(1, tiles) * shape.tile_rows, shape.panel_codes};
}

// The codebook as the search scores it, built once per call: O(K D), never O(N K). Row-major for
// the BLAS tiles; for a direct kernel packed in panels of its panel width, [panels, D, width]
// (bf16: [panels, D / 2, 32, 2], see search_isa.h), the last panel padded with zero codes
// whose bias is +inf so that they never win.
template <typename acc_t>
struct PreparedCodebook {
  Kernel kernel = Kernel::Blas;
  at::Tensor codes;   // centred (l2), unit rows (cosine) or as given (dot): [K, D] or packed panels;
                      // bf16: the exact bf16 codes, never centred nor scaled
  at::Tensor bias;    // l2's |e - c|^2 per code [K] (bf16: |e|^2); packed: [panels * width] for every metric
  at::Tensor scale;   // bf16 only: the score's factor of z.e per code, [panels * 32]
  at::Tensor center;  // [D] c (l2, except bf16)
  int64_t num_panels = 0;
  int64_t dim_pairs = 0;  // bf16: D / 2 rounded up
};

// Whether every entry of one code is finite: only such codes count towards the l2 centre.
template <typename acc_t>
inline bool is_finite_code(const acc_t* row, int64_t dim) {
  for (int64_t d = 0; d < dim; ++d) {
    if (!std::isfinite(static_cast<double>(row[d]))) return false;
  }
  return true;
}

// The centre is the mean of the finite codes only: one NaN or Inf code must not shift, and so
// poison, every other code.
template <typename acc_t>
at::Tensor finite_mean(const at::Tensor& codebook_acc) {
  const int64_t num_codes = codebook_acc.size(0), dim = codebook_acc.size(1);
  const acc_t* source = codebook_acc.data_ptr<acc_t>();
  std::vector<double> total(dim, 0.0);
  int64_t finite_codes = 0;
  for (int64_t k = 0; k < num_codes; ++k) {
    const acc_t* row = source + k * dim;
    if (!is_finite_code(row, dim)) continue;
    ++finite_codes;
    for (int64_t d = 0; d < dim; ++d) total[d] += static_cast<double>(row[d]);
  }
  at::Tensor center = at::empty({dim}, codebook_acc.options());
  acc_t* values = center.data_ptr<acc_t>();
  for (int64_t d = 0; d < dim; ++d) values[d] = static_cast<acc_t>(total[d] / std::max<int64_t>(finite_codes, 1));
  return center;
}

// The l2 search's centre: per dimension the finite codes' mean, rounded to a multiple of the largest
// power of two at or below their mean absolute deviation there (kept where that is 0 or infinite), as
// fastvq.backends.search_codebook.search_center computes it. The rounding moves the centre by at
// most half the spread, and makes e - c and z - c exact for data on a grid, so that equally distant
// codes get exactly equal scores and the tie goes to the lowest index.
template <typename acc_t>
at::Tensor search_center(const at::Tensor& codebook_acc) {
  at::Tensor center = finite_mean<acc_t>(codebook_acc);
  const int64_t num_codes = codebook_acc.size(0), dim = codebook_acc.size(1);
  const acc_t* source = codebook_acc.data_ptr<acc_t>();
  acc_t* values = center.data_ptr<acc_t>();
  std::vector<double> deviation(dim, 0.0);
  int64_t finite_codes = 0;
  for (int64_t k = 0; k < num_codes; ++k) {
    const acc_t* row = source + k * dim;
    if (!is_finite_code(row, dim)) continue;
    ++finite_codes;
    for (int64_t d = 0; d < dim; ++d) deviation[d] += std::abs(static_cast<double>(row[d]) - values[d]);
  }
  for (int64_t d = 0; d < dim; ++d) {
    const double spread = deviation[d] / std::max<int64_t>(finite_codes, 1);
    if (!(spread > 0) || !std::isfinite(spread)) continue;
    const double step = std::exp2(std::floor(std::log2(spread)));
    values[d] = static_cast<acc_t>(std::nearbyint(static_cast<double>(values[d]) / step) * step);
  }
  return center;
}

// Writes one code's search form to target[d * stride] and returns its bias (|e - c|^2 for l2).
template <typename acc_t>
acc_t write_search_form(const acc_t* code, const acc_t* center, int64_t dim, Metric metric, acc_t* target,
                        int64_t stride) {
  acc_t squares = 0;
  if (metric == Metric::L2) {
    for (int64_t d = 0; d < dim; ++d) {
      const acc_t centred = code[d] - center[d];
      target[d * stride] = centred;
      squares += centred * centred;
    }
    return squares;
  }
  if (metric == Metric::Cosine) {
    for (int64_t d = 0; d < dim; ++d) squares += code[d] * code[d];
    const acc_t norm = std::max<acc_t>(std::sqrt(squares), static_cast<acc_t>(kNormEps));
    for (int64_t d = 0; d < dim; ++d) target[d * stride] = code[d] / norm;
    return 0;
  }
  for (int64_t d = 0; d < dim; ++d) target[d * stride] = code[d];
  return 0;
}

template <typename acc_t>
PreparedCodebook<acc_t> prepare_codebook(const at::Tensor& codebook_acc, Metric metric, Kernel kernel) {
  const int64_t num_codes = codebook_acc.size(0), dim = codebook_acc.size(1);
  const acc_t* source = codebook_acc.data_ptr<acc_t>();
  const auto options = codebook_acc.options();
  const bool packed = kernel != Kernel::Blas;
  const int64_t width = packed ? direct_shape(kernel).panel_codes : 1;
  PreparedCodebook<acc_t> prepared;
  prepared.kernel = kernel;
  if (metric == Metric::L2) prepared.center = search_center<acc_t>(codebook_acc);
  if (packed) {
    prepared.num_panels = (num_codes + width - 1) / width;
    prepared.codes = at::zeros({prepared.num_panels, dim, width}, options);
    prepared.bias = at::full({prepared.num_panels * width}, std::numeric_limits<double>::infinity(), options);
  } else if (metric == Metric::Dot) {
    prepared.codes = codebook_acc;
    return prepared;
  } else {
    prepared.codes = at::empty({num_codes, dim}, options);
    if (metric == Metric::L2) prepared.bias = at::empty({num_codes}, options);
  }
  acc_t* codes = prepared.codes.template data_ptr<acc_t>();
  acc_t* bias = prepared.bias.defined() ? prepared.bias.template data_ptr<acc_t>() : nullptr;
  const acc_t* center = metric == Metric::L2 ? prepared.center.template data_ptr<acc_t>() : nullptr;
  const int64_t grain = std::max<int64_t>(1, kParallelWork / std::max<int64_t>(dim, 1));
  fastvq::parallel_for(0, num_codes, grain, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t panel = k / width, lane = k % width;
      acc_t* target = packed ? codes + panel * dim * width + lane : codes + k * dim;
      const acc_t code_bias = write_search_form(source + k * dim, center, dim, metric, target, packed ? width : 1);
      if (bias != nullptr) bias[k] = code_bias;
    }
  });
  return prepared;
}

// scores[r, j] = z_tile[r] . codes[j] for a row-major z tile [rows, D] and codes [n, D].
template <typename acc_t>
void tile_product(const at::Tensor& z_tile, const at::Tensor& codes, at::Tensor& scores, int64_t rows,
                  int64_t code_start, int64_t num, int64_t dim) {
  const acc_t* a = z_tile.data_ptr<acc_t>();
  const acc_t* b = codes.data_ptr<acc_t>() + code_start * dim;
  acc_t* c = scores.data_ptr<acc_t>();
  constexpr bool is_float = std::is_same_v<acc_t, float>;
  const bool have_blas = is_float ? sgemm_ != nullptr : dgemm_ != nullptr;
  const int64_t limit = std::numeric_limits<int>::max();
  if (have_blas && rows <= limit && num <= limit && dim <= limit) {
    // Column-major BLAS sees the row-major scores [rows, num] as its transpose: C^T = codes . z^T.
    const int m = static_cast<int>(num), n = static_cast<int>(rows), k = static_cast<int>(dim);
    const acc_t one = 1, zero = 0;
    if constexpr (is_float) {
      sgemm_("T", "N", &m, &n, &k, &one, b, &k, a, &k, &zero, c, &m);
    } else {
      dgemm_("T", "N", &m, &n, &k, &one, b, &k, a, &k, &zero, c, &m);
    }
    return;
  }
  at::Tensor out = scores.narrow(0, 0, rows * num).view({rows, num});
  at::mm_out(out, z_tile.narrow(0, 0, rows), codes.narrow(0, code_start, num).t());
}

// The contract's 1 - cos or -z.e from double sums over D of z.e, |z|^2 and |e|^2.
inline float similarity_distance(double dot, double z_sq, double e_sq, Metric metric) {
  if (metric == Metric::Dot) return static_cast<float>(-dot);
  const double norms = std::max(std::sqrt(z_sq), kNormEps) * std::max(std::sqrt(e_sq), kNormEps);
  // Rounding can put a parallel pair's 1 - cos a few ulps below 0; a NaN (never < 0) stays NaN.
  const double distance = 1 - dot / norms;
  return static_cast<float>(distance < 0 ? 0 : distance);
}

// The contract's distance of a row to its chosen code, from the inputs themselves (no centring).
// It is summed in double whatever the input dtype: a dot or cosine near zero is the difference of
// terms far larger than itself, and an fp32 sum over D of them would lose the digits the contract
// asks for. This is O(D) per row, once, against the search's O(K D).
template <typename acc_t, typename z_t>
float true_distance(const z_t* z_row, int64_t z_stride, const acc_t* code, int64_t dim, Metric metric) {
  if (metric == Metric::L2) {
    double total = 0;
    for (int64_t d = 0; d < dim; ++d) {
      const double diff = static_cast<double>(static_cast<acc_t>(z_row[d * z_stride])) - static_cast<double>(code[d]);
      total += diff * diff;
    }
    return static_cast<float>(total);
  }
  double dot = 0, z_sq = 0, e_sq = 0;
  for (int64_t d = 0; d < dim; ++d) {
    const double value = static_cast<double>(static_cast<acc_t>(z_row[d * z_stride]));
    const double code_value = static_cast<double>(code[d]);
    dot += value * code_value;
    z_sq += value * value;
    e_sq += code_value * code_value;
  }
  return similarity_distance(dot, z_sq, e_sq, metric);
}

// The l2 true distance of a row to a code as the top-k search's finish sums it (topk.cpp): z - e and its
// square in double, exact for float inputs, in kPartialSums interleaved partial sums over the dimensions
// (lane d % kPartialSums), which the compiler keeps in vector registers, then the partials in order and the
// last D % kPartialSums dimensions. Summed in one chain of D dependent additions, true_distance's order,
// the rows' distances took 6 % of a one-thread search at K = 1 024, D = 64 (perf, Zen 4). The order changes
// the double sum's last bits at most, far below the float32 distance's resolution.
constexpr int64_t kPartialSums = 8;

template <typename acc_t, typename z_t>
float l2_true_distance(const z_t* z_row, int64_t z_stride, const acc_t* code, int64_t dim) {
  double partial[kPartialSums] = {};
  const int64_t whole = dim / kPartialSums * kPartialSums;
  for (int64_t d = 0; d < whole; d += kPartialSums) {
    for (int64_t lane = 0; lane < kPartialSums; ++lane) {
      const double diff = static_cast<double>(static_cast<acc_t>(z_row[(d + lane) * z_stride])) -
                          static_cast<double>(code[d + lane]);
      partial[lane] += diff * diff;
    }
  }
  double total = 0;
  for (int64_t lane = 0; lane < kPartialSums; ++lane) total += partial[lane];
  for (int64_t d = whole; d < dim; ++d) {
    const double diff = static_cast<double>(static_cast<acc_t>(z_row[d * z_stride])) - static_cast<double>(code[d]);
    total += diff * diff;
  }
  return static_cast<float>(total);
}

// Rows whose cosine or dot sums true_distances runs side by side.
constexpr int64_t kInterleavedRows = 8;

// The true distances of rows [0, rows) of z (strides row_stride, col_stride) to their codes
// codebook[codes[r]], into distances[r]: l2 as l2_true_distance sums it; cosine and dot with true_distance's
// arithmetic, each row's sums over d in order, so its bits, but kInterleavedRows rows at a time so that their
// chains of dependent additions overlap.
template <typename acc_t, typename z_t>
void true_distances(const z_t* z, int64_t row_stride, int64_t col_stride, const acc_t* codebook, int64_t dim,
                    Metric metric, const int64_t* codes, int64_t rows, float* distances) {
  if (metric == Metric::L2) {
    for (int64_t r = 0; r < rows; ++r) {
      distances[r] = l2_true_distance<acc_t, z_t>(z + r * row_stride, col_stride, codebook + codes[r] * dim, dim);
    }
    return;
  }
  constexpr int64_t kGroup = kInterleavedRows;
  int64_t first = 0;
  for (; first + kGroup <= rows; first += kGroup) {
    const z_t* z_rows[kGroup];
    const acc_t* code_rows[kGroup];
    for (int64_t r = 0; r < kGroup; ++r) {
      z_rows[r] = z + (first + r) * row_stride;
      code_rows[r] = codebook + codes[first + r] * dim;
    }
    double dot[kGroup] = {}, z_sq[kGroup] = {}, e_sq[kGroup] = {};
    for (int64_t d = 0; d < dim; ++d) {
      for (int64_t r = 0; r < kGroup; ++r) {
        const double value = static_cast<double>(static_cast<acc_t>(z_rows[r][d * col_stride]));
        const double code_value = static_cast<double>(code_rows[r][d]);
        dot[r] += value * code_value;
        z_sq[r] += value * value;
        e_sq[r] += code_value * code_value;
      }
    }
    for (int64_t r = 0; r < kGroup; ++r) distances[first + r] = similarity_distance(dot[r], z_sq[r], e_sq[r], metric);
  }
  for (; first < rows; ++first) {
    distances[first] =
        true_distance<acc_t, z_t>(z + first * row_stride, col_stride, codebook + codes[first] * dim, dim, metric);
  }
}

// Whether every entry of a row is finite. Under cosine a row with an Inf has a NaN distance to every
// code (Inf / Inf), though its scores -z.e / |e| are +-Inf and would pick an arbitrary code: the
// contract gives a row whose every distance is NaN index 0 (top-k: 0..k-1), as for a NaN row.
template <typename z_t>
bool row_is_finite(const z_t* z_row, int64_t z_stride, int64_t dim) {
  for (int64_t d = 0; d < dim; ++d) {
    if (!std::isfinite(static_cast<double>(z_row[d * z_stride]))) return false;
  }
  return true;
}

// Rows [row_start, row_start + rows) of z in acc_t, centred on `center` for l2, row-major into `target`.
template <typename acc_t, typename z_t, Metric metric>
void pack_centred_rows(const at::Tensor& z, int64_t row_start, int64_t rows, const acc_t* center, acc_t* target) {
  const int64_t dim = z.size(1), row_stride = z.stride(0), col_stride = z.stride(1);
  const z_t* z_data = z.data_ptr<z_t>();
  for (int64_t r = 0; r < rows; ++r) {
    const z_t* source = z_data + (row_start + r) * row_stride;
    for (int64_t d = 0; d < dim; ++d) {
      const acc_t value = static_cast<acc_t>(source[d * col_stride]);
      target[r * dim + d] = metric == Metric::L2 ? value - center[d] : value;
    }
  }
}

// FASTVQ_CPU_SEARCH (read at every call, like FASTVQ_BACKEND): `auto` (or unset) takes the fastest
// kernel this CPU runs; `avx512-bf16`, `avx512`, `avx2` and `blas` ask for one (bf16 inputs go to
// the bf16 kernel only under `auto` and `avx512-bf16`, and are widened to fp32 otherwise).
inline std::string requested_kernel() {
  const char* choice = std::getenv("FASTVQ_CPU_SEARCH");
  const std::string name = choice == nullptr || *choice == '\0' ? "auto" : choice;
  TORCH_CHECK_VALUE(name == "auto" || name == "avx512-bf16" || name == "avx512" || name == "avx2" || name == "blas",
                    "FASTVQ_CPU_SEARCH must be auto, avx512-bf16, avx512, avx2 or blas, got '", name, "'");
  TORCH_CHECK_VALUE((name != "avx512-bf16" || avx512::bf16_available()) && (name != "avx512" || avx512::available()) &&
                        (name != "avx2" || avx2::available()),
                    "FASTVQ_CPU_SEARCH=", name, " but this CPU (or this build) does not run that kernel");
  return name;
}

// The fp32 kernel for `requested` (fp32, fp16 and widened bf16 inputs alike).
inline Kernel fp32_kernel(const std::string& requested) {
  if (requested == "blas") return Kernel::Blas;
  if (requested == "avx2") return Kernel::Avx2;
  if (avx512::available()) return Kernel::Avx512;
  return avx2::available() ? Kernel::Avx2 : Kernel::Blas;
}

}  // namespace fastvq
