// Sinkhorn passes on CPU: every (row, code) cost recomputed tile by tile, never stored as N x K.
//
// A thread takes a block of kBlockRows rows and walks the codes in tiles of at most kTileCodes: the tile's
// dot products come from search_common.h's BLAS tile product (one sgemm/dgemm on the calling thread), the
// metric's transform turns them into costs, and each pass folds them at once:
// - the row pass: each row's running maximum and sum of exp(score - max) (an online log-sum-exp) of
//   score = (shift - C) * scale + g, and with `argmax` the first code of the largest score;
// - the column pass: the rows are cut into a fixed number of contiguous splits (a function of N only, so
//   the result does not depend on the thread count); each split folds its rows into per-code running
//   (max, sum of exp) partials [splits, K], which fastvq/backends/cpp.py combines. No atomics.
// - the cost statistics: per row, the count, min, max, mean and sum of squared deviations of the non-NaN
//   costs, each code tile's combined by Chan's formula in double; fastvq/backends/cpp.py combines the rows.
// NaN scores carry no mass (-inf). The exponentials are ATen's vectorised ones (at::vec).
#include "search_common.h"

#include <ATen/cpu/vec/vec.h>

namespace fastvq {
namespace {

// 256 rows a block: each block streams the whole codebook through its tiles, so a larger block reads it fewer
// times a pass (64-row blocks made a pass about 3 nearest_code calls at K = 16 384, D = 256).
constexpr int64_t kBlockRows = 256;
constexpr int64_t kTileCodes = 1024;
constexpr int64_t kMaxSplits = 64;

enum class Cost { L2, Euclidean, Cosine, Dot };

Cost parse_cost(const std::string& metric) {
  if (metric == "l2") return Cost::L2;
  if (metric == "euclidean") return Cost::Euclidean;
  if (metric == "cosine") return Cost::Cosine;
  TORCH_CHECK(metric == "dot", "metric must be l2, euclidean, cosine or dot, got ", metric);
  return Cost::Dot;
}

// Both operands in the accumulation dtype, row-major, and the metric's per-row and per-code terms:
// squared norms (l2, euclidean) or inverse norms floored at F.normalize's eps (cosine).
template <typename acc_t>
struct Operands {
  at::Tensor z, codes, row_term, code_term;
  Cost cost;
  int64_t num_rows, num_codes, dim;

  Operands(const at::Tensor& z_in, const at::Tensor& codebook, const std::string& metric) {
    const auto dtype = c10::CppTypeToScalarType<acc_t>::value;
    z = z_in.to(dtype).contiguous();
    codes = codebook.to(dtype).contiguous();
    cost = parse_cost(metric);
    num_rows = z.size(0);
    num_codes = codes.size(0);
    dim = z.size(1);
    row_term = terms(z);
    code_term = terms(codes);
  }

  at::Tensor terms(const at::Tensor& rows) const {
    at::Tensor norms = at::linalg_vector_norm(rows, 2, {1}, false);
    if (cost == Cost::Cosine) return norms.clamp_min(kNormEps).reciprocal();
    return norms.square();
  }

