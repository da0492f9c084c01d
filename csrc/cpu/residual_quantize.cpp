// Greedy residual quantization on CPU: every level of a row tile in one walk, its residual kept in cache.
//
// The rows are cut into tiles (a direct kernel's register tiles times its tiles per block, or the BLAS
// tile's rows, as the nearest-code search sizes them: search_common.h) and threads take whole tiles. A
// tile converts its rows of z to fp32 (fp64 for fp64 inputs) once, then for each level: centres its
// residual on that level's search centre, scores it against every code of the level with the search's
// kernels (search_isa.h's fold_scores on the level's packed panels, or a BLAS tile product and a
// sequential fold), takes each row's argmin (ties to the lowest index, a NaN score never wins), and
// subtracts the chosen code from the residual, adding it to the row's running sum and its squared
// remainder to the level's commitment. The residual never leaves the tile between levels: the bare
// per-level loop writes and reads it (and an N x K score matrix) through memory once per level.
//
// The EMA statistics (per level, per code: the count and the sum of the residual the level saw) are
// summed deterministically without a per-thread [L, K, D] buffer: the rows are processed in chunks
// whose per-level residuals (chunk rows x levels x D, at most kStatsChunkBytes) are kept, and after
// each chunk the threads take whole levels and add the chunk's rows in row order.
#include "../fastvq.h"
#include "search_common.h"
#include "search_isa.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

