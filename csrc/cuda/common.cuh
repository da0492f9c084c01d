// Device helpers shared by the CUDA kernel files (no PyTorch headers: compiles with nvcc alone).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace fastvq {
namespace cuda {

// An element of z or of the summed values (fp32, fp16 or bf16), widened to fp32 for accumulation.
// __forceinline__ implies inline, so each kernel file may include these specialisations.
template <typename T>
__device__ __forceinline__ float to_float(T value);
template <>
__device__ __forceinline__ float to_float<float>(float value) {
  return value;
}
template <>
__device__ __forceinline__ float to_float<__half>(__half value) {
  return __half2float(value);
}
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 value) {
  return __bfloat162float(value);
}

}  // namespace cuda
}  // namespace fastvq
