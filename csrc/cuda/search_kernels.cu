// Fused nearest-code search in CUDA C++ (no PyTorch headers: compiles with nvcc alone).
//
// A block of 256 threads owns 64 rows of z and walks the codebook 64 codes at a time. D is walked
// in slices of 16 staged through shared memory; each thread accumulates a 4 x 4 register tile of
// z.e in fp32 FMAs (IEEE fp32, no tf32). After each code tile every thread folds its 4 x 4 scores
// into a running (min, argmin) for its 4 rows over its own codes, which it sees in increasing
// index order; at the end the 16 threads that share a row merge their minima, ties to the lower
// index. Strict < everywhere: the lowest index wins ties whatever the tiling, and a NaN score
// never wins (it counts as +inf: a row whose every score is NaN or +inf gets index 0). Scores are
// those of fastvq/backends/search_codebook.py (SearchCodebook), on the codebook binding.cpp prepares
// as it does; with its rounded l2 centre, data on a grid scores exactly, so true ties tie. A cosine
// row with an Inf gets index 0 (csrc/cpu/search.cpp, row_is_finite). The winner's distance is then
// recomputed from z - e.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"
#include "kernels.h"

namespace fastvq {
namespace cuda {
namespace {

constexpr int kBlockRows = 64;
constexpr int kBlockCodes = 64;
constexpr int kBlockDim = 16;
constexpr int kThreadsAlongCodes = 16;
constexpr int kThreadsAlongRows = 16;
constexpr int kThreads = kThreadsAlongCodes * kThreadsAlongRows;
constexpr int kRowsPerThread = kBlockRows / kThreadsAlongRows;
constexpr int kCodesPerThread = kBlockCodes / kThreadsAlongCodes;
constexpr float kNormEps = 1e-12f;

template <typename T, Metric metric>
__global__ void __launch_bounds__(kThreads) nearest_code_fwd_kernel(SearchArgs args) {
  // +1 column: the transposed stores of a slice hit 16 different banks.
  __shared__ float z_slice[kBlockDim][kBlockRows + 1];
  __shared__ float code_slice[kBlockDim][kBlockCodes + 1];
  __shared__ float merge_best[kBlockRows][kThreadsAlongCodes];
  __shared__ int64_t merge_index[kBlockRows][kThreadsAlongCodes];

  const T* z = static_cast<const T*>(args.z);
  const int lane_code = threadIdx.x % kThreadsAlongCodes;
  const int lane_row = threadIdx.x / kThreadsAlongCodes;
  const int64_t row_start = static_cast<int64_t>(blockIdx.x) * kBlockRows;

  float best[kRowsPerThread];
  int64_t best_index[kRowsPerThread];
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    best[i] = __int_as_float(0x7f800000);  // +inf
    best_index[i] = 0;
  }