namespace fastvq {
namespace {

// The statistics' residual buffer per chunk of rows: large enough to amortise the level pass, small
// enough to stay out of the way of the codebooks in the last-level cache.
constexpr int64_t kStatsChunkBytes = 32 * 1024 * 1024;

// What one call shares across threads.
template <typename acc_t>
struct Walk {
  int64_t num_rows, dim, num_codes, num_levels, n_q;
  const acc_t* codes;                    // the codebooks as given, [L, K, D] in acc_t
  const int64_t* row_levels;             // [N] or null: each row's level count, clamped to [0, n_q] here
  std::vector<PreparedCodebook<acc_t>> prepared;  // each level's search form (centred, packed)
  Kernel kernel;
  DirectShape shape;
  TileShape tile;
  int64_t* indices;  // [N, L], prefilled with -1
};

template <typename acc_t>
int64_t row_level_count(const Walk<acc_t>& walk, int64_t row) {
  if (walk.row_levels == nullptr) return walk.n_q;
  return std::min<int64_t>(walk.n_q, std::max<int64_t>(0, walk.row_levels[row]));
}

// A thread's scratch for one tile: the residual and running sum in acc_t, the centred search tile, and
// the search's state.
template <typename acc_t>
struct TileScratch {
  at::Tensor residual;  // [rows, D]
  at::Tensor total;     // [rows, D]
  at::Tensor z_tile;    // [rows, D], the residual minus the level's centre; zero padding rows
  at::Tensor scores;    // BLAS: [rows * codes]
  std::vector<float> lane_best;
  std::vector<int32_t> lane_index;
  std::vector<acc_t> best;
  std::vector<int64_t> best_index;
  std::vector<int64_t> levels;
};

// Each row's argmin over the level's codes into scratch.best_index.
template <typename acc_t>
void search_level(const Walk<acc_t>& walk, const PreparedCodebook<acc_t>& prepared, TileScratch<acc_t>& scratch,
                  int64_t rows) {
  std::fill(scratch.best.begin(), scratch.best.end(), std::numeric_limits<acc_t>::infinity());
  std::fill(scratch.best_index.begin(), scratch.best_index.end(), 0);
  if (walk.kernel != Kernel::Blas) {
    if constexpr (std::is_same_v<acc_t, float>) {
      const int64_t padded = (rows + walk.shape.tile_rows - 1) / walk.shape.tile_rows * walk.shape.tile_rows;
      std::fill(scratch.lane_best.begin(), scratch.lane_best.end(), std::numeric_limits<float>::infinity());
      std::fill(scratch.lane_index.begin(), scratch.lane_index.end(), 0);
      const float* z_tile = scratch.z_tile.template data_ptr<float>();
      const float* panels = prepared.codes.template data_ptr<float>();
      const float* bias = prepared.bias.template data_ptr<float>();
      if (walk.kernel == Kernel::Avx512) {
        avx512::fold_scores(z_tile, padded, walk.dim, panels, bias, prepared.num_panels, -2.0f,
                            scratch.lane_best.data(), scratch.lane_index.data());
      } else {
        avx2::fold_scores(z_tile, padded, walk.dim, panels, bias, prepared.num_panels, -2.0f,
                          scratch.lane_best.data(), scratch.lane_index.data());
      }
      // Lane j of a row saw codes j, j + kLanes, ... first-come on ties: merging the lanes by value, ties
      // to the lower code, gives the lowest index of the row's minimum.
      for (int64_t r = 0; r < rows; ++r) {
        const float* lane_best = scratch.lane_best.data() + r * kLanes;
        const int32_t* lane_index = scratch.lane_index.data() + r * kLanes;
        for (int64_t j = 0; j < kLanes; ++j) {
          if (lane_best[j] < scratch.best[r] || (lane_best[j] == scratch.best[r] && lane_index[j] < scratch.best_index[r])) {
            scratch.best[r] = lane_best[j];
            scratch.best_index[r] = lane_index[j];
          }
        }
      }
    }
    return;
  }
  const acc_t* bias = prepared.bias.template data_ptr<acc_t>();
  const acc_t* products = scratch.scores.template data_ptr<acc_t>();
  for (int64_t start = 0; start < walk.num_codes; start += walk.tile.codes) {
    const int64_t num = std::min(walk.tile.codes, walk.num_codes - start);
    tile_product<acc_t>(scratch.z_tile, prepared.codes, scratch.scores, rows, start, num, walk.dim);
    for (int64_t r = 0; r < rows; ++r) {
      const acc_t* row_products = products + r * num;
      for (int64_t k = 0; k < num; ++k) {
        const acc_t score = bias[start + k] - 2 * row_products[k];
        if (score < scratch.best[r]) {  // strict: the first code wins ties, NaN never wins
          scratch.best[r] = score;
          scratch.best_index[r] = start + k;
        }
      }
    }
  }
}

// Walks the levels of rows [row_start, row_start + rows): indices, the quantized rows, the tile's
// commitment per level (`commitment`, [L] doubles) and, when `kept` is set, each level's input residual
// at kept[((row - kept_first_row) n_q + level) D].
template <typename acc_t>
void walk_tile(const Walk<acc_t>& walk, const acc_t* z_data, TileScratch<acc_t>& scratch, int64_t row_start,
               int64_t rows, acc_t* quantized, double* commitment, acc_t* kept, int64_t kept_first_row) {
  const int64_t dim = walk.dim;
  acc_t* residual = scratch.residual.template data_ptr<acc_t>();
  acc_t* total = scratch.total.template data_ptr<acc_t>();
  acc_t* z_tile = scratch.z_tile.template data_ptr<acc_t>();
  int64_t deepest = 0;
  for (int64_t r = 0; r < rows; ++r) {
    std::copy(z_data + (row_start + r) * dim, z_data + (row_start + r + 1) * dim, residual + r * dim);
    std::fill(total + r * dim, total + (r + 1) * dim, acc_t{0});
    scratch.levels[r] = row_level_count(walk, row_start + r);
    deepest = std::max(deepest, scratch.levels[r]);
  }
  for (int64_t level = 0; level < deepest; ++level) {
    const PreparedCodebook<acc_t>& prepared = walk.prepared[level];
    const acc_t* center = prepared.center.template data_ptr<acc_t>();
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t d = 0; d < dim; ++d) z_tile[r * dim + d] = residual[r * dim + d] - center[d];
    }
    search_level(walk, prepared, scratch, rows);
    double level_commitment = 0;
    for (int64_t r = 0; r < rows; ++r) {
      if (level >= scratch.levels[r]) continue;
      const int64_t chosen = scratch.best_index[r];
      const acc_t* code = walk.codes + (level * walk.num_codes + chosen) * dim;
      acc_t* row = residual + r * dim;
      acc_t* row_total = total + r * dim;
      if (kept != nullptr) {
        std::copy(row, row + dim, kept + ((row_start + r - kept_first_row) * walk.n_q + level) * dim);
      }
      double squares = 0;
      for (int64_t d = 0; d < dim; ++d) {
        row[d] -= code[d];
        row_total[d] += code[d];
        squares += static_cast<double>(row[d]) * static_cast<double>(row[d]);
      }
      level_commitment += squares;
      walk.indices[(row_start + r) * walk.num_levels + level] = chosen;
    }
    commitment[level] += level_commitment;
  }
  std::copy(total, total + rows * dim, quantized + row_start * dim);
}

