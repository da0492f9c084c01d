// Nearest-code search on CPU, threads over blocks of rows of z (and, when the rows are too few to
// keep every thread busy, over segments of the codebook), in one of four kernels.
//
// Each work item converts (and, for l2, centres) a block of rows into an fp32 tile (fp64 for fp64
// inputs) and walks its codes with it, keeping a running (min, argmin) per row:
//
// - the direct kernels, fp32 (search_avx512.cpp on CPUs with AVX-512F, search_avx2.cpp on
//   CPUs with AVX2 and FMA but not AVX-512F): scores are computed in registers, a register tile of
//   rows x codes at a time, and folded at once; the codebook is packed in panels for them. The
//   AVX-512 kernel measured 2.5x faster than MKL's sgemm on this project's Zen 4 CI machine.
// - the bf16 direct kernel (search_avx512.cpp, AVX512-BF16; bf16 z and codebook): the same on
//   the exact bf16 values with vdpbf16ps, never widened; it scores uncentred codes, so l2 takes it
//   only for codebooks near the origin (bf16_codebook_near_origin).
// - the BLAS tiles (fp64, CPUs without AVX2, or FASTVQ_CPU_SEARCH=blas): one single-threaded GEMM
//   writes a tile of scores into a per-thread buffer of about 1 MiB that stays in cache, and a
//   vectorised pass folds it into the running minimum before the next tile overwrites it.
//
// None ever holds more than one tile per thread, where the bare z @ codebook^T streams its whole
// N x K result through memory. The chosen code's distance is then recomputed from z - e.
// The scores follow fastvq/backends/search_codebook.py (SearchCodebook) exactly: l2 uses
// |e - c|^2 - 2 (z - c).(e - c) with c the coarsely rounded mean of the finite codes (search_center),
// cosine -z.e/|e|, dot -z.e; a NaN score never wins, and ties keep the lowest index, whatever the
// tiling and the split.
//
// The top-k search (topk.cpp) runs on the same kernels and tiles; what the two share (the prepared
// codebook, search_center, the tile sizes, the true distance, the choice of kernel) is in
// search_common.h.
#include "../fastvq.h"
#include "search_common.h"
#include "search_isa.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

