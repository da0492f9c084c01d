// The CUDA C++ kernels of fastvq._C, behind a plain C++ interface.
//
// Nothing here (or in the .cu files) includes a PyTorch header: the kernels compile with nvcc
// alone, which is how CI checks them on machines without a CUDA build of PyTorch
// (tests/backends/test_cuda_sources.py). binding.cpp, compiled only where CUDA PyTorch is present, prepares
// the tensors with ATen and calls these launchers on the current stream.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace fastvq {
namespace cuda {

enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2 };
enum class Metric : int { L2 = 0, Cosine = 1, Dot = 2 };

// Strides are in elements. The codebook arrives prepared by the caller, as fastvq/backends/search_codebook.py's
// SearchCodebook prepares it: `codes` centred on c (l2: the finite codes' mean rounded to a power of two of
// their spread, search_center), scaled to unit rows (cosine) or as given (dot), with `bias` = |e - c|^2 and
// `center` = c for l2 (null otherwise).
struct SearchArgs {
  const void* z;
  DType z_dtype;
  int64_t z_row_stride;
  int64_t z_col_stride;
  const float* codes;      // [K, D] fp32, contiguous
  const float* bias;       // [K] fp32 (l2)
  const float* center;     // [D] fp32 (l2)
  const float* originals;  // [K, D] fp32, contiguous: the codes as given, for the true distance
  int64_t num_rows;
  int64_t num_codes;
  int64_t dim;
  Metric metric;
  int64_t* indices;  // [N] out
  float* distances;  // [N] out: the chosen code's true distance, recomputed from z - e
};

// Fused search: scores tile by tile in registers and shared memory, a running (min, argmin) per
// row (strict <, so the lowest index wins ties and NaN never wins), never an N x K matrix.
cudaError_t nearest_code(const SearchArgs& args, cudaStream_t stream);

struct SegmentArgs {
  const void* values;
  DType dtype;
  int64_t row_stride;
  int64_t col_stride;
  const void* indices;
  bool indices_int64;  // else int32
  int64_t index_stride;
  int64_t num_rows;
  int64_t num_codes;
  int64_t dim;
  float* sums;      // [K, D] fp32, contiguous, zero-initialised: sums[k] += rows of code k
  int64_t* counts;  // [K], zero-initialised (atomic path only)
};

// sums[k] += values[i] and counts[k] += 1 for every i with indices[i] == k, with fp32 atomics:
// fast, but the order of the additions varies from run to run. Indices outside [0, K) are skipped.
cudaError_t segment_sum_atomic(const SegmentArgs& args, cudaStream_t stream);

// The deterministic path: `order` lists the rows sorted by code (stable) and rows
// offsets[k] .. offsets[k + 1] of it belong to code k; each sum is added in that fixed order.
// `counts` is not written (the caller has them from building `offsets`).
cudaError_t segment_sum_sorted(const SegmentArgs& args, const int64_t* order, const int64_t* offsets,
                               cudaStream_t stream);

}  // namespace cuda
}  // namespace fastvq
