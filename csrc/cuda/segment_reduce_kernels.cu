// Segment reduce in CUDA C++ (no PyTorch headers: compiles with nvcc alone): per-code counts and
// fp32 sums of rows, with no one-hot matrix. Two kernels, as in fastvq/backends/triton/segment_reduce.py:
// fp32 atomics (fast, run-to-run variation in the last bits), and a sorted pass in which one
// thread sums one (code, column) over the code's rows in a fixed order (deterministic).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"
#include "kernels.h"

namespace fastvq {
namespace cuda {
namespace {

constexpr int kColumnsPerBlock = 32;
constexpr int kRowsPerBlock = 8;
constexpr int kSortedThreads = 128;

template <typename I>
__device__ __forceinline__ int64_t code_of(const SegmentArgs& args, int64_t row) {
  return static_cast<int64_t>(static_cast<const I*>(args.indices)[row * args.index_stride]);
}

template <typename T, typename I>
__global__ void segment_sum_atomic_kernel(SegmentArgs args) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y;
  const int64_t col = static_cast<int64_t>(blockIdx.y) * kColumnsPerBlock + threadIdx.x;
  if (row >= args.num_rows) return;
  const int64_t code = code_of<I>(args, row);
  if (code < 0 || code >= args.num_codes) return;  // belongs to no code: never written through
  if (col < args.dim) {
    const T* values = static_cast<const T*>(args.values);
    atomicAdd(args.sums + code * args.dim + col, to_float(values[row * args.row_stride + col * args.col_stride]));
  }
  if (blockIdx.y == 0 && threadIdx.x == 0) {
    atomicAdd(reinterpret_cast<unsigned long long*>(args.counts + code), 1ULL);
  }
}

template <typename T>
__global__ void segment_sum_sorted_kernel(SegmentArgs args, const int64_t* order, const int64_t* offsets) {
  const int64_t code = blockIdx.x;
  const int64_t col = static_cast<int64_t>(blockIdx.y) * kSortedThreads + threadIdx.x;
  if (col >= args.dim) return;
  const T* values = static_cast<const T*>(args.values);
  float total = 0.0f;
  for (int64_t position = offsets[code]; position < offsets[code + 1]; ++position) {
    total += to_float(values[order[position] * args.row_stride + col * args.col_stride]);
  }
  args.sums[code * args.dim + col] += total;
}

template <typename T>
void launch_atomic(const SegmentArgs& args, dim3 grid, dim3 block, cudaStream_t stream) {
  if (args.indices_int64) {
    segment_sum_atomic_kernel<T, int64_t><<<grid, block, 0, stream>>>(args);
  } else {
    segment_sum_atomic_kernel<T, int32_t><<<grid, block, 0, stream>>>(args);
  }
}

bool grid_fits(int64_t x, int64_t y) { return x <= 0x7fffffff && y <= 65535; }

}  // namespace

cudaError_t segment_sum_atomic(const SegmentArgs& args, cudaStream_t stream) {
  if (args.num_rows == 0 || args.dim == 0) return cudaSuccess;
  const int64_t blocks_x = (args.num_rows + kRowsPerBlock - 1) / kRowsPerBlock;
  const int64_t blocks_y = (args.dim + kColumnsPerBlock - 1) / kColumnsPerBlock;
  if (!grid_fits(blocks_x, blocks_y)) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned int>(blocks_x), static_cast<unsigned int>(blocks_y));
  const dim3 block(kColumnsPerBlock, kRowsPerBlock);
  switch (args.dtype) {
    case DType::Float32:
      launch_atomic<float>(args, grid, block, stream);
      break;
    case DType::Float16:
      launch_atomic<__half>(args, grid, block, stream);
      break;
    case DType::BFloat16:
      launch_atomic<__nv_bfloat16>(args, grid, block, stream);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t segment_sum_sorted(const SegmentArgs& args, const int64_t* order, const int64_t* offsets,
                               cudaStream_t stream) {
  if (args.num_codes == 0 || args.dim == 0) return cudaSuccess;
  const int64_t blocks_y = (args.dim + kSortedThreads - 1) / kSortedThreads;
  if (!grid_fits(args.num_codes, blocks_y)) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned int>(args.num_codes), static_cast<unsigned int>(blocks_y));
  switch (args.dtype) {
    case DType::Float32:
      segment_sum_sorted_kernel<float><<<grid, kSortedThreads, 0, stream>>>(args, order, offsets);
      break;
    case DType::Float16:
      segment_sum_sorted_kernel<__half><<<grid, kSortedThreads, 0, stream>>>(args, order, offsets);
      break;
    case DType::BFloat16:
      segment_sum_sorted_kernel<__nv_bfloat16><<<grid, kSortedThreads, 0, stream>>>(args, order, offsets);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace fastvq