template <typename acc_t>
void residual_quantize_rows(Walk<acc_t>& walk, const acc_t* z, acc_t* quantized, at::Tensor& commitment_out,
                            acc_t* counts, acc_t* sums, bool return_stats) {
  const int64_t num_rows = walk.num_rows, dim = walk.dim, tile_rows = walk.tile.rows;
  const int64_t num_tiles = (num_rows + tile_rows - 1) / tile_rows;
  // Per tile per level, summed in tile order afterwards: the same total whatever the threads.
  std::vector<double> commitment(num_tiles * walk.num_levels, 0.0);
  const int64_t kept_row_bytes = walk.n_q * dim * static_cast<int64_t>(sizeof(acc_t));
  const int64_t chunk_tiles = return_stats ? std::max<int64_t>(1, kStatsChunkBytes / (kept_row_bytes * tile_rows))
                                           : num_tiles;
  std::vector<acc_t> kept(return_stats ? std::min(num_tiles, chunk_tiles) * tile_rows * walk.n_q * dim : 0);
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);
  for (int64_t first_tile = 0; first_tile < num_tiles; first_tile += chunk_tiles) {
    const int64_t last_tile = std::min(num_tiles, first_tile + chunk_tiles);
    const int64_t chunk_first_row = first_tile * tile_rows;
    const int64_t chunk_end_row = std::min(num_rows, last_tile * tile_rows);
    // Small problems stay on the calling thread: waking the pool costs more than they do.
    const int64_t tile_work = tile_rows * walk.num_codes * dim * walk.n_q;
    const int64_t tile_grain = std::max<int64_t>(1, kParallelWork / std::max<int64_t>(tile_work, 1));
    fastvq::parallel_for(first_tile, last_tile, tile_grain, [&](int64_t begin, int64_t end) {
      TileScratch<acc_t> scratch;
      scratch.residual = at::empty({tile_rows, dim}, options);
      scratch.total = at::empty({tile_rows, dim}, options);
      scratch.z_tile = at::zeros({tile_rows, dim}, options);
      if (walk.kernel == Kernel::Blas) scratch.scores = at::empty({tile_rows * walk.tile.codes}, options);
      scratch.lane_best.resize(walk.kernel == Kernel::Blas ? 0 : tile_rows * kLanes);
      scratch.lane_index.resize(scratch.lane_best.size());
      scratch.best.resize(tile_rows);
      scratch.best_index.resize(tile_rows);
      scratch.levels.resize(tile_rows);
      for (int64_t tile = begin; tile < end; ++tile) {
        const int64_t row_start = tile * tile_rows;
        const int64_t rows = std::min(tile_rows, num_rows - row_start);
        if (rows < tile_rows) {  // a direct kernel also scores the padding rows of a short last tile
          scratch.z_tile.zero_();
        }
        walk_tile<acc_t>(walk, z, scratch, row_start, rows, quantized,
                                     commitment.data() + tile * walk.num_levels,
                                     return_stats ? kept.data() : nullptr, chunk_first_row);
      }
    });
    if (!return_stats) continue;
    // Each level's counts and sums from this chunk, by one thread per level, in row order.
    const int64_t level_work = (chunk_end_row - chunk_first_row) * dim;
    fastvq::parallel_for(0, walk.n_q, std::max<int64_t>(1, kParallelWork / std::max<int64_t>(level_work, 1)),
                     [&](int64_t begin, int64_t end) {
      for (int64_t level = begin; level < end; ++level) {
        for (int64_t row = chunk_first_row; row < chunk_end_row; ++row) {
          const int64_t chosen = walk.indices[row * walk.num_levels + level];
          if (chosen < 0) continue;
          counts[level * walk.num_codes + chosen] += 1;
          acc_t* target = sums + (level * walk.num_codes + chosen) * dim;
          const acc_t* source = kept.data() + ((row - chunk_first_row) * walk.n_q + level) * dim;
          for (int64_t d = 0; d < dim; ++d) target[d] += source[d];
        }
      }
    });
  }
  float* out = commitment_out.data_ptr<float>();
  for (int64_t level = 0; level < walk.num_levels; ++level) {
    double level_total = 0;
    for (int64_t tile = 0; tile < num_tiles; ++tile) level_total += commitment[tile * walk.num_levels + level];
    out[level] = static_cast<float>(level_total);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> residual_quantize_cpu(
    const at::Tensor& z, const at::Tensor& codebooks, int64_t n_q, const c10::optional<at::Tensor>& row_levels,
    bool return_stats) {
  const SerialTorchOps serial_torch_ops;  // PyTorch's own ops inline, this op's loops on all threads (parallel.h)
  TORCH_CHECK_VALUE(z.dim() == 2 && codebooks.dim() == 3 && z.size(1) == codebooks.size(2) && codebooks.size(0) >= 1 &&
                        codebooks.size(1) >= 1 && n_q >= 1 && n_q <= codebooks.size(0),
                    "residual_quantize expects z [N, D], codebooks [L, K, D] with L, K >= 1 and 1 <= n_q <= L, got ",
                    z.sizes(), ", ", codebooks.sizes(), " and n_q = ", n_q);
  TORCH_CHECK(z.device().is_cpu() && codebooks.device().is_cpu(), "fastvq_C::residual_quantize (CPU) got tensors on ",
              z.device(), " and ", codebooks.device());
  const at::ScalarType out_dtype = at::promote_types(z.scalar_type(), codebooks.scalar_type());
  const at::ScalarType acc_dtype = out_dtype == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t num_rows = z.size(0), dim = z.size(1), num_levels = codebooks.size(0), num_codes = codebooks.size(1);
  const int64_t stat_levels = return_stats ? num_levels : 0;
  at::Tensor indices = at::full({num_rows, num_levels}, -1, z.options().dtype(at::kLong));
  at::Tensor commitment = at::zeros({num_levels}, z.options().dtype(at::kFloat));
  at::Tensor counts = at::zeros({stat_levels, num_codes}, z.options().dtype(acc_dtype));
  at::Tensor sums = at::zeros({stat_levels, num_codes, dim}, z.options().dtype(acc_dtype));
  if (num_rows == 0) return {indices, at::empty({0, dim}, z.options().dtype(out_dtype)), commitment, counts.to(at::kFloat), sums.to(at::kFloat)};
  at::Tensor levels;
  if (row_levels.has_value()) {
    TORCH_CHECK_VALUE(row_levels->dim() == 1 && row_levels->size(0) == num_rows,
                      "residual_quantize expects row levels [N], got ", row_levels->sizes());
    levels = row_levels->to(at::kLong).contiguous();
  }
  // The rows are converted once (a no-op for contiguous fp32), an O(N D) pass against the search's O(N L K D).
  const at::Tensor z_acc = z.to(acc_dtype).contiguous();
  const at::Tensor codebooks_acc = codebooks.to(acc_dtype).contiguous();
  at::Tensor quantized_acc = at::empty({num_rows, dim}, z.options().dtype(acc_dtype));
  // The direct kernels number codes in int32 lanes.
  const bool lanes_fit = num_codes < std::numeric_limits<int32_t>::max() / 2;
  AT_DISPATCH_FLOATING_TYPES(acc_dtype, "fastvq_residual_quantize_cpu", [&] {
    using acc_t = scalar_t;
    Walk<acc_t> walk;
    walk.num_rows = num_rows;
    walk.dim = dim;
    walk.num_codes = num_codes;
    walk.num_levels = num_levels;
    walk.n_q = n_q;
    walk.codes = codebooks_acc.data_ptr<acc_t>();
    walk.row_levels = levels.defined() ? levels.data_ptr<int64_t>() : nullptr;
    walk.kernel = std::is_same_v<acc_t, float> && lanes_fit ? fp32_kernel(requested_kernel()) : Kernel::Blas;
    walk.shape = direct_shape(walk.kernel);
    walk.tile = walk.kernel == Kernel::Blas ? tile_shape(num_rows, num_codes, dim, sizeof(acc_t))
                                            : direct_tile_shape(num_rows, walk.shape);
    walk.indices = indices.data_ptr<int64_t>();
    walk.prepared.reserve(n_q);
    for (int64_t level = 0; level < n_q; ++level) {
      walk.prepared.push_back(prepare_codebook<acc_t>(codebooks_acc.select(0, level), Metric::L2, walk.kernel));
    }
    acc_t* count_data = return_stats ? counts.data_ptr<acc_t>() : nullptr;
    acc_t* sum_data = return_stats ? sums.data_ptr<acc_t>() : nullptr;
    residual_quantize_rows<acc_t>(walk, z_acc.data_ptr<acc_t>(), quantized_acc.data_ptr<acc_t>(), commitment,
                                  count_data, sum_data, return_stats);
  });
  return {indices, quantized_acc.to(out_dtype), commitment, counts.to(at::kFloat), sums.to(at::kFloat)};
}

// The backward of residual_quantize (fastvq/ops/residual_quantize.py documents the gradients): each row walks
// its levels again from z and the chosen codes, its residual in cache, adding 2 c_l e_l (e_l = r_l - q_l, the
// residual after level l) to its gradient; the codebook gradient -2 b_l e_l onto each chosen code is summed as
// the forward's statistics are, per level in row order from a chunk's kept e_l.
std::tuple<at::Tensor, at::Tensor> residual_quantize_backward_cpu(
    const at::Tensor& grad_quantized, const at::Tensor& grad_commitment, const at::Tensor& grad_codebook_loss,
    const at::Tensor& z, const at::Tensor& codebooks, const at::Tensor& indices, const std::string& straight_through,
    bool compute_codebook_grad) {
  const SerialTorchOps serial_torch_ops;  // PyTorch's own ops inline, this op's loops on all threads (parallel.h)
  TORCH_CHECK_VALUE(straight_through == "final" || straight_through == "per_level" ||
                        straight_through == "detached_residual",
                    "straight_through must be final, per_level or detached_residual, got '", straight_through, "'");
  const at::ScalarType acc_dtype =
      at::promote_types(z.scalar_type(), codebooks.scalar_type()) == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t num_rows = z.size(0), dim = z.size(1), num_levels = codebooks.size(0), num_codes = codebooks.size(1);
  const at::Tensor z_acc = z.to(acc_dtype).contiguous();
  const at::Tensor grad_acc = grad_quantized.to(acc_dtype).contiguous();
  const at::Tensor codes_acc = codebooks.to(acc_dtype).contiguous();
  const at::Tensor chosen = indices.to(at::kLong).contiguous();
  const at::Tensor commit_scale = grad_commitment.to(at::kDouble).mul(2.0).contiguous();
  const at::Tensor codebook_scale = grad_codebook_loss.to(at::kDouble).mul(-2.0).contiguous();
  at::Tensor grad_z = at::empty({num_rows, dim}, z.options().dtype(acc_dtype));
  at::Tensor grad_codebooks = at::zeros({compute_codebook_grad ? num_levels : 0, num_codes, dim},
                                        z.options().dtype(acc_dtype));
  const bool per_level = straight_through == "per_level", detached = straight_through == "detached_residual";
  // per_level: r_{l+1} = r_l - (r_l + sg[...]) has zero gradient to r_l, so only level 0 reaches z.
  const int64_t z_levels = per_level ? 1 : num_levels;
  const int64_t walk_levels = compute_codebook_grad ? num_levels : z_levels;
  AT_DISPATCH_FLOATING_TYPES(acc_dtype, "fastvq_residual_quantize_backward_cpu", [&] {
    using acc_t = scalar_t;
    const acc_t* z_data = z_acc.data_ptr<acc_t>();
    const acc_t* grad_data = grad_acc.data_ptr<acc_t>();
    const acc_t* codes = codes_acc.data_ptr<acc_t>();
    const int64_t* index = chosen.data_ptr<int64_t>();
    const double* commit = commit_scale.data_ptr<double>();
    const double* scale = codebook_scale.data_ptr<double>();
    acc_t* grad_z_data = grad_z.data_ptr<acc_t>();
    const int64_t kept_row = walk_levels * dim;
    const int64_t chunk_rows = compute_codebook_grad
                                   ? std::max<int64_t>(1, kStatsChunkBytes / (kept_row * static_cast<int64_t>(sizeof(acc_t))))
                                   : std::max<int64_t>(num_rows, 1);
    std::vector<acc_t> kept(compute_codebook_grad ? std::min(chunk_rows, num_rows) * kept_row : 0);
    for (int64_t chunk_start = 0; chunk_start < num_rows; chunk_start += chunk_rows) {
      const int64_t chunk_end = std::min(num_rows, chunk_start + chunk_rows);
      const int64_t grain = std::max<int64_t>(1, kParallelWork / std::max<int64_t>(1, walk_levels * dim));
      fastvq::parallel_for(chunk_start, chunk_end, grain, [&](int64_t begin, int64_t end) {
        std::vector<acc_t> residual(dim), grad(dim);
        for (int64_t row = begin; row < end; ++row) {
          const int64_t* row_index = index + row * num_levels;
          int64_t levels = 0;
          while (levels < num_levels && row_index[levels] >= 0) ++levels;
          const acc_t multiplier = detached ? static_cast<acc_t>(levels) : per_level ? (levels > 0 ? 1 : 0) : 1;
          for (int64_t d = 0; d < dim; ++d) {
            residual[d] = z_data[row * dim + d];
            grad[d] = multiplier * grad_data[row * dim + d];
          }
          for (int64_t level = 0; level < std::min(levels, walk_levels); ++level) {
            const acc_t* code = codes + (level * num_codes + row_index[level]) * dim;
            const acc_t weight = static_cast<acc_t>(commit[level]);
            const bool to_z = level < z_levels;
            for (int64_t d = 0; d < dim; ++d) {
              residual[d] -= code[d];
              if (to_z) grad[d] += weight * residual[d];
            }
            if (compute_codebook_grad) {
              std::copy(residual.begin(), residual.end(), kept.begin() + (row - chunk_start) * kept_row + level * dim);
            }
          }
          std::copy(grad.begin(), grad.end(), grad_z_data + row * dim);
        }
      });
      if (!compute_codebook_grad) continue;
      acc_t* target_data = grad_codebooks.data_ptr<acc_t>();
      const int64_t level_work = (chunk_end - chunk_start) * dim;
      fastvq::parallel_for(0, num_levels, std::max<int64_t>(1, kParallelWork / std::max<int64_t>(level_work, 1)),
                       [&](int64_t begin, int64_t end) {
        for (int64_t level = begin; level < end; ++level) {
          const acc_t weight = static_cast<acc_t>(scale[level]);
          for (int64_t row = chunk_start; row < chunk_end; ++row) {
            const int64_t code = index[row * num_levels + level];
            if (code < 0) continue;
            acc_t* target = target_data + (level * num_codes + code) * dim;
            const acc_t* after = kept.data() + (row - chunk_start) * kept_row + level * dim;
            for (int64_t d = 0; d < dim; ++d) target[d] += weight * after[d];
          }
        }
      });
    }
  });
  return {grad_z.to(z.scalar_type()), grad_codebooks};
}

}  // namespace fastvq
