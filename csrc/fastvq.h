// Declarations shared by the translation units of fastvq._C.
//
// Every kernel here is registered in module.cpp as an implementation of a torch.ops.fastvq_C
// operator; fastvq/backends/cpp.py calls those operators from the real implementations of the public
// torch.ops.fastvq operators, after fastvq/_checks.py has validated the inputs.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <tuple>

namespace fastvq {

enum class Metric { L2, Cosine, Dot };

Metric parse_metric(const std::string& metric);

// (indices int64 [N], distances fp32 [N], codes [N or 0, D] in the promoted dtype).
std::tuple<at::Tensor, at::Tensor, at::Tensor> nearest_code_cpu(
    const at::Tensor& z, const at::Tensor& codebook, const std::string& metric, bool return_codes);

// (counts fp32 [K], sums fp32 [K, D]); deterministic on CPU whatever `deterministic` says.
std::tuple<at::Tensor, at::Tensor> segment_reduce_cpu(
    const at::Tensor& values, const at::Tensor& indices, int64_t num_codes, bool deterministic);

}  // namespace fastvq