  // costs[r, j] of rows [row_start, row_start + rows) against codes [code_start, code_start + num),
  // written over the dot products in `tile` [rows, num].
  void cost_tile(at::Tensor& tile, int64_t row_start, int64_t rows, int64_t code_start, int64_t num) const {
    at::Tensor z_tile = z.narrow(0, row_start, rows);
    tile_product<acc_t>(z_tile, codes, tile, rows, code_start, num, dim);
    acc_t* out = tile.data_ptr<acc_t>();
    const acc_t* rt = row_term.data_ptr<acc_t>() + row_start;
    const acc_t* ct = code_term.data_ptr<acc_t>() + code_start;
    for (int64_t r = 0; r < rows; ++r) {
      acc_t* line = out + r * num;
      for (int64_t j = 0; j < num; ++j) {
        const acc_t product = line[j];
        acc_t value;
        if (cost == Cost::Dot) {
          value = -product;
        } else if (cost == Cost::Cosine) {
          value = acc_t(1) - product * rt[r] * ct[j];
          value = value < acc_t(0) ? acc_t(0) : value;  // keeps NaN, unlike std::max(0, NaN)
        } else {
          value = rt[r] + ct[j] - acc_t(2) * product;
          value = value < acc_t(0) ? acc_t(0) : value;
          if (cost == Cost::Euclidean) value = std::sqrt(value);
        }
        line[j] = value;
      }
    }
  }
};

template <typename acc_t>
constexpr acc_t minus_infinity() {
  return -std::numeric_limits<acc_t>::infinity();
}

// scores = (shift - cost) * scale + potential, NaN as -inf, in place over a tile row of `num` entries.
template <typename acc_t>
inline void to_scores(acc_t* line, int64_t num, acc_t shift, acc_t scale, const acc_t* potential, acc_t row_potential) {
  for (int64_t j = 0; j < num; ++j) {
    const acc_t score = (shift - line[j]) * scale + (potential ? potential[j] : row_potential);
    line[j] = score == score ? score : minus_infinity<acc_t>();
  }
}

// sum over j of exp(values[j] - high), vectorised.
template <typename acc_t>
inline acc_t sum_exp(const acc_t* values, int64_t num, acc_t high) {
  using Vec = at::vec::Vectorized<acc_t>;
  const Vec offset(high);
  Vec total(acc_t(0));
  int64_t j = 0;
  for (; j + Vec::size() <= num; j += Vec::size()) total = total + (Vec::loadu(values + j) - offset).exp();
  acc_t sum = at::vec::vec_reduce_all<acc_t>([](Vec a, Vec b) { return a + b; }, total);
  for (; j < num; ++j) sum += std::exp(values[j] - high);
  return sum;
}

template <typename acc_t>
at::Tensor scratch(int64_t rows, int64_t num) {
  return at::empty({rows * num}, at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value));
}

template <typename acc_t>
void row_pass(const Operands<acc_t>& ops, const acc_t* potential, acc_t shift, acc_t scale, acc_t* lse,
              int64_t* indices) {
  const int64_t blocks = (ops.num_rows + kBlockRows - 1) / kBlockRows;
  const int64_t tile_codes = std::min(ops.num_codes, kTileCodes);
  fastvq::parallel_for(0, blocks, 1, [&](int64_t block_begin, int64_t block_end) {
    at::Tensor tile = scratch<acc_t>(kBlockRows, tile_codes);
    std::vector<acc_t> high(kBlockRows), total(kBlockRows), best(kBlockRows);
    std::vector<int64_t> best_index(kBlockRows);
    for (int64_t block = block_begin; block < block_end; ++block) {
      const int64_t row_start = block * kBlockRows;
      const int64_t rows = std::min(kBlockRows, ops.num_rows - row_start);
      std::fill(high.begin(), high.end(), minus_infinity<acc_t>());
      std::fill(total.begin(), total.end(), acc_t(0));
      std::fill(best.begin(), best.end(), minus_infinity<acc_t>());
      std::fill(best_index.begin(), best_index.end(), 0);
      for (int64_t code_start = 0; code_start < ops.num_codes; code_start += tile_codes) {
        const int64_t num = std::min(tile_codes, ops.num_codes - code_start);
        ops.cost_tile(tile, row_start, rows, code_start, num);
        for (int64_t r = 0; r < rows; ++r) {
          acc_t* line = tile.data_ptr<acc_t>() + r * num;
          to_scores<acc_t>(line, num, shift, scale, potential + code_start, 0);
          acc_t tile_max = minus_infinity<acc_t>();
          int64_t tile_index = 0;
          for (int64_t j = 0; j < num; ++j) {
            if (line[j] > tile_max) {  // strict: the first maximum, the lowest index, wins
              tile_max = line[j];
              tile_index = j;
            }
          }
          if (tile_max > best[r]) {
            best[r] = tile_max;
            best_index[r] = code_start + tile_index;
          }
          const acc_t new_high = std::max(high[r], tile_max);
          if (new_high == minus_infinity<acc_t>()) continue;
          total[r] = total[r] * std::exp(high[r] - new_high) + sum_exp<acc_t>(line, num, new_high);
          high[r] = new_high;
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        lse[row_start + r] = total[r] > 0 ? high[r] + std::log(total[r]) : minus_infinity<acc_t>();
        if (indices) indices[row_start + r] = best_index[r];
      }
    }
  });
}

// Splits of the column pass: a function of N only, whole row blocks each.
inline int64_t column_splits(int64_t num_rows) {
  const int64_t blocks = (num_rows + kBlockRows - 1) / kBlockRows;
  return std::max<int64_t>(1, std::min(blocks, kMaxSplits));
}

template <typename acc_t>
void column_pass(const Operands<acc_t>& ops, const acc_t* potential, acc_t shift, acc_t scale, acc_t* partial_max,
                 acc_t* partial_sum, int64_t splits) {
  using Vec = at::vec::Vectorized<acc_t>;
  const int64_t blocks = (ops.num_rows + kBlockRows - 1) / kBlockRows;
  const int64_t blocks_per_split = (blocks + splits - 1) / splits;
  const int64_t tile_codes = std::min(ops.num_codes, kTileCodes);
  fastvq::parallel_for(0, splits, 1, [&](int64_t split_begin, int64_t split_end) {
    at::Tensor tile = scratch<acc_t>(kBlockRows, tile_codes);
    std::vector<acc_t> tile_max(tile_codes), safe(tile_codes);
    for (int64_t split = split_begin; split < split_end; ++split) {
      acc_t* high = partial_max + split * ops.num_codes;
      acc_t* total = partial_sum + split * ops.num_codes;
      std::fill(high, high + ops.num_codes, minus_infinity<acc_t>());
      std::fill(total, total + ops.num_codes, acc_t(0));
      const int64_t block_end = std::min(blocks, (split + 1) * blocks_per_split);
      for (int64_t block = split * blocks_per_split; block < block_end; ++block) {
        const int64_t row_start = block * kBlockRows;
        const int64_t rows = std::min(kBlockRows, ops.num_rows - row_start);
        for (int64_t code_start = 0; code_start < ops.num_codes; code_start += tile_codes) {
          const int64_t num = std::min(tile_codes, ops.num_codes - code_start);
          ops.cost_tile(tile, row_start, rows, code_start, num);
          acc_t* data = tile.data_ptr<acc_t>();
          std::fill(tile_max.begin(), tile_max.begin() + num, minus_infinity<acc_t>());
          for (int64_t r = 0; r < rows; ++r) {
            acc_t* line = data + r * num;
            to_scores<acc_t>(line, num, shift, scale, nullptr, potential[row_start + r]);
            for (int64_t j = 0; j < num; ++j) tile_max[j] = std::max(tile_max[j], line[j]);
          }
          acc_t* code_high = high + code_start;
          acc_t* code_total = total + code_start;
          for (int64_t j = 0; j < num; ++j) {
            const acc_t new_high = std::max(code_high[j], tile_max[j]);
            safe[j] = new_high == minus_infinity<acc_t>() ? acc_t(0) : new_high;
            code_total[j] *= std::exp(code_high[j] - safe[j]);
            code_high[j] = new_high;
          }
          for (int64_t r = 0; r < rows; ++r) {
            const acc_t* line = data + r * num;
            int64_t j = 0;
            for (; j + Vec::size() <= num; j += Vec::size()) {
              const Vec sum = Vec::loadu(code_total + j) + (Vec::loadu(line + j) - Vec::loadu(safe.data() + j)).exp();
              sum.store(code_total + j);
            }
            for (; j < num; ++j) code_total[j] += std::exp(line[j] - safe[j]);
          }
        }
      }
    }
  });
}

template <typename acc_t>
void cost_stats(const Operands<acc_t>& ops, double* stats) {
  const int64_t blocks = (ops.num_rows + kBlockRows - 1) / kBlockRows;
  const int64_t tile_codes = std::min(ops.num_codes, kTileCodes);
  fastvq::parallel_for(0, blocks, 1, [&](int64_t block_begin, int64_t block_end) {
    at::Tensor tile = scratch<acc_t>(kBlockRows, tile_codes);
    for (int64_t block = block_begin; block < block_end; ++block) {
      const int64_t row_start = block * kBlockRows;
      const int64_t rows = std::min(kBlockRows, ops.num_rows - row_start);
      for (int64_t r = 0; r < rows; ++r) {
        double* row = stats + (row_start + r) * 5;
        row[0] = 0;
        row[1] = std::numeric_limits<double>::infinity();
        row[2] = -std::numeric_limits<double>::infinity();
        row[3] = 0;
        row[4] = 0;
      }
      for (int64_t code_start = 0; code_start < ops.num_codes; code_start += tile_codes) {
        const int64_t num = std::min(tile_codes, ops.num_codes - code_start);
        ops.cost_tile(tile, row_start, rows, code_start, num);
        for (int64_t r = 0; r < rows; ++r) {
          const acc_t* line = tile.data_ptr<acc_t>() + r * num;
          double* row = stats + (row_start + r) * 5;
          double count = 0, sum = 0;
          for (int64_t j = 0; j < num; ++j) {
            if (line[j] != line[j]) continue;
            count += 1;
            sum += line[j];
            row[1] = std::min<double>(row[1], line[j]);
            row[2] = std::max<double>(row[2], line[j]);
          }
          if (count == 0) continue;
          const double mean = sum / count;
          double squares = 0;
          for (int64_t j = 0; j < num; ++j) {
            if (line[j] == line[j]) squares += (line[j] - mean) * (line[j] - mean);
          }
          const double merged = row[0] + count, delta = mean - row[3];
          row[3] += delta * count / merged;
          row[4] += squares + delta * delta * row[0] * count / merged;
          row[0] = merged;
        }
      }
    }
  });
}

bool wide(const at::Tensor& z, const at::Tensor& codebook) {
  return at::promote_types(z.scalar_type(), codebook.scalar_type()) == at::kDouble;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> sinkhorn_row_pass_cpu(const at::Tensor& z, const at::Tensor& codebook,
                                                         const at::Tensor& column_potential, const std::string& metric,
                                                         const at::Tensor& affine, bool argmax) {
  const SerialTorchOps serial_torch_ops;  // PyTorch's own ops inline, this op's loops on all threads (parallel.h)
  const auto options = column_potential.options();
  at::Tensor lse = at::empty({z.size(0)}, options);
  at::Tensor indices = at::empty({argmax ? z.size(0) : 0}, options.dtype(at::kLong));
  if (z.size(0) == 0) return {lse, indices};
  auto run = [&](auto zero) {
    using acc_t = decltype(zero);
    Operands<acc_t> ops(z, codebook, metric);
    at::Tensor potential = column_potential.contiguous();
    at::Tensor terms = affine.contiguous();
    row_pass<acc_t>(ops, potential.data_ptr<acc_t>(), terms.data_ptr<acc_t>()[0], terms.data_ptr<acc_t>()[1],
                    lse.data_ptr<acc_t>(), argmax ? indices.data_ptr<int64_t>() : nullptr);
  };
  if (wide(z, codebook)) run(double{0}); else run(float{0});
  return {lse, indices};
}

std::tuple<at::Tensor, at::Tensor> sinkhorn_column_partials_cpu(const at::Tensor& z, const at::Tensor& codebook,
                                                                const at::Tensor& row_potential,
                                                                const std::string& metric, const at::Tensor& affine) {
  const SerialTorchOps serial_torch_ops;  // PyTorch's own ops inline, this op's loops on all threads (parallel.h)
  const int64_t splits = column_splits(z.size(0));
  const auto options = row_potential.options();
  at::Tensor partial_max = at::empty({splits, codebook.size(0)}, options);
  at::Tensor partial_sum = at::empty({splits, codebook.size(0)}, options);
  if (z.size(0) == 0) return {partial_max.fill_(-std::numeric_limits<double>::infinity()), partial_sum.zero_()};
  auto run = [&](auto zero) {
    using acc_t = decltype(zero);
    Operands<acc_t> ops(z, codebook, metric);
    at::Tensor potential = row_potential.contiguous();
    at::Tensor terms = affine.contiguous();
    column_pass<acc_t>(ops, potential.data_ptr<acc_t>(), terms.data_ptr<acc_t>()[0], terms.data_ptr<acc_t>()[1],
                       partial_max.data_ptr<acc_t>(), partial_sum.data_ptr<acc_t>(), splits);
  };
  if (wide(z, codebook)) run(double{0}); else run(float{0});
  return {partial_max, partial_sum};
}

at::Tensor sinkhorn_cost_stats_cpu(const at::Tensor& z, const at::Tensor& codebook, const std::string& metric) {
  const SerialTorchOps serial_torch_ops;  // PyTorch's own ops inline, this op's loops on all threads (parallel.h)
  at::Tensor stats = at::empty({z.size(0), 5}, z.options().dtype(at::kDouble));
  if (z.size(0) == 0) return stats;
  auto run = [&](auto zero) {
    using acc_t = decltype(zero);
    Operands<acc_t> ops(z, codebook, metric);
    cost_stats<acc_t>(ops, stats.data_ptr<double>());
  };
  if (wide(z, codebook)) run(double{0}); else run(float{0});
  return stats;
}

}  // namespace fastvq