  for (int64_t code_start = 0; code_start < args.num_codes; code_start += kBlockCodes) {
    float acc[kRowsPerThread][kCodesPerThread] = {};
    for (int64_t dim_start = 0; dim_start < args.dim; dim_start += kBlockDim) {
      __syncthreads();  // the previous slice has been read by every thread
      for (int element = threadIdx.x; element < kBlockRows * kBlockDim; element += kThreads) {
        const int r = element / kBlockDim, d = element % kBlockDim;
        const int64_t row = row_start + r, col = dim_start + d;
        float value = 0.0f;
        if (row < args.num_rows && col < args.dim) {
          value = to_float(z[row * args.z_row_stride + col * args.z_col_stride]);
          if (metric == Metric::L2) value -= args.center[col];
        }
        z_slice[d][r] = value;
      }
      for (int element = threadIdx.x; element < kBlockCodes * kBlockDim; element += kThreads) {
        const int c = element / kBlockDim, d = element % kBlockDim;
        const int64_t code = code_start + c, col = dim_start + d;
        code_slice[d][c] = (code < args.num_codes && col < args.dim) ? args.codes[code * args.dim + col] : 0.0f;
      }
      __syncthreads();
#pragma unroll
      for (int d = 0; d < kBlockDim; ++d) {
        float a[kRowsPerThread], b[kCodesPerThread];
#pragma unroll
        for (int i = 0; i < kRowsPerThread; ++i) a[i] = z_slice[d][lane_row + i * kThreadsAlongRows];
#pragma unroll
        for (int j = 0; j < kCodesPerThread; ++j) b[j] = code_slice[d][lane_code + j * kThreadsAlongCodes];
#pragma unroll
        for (int i = 0; i < kRowsPerThread; ++i) {
#pragma unroll
          for (int j = 0; j < kCodesPerThread; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
      }
    }
#pragma unroll
    for (int j = 0; j < kCodesPerThread; ++j) {
      const int64_t code = code_start + lane_code + j * kThreadsAlongCodes;
      if (code >= args.num_codes) break;
      const float bias = metric == Metric::L2 ? args.bias[code] : 0.0f;
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) {
        const float score = metric == Metric::L2 ? bias - 2.0f * acc[i][j] : -acc[i][j];
        if (score < best[i]) {
          best[i] = score;
          best_index[i] = code;
        }
      }
    }
  }

#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    merge_best[lane_row + i * kThreadsAlongRows][lane_code] = best[i];
    merge_index[lane_row + i * kThreadsAlongRows][lane_code] = best_index[i];
  }
  __syncthreads();
  if (threadIdx.x >= kBlockRows) return;
  const int r = threadIdx.x;
  const int64_t row = row_start + r;
  if (row >= args.num_rows) return;
  float row_best = merge_best[r][0];
  int64_t row_index = merge_index[r][0];
  for (int t = 1; t < kThreadsAlongCodes; ++t) {
    const float value = merge_best[r][t];
    const int64_t index = merge_index[r][t];
    if (value < row_best || (value == row_best && index < row_index)) {
      row_best = value;
      row_index = index;
    }
  }
  const T* z_row = z + row * args.z_row_stride;
  if (metric == Metric::Cosine) {
    // A row with an Inf has a NaN 1 - cos to every code (Inf / Inf), though its scores -z.e / |e| are
    // +-Inf and would pick an arbitrary code: the contract gives it index 0, as it does a NaN row.
    for (int64_t d = 0; d < args.dim; ++d) {
      if (!isfinite(to_float(z_row[d * args.z_col_stride]))) row_index = 0;
    }
  }
  const float* code = args.originals + row_index * args.dim;
  float total = 0.0f, z_sq = 0.0f, e_sq = 0.0f;
  for (int64_t d = 0; d < args.dim; ++d) {
    const float z_value = to_float(z_row[d * args.z_col_stride]);
    if (metric == Metric::L2) {
      const float diff = z_value - code[d];
      total = fmaf(diff, diff, total);
    } else {
      total = fmaf(z_value, code[d], total);
      z_sq = fmaf(z_value, z_value, z_sq);
      e_sq = fmaf(code[d], code[d], e_sq);
    }
  }
  float distance = total;
  if (metric == Metric::Dot) distance = -total;
  if (metric == Metric::Cosine) {
    distance = 1.0f - total / (fmaxf(sqrtf(z_sq), kNormEps) * fmaxf(sqrtf(e_sq), kNormEps));
    // Rounding can put a parallel pair's 1 - cos a few ulps below 0; a NaN (never < 0) stays NaN.
    if (distance < 0.0f) distance = 0.0f;
  }
  args.indices[row] = row_index;
  args.distances[row] = distance;
}

template <typename T>
void launch_for_metric(const SearchArgs& args, dim3 grid, cudaStream_t stream) {
  switch (args.metric) {
    case Metric::L2:
      nearest_code_fwd_kernel<T, Metric::L2><<<grid, kThreads, 0, stream>>>(args);
      break;
    case Metric::Cosine:
      nearest_code_fwd_kernel<T, Metric::Cosine><<<grid, kThreads, 0, stream>>>(args);
      break;
    case Metric::Dot:
      nearest_code_fwd_kernel<T, Metric::Dot><<<grid, kThreads, 0, stream>>>(args);
      break;
  }
}

}  // namespace

cudaError_t nearest_code(const SearchArgs& args, cudaStream_t stream) {
  if (args.num_rows == 0) return cudaSuccess;
  const int64_t blocks = (args.num_rows + kBlockRows - 1) / kBlockRows;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned int>(blocks));
  switch (args.z_dtype) {
    case DType::Float32:
      launch_for_metric<float>(args, grid, stream);
      break;
    case DType::Float16:
      launch_for_metric<__half>(args, grid, stream);
      break;
    case DType::BFloat16:
      launch_for_metric<__nv_bfloat16>(args, grid, stream);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace fastvq
