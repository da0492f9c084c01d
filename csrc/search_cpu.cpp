// Nearest-code search on CPU, threads over blocks of rows of z, in one of two kernels.
//
// Each thread converts (and, for l2, centres) a block of rows into an fp32 tile (fp64 for fp64
// inputs) and walks the whole codebook with it, keeping a running (min, argmin) per row:
//
// - the direct kernel (search_cpu_avx512.cpp, fp32 on CPUs with AVX-512F): scores are computed in
//   registers, 14 rows x 32 codes at a time, and folded at once; the codebook is packed in panels
//   of 32 codes for it. It measured 2.5x faster than MKL's sgemm on this project's AMD EPYC CI
//   machine, at D = 64 and at D = 256 alike.
// - the BLAS tiles (every other CPU, fp64, or FASTVQ_CPU_SEARCH=blas): one single-threaded GEMM
//   writes a tile of scores into a per-thread buffer of about 1 MiB that stays in cache, and a
//   vectorised pass folds it into the running minimum before the next tile overwrites it.
//
// Neither ever holds more than one tile per thread, where the bare z @ codebook^T streams its
// whole N x K result through memory. The chosen code's distance is then recomputed from z - e.
// The scores follow fastvq/backends/common.py (SearchCodebook) exactly: l2 uses |e - c|^2 - 2 (z - c).(e - c) with c the
// mean of the finite codes, cosine -z.e/|e|, dot -z.e; a NaN score never wins, and ties keep the
// lowest index, whatever the tiling.
#include "fastvq.h"
#include "search_cpu_avx512.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
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

Metric parse_metric(const std::string& metric) {
  if (metric == "l2") return Metric::L2;
  if (metric == "cosine") return Metric::Cosine;
  if (metric == "dot") return Metric::Dot;
  TORCH_CHECK_VALUE(false, "metric must be one of ('l2', 'cosine', 'dot'), got '", metric, "'");
}

