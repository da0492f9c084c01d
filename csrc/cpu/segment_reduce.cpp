// Segment reduce on CPU: per-code counts and fp32 sums of the rows assigned to each code.
//
// Threads split the codes, not the rows: each thread scans every index (8 bytes a row) and adds
// only the rows of its own codes, in row order. No two threads write the same sum, nothing is
// atomic, and every sum is added in the same order as a serial loop (and as index_add_ on CPU),
// so the result is deterministic and does not depend on the number of threads.
#include "../fastvq.h"
#include "parallel.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>

namespace fastvq {
namespace {

constexpr int64_t kParallelWork = int64_t{1} << 18;

template <typename acc_t, typename value_t, typename index_t>
void segment_sum(const at::Tensor& values, const at::Tensor& indices, int64_t num_codes, acc_t* sums,
                 int64_t* counts) {
  const int64_t num_rows = values.size(0), dim = values.size(1);
  const int64_t row_stride = values.stride(0), col_stride = values.stride(1), index_stride = indices.stride(0);
  const value_t* value_data = values.data_ptr<value_t>();
  const index_t* index_data = indices.data_ptr<index_t>();
  // Code ranges: two per thread, but every range scans all N indices again (a load, two compares and a
  // branch that a random code often mispredicts), so no more ranges than dim / 4, which keeps each range's
  // additions (N dim / ranges) at least four per index it scans; below kParallelWork additions, or with
  // dim < 8, one range (the caller alone).
  const int64_t ranges = num_rows * dim < kParallelWork
                             ? 1
                             : std::clamp<int64_t>(dim / 4, 1, 2 * static_cast<int64_t>(fastvq::num_threads()));
  const int64_t grain = std::max<int64_t>(1, (num_codes + ranges - 1) / ranges);
  fastvq::parallel_for(0, num_codes, grain, [&](int64_t code_begin, int64_t code_end) {
    for (int64_t row = 0; row < num_rows; ++row) {
      const int64_t code = static_cast<int64_t>(index_data[row * index_stride]);
      // Indices outside [0, K) belong to no code and are skipped, never written through.
      if (code < code_begin || code >= code_end) continue;
      ++counts[code];
      acc_t* target = sums + code * dim;
      const value_t* source = value_data + row * row_stride;
      for (int64_t d = 0; d < dim; ++d) target[d] += static_cast<acc_t>(source[d * col_stride]);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> segment_reduce_cpu(
    const at::Tensor& values, const at::Tensor& indices, int64_t num_codes, bool /*deterministic*/) {
  const SerialTorchOps serial_torch_ops;  // PyTorch's own ops inline, this op's loops on all threads (parallel.h)
  TORCH_CHECK_VALUE(values.dim() == 2 && indices.dim() == 1 && indices.size(0) == values.size(0) && num_codes >= 1,
                    "segment_reduce expects values [N, D], indices [N] and num_codes >= 1, got ", values.sizes(),
                    ", ", indices.sizes(), " and ", num_codes);
  TORCH_CHECK(values.device().is_cpu() && indices.device().is_cpu(),
              "fastvq_C::segment_reduce (CPU) got tensors on ", values.device(), " and ", indices.device());
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kLong || indices.scalar_type() == at::kInt,
                   "segment_reduce: indices must be int64 or int32, got ", indices.scalar_type());
  const int64_t dim = values.size(1);
  const bool wide = values.scalar_type() == at::kDouble;
  at::Tensor counts = at::zeros({num_codes}, indices.options().dtype(at::kLong));
  at::Tensor sums = at::zeros({num_codes, dim}, values.options().dtype(wide ? at::kDouble : at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "fastvq_segment_reduce_cpu", [&] {
    using value_t = scalar_t;
    AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "fastvq_segment_reduce_cpu_indices", [&] {
      if (wide) {
        segment_sum<double, value_t, index_t>(values, indices, num_codes, sums.data_ptr<double>(),
                                              counts.data_ptr<int64_t>());
      } else {
        segment_sum<float, value_t, index_t>(values, indices, num_codes, sums.data_ptr<float>(),
                                             counts.data_ptr<int64_t>());
      }
    });
  });
  return {counts.to(at::kFloat), sums.to(at::kFloat)};
}

}  // namespace fastvq
