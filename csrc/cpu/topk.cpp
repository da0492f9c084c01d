// The top-k search on CPU (nearest_codes_cpu): each row's k nearest codes, in threads over blocks of
// rows of z.
//
// The nearest-code search's blocks of rows, row tiles, prepared codebook and kernels (search.cpp,
// search_common.h), each row carrying its best k (score, code) pairs (topk.h) instead of a running
// minimum: the direct kernels compare a panel's scores with the row's k-th best in one vector compare
// and offer only those below it, the BLAS tiles a group of 16 scores only when its minimum beats it
// (search_avx512.cpp says how the kernels insert them). Codes arrive in ascending order, so
// ties keep the lower index. Afterwards the k codes' true distances are recomputed from z - e; the
// list stays in the order of the scores (the search's keys), so that its first column is the search's
// answer.
#include "../fastvq.h"
#include "search_common.h"
#include "search_isa.h"
#include "topk.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

namespace fastvq {

namespace {

template <typename acc_t, Metric metric>
void offer_tile(const acc_t* products, const acc_t* bias, int64_t num, int64_t code_start, int64_t k, acc_t* best,
                int32_t* index) {
  acc_t scores[kLanes];
  for (int64_t j = 0; j < num; j += kLanes) {
    const int64_t count = std::min(kLanes, num - j);
    acc_t lowest = std::numeric_limits<acc_t>::infinity();
    for (int64_t i = 0; i < count; ++i) {
      scores[i] = metric == Metric::L2 ? bias[j + i] - 2 * products[j + i] : -products[j + i];
      lowest = std::min(lowest, scores[i]);
    }
    if (lowest < best[k - 1]) topk_offer(best, index, k, scores, count, static_cast<int32_t>(code_start + j));
  }
}

// One code of a row's finished list: its search key, its true distance and whether that is NaN.
template <typename acc_t>
struct Candidate {
  acc_t key;
  bool is_nan;
  float distance;
  int64_t code;
};

// The l2 true distances of a row to its listed codes, summed as search_common.h's l2_true_distance sums
// them (z - e and its square in double, exact for float inputs, in eight interleaved partial sums over the
// dimensions, which the compiler puts in vector registers), with the row's values converted once: the
// first listed code's distance has the nearest-code search's bits. One code's sum in order is a chain of D
// dependent additions, and summed that way the k codes of every row took a tenth of the top-k search at
// D = 64, k = 8.
template <typename acc_t, typename z_t>
void l2_true_distances(const z_t* z_row, int64_t z_stride, const acc_t* originals, int64_t dim,
                       std::vector<Candidate<acc_t>>& candidates, std::vector<double>& z_values) {
  constexpr int64_t kPartialSums = 8;
  z_values.resize(dim);
  for (int64_t d = 0; d < dim; ++d) z_values[d] = static_cast<double>(static_cast<acc_t>(z_row[d * z_stride]));
  const int64_t whole = dim / kPartialSums * kPartialSums;
  for (Candidate<acc_t>& candidate : candidates) {
    const acc_t* code = originals + candidate.code * dim;
    double partial[kPartialSums] = {};
    for (int64_t d = 0; d < whole; d += kPartialSums) {
      for (int64_t lane = 0; lane < kPartialSums; ++lane) {
        const double diff = z_values[d + lane] - static_cast<double>(code[d + lane]);
        partial[lane] += diff * diff;
      }
    }
    double total = 0;
    for (int64_t lane = 0; lane < kPartialSums; ++lane) total += partial[lane];
    for (int64_t d = whole; d < dim; ++d) {
      const double diff = z_values[d] - static_cast<double>(code[d]);
      total += diff * diff;
    }
    candidate.distance = static_cast<float>(total);
  }
}

// How many rows ahead the finish asks for the listed codes: a row's k codes are scattered over a
// codebook that need not fit in the caches the search's panels leave, and the loads of one row alone
// leave the finish waiting on memory.
constexpr int64_t kPrefetchRows = 2;

template <typename acc_t>
void prefetch_listed_codes(const acc_t* originals, int64_t dim, int64_t k, const int32_t* listed) {
#if defined(__GNUC__) || defined(__clang__)
  constexpr int64_t kLineBytes = 64;
  const int64_t code_bytes = dim * static_cast<int64_t>(sizeof(acc_t));
  for (int64_t j = 0; j < k; ++j) {
    if (listed[j] < 0) continue;
    const char* code = reinterpret_cast<const char*>(originals + listed[j] * dim);
    for (int64_t offset = 0; offset < code_bytes; offset += kLineBytes) __builtin_prefetch(code + offset);
  }
#endif
}

// Completes and orders one row's list of (key, code) pairs, key the score the search ranks by: slots
// still unfilled (every other code's score was NaN or +inf) take the lowest codes not listed, with
// key +inf; then ascending key, among equal keys a NaN true distance last, then ascending index. The
// search (nearest_code) picks the lowest index among its lowest keys, so the first column is its
// answer. A cosine row with an Inf lists 0..k-1 (see row_is_finite). `candidates` and `z_values` are
// the thread's scratch, reused from row to row.
template <typename acc_t, typename z_t>
void finish_topk_row(const z_t* z_row, int64_t z_stride, const acc_t* originals, int64_t dim, Metric metric,
                     int64_t k, const acc_t* keys, const int32_t* listed, int64_t* indices, float* distances,
                     std::vector<Candidate<acc_t>>& candidates, std::vector<double>& z_values) {
  candidates.clear();
  if (metric != Metric::Cosine || row_is_finite(z_row, z_stride, dim)) {
    for (int64_t j = 0; j < k && listed[j] >= 0; ++j) candidates.push_back({keys[j], false, 0.0f, listed[j]});
  }
  const int64_t num_listed = static_cast<int64_t>(candidates.size());
  if (num_listed < k) {
    std::sort(candidates.begin(), candidates.end(),
              [](const Candidate<acc_t>& a, const Candidate<acc_t>& b) { return a.code < b.code; });
    for (int64_t code = 0, next = 0; static_cast<int64_t>(candidates.size()) < k; ++code) {
      while (next < num_listed && candidates[next].code < code) ++next;
      if (next < num_listed && candidates[next].code == code) continue;
      candidates.push_back({std::numeric_limits<acc_t>::infinity(), false, 0.0f, code});
    }
  }
  if (metric == Metric::L2) {
    l2_true_distances<acc_t, z_t>(z_row, z_stride, originals, dim, candidates, z_values);
  } else {
    for (Candidate<acc_t>& candidate : candidates) {
      candidate.distance = true_distance<acc_t, z_t>(z_row, z_stride, originals + candidate.code * dim, dim, metric);
    }
  }
  for (Candidate<acc_t>& candidate : candidates) candidate.is_nan = std::isnan(candidate.distance);
  std::sort(candidates.begin(), candidates.end(), [](const Candidate<acc_t>& a, const Candidate<acc_t>& b) {
    if (a.key != b.key) return a.key < b.key;
    if (a.is_nan != b.is_nan) return b.is_nan;
    return a.code < b.code;
  });
  for (int64_t j = 0; j < k; ++j) {
    indices[j] = candidates[j].code;
    distances[j] = candidates[j].distance;
  }
}

template <typename acc_t, typename z_t, Metric metric>
void topk_search(const at::Tensor& z, const at::Tensor& codebook_acc, const PreparedCodebook<acc_t>& prepared,
                 int64_t k, int64_t* indices, float* distances) {
  const int64_t num_rows = z.size(0), dim = z.size(1), num_codes = codebook_acc.size(0);
  const acc_t* originals = codebook_acc.data_ptr<acc_t>();
  const Kernel kernel = prepared.kernel;
  const bool direct = kernel != Kernel::Blas;
  const DirectShape shape = direct_shape(kernel);
  const acc_t* center = metric == Metric::L2 ? prepared.center.template data_ptr<acc_t>() : nullptr;
  const acc_t* bias = metric == Metric::L2 && !direct ? prepared.bias.template data_ptr<acc_t>() : nullptr;
  const TileShape tile = direct ? direct_tile_shape(num_rows, shape) : tile_shape(num_rows, num_codes, dim, sizeof(acc_t));
  const int64_t num_blocks = (num_rows + tile.rows - 1) / tile.rows;
  const int64_t grain = std::max<int64_t>(1, kParallelWork / std::max<int64_t>(tile.rows * num_codes * dim, 1));
  const auto options = codebook_acc.options();
  const z_t* z_data = z.data_ptr<z_t>();
  fastvq::parallel_for(0, num_blocks, grain, [&](int64_t block_begin, int64_t block_end) {
    // Zeros: a direct kernel also reads the padding rows of a short last block.
    at::Tensor z_tile = at::zeros({tile.rows, dim}, options);
    at::Tensor scores = direct ? at::Tensor() : at::empty({tile.rows * tile.codes}, options);
    std::vector<acc_t> best(tile.rows * k);
    std::vector<int32_t> listed(tile.rows * k);
    std::vector<Candidate<acc_t>> candidates;
    candidates.reserve(k);
    std::vector<double> z_values;
    for (int64_t block = block_begin; block < block_end; ++block) {
      const int64_t row_start = block * tile.rows;
      const int64_t rows = std::min(tile.rows, num_rows - row_start);
      pack_centred_rows<acc_t, z_t, metric>(z, row_start, rows, center, z_tile.template data_ptr<acc_t>());
      std::fill(best.begin(), best.end(), std::numeric_limits<acc_t>::infinity());
      std::fill(listed.begin(), listed.end(), -1);
      if (direct) {
        if constexpr (std::is_same_v<acc_t, float>) {
          const float scale = metric == Metric::L2 ? -2.0f : -1.0f;
          auto run = kernel == Kernel::Avx512 ? avx512::topk_scores : avx2::topk_scores;
          run(z_tile.template data_ptr<float>(), tile.rows, dim, prepared.codes.template data_ptr<float>(),
              prepared.bias.template data_ptr<float>(), prepared.num_panels, scale, k, best.data(), listed.data());
        }
      } else {
        const acc_t* products = scores.template data_ptr<acc_t>();
        for (int64_t start = 0; start < num_codes; start += tile.codes) {
          const int64_t num = std::min(tile.codes, num_codes - start);
          tile_product<acc_t>(z_tile, prepared.codes, scores, rows, start, num, dim);
          for (int64_t r = 0; r < rows; ++r) {
            offer_tile<acc_t, metric>(products + r * num, bias == nullptr ? nullptr : bias + start, num, start, k,
                                      best.data() + r * k, listed.data() + r * k);
          }
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        if (r + kPrefetchRows < rows) prefetch_listed_codes(originals, dim, k, listed.data() + (r + kPrefetchRows) * k);
        const int64_t row = row_start + r;
        finish_topk_row<acc_t, z_t>(z_data + row * z.stride(0), z.stride(1), originals, dim, metric, k,
                                    best.data() + r * k, listed.data() + r * k, indices + row * k,
                                    distances + row * k, candidates, z_values);
      }
    }
  });
}

template <typename acc_t, typename z_t>
void topk_metric(Metric metric, const at::Tensor& z, const at::Tensor& codebook_acc,
                 const PreparedCodebook<acc_t>& prepared, int64_t k, int64_t* indices, float* distances) {
  switch (metric) {
    case Metric::L2:
      return topk_search<acc_t, z_t, Metric::L2>(z, codebook_acc, prepared, k, indices, distances);
    case Metric::Cosine:
      return topk_search<acc_t, z_t, Metric::Cosine>(z, codebook_acc, prepared, k, indices, distances);
    case Metric::Dot:
      return topk_search<acc_t, z_t, Metric::Dot>(z, codebook_acc, prepared, k, indices, distances);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> nearest_codes_cpu(const at::Tensor& z, const at::Tensor& codebook, int64_t k,
                                                     const std::string& metric_name) {
  const SerialTorchOps serial_torch_ops;  // PyTorch's own ops inline, this op's loops on all threads (parallel.h)
  const Metric metric = parse_metric(metric_name);
  TORCH_CHECK_VALUE(z.dim() == 2 && codebook.dim() == 2 && z.size(1) == codebook.size(1) && k >= 1 &&
                        k <= codebook.size(0) && codebook.size(0) < std::numeric_limits<int32_t>::max(),
                    "nearest_codes expects z [N, D], codebook [K, D] and 1 <= k <= K, got ", z.sizes(), ", ",
                    codebook.sizes(), " and k = ", k);
  TORCH_CHECK(z.device().is_cpu() && codebook.device().is_cpu(), "fastvq_C::nearest_codes (CPU) got tensors on ",
              z.device(), " and ", codebook.device());
  const std::string requested = requested_kernel();
  const at::ScalarType out_dtype = at::promote_types(z.scalar_type(), codebook.scalar_type());
  const at::ScalarType acc_dtype = out_dtype == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t num_rows = z.size(0);
  at::Tensor indices = at::empty({num_rows, k}, z.options().dtype(at::kLong));
  at::Tensor distances = at::empty({num_rows, k}, z.options().dtype(at::kFloat));
  if (num_rows == 0) return {indices, distances};
  const at::Tensor codebook_acc = codebook.to(acc_dtype).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "fastvq_nearest_codes_cpu", [&] {
    using z_t = scalar_t;
    if (acc_dtype == at::kDouble) {
      const auto prepared = prepare_codebook<double>(codebook_acc, metric, Kernel::Blas);
      topk_metric<double, z_t>(metric, z, codebook_acc, prepared, k, indices.data_ptr<int64_t>(),
                               distances.data_ptr<float>());
      return;
    }
    const auto prepared = prepare_codebook<float>(codebook_acc, metric, fp32_kernel(requested));
    topk_metric<float, z_t>(metric, z, codebook_acc, prepared, k, indices.data_ptr<int64_t>(),
                            distances.data_ptr<float>());
  });
  return {indices, distances};
}

}  // namespace fastvq