namespace fastvq {

Metric parse_metric(const std::string& metric) {
  if (metric == "l2") return Metric::L2;
  if (metric == "cosine") return Metric::Cosine;
  if (metric == "dot") return Metric::Dot;
  TORCH_CHECK_VALUE(false, "metric must be one of ('l2', 'cosine', 'dot'), got '", metric, "'");
}

namespace {

const char* kernel_name(Kernel kernel) {
  switch (kernel) {
    case Kernel::Blas:
      return "blas-tiles";
    case Kernel::Avx2:
      return "avx2-direct";
    case Kernel::Avx512:
      return "avx512-direct";
    case Kernel::Avx512Bf16:
      return "avx512bf16-direct";
  }
  return "";
}

// Panels per call from which the AVX-512 fp32 kernel keeps one running minimum per row (argmin_scores)
// rather than 16 lanes per row (fold_scores). Its compare per row and panel is cheaper than the lanes'
// compares, blends, loads and stores, but each panel that lowers a row's best (about ln(panels) + 1 of them)
// costs a mispredicted branch and a scalar pass. Measured per call (one thread, Zen 4, D = 64, CPU time on a
// loaded machine): at K = 1 024 (32 panels) 22.8 ms against 20.9 ms with the lanes; against the lanes of the
// build before it, 159-160 ms against 161-164 at K = 8 192 (N = 16 384) and 320 against 327-331 at K = 65 536
// (N = 4 096).
constexpr int64_t kArgminMinPanels = 256;

// How a search is cut into work items: blocks of rows times segments of codes. With enough row
// blocks every item is a whole block against the whole codebook. With too few to keep every thread
// busy (small N, large K) the codebook is split as well, each item folds its segment into a
// partial (min, argmin) per row, and the partials are merged in code order afterwards, so that the
// lowest index still wins ties. A segment is a whole number of code tiles (BLAS) or panels (direct
// kernels), so that every code is scored by the same arithmetic whatever the split.
struct Partition {
  TileShape tile;
  int64_t blocks;
  int64_t segments;
  int64_t segment_codes;
};

// Items per thread below which the codebook is split: the threads' shares of items then differ by
// at most 1 / kItemsPerThread. Segments hold at least kMinSegmentCodes codes, so the per-item costs
// (the row tile's packing, the lanes' merge) stay small against the scoring.
constexpr int64_t kItemsPerThread = 16;
constexpr int64_t kMinSegmentCodes = 1024;
// On several threads an item holds at most about this many multiply-adds (0.15 ms on a Zen 4 core), the
// codebook split further where a block of rows against the whole codebook holds more. fastvq::parallel_for
// (parallel.h) counts a loop's size in grains, and after a stall backs loops of fewer than 512 grains off to
// the calling thread; a search's grain is one item when items are large, so without the cap a search of
// 4 096 rows against 65 536 codes (37 items of 0.47 G multiply-adds, 17 G in all) counted as small and ran
// on one thread. With the cap, only searches below 512 x 2^24 multiply-adds (8.6 G, about 75 ms on one
// core) do. The per-item cost (the lanes' merge, the partials) stays below 1 % of an item.
constexpr int64_t kMaxItemWork = int64_t{1} << 24;

Partition partition(const TileShape& tile, int64_t num_rows, int64_t num_codes, int64_t dim, int64_t num_problems) {
  const int64_t blocks = (num_rows + tile.rows - 1) / tile.rows;
  const int64_t all_blocks = blocks * num_problems;
  const int64_t wanted = kItemsPerThread * fastvq::num_threads();
  const int64_t most_segments = std::max<int64_t>(1, num_codes / kMinSegmentCodes);
  int64_t segments = 1;
  if (all_blocks < wanted) segments = std::min((wanted + all_blocks - 1) / all_blocks, most_segments);
  if (fastvq::num_threads() > 1) {
    const int64_t block_work = tile.rows * num_codes * dim;
    segments = std::max(segments, std::min((block_work + kMaxItemWork - 1) / kMaxItemWork, most_segments));
  }
  const int64_t unit = tile.codes;
  const int64_t segment_codes = ((num_codes + segments - 1) / segments + unit - 1) / unit * unit;
  return {tile, blocks, (num_codes + segment_codes - 1) / segment_codes, segment_codes};
}

// The bf16 kernel scores the uncentred codes: centring would round z - c and e - c back to bf16,
// and the products would no longer be those of the inputs. Without the centring, l2's
// |e|^2 - 2 z.e loses digits to cancellation when the codebook sits far from the origin
// compared with its spread, so the bf16 kernel takes l2 only where the mean of the finite codes
// c has |c|^2 <= 4 mean |e - c|^2 (|c| at most twice the codes' RMS spread around it: the terms are
// then at most about five times those of the centred form); elsewhere bf16 is widened to fp32 and
// searched centred, as fp32 is.
constexpr double kBf16MaxOffsetToSpread = 4.0;

bool bf16_codebook_near_origin(const at::Tensor& codebook_acc) {
  const at::Tensor center = finite_mean<float>(codebook_acc);
  const int64_t num_codes = codebook_acc.size(0), dim = codebook_acc.size(1);
  const float* source = codebook_acc.data_ptr<float>();
  const float* c = center.data_ptr<float>();
  double offset = 0, spread = 0;
  int64_t finite_codes = 0;
  for (int64_t d = 0; d < dim; ++d) offset += static_cast<double>(c[d]) * c[d];
  for (int64_t k = 0; k < num_codes; ++k) {
    double squares = 0;
    for (int64_t d = 0; d < dim; ++d) {
      const double diff = static_cast<double>(source[k * dim + d]) - c[d];
      squares += diff * diff;
    }
    if (!std::isfinite(squares)) continue;
    spread += squares;
    ++finite_codes;
  }
  return offset <= kBf16MaxOffsetToSpread * spread / std::max<int64_t>(finite_codes, 1);
}

// The bf16 codebook in the bf16 kernel's panels, with l2's |e|^2 or cosine's -1 / |e| per code
// computed in double from the exact codes.
PreparedCodebook<float> prepare_bf16_codebook(const at::Tensor& codebook, Metric metric) {
  const int64_t num_codes = codebook.size(0), dim = codebook.size(1);
  constexpr int64_t width = avx512::kPanelCodes;
  const at::Tensor source_tensor = codebook.contiguous();
  const uint16_t* source = reinterpret_cast<const uint16_t*>(source_tensor.data_ptr<at::BFloat16>());
  const auto float_options = codebook.options().dtype(at::kFloat);
  PreparedCodebook<float> prepared;
  prepared.kernel = Kernel::Avx512Bf16;
  prepared.dim_pairs = (dim + 1) / 2;
  prepared.num_panels = (num_codes + width - 1) / width;
  prepared.codes = at::zeros({prepared.num_panels, prepared.dim_pairs, width, 2}, codebook.options().dtype(at::kShort));
  prepared.bias = at::full({prepared.num_panels * width}, std::numeric_limits<float>::infinity(), float_options);
  prepared.scale = at::zeros({prepared.num_panels * width}, float_options);
  uint16_t* codes = reinterpret_cast<uint16_t*>(prepared.codes.data_ptr<int16_t>());
  float* bias = prepared.bias.data_ptr<float>();
  float* scale = prepared.scale.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, kParallelWork / std::max<int64_t>(dim, 1));
  fastvq::parallel_for(0, num_codes, grain, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t panel = k / width, lane = k % width;
      double squares = 0;
      for (int64_t d = 0; d < dim; ++d) {
        const uint16_t bits = source[k * dim + d];
        codes[((panel * prepared.dim_pairs + d / 2) * width + lane) * 2 + d % 2] = bits;
        const double value = static_cast<double>(c10::BFloat16(bits, c10::BFloat16::from_bits()));
        squares += value * value;
      }
      if (metric == Metric::L2) {
        bias[k] = static_cast<float>(squares);
        scale[k] = -2.0f;
      } else {
        bias[k] = 0.0f;
        scale[k] = metric == Metric::Cosine ? static_cast<float>(-1.0 / std::max(std::sqrt(squares), kNormEps)) : -1.0f;
      }
    }
  });
  return prepared;
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
// (best, best_index) only if strictly better. Lanes are never NaN (they take a score only if it is
// below theirs), so the lowest value, then the lowest index among the lanes equal to it, is the lanes'
// ordered minimum; both passes are branch-free, which the compiler vectorises.
template <typename acc_t, typename Index>
inline void fold_lanes(const acc_t* lane_best, const Index* lane_index, int64_t code_start, acc_t& best,
                       int64_t& best_index) {
  acc_t tile_best = lane_best[0];
  for (int64_t j = 1; j < kLanes; ++j) tile_best = lane_best[j] < tile_best ? lane_best[j] : tile_best;
  Index tile_index = std::numeric_limits<Index>::max();
  for (int64_t j = 0; j < kLanes; ++j) {
    tile_index = lane_best[j] == tile_best && lane_index[j] < tile_index ? lane_index[j] : tile_index;
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

// A thread's scratch: its row tile, and its score tile (BLAS) or lane state (direct kernels).
template <typename acc_t>
struct Scratch {
  at::Tensor z_tile;  // [rows, D] acc_t, or [rows, 2 dim_pairs] bf16 bits for the bf16 kernel
  at::Tensor scores;  // BLAS: [rows * codes]
  std::vector<float> lane_best;
  std::vector<int32_t> lane_index;
  std::vector<float> row_best;  // the AVX-512 fp32 kernel's running minimum per row (argmin_scores)
  std::vector<int32_t> row_index;
  std::vector<acc_t> best;
  std::vector<int64_t> best_index;
  int64_t packed_block = -1;  // the block whose rows z_tile holds
};

// One search problem of a call: its rows, its codebook as the kernels score it, and where its answers go. A
// batched call holds B of them with the same N, K and D, searched in one parallel loop.
template <typename acc_t>
struct Problem {
  at::Tensor z;             // [N, D], any strides
  at::Tensor codebook_acc;  // [K, D] contiguous, in acc_t
  PreparedCodebook<acc_t> prepared;
  int64_t* indices;
  float* distances;
};

// Searches every problem in one parallel loop over (problem, row block, code segment) items: a batch of
// small problems keeps every thread busy where one call per problem would not, and the work items are
// those of a single search, so each problem gets exactly the answer a call of its own gives.
template <typename acc_t, typename z_t, Metric metric>
void search(const std::vector<Problem<acc_t>>& problems) {
  const Problem<acc_t>& first = problems.front();
  const int64_t num_problems = static_cast<int64_t>(problems.size());
  const int64_t num_rows = first.z.size(0), dim = first.z.size(1), num_codes = first.codebook_acc.size(0);
  const Kernel kernel = first.prepared.kernel;
  const bool direct = kernel != Kernel::Blas;
  const bool bf16 = kernel == Kernel::Avx512Bf16;
  const DirectShape shape = direct_shape(kernel);
  const Partition part = partition(direct ? direct_tile_shape(num_rows, shape)
                                          : tile_shape(num_rows, num_codes, dim, sizeof(acc_t)),
                                   num_rows, num_codes, dim, num_problems);
  const TileShape tile = part.tile;
  const int64_t items_per_problem = part.blocks * part.segments;
  const int64_t num_items = num_problems * items_per_problem;
  const int64_t item_work = tile.rows * part.segment_codes * dim;
  const int64_t grain = std::max<int64_t>(1, kParallelWork / std::max<int64_t>(item_work, 1));
  const bool split = part.segments > 1;
  // The partial (min, argmin) of every segment for every row: O(B N x threads), never O(B N K).
  const int64_t all_rows = num_problems * num_rows;
  std::vector<acc_t> partial_best(split ? part.segments * all_rows : 0);
  std::vector<int64_t> partial_index(partial_best.size());
  const auto options = first.codebook_acc.options();
  const int64_t tile_width = bf16 ? 2 * first.prepared.dim_pairs : dim;

  // Writes rows [row_start, row_start + rows) of a problem: their codes and their true distances.
  auto finish_rows = [&](const Problem<acc_t>& problem, int64_t row_start, int64_t rows, const int64_t* best_index) {
    const z_t* z_data = problem.z.template data_ptr<z_t>();
    const int64_t row_stride = problem.z.stride(0), col_stride = problem.z.stride(1);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t row = row_start + r;
      const bool nan_row = metric == Metric::Cosine && !row_is_finite(z_data + row * row_stride, col_stride, dim);
      problem.indices[row] = nan_row ? 0 : best_index[r];
    }
    true_distances<acc_t, z_t>(z_data + row_start * row_stride, row_stride, col_stride,
                               problem.codebook_acc.template data_ptr<acc_t>(), dim, metric,
                               problem.indices + row_start, rows, problem.distances + row_start);
  };

  auto pack_rows = [&](const Problem<acc_t>& problem, Scratch<acc_t>& scratch, int64_t row_start, int64_t rows) {
    if constexpr (std::is_same_v<z_t, at::BFloat16>) {
      if (bf16) {
        const z_t* z_data = problem.z.template data_ptr<z_t>();
        const int64_t row_stride = problem.z.stride(0), col_stride = problem.z.stride(1);
        uint16_t* target = reinterpret_cast<uint16_t*>(scratch.z_tile.template data_ptr<int16_t>());
        for (int64_t r = 0; r < rows; ++r) {
          const z_t* source = z_data + (row_start + r) * row_stride;
          for (int64_t d = 0; d < dim; ++d) target[r * tile_width + d] = source[d * col_stride].x;
        }
        return;
      }
    }
    const acc_t* center = metric == Metric::L2 && !bf16 ? problem.prepared.center.template data_ptr<acc_t>() : nullptr;
    pack_centred_rows<acc_t, z_t, metric>(problem.z, row_start, rows, center, scratch.z_tile.template data_ptr<acc_t>());
  };

  // Folds codes [code_start, code_start + count) into the running (best, best_index) of the rows.
  auto fold_segment = [&](const PreparedCodebook<acc_t>& prepared, Scratch<acc_t>& scratch, int64_t rows,
                          int64_t code_start, int64_t count) {
    if (direct) {
      if constexpr (std::is_same_v<acc_t, float>) {
        const int64_t width = shape.panel_codes;
        const int64_t padded = (rows + shape.tile_rows - 1) / shape.tile_rows * shape.tile_rows;
        const int64_t first_panel = code_start / width, panels = (count + width - 1) / width;
        const float* panel_bias = prepared.bias.template data_ptr<float>() + first_panel * width;
        if (kernel == Kernel::Avx512 && panels >= kArgminMinPanels) {
          // One running minimum per row, no lanes to merge (search_isa.h's argmin_scores).
          std::fill(scratch.row_best.begin(), scratch.row_best.end(), std::numeric_limits<float>::infinity());
          std::fill(scratch.row_index.begin(), scratch.row_index.end(), -1);
          avx512::argmin_scores(scratch.z_tile.template data_ptr<float>(), padded, dim,
                                prepared.codes.template data_ptr<float>() + first_panel * dim * width, panel_bias,
                                panels, metric == Metric::L2 ? -2.0f : -1.0f, scratch.row_best.data(),
                                scratch.row_index.data());
          for (int64_t r = 0; r < rows; ++r) {
            if (scratch.row_index[r] < 0 || !(scratch.row_best[r] < scratch.best[r])) continue;
            scratch.best[r] = scratch.row_best[r];
            scratch.best_index[r] = code_start + scratch.row_index[r];
          }
          return;
        }
        std::fill(scratch.lane_best.begin(), scratch.lane_best.end(), std::numeric_limits<float>::infinity());
        std::fill(scratch.lane_index.begin(), scratch.lane_index.end(), 0);
        if (bf16) {
          avx512::fold_scores_bf16(
              reinterpret_cast<const uint16_t*>(scratch.z_tile.template data_ptr<int16_t>()), padded,
              prepared.dim_pairs,
              reinterpret_cast<const uint16_t*>(prepared.codes.template data_ptr<int16_t>()) +
                  first_panel * prepared.dim_pairs * width * 2,
              panel_bias, prepared.scale.template data_ptr<float>() + first_panel * width, panels,
              scratch.lane_best.data(), scratch.lane_index.data());
        } else {
          const auto fold = kernel == Kernel::Avx512 ? avx512::fold_scores : avx2::fold_scores;
          fold(scratch.z_tile.template data_ptr<float>(), padded, dim,
               prepared.codes.template data_ptr<float>() + first_panel * dim * width, panel_bias, panels,
               metric == Metric::L2 ? -2.0f : -1.0f, scratch.lane_best.data(), scratch.lane_index.data());
        }
        for (int64_t r = 0; r < rows; ++r) {
          fold_lanes(scratch.lane_best.data() + r * kLanes, scratch.lane_index.data() + r * kLanes, code_start,
                     scratch.best[r], scratch.best_index[r]);
        }
      }
      return;
    }
    const acc_t* bias = metric == Metric::L2 ? prepared.bias.template data_ptr<acc_t>() : nullptr;
    const acc_t* products = scratch.scores.template data_ptr<acc_t>();
    for (int64_t start = code_start; start < code_start + count; start += tile.codes) {
      const int64_t num = std::min(tile.codes, code_start + count - start);
      tile_product<acc_t>(scratch.z_tile, prepared.codes, scratch.scores, rows, start, num, dim);
      for (int64_t r = 0; r < rows; ++r) {
        fold_row<acc_t, metric>(products + r * num, bias == nullptr ? nullptr : bias + start, num, start,
                                scratch.best[r], scratch.best_index[r]);
      }
    }
  };

  fastvq::parallel_for(0, num_items, grain, [&](int64_t item_begin, int64_t item_end) {
    // One row tile and one score tile (or lane state) per thread: all the memory the search adds
    // beyond O(B K D) and the partials. Zeros: a direct kernel also reads the padding rows of a
    // short last block.
    Scratch<acc_t> scratch;
    scratch.z_tile = bf16 ? at::zeros({tile.rows, tile_width}, options.dtype(at::kShort))
                          : at::zeros({tile.rows, dim}, options);
    if (!direct) scratch.scores = at::empty({tile.rows * tile.codes}, options);
    scratch.lane_best.resize(direct ? tile.rows * kLanes : 0);
    scratch.row_best.resize(kernel == Kernel::Avx512 ? tile.rows : 0);
    scratch.row_index.resize(scratch.row_best.size());
    scratch.lane_index.resize(scratch.lane_best.size());
    scratch.best.resize(tile.rows);
    scratch.best_index.resize(tile.rows);
    for (int64_t item = item_begin; item < item_end; ++item) {
      const int64_t index = item / items_per_problem, problem_item = item % items_per_problem;
      const Problem<acc_t>& problem = problems[index];
      const int64_t block = problem_item / part.segments, segment = problem_item % part.segments;
      const int64_t row_start = block * tile.rows;
      const int64_t rows = std::min(tile.rows, num_rows - row_start);
      const int64_t code_start = segment * part.segment_codes;
      if (scratch.packed_block != index * part.blocks + block) {
        pack_rows(problem, scratch, row_start, rows);
        scratch.packed_block = index * part.blocks + block;
      }
      std::fill(scratch.best.begin(), scratch.best.begin() + rows, std::numeric_limits<acc_t>::infinity());
      std::fill(scratch.best_index.begin(), scratch.best_index.begin() + rows, 0);
      fold_segment(problem.prepared, scratch, rows, code_start, std::min(part.segment_codes, num_codes - code_start));
      if (!split) {
        finish_rows(problem, row_start, rows, scratch.best_index.data());
        continue;
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t slot = segment * all_rows + index * num_rows + row_start + r;
        partial_best[slot] = scratch.best[r];
        partial_index[slot] = scratch.best_index[r];
      }
    }
  });
  if (!split) return;
  // Segments in code order and strictly better only: the lowest index wins ties, a NaN never wins.
  fastvq::parallel_for(0, all_rows, std::max<int64_t>(1, kParallelWork / std::max<int64_t>(dim, 1)),
                       [&](int64_t begin, int64_t end) {
                         std::vector<int64_t> merged(end - begin);
                         for (int64_t slot = begin; slot < end; ++slot) {
                           acc_t best = std::numeric_limits<acc_t>::infinity();
                           int64_t best_index = 0;
                           for (int64_t segment = 0; segment < part.segments; ++segment) {
                             if (partial_best[segment * all_rows + slot] < best) {
                               best = partial_best[segment * all_rows + slot];
                               best_index = partial_index[segment * all_rows + slot];
                             }
                           }
                           merged[slot - begin] = best_index;
                         }
                         // The chunk's rows, problem by problem.
                         for (int64_t slot = begin; slot < end;) {
                           const int64_t problem = slot / num_rows, row = slot % num_rows;
                           const int64_t rows = std::min(end - slot, num_rows - row);
                           finish_rows(problems[problem], row, rows, merged.data() + (slot - begin));
                           slot += rows;
                         }
                       });
}

template <typename acc_t, typename z_t>
void search_metric(Metric metric, const std::vector<Problem<acc_t>>& problems) {
  switch (metric) {
    case Metric::L2:
      return search<acc_t, z_t, Metric::L2>(problems);
    case Metric::Cosine:
      return search<acc_t, z_t, Metric::Cosine>(problems);
    case Metric::Dot:
      return search<acc_t, z_t, Metric::Dot>(problems);
  }
}

bool bf16_kernel_wanted(const std::string& requested) {
  return (requested == "auto" || requested == "avx512-bf16") && avx512::bf16_available();
}

}  // namespace

