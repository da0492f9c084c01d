// The CUDA implementations of the torch.ops.fastvq_C operators: ATen prepares the inputs on the
// device and the torch-free launchers of kernels.h run on the current stream. Compiled only into
// builds made against a CUDA build of PyTorch (setup.py, FASTVQ_BUILD_CUDA).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "../fastvq.h"
#include "kernels.h"

namespace fastvq {
namespace {

constexpr double kNormEps = 1e-12;  // F.normalize's eps, as in fastvq/backends/common.py

cuda::DType kernel_dtype(const at::Tensor& tensor, const char* name) {
  switch (tensor.scalar_type()) {
    case at::kFloat:
      return cuda::DType::Float32;
    case at::kHalf:
      return cuda::DType::Float16;
    case at::kBFloat16:
      return cuda::DType::BFloat16;
    default:
      TORCH_CHECK_TYPE(false, "fastvq's CUDA kernels take float32, float16 or bfloat16 ", name, ", got ",
                       tensor.scalar_type());
  }
}

void check_launch(cudaError_t status, const char* kernel) {
  TORCH_CHECK(status == cudaSuccess, "fastvq CUDA kernel ", kernel, " failed to launch: ", cudaGetErrorString(status));
}

// The l2 search's centre, fp32 [D], of the fp32 codebook [K, D]: per dimension the finite codes' mean,
// rounded to a multiple of the largest power of two at or below their mean absolute deviation there (kept
// where that is 0 or infinite), computed as csrc/cpu/search.cpp's search_center computes it (in double,
// around the fp32 mean) but on the device, so that the search never waits for the host. The rounding
// makes e - c and z - c exact for data on a grid, so equally distant codes get exactly equal scores and
// the tie goes to the lowest index.
at::Tensor search_center(const at::Tensor& originals) {
  const at::Tensor codes = originals.to(at::kDouble);
  const at::Tensor finite = codes.isfinite().all(1, /*keepdim=*/true);
  const at::Tensor finite_codes = finite.sum().clamp_min(1);
  const at::Tensor mean = (at::where(finite, codes, 0.0).sum(0) / finite_codes).to(at::kFloat).to(at::kDouble);
  const at::Tensor deviation = at::where(finite, (codes - mean).abs(), 0.0).sum(0) / finite_codes;
  const at::Tensor step = at::exp2(at::floor(at::log2(deviation)));
  const at::Tensor roundable = (deviation > 0) & deviation.isfinite();
  return at::where(roundable, at::round(mean / step) * step, mean).to(at::kFloat);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> nearest_code_cuda(
    const at::Tensor& z, const at::Tensor& codebook, const std::string& metric_name, bool return_codes) {
  const Metric metric = parse_metric(metric_name);
  TORCH_CHECK(z.is_cuda() && codebook.device() == z.device(), "fastvq_C::nearest_code (CUDA) got tensors on ",
              z.device(), " and ", codebook.device());
  const c10::cuda::CUDAGuard guard(z.device());
  const at::ScalarType out_dtype = at::promote_types(z.scalar_type(), codebook.scalar_type());
  const int64_t num_rows = z.size(0), dim = z.size(1);
  at::Tensor indices = at::empty({num_rows}, z.options().dtype(at::kLong));
  at::Tensor distances = at::empty({num_rows}, z.options().dtype(at::kFloat));
  if (num_rows == 0) return {indices, distances, at::empty({0, dim}, z.options().dtype(out_dtype))};

  // The codebook as fastvq.backends.search_codebook.SearchCodebook prepares it: O(K D) device work, once per call.
  const at::Tensor originals = codebook.to(at::kFloat).contiguous();
  at::Tensor codes = originals, bias, center;
  if (metric == Metric::L2) {
    center = search_center(originals);
    codes = (originals - center).contiguous();
    bias = (codes * codes).sum(1);
  } else if (metric == Metric::Cosine) {
    codes = (originals / originals.norm(2, {1}, /*keepdim=*/true).clamp_min(kNormEps)).contiguous();
  }

  cuda::SearchArgs args{};
  args.z = z.data_ptr();
  args.z_dtype = kernel_dtype(z, "z");
  args.z_row_stride = z.stride(0);
  args.z_col_stride = z.stride(1);
  args.codes = codes.data_ptr<float>();
  args.bias = metric == Metric::L2 ? bias.data_ptr<float>() : nullptr;
  args.center = metric == Metric::L2 ? center.data_ptr<float>() : nullptr;
  args.originals = originals.data_ptr<float>();
  args.num_rows = num_rows;
  args.num_codes = codebook.size(0);
  args.dim = dim;
  args.metric = metric == Metric::L2 ? cuda::Metric::L2 : metric == Metric::Cosine ? cuda::Metric::Cosine
                                                                                   : cuda::Metric::Dot;
  args.indices = indices.data_ptr<int64_t>();
  args.distances = distances.data_ptr<float>();
  check_launch(cuda::nearest_code(args, c10::cuda::getCurrentCUDAStream()), "nearest_code");
  at::Tensor gathered = return_codes ? codebook.to(out_dtype).index_select(0, indices)
                                     : at::empty({0, dim}, z.options().dtype(out_dtype));
  return {indices, distances, gathered};
}

std::tuple<at::Tensor, at::Tensor> segment_reduce_cuda(
    const at::Tensor& values, const at::Tensor& indices, int64_t num_codes, bool deterministic) {
  TORCH_CHECK(values.is_cuda() && indices.device() == values.device(), "fastvq_C::segment_reduce (CUDA) got tensors on ",
              values.device(), " and ", indices.device());
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kLong || indices.scalar_type() == at::kInt,
                   "segment_reduce: indices must be int64 or int32, got ", indices.scalar_type());
  const c10::cuda::CUDAGuard guard(values.device());
  const int64_t dim = values.size(1);
  at::Tensor sums = at::zeros({num_codes, dim}, values.options().dtype(at::kFloat));
  at::Tensor counts = at::zeros({num_codes}, values.options().dtype(at::kLong));

  cuda::SegmentArgs args{};
  args.values = values.data_ptr();
  args.dtype = kernel_dtype(values, "values");
  args.row_stride = values.stride(0);
  args.col_stride = values.stride(1);
  args.indices = indices.data_ptr();
  args.indices_int64 = indices.scalar_type() == at::kLong;
  args.index_stride = indices.stride(0);
  args.num_rows = values.size(0);
  args.num_codes = num_codes;
  args.dim = dim;
  args.sums = sums.data_ptr<float>();
  args.counts = counts.data_ptr<int64_t>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (!deterministic) {
    check_launch(cuda::segment_sum_atomic(args, stream), "segment_sum_atomic");
    return {counts.to(at::kFloat), sums};
  }
  // Rows sorted by code once; out-of-range indices sort past the last code and are never read.
  const at::Tensor keys = at::where((indices >= 0) & (indices < num_codes), indices.to(at::kLong), num_codes);
  const at::Tensor order = std::get<1>(keys.sort(/*stable=*/true, /*dim=*/0));
  at::Tensor code_counts = at::zeros({num_codes + 1}, keys.options());
  code_counts.index_add_(0, keys, at::ones_like(keys));  // integer adds: exact in any order
  at::Tensor offsets = at::zeros({num_codes + 1}, keys.options());
  offsets.narrow(0, 1, num_codes).copy_(code_counts.narrow(0, 0, num_codes).cumsum(0));
  check_launch(cuda::segment_sum_sorted(args, order.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(), stream),
               "segment_sum_sorted");
  return {code_counts.narrow(0, 0, num_codes).to(at::kFloat), sums};
}

}  // namespace
}  // namespace fastvq

TORCH_LIBRARY_IMPL(fastvq_C, CUDA, m) {
  m.impl("nearest_code", &fastvq::nearest_code_cuda);
  m.impl("segment_reduce", &fastvq::segment_reduce_cuda);
}
