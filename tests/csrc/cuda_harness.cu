// A stand-alone check of the CUDA kernels, built by nvcc alone (tests/test_cuda_sources.py builds
// it on every machine with nvcc and runs it where a GPU is present). It prepares the codebook as
// binding.cpp does, runs the search and both segment reductions on odd sizes with a duplicated
// code and an all-NaN row, and compares them with a float64 brute force on the host.
// Exit status: 0 passed, 1 a mismatch, 77 no CUDA device to run on.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <random>
#include <vector>

#include "kernels.h"

namespace {

int failures = 0;

void expect(bool ok, const char* what, int64_t where) {
  if (!ok && failures++ < 10) std::printf("mismatch: %s at %lld\n", what, static_cast<long long>(where));
}

template <typename T>
T* to_device(const std::vector<T>& host) {
  T* device = nullptr;
  cudaMalloc(&device, host.size() * sizeof(T));
  cudaMemcpy(device, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice);
  return device;
}

template <typename T>
std::vector<T> to_host(const T* device, size_t count) {
  std::vector<T> host(count);
  cudaMemcpy(host.data(), device, count * sizeof(T), cudaMemcpyDeviceToHost);
  return host;
}

}  // namespace

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("no CUDA device: the harness built but has nothing to run on\n");
    return 77;
  }
  const int64_t N = 1000, K = 333, D = 70;
  std::mt19937 generator(0);
  std::normal_distribution<float> normal;
  std::vector<float> z(N * D), codebook(K * D);
  for (auto& value : z) value = normal(generator);
  for (auto& value : codebook) value = normal(generator) + 100.0f;  // far from the origin
  for (auto& value : z) value += 100.0f;
  for (int64_t d = 0; d < D; ++d) codebook[200 * D + d] = codebook[7 * D + d];  // a tie: 7 must win
  for (int64_t d = 0; d < D; ++d) z[3 * D + d] = codebook[7 * D + d];
  for (int64_t d = 0; d < D; ++d) z[5 * D + d] = std::numeric_limits<float>::quiet_NaN();

  std::vector<float> center(D, 0.0f), codes(K * D), bias(K, 0.0f);
  for (int64_t d = 0; d < D; ++d) {
    double total = 0;
    for (int64_t k = 0; k < K; ++k) total += codebook[k * D + d];
    center[d] = static_cast<float>(total / K);
  }
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t d = 0; d < D; ++d) {
      codes[k * D + d] = codebook[k * D + d] - center[d];
      bias[k] += codes[k * D + d] * codes[k * D + d];
    }
  }

  fastvq::cuda::SearchArgs search{};
  search.z = to_device(z);
  search.z_dtype = fastvq::cuda::DType::Float32;
  search.z_row_stride = D;
  search.z_col_stride = 1;
  search.codes = to_device(codes);
  search.bias = to_device(bias);
  search.center = to_device(center);
  search.originals = to_device(codebook);
  search.num_rows = N;
  search.num_codes = K;
  search.dim = D;
  search.metric = fastvq::cuda::Metric::L2;
  cudaMalloc(&search.indices, N * sizeof(int64_t));
  cudaMalloc(&search.distances, N * sizeof(float));
  if (fastvq::cuda::nearest_code(search, nullptr) != cudaSuccess || cudaDeviceSynchronize() != cudaSuccess) {
    std::printf("nearest_code failed: %s\n", cudaGetErrorString(cudaGetLastError()));
    return 1;
  }
  const std::vector<int64_t> indices = to_host(search.indices, N);
  const std::vector<float> distances = to_host(search.distances, N);
  for (int64_t i = 0; i < N; ++i) {
    double best = std::numeric_limits<double>::infinity(), chosen = 0;
    for (int64_t k = 0; k < K; ++k) {
      double total = 0;
      for (int64_t d = 0; d < D; ++d) {
        const double diff = static_cast<double>(z[i * D + d]) - codebook[k * D + d];
        total += diff * diff;
      }
      if (total < best) best = total;
      if (k == indices[i]) chosen = total;
    }
    if (i == 5) {
      expect(indices[i] == 0 && std::isnan(distances[i]), "all-NaN row: index 0, distance NaN", i);
      continue;
    }
    expect(indices[i] >= 0 && indices[i] < K, "index in range", i);
    expect(chosen - best <= 1e-5 * (best + 1.0), "chosen code within 1e-5 of the best", i);
    expect(std::fabs(distances[i] - chosen) <= 1e-4 * (chosen + 1.0), "returned distance is the true one", i);
  }
  expect(indices[3] == 7 && distances[3] == 0.0f, "tie between codes 7 and 200 goes to 7", 3);

  // The segment sums run over finite rows: row 5 becomes zeros.
  for (int64_t d = 0; d < D; ++d) z[5 * D + d] = 0.0f;
  cudaMemcpy(const_cast<void*>(search.z), z.data(), z.size() * sizeof(float), cudaMemcpyHostToDevice);
  std::vector<int64_t> assignment(N);
  std::vector<double> expected(K * D, 0.0);
  std::vector<int64_t> expected_counts(K, 0);
  for (int64_t i = 0; i < N; ++i) {
    assignment[i] = i % 17 == 0 ? -1 : static_cast<int64_t>(generator() % K);  // -1 belongs to no code
    if (assignment[i] < 0) continue;
    ++expected_counts[assignment[i]];
    for (int64_t d = 0; d < D; ++d) expected[assignment[i] * D + d] += z[i * D + d];
  }
  std::vector<int64_t> order, offsets(K + 1, 0);
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t i = 0; i < N; ++i) {
      if (assignment[i] == k) order.push_back(i);
    }
    offsets[k + 1] = static_cast<int64_t>(order.size());
  }
  fastvq::cuda::SegmentArgs segment{};
  segment.values = search.z;
  segment.dtype = fastvq::cuda::DType::Float32;
  segment.row_stride = D;
  segment.col_stride = 1;
  segment.indices = to_device(assignment);
  segment.indices_int64 = true;
  segment.index_stride = 1;
  segment.num_rows = N;
  segment.num_codes = K;
  segment.dim = D;
  for (int sorted = 0; sorted < 2; ++sorted) {
    segment.sums = to_device(std::vector<float>(K * D, 0.0f));
    segment.counts = to_device(std::vector<int64_t>(K, 0));
    const cudaError_t status = sorted ? fastvq::cuda::segment_sum_sorted(segment, to_device(order),
                                                                           to_device(offsets), nullptr)
                                      : fastvq::cuda::segment_sum_atomic(segment, nullptr);
    if (status != cudaSuccess || cudaDeviceSynchronize() != cudaSuccess) {
      std::printf("segment reduce failed: %s\n", cudaGetErrorString(cudaGetLastError()));
      return 1;
    }
    const std::vector<float> sums = to_host(segment.sums, K * D);
    const std::vector<int64_t> counts = to_host(segment.counts, K);
    for (int64_t k = 0; k < K; ++k) {
      if (!sorted) expect(counts[k] == expected_counts[k], "segment counts", k);
      for (int64_t d = 0; d < D; ++d) {
        const double want = expected[k * D + d];
        expect(std::fabs(sums[k * D + d] - want) <= 1e-4 * (std::fabs(want) + 1.0), "segment sums", k);
      }
    }
  }
  std::printf(failures ? "FAILED: %d mismatches\n" : "ok\n", failures);
  return failures ? 1 : 0;
}