std::string cpu_search_kernels() {
  const std::string requested = requested_kernel();
  const char* fp32 = kernel_name(fp32_kernel(requested));
  const std::string bf16 = bf16_kernel_wanted(requested) ? kernel_name(Kernel::Avx512Bf16)
                                                         : std::string(fp32) + " (widened to fp32)";
  return std::string("{\"fp32\": \"") + fp32 + "\", \"fp16\": \"" + fp32 + " (widened to fp32)\", \"bf16\": \"" +
         bf16 + "\", \"fp64\": \"" + kernel_name(Kernel::Blas) + "\"}";
}

namespace {

// Searches problems[b] = (z[b] [N, D], codebook[b] [K, D]) for every b of the [B, N, D] and [B, K, D]
// inputs into indices [B, N] and distances [B, N]: each codebook prepared once, then one parallel
// loop over every problem's work items. The kernel is chosen once for all problems (the bf16 one only
// if every codebook may take it), so all problems share one tiling.
void search_batch(const at::Tensor& z, const at::Tensor& codebook, Metric metric, at::Tensor& indices,
                  at::Tensor& distances) {
  const std::string requested = requested_kernel();
  const at::ScalarType out_dtype = at::promote_types(z.scalar_type(), codebook.scalar_type());
  const at::ScalarType acc_dtype = out_dtype == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t num_problems = z.size(0);
  const at::Tensor codebooks_acc = codebook.to(acc_dtype).contiguous();
  int64_t* index_data = indices.data_ptr<int64_t>();
  float* distance_data = distances.data_ptr<float>();
  const int64_t num_rows = z.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "fastvq_nearest_code_cpu", [&] {
    using z_t = scalar_t;
    if (acc_dtype == at::kDouble) {
      std::vector<Problem<double>> problems;
      for (int64_t b = 0; b < num_problems; ++b) {
        const at::Tensor codebook_acc = codebooks_acc.select(0, b);
        problems.push_back({z.select(0, b), codebook_acc, prepare_codebook<double>(codebook_acc, metric, Kernel::Blas),
                            index_data + b * num_rows, distance_data + b * num_rows});
      }
      search_metric<double, z_t>(metric, problems);
      return;
    }
    // The direct kernels number codes in int32 lanes.
    const bool lanes_fit = codebook.size(1) < std::numeric_limits<int32_t>::max() / 2;
    bool bf16 = z.scalar_type() == at::kBFloat16 && codebook.scalar_type() == at::kBFloat16 && lanes_fit &&
                bf16_kernel_wanted(requested);
    for (int64_t b = 0; bf16 && metric == Metric::L2 && b < num_problems; ++b) {
      bf16 = bf16_codebook_near_origin(codebooks_acc.select(0, b));
    }
    const Kernel kernel = bf16 ? Kernel::Avx512Bf16 : lanes_fit ? fp32_kernel(requested) : Kernel::Blas;
    std::vector<Problem<float>> problems;
    for (int64_t b = 0; b < num_problems; ++b) {
      const at::Tensor codebook_acc = codebooks_acc.select(0, b);
      problems.push_back({z.select(0, b), codebook_acc,
                          bf16 ? prepare_bf16_codebook(codebook.select(0, b), metric)
                               : prepare_codebook<float>(codebook_acc, metric, kernel),
                          index_data + b * num_rows, distance_data + b * num_rows});
    }
    search_metric<float, z_t>(metric, problems);
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> nearest_code_cpu(
    const at::Tensor& z, const at::Tensor& codebook, const std::string& metric_name, bool return_codes) {
  const SerialTorchOps serial_torch_ops;  // PyTorch's own ops inline, this op's loops on all threads (parallel.h)
  const Metric metric = parse_metric(metric_name);
  TORCH_CHECK_VALUE(z.dim() == 2 && codebook.dim() == 2 && z.size(1) == codebook.size(1) && codebook.size(0) >= 1,
                    "nearest_code expects z [N, D] and codebook [K, D] with K >= 1, got ", z.sizes(), " and ",
                    codebook.sizes());
  TORCH_CHECK(z.device().is_cpu() && codebook.device().is_cpu(), "fastvq_C::nearest_code (CPU) got tensors on ",
              z.device(), " and ", codebook.device());
  const at::ScalarType out_dtype = at::promote_types(z.scalar_type(), codebook.scalar_type());
  const int64_t num_rows = z.size(0), dim = z.size(1);
  at::Tensor indices = at::empty({num_rows}, z.options().dtype(at::kLong));
  at::Tensor distances = at::empty({num_rows}, z.options().dtype(at::kFloat));
  if (num_rows == 0) {
    return {indices, distances, at::empty({0, dim}, z.options().dtype(out_dtype))};
  }
  search_batch(z.unsqueeze(0), codebook.unsqueeze(0), metric, indices, distances);
  at::Tensor codes = return_codes ? codebook.to(out_dtype).index_select(0, indices)
                                  : at::empty({0, dim}, z.options().dtype(out_dtype));
  return {indices, distances, codes};
}

std::tuple<at::Tensor, at::Tensor> nearest_code_batched_cpu(const at::Tensor& z, const at::Tensor& codebook,
                                                            const std::string& metric_name) {
  const SerialTorchOps serial_torch_ops;  // PyTorch's own ops inline, this op's loops on all threads (parallel.h)
  const Metric metric = parse_metric(metric_name);
  TORCH_CHECK_VALUE(z.dim() == 3 && codebook.dim() == 3 && z.size(0) == codebook.size(0) &&
                        z.size(2) == codebook.size(2) && codebook.size(1) >= 1,
                    "nearest_code_batched expects z [B, N, D] and codebook [B, K, D] with K >= 1, got ", z.sizes(),
                    " and ", codebook.sizes());
  TORCH_CHECK(z.device().is_cpu() && codebook.device().is_cpu(),
              "fastvq_C::nearest_code_batched (CPU) got tensors on ", z.device(), " and ", codebook.device());
  at::Tensor indices = at::empty({z.size(0), z.size(1)}, z.options().dtype(at::kLong));
  at::Tensor distances = at::empty({z.size(0), z.size(1)}, z.options().dtype(at::kFloat));
  if (indices.numel() == 0) return {indices, distances};
  search_batch(z, codebook, metric, indices, distances);
  return {indices, distances};
}
}  // namespace fastvq