namespace {

// Scores folded per step of the running minimum: one AVX-512 register of fp32 (two of AVX2).
constexpr int64_t kLanes = 16;
constexpr double kNormEps = 1e-12;  // F.normalize's eps, as in fastvq/backends/common.py
// Below this many multiply-adds a search runs on the calling thread: waking the pool costs more.
constexpr int64_t kParallelWork = int64_t{1} << 21;

struct TileShape {
  int64_t rows;
  int64_t codes;
};

// A thread's row tile [rows, D] plus its score tile [rows, codes] take about 1 MiB: about one core's
// L2 on current x86 servers, and always within the shared L3, so each tile's scores are folded
// while still cached. Wide code tiles amortise the GEMM's packing and the fold's lane merge; the
// rows shrink for small N so that every thread still gets a block.
TileShape tile_shape(int64_t num_rows, int64_t num_codes, int64_t dim, int64_t elem_size) {
  constexpr int64_t kTileBytes = 1024 * 1024;
  const int64_t codes = std::min<int64_t>(2048, (num_codes + kLanes - 1) / kLanes * kLanes);
  int64_t rows = kTileBytes / (elem_size * (codes + dim));
  const int64_t rows_per_thread = (num_rows + at::get_num_threads() - 1) / at::get_num_threads();
  rows = std::max<int64_t>(16, std::min({rows, int64_t{256}, rows_per_thread}));
  return {rows, codes};
}

// The direct kernel's rows per block: 8 register tiles of 14 rows share each L2 block of codes,
// fewer for small N so that every thread still gets a block.
TileShape direct_tile_shape(int64_t num_rows) {
  const int64_t rows_per_thread = (num_rows + at::get_num_threads() - 1) / at::get_num_threads();
  const int64_t tiles = std::min<int64_t>(8, (rows_per_thread + avx512::kTileRows - 1) / avx512::kTileRows);
  return {std::max<int64_t>(1, tiles) * avx512::kTileRows, 0};
}

// The codebook as the search scores it, built once per call: O(K D), never O(N K). Row-major for
// the BLAS tiles; for the AVX-512 kernel packed in panels of 32 codes, [panels, D, 32], the last
// panel padded with zero codes whose bias is +inf so that they never win.
template <typename acc_t>
struct PreparedCodebook {
  at::Tensor codes;   // centred (l2), unit rows (cosine) or as given (dot): [K, D] or packed panels
  at::Tensor bias;    // l2's |e - c|^2 per code [K]; packed: [panels * 32] for every metric
  at::Tensor center;  // [D] c (l2)
  bool packed = false;
  int64_t num_panels = 0;
};

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
    bool finite = true;
    for (int64_t d = 0; d < dim; ++d) finite = finite && std::isfinite(static_cast<double>(row[d]));
    if (!finite) continue;
    ++finite_codes;
    for (int64_t d = 0; d < dim; ++d) total[d] += static_cast<double>(row[d]);
  }
  at::Tensor center = at::empty({dim}, codebook_acc.options());
  acc_t* values = center.data_ptr<acc_t>();
  for (int64_t d = 0; d < dim; ++d) values[d] = static_cast<acc_t>(total[d] / std::max<int64_t>(finite_codes, 1));
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
PreparedCodebook<acc_t> prepare_codebook(const at::Tensor& codebook_acc, Metric metric, bool packed) {
  const int64_t num_codes = codebook_acc.size(0), dim = codebook_acc.size(1);
  const acc_t* source = codebook_acc.data_ptr<acc_t>();
  const auto options = codebook_acc.options();
  PreparedCodebook<acc_t> prepared;
  prepared.packed = packed;
  if (metric == Metric::L2) prepared.center = finite_mean<acc_t>(codebook_acc);
  if (packed) {
    prepared.num_panels = (num_codes + avx512::kPanelCodes - 1) / avx512::kPanelCodes;
    prepared.codes = at::zeros({prepared.num_panels, dim, avx512::kPanelCodes}, options);
    prepared.bias = at::full({prepared.num_panels * avx512::kPanelCodes}, std::numeric_limits<double>::infinity(),
                             options);
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
  at::parallel_for(0, num_codes, grain, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t panel = k / avx512::kPanelCodes, lane = k % avx512::kPanelCodes;
      acc_t* target = packed ? codes + panel * dim * avx512::kPanelCodes + lane : codes + k * dim;
      const acc_t code_bias =
          write_search_form(source + k * dim, center, dim, metric, target, packed ? avx512::kPanelCodes : 1);
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

// kLanes scores and their code positions as one vector each (GCC/Clang vector extensions, lowered
// to whatever SIMD the target has): the comparison mask of the scores has the width of the indices.
template <typename acc_t>
struct Lanes;
template <>
struct Lanes<float> {
  typedef float Values __attribute__((vector_size(kLanes * sizeof(float))));
  typedef int32_t Indices __attribute__((vector_size(kLanes * sizeof(int32_t))));
  using Index = int32_t;
};
template <>
struct Lanes<double> {
  typedef double Values __attribute__((vector_size(kLanes * sizeof(double))));
  typedef int64_t Indices __attribute__((vector_size(kLanes * sizeof(int64_t))));
  using Index = int64_t;
};

// Merges a row's lanes by value, ties to the lower index, and lets the winner replace the running
// (best, best_index) only if strictly better.
template <typename acc_t, typename Index>
inline void fold_lanes(const acc_t* lane_best, const Index* lane_index, int64_t code_start, acc_t& best,
                       int64_t& best_index) {
  acc_t tile_best = lane_best[0];
  Index tile_index = lane_index[0];
  for (int64_t j = 1; j < kLanes; ++j) {
    if (lane_best[j] < tile_best || (lane_best[j] == tile_best && lane_index[j] < tile_index)) {
      tile_best = lane_best[j];
      tile_index = lane_index[j];
    }
  }
  if (tile_best < best) {
    best = tile_best;
    best_index = code_start + tile_index;
  }
}

// Folds one row's tile of products into its running (best, best_index). Lane j sees the codes
// j, j + 16, ... in increasing order and keeps the first of equal scores (strict <); the lanes are
// then merged by value, ties to the lower index, and the tile's winner replaces the running one
// only if strictly better. So the lowest index wins whatever the tiling, and since NaN < x is
// false a NaN score never wins.
template <typename acc_t, Metric metric>
inline void fold_row(const acc_t* products, const acc_t* bias, int64_t num, int64_t code_start, acc_t& best,
                     int64_t& best_index) {
  using Values = typename Lanes<acc_t>::Values;
  using Indices = typename Lanes<acc_t>::Indices;
  using Index = typename Lanes<acc_t>::Index;
  Values lanes_best, scores, lane_bias;
  Indices lanes_index{}, position, step;
  for (int64_t j = 0; j < kLanes; ++j) {
    lanes_best[j] = std::numeric_limits<acc_t>::infinity();
    position[j] = static_cast<Index>(j);
    step[j] = static_cast<Index>(kLanes);
  }
  const int64_t full = num / kLanes * kLanes;
  for (int64_t k = 0; k < full; k += kLanes) {
    std::memcpy(&scores, products + k, sizeof(Values));
    if (metric == Metric::L2) {
      std::memcpy(&lane_bias, bias + k, sizeof(Values));
      scores = lane_bias - scores * static_cast<acc_t>(2);
    } else {
      scores = -scores;
    }
    const auto better = scores < lanes_best;
    lanes_best = better ? scores : lanes_best;
    lanes_index = better ? position : lanes_index;
    position += step;
  }
  acc_t lane_best[kLanes];
  Index lane_index[kLanes];
  std::memcpy(lane_best, &lanes_best, sizeof(Values));
  std::memcpy(lane_index, &lanes_index, sizeof(Indices));
  for (int64_t k = full; k < num; ++k) {
    const int64_t j = k - full;
    const acc_t score = metric == Metric::L2 ? bias[k] - 2 * products[k] : -products[k];
    if (score < lane_best[j]) {
      lane_best[j] = score;
      lane_index[j] = static_cast<Index>(k);
    }
  }
  fold_lanes(lane_best, lane_index, code_start, best, best_index);
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
  if (metric == Metric::Dot) return static_cast<float>(-dot);
  const double norms = std::max(std::sqrt(z_sq), kNormEps) * std::max(std::sqrt(e_sq), kNormEps);
  return static_cast<float>(1 - dot / norms);
}

template <typename acc_t, typename z_t, Metric metric>
void search(const at::Tensor& z, const at::Tensor& codebook_acc, const PreparedCodebook<acc_t>& prepared,
            int64_t* indices, float* distances) {
  const int64_t num_rows = z.size(0), dim = z.size(1), num_codes = codebook_acc.size(0);
  const int64_t row_stride = z.stride(0), col_stride = z.stride(1);
  const z_t* z_data = z.data_ptr<z_t>();
  const acc_t* originals = codebook_acc.data_ptr<acc_t>();
  const acc_t* center = metric == Metric::L2 ? prepared.center.template data_ptr<acc_t>() : nullptr;
  const acc_t* bias = metric == Metric::L2 && !prepared.packed ? prepared.bias.template data_ptr<acc_t>() : nullptr;
  const TileShape tile =
      prepared.packed ? direct_tile_shape(num_rows) : tile_shape(num_rows, num_codes, dim, sizeof(acc_t));
  const int64_t num_blocks = (num_rows + tile.rows - 1) / tile.rows;
  const int64_t block_work = tile.rows * num_codes * dim;
  const int64_t grain = std::max<int64_t>(1, kParallelWork / std::max<int64_t>(block_work, 1));
  const auto options = codebook_acc.options();

  at::parallel_for(0, num_blocks, grain, [&](int64_t block_begin, int64_t block_end) {
    // One row tile and one score tile (or lane state) per thread: all the memory the search adds
    // beyond O(K D). Zeros: the direct kernel also reads the padding rows of a short last block.
    at::Tensor z_tile = at::zeros({tile.rows, dim}, options);
    acc_t* z_tile_data = z_tile.data_ptr<acc_t>();
    at::Tensor scores = prepared.packed ? at::Tensor() : at::empty({tile.rows * tile.codes}, options);
    std::vector<float> lane_best(prepared.packed ? tile.rows * kLanes : 0);
    std::vector<int32_t> lane_index(lane_best.size());
    std::vector<acc_t> best(tile.rows);
    std::vector<int64_t> best_index(tile.rows);
    for (int64_t block = block_begin; block < block_end; ++block) {
      const int64_t row_start = block * tile.rows;
      const int64_t rows = std::min(tile.rows, num_rows - row_start);
      for (int64_t r = 0; r < rows; ++r) {
        const z_t* source = z_data + (row_start + r) * row_stride;
        acc_t* target = z_tile_data + r * dim;
        for (int64_t d = 0; d < dim; ++d) {
          const acc_t value = static_cast<acc_t>(source[d * col_stride]);
          target[d] = metric == Metric::L2 ? value - center[d] : value;
        }
      }
      std::fill(best.begin(), best.begin() + rows, std::numeric_limits<acc_t>::infinity());
      std::fill(best_index.begin(), best_index.begin() + rows, 0);
      if constexpr (std::is_same_v<acc_t, float>) {
        if (prepared.packed) {
          const int64_t padded = (rows + avx512::kTileRows - 1) / avx512::kTileRows * avx512::kTileRows;
          std::fill(lane_best.begin(), lane_best.end(), std::numeric_limits<float>::infinity());
          std::fill(lane_index.begin(), lane_index.end(), 0);
          avx512::fold_scores(z_tile_data, padded, dim, prepared.codes.template data_ptr<float>(),
                              prepared.bias.template data_ptr<float>(), prepared.num_panels,
                              metric == Metric::L2 ? -2.0f : -1.0f, lane_best.data(), lane_index.data());
          for (int64_t r = 0; r < rows; ++r) {
            fold_lanes(lane_best.data() + r * kLanes, lane_index.data() + r * kLanes, 0, best[r], best_index[r]);
          }
        }
      }
      if (!prepared.packed) {
        const acc_t* products = scores.data_ptr<acc_t>();
        for (int64_t code_start = 0; code_start < num_codes; code_start += tile.codes) {
          const int64_t num = std::min(tile.codes, num_codes - code_start);
          const acc_t* tile_bias = metric == Metric::L2 ? bias + code_start : nullptr;
          tile_product<acc_t>(z_tile, prepared.codes, scores, rows, code_start, num, dim);
          for (int64_t r = 0; r < rows; ++r) {
            fold_row<acc_t, metric>(products + r * num, tile_bias, num, code_start, best[r], best_index[r]);
          }
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t row = row_start + r;
        indices[row] = best_index[r];
        distances[row] = true_distance<acc_t, z_t>(z_data + row * row_stride, col_stride,
                                                   originals + best_index[r] * dim, dim, metric);
      }
    }
  });
}

template <typename acc_t, typename z_t>
void search_metric(Metric metric, const at::Tensor& z, const at::Tensor& codebook_acc,
                   const PreparedCodebook<acc_t>& prepared, int64_t* indices, float* distances) {
  switch (metric) {
    case Metric::L2:
      return search<acc_t, z_t, Metric::L2>(z, codebook_acc, prepared, indices, distances);
    case Metric::Cosine:
      return search<acc_t, z_t, Metric::Cosine>(z, codebook_acc, prepared, indices, distances);
    case Metric::Dot:
      return search<acc_t, z_t, Metric::Dot>(z, codebook_acc, prepared, indices, distances);
  }
}

// The AVX-512 kernel where the CPU has it; FASTVQ_CPU_SEARCH=blas forces the BLAS tiles (read at
// every call, like FASTVQ_BACKEND).
bool use_direct_kernel() {
  const char* choice = std::getenv("FASTVQ_CPU_SEARCH");
  return avx512::available() && !(choice != nullptr && std::string(choice) == "blas");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> nearest_code_cpu(
    const at::Tensor& z, const at::Tensor& codebook, const std::string& metric_name, bool return_codes) {
  const Metric metric = parse_metric(metric_name);
  TORCH_CHECK_VALUE(z.dim() == 2 && codebook.dim() == 2 && z.size(1) == codebook.size(1) && codebook.size(0) >= 1,
                    "nearest_code expects z [N, D] and codebook [K, D] with K >= 1, got ", z.sizes(), " and ",
                    codebook.sizes());
  TORCH_CHECK(z.device().is_cpu() && codebook.device().is_cpu(), "fastvq_C::nearest_code (CPU) got tensors on ",
              z.device(), " and ", codebook.device());
  const at::ScalarType out_dtype = at::promote_types(z.scalar_type(), codebook.scalar_type());
  const at::ScalarType acc_dtype = out_dtype == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t num_rows = z.size(0), dim = z.size(1);
  at::Tensor indices = at::empty({num_rows}, z.options().dtype(at::kLong));
  at::Tensor distances = at::empty({num_rows}, z.options().dtype(at::kFloat));
  if (num_rows == 0) {
    return {indices, distances, at::empty({0, dim}, z.options().dtype(out_dtype))};
  }
  const at::Tensor codebook_acc = codebook.to(acc_dtype).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "fastvq_nearest_code_cpu", [&] {
    using z_t = scalar_t;
    if (acc_dtype == at::kDouble) {
      const auto prepared = prepare_codebook<double>(codebook_acc, metric, /*packed=*/false);
      search_metric<double, z_t>(metric, z, codebook_acc, prepared, indices.data_ptr<int64_t>(),
                                 distances.data_ptr<float>());
    } else {
      // The direct kernel numbers codes in int32 lanes.
      const bool packed = use_direct_kernel() && codebook.size(0) < std::numeric_limits<int32_t>::max() / 2;
      const auto prepared = prepare_codebook<float>(codebook_acc, metric, packed);
      search_metric<float, z_t>(metric, z, codebook_acc, prepared, indices.data_ptr<int64_t>(),
                                distances.data_ptr<float>());
    }
  });
  at::Tensor codes = return_codes ? codebook.to(out_dtype).index_select(0, indices)
                                  : at::empty({0, dim}, z.options().dtype(out_dtype));
  return {indices, distances, codes};
}

}  // namespace fastvq
