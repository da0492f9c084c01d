// A stand-alone check of the CUDA kernels, built by nvcc alone (tests/backends/test_cuda_sources.py builds
// it on every machine with nvcc and runs it where a GPU is present). It prepares the codebook as
// binding.cpp does, runs the search and both segment reductions on odd sizes with a duplicated
// code and an all-NaN row, and compares them with a float64 brute force on the host; then the search
// contracts of issue 23: exact ties on an integer grid far from the origin go to the lowest index
// (the rounded l2 centre makes every score exact), and a cosine row with an Inf or a NaN gets index 0.
// Exit status: 0 passed, 1 a mismatch, 77 no CUDA device to run on.
#include <cuda_runtime.h>

#include <algorithm>
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

// The l2 centre binding.cpp's search_center computes (as csrc/cpu/search.cpp does): per dimension the
// finite codes' mean, rounded to a multiple of the largest power of two at or below their mean
// absolute deviation (kept where that is 0 or infinite).
std::vector<float> search_center(const std::vector<float>& codebook, int64_t K, int64_t D) {
  std::vector<bool> finite(K, true);
  int64_t finite_codes = 0;
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t d = 0; d < D; ++d) finite[k] = finite[k] && std::isfinite(codebook[k * D + d]);
    finite_codes += finite[k];
  }
  const double count = static_cast<double>(std::max<int64_t>(finite_codes, 1));
  std::vector<float> center(D);
  for (int64_t d = 0; d < D; ++d) {
    double total = 0, deviation = 0;
    for (int64_t k = 0; k < K; ++k) total += finite[k] ? codebook[k * D + d] : 0.0;
    center[d] = static_cast<float>(total / count);
    for (int64_t k = 0; k < K; ++k) deviation += finite[k] ? std::fabs(codebook[k * D + d] - double{center[d]}) : 0.0;
    const double spread = deviation / count;
    if (!(spread > 0) || !std::isfinite(spread)) continue;
    const double step = std::exp2(std::floor(std::log2(spread)));
    center[d] = static_cast<float>(std::nearbyint(center[d] / step) * step);
  }
  return center;
}

// Prepares the fp32 codebook [K, D] as binding.cpp does and searches the fp32 rows z [N, D] on the
// device; false (after saying why) when a CUDA call fails.
bool search(const std::vector<float>& z, const std::vector<float>& codebook, int64_t N, int64_t K, int64_t D,
            fastvq::cuda::Metric metric, std::vector<int64_t>& indices, std::vector<float>& distances) {
  std::vector<float> center(D, 0.0f), codes(codebook), bias(K, 0.0f);
  if (metric == fastvq::cuda::Metric::L2) {
    center = search_center(codebook, K, D);
    for (int64_t k = 0; k < K; ++k) {
      for (int64_t d = 0; d < D; ++d) {
        codes[k * D + d] = codebook[k * D + d] - center[d];
        bias[k] += codes[k * D + d] * codes[k * D + d];
      }
    }
  } else if (metric == fastvq::cuda::Metric::Cosine) {
    for (int64_t k = 0; k < K; ++k) {
      double norm = 0;
      for (int64_t d = 0; d < D; ++d) norm += double{codebook[k * D + d]} * codebook[k * D + d];
      const float scale = static_cast<float>(1.0 / std::max(std::sqrt(norm), 1e-12));
      for (int64_t d = 0; d < D; ++d) codes[k * D + d] = codebook[k * D + d] * scale;
    }
  }
  fastvq::cuda::SearchArgs args{};
  float* const z_device = to_device(z);
  float* const codes_device = to_device(codes);
  float* const bias_device = to_device(bias);
  float* const center_device = to_device(center);
  float* const originals_device = to_device(codebook);
  args.z = z_device;
  args.z_dtype = fastvq::cuda::DType::Float32;
  args.z_row_stride = D;
  args.z_col_stride = 1;
  args.codes = codes_device;
  args.bias = bias_device;
  args.center = center_device;
  args.originals = originals_device;
  args.num_rows = N;
  args.num_codes = K;
  args.dim = D;
  args.metric = metric;
  cudaMalloc(&args.indices, N * sizeof(int64_t));
  cudaMalloc(&args.distances, N * sizeof(float));
  const bool ran = fastvq::cuda::nearest_code(args, nullptr) == cudaSuccess && cudaDeviceSynchronize() == cudaSuccess;
  if (ran) {
    indices = to_host(args.indices, N);
    distances = to_host(args.distances, N);
  } else {
    std::printf("nearest_code failed: %s\n", cudaGetErrorString(cudaGetLastError()));
  }
  for (float* buffer : {z_device, codes_device, bias_device, center_device, originals_device, args.distances}) {
    cudaFree(buffer);
  }
  cudaFree(args.indices);
  return ran;
}

// Integer codes and rows in [1000, 1004)^3: many rows lie at exactly the same distance from several
// codes, and with the rounded centre every score is exact, so the search must return the lowest index
// among them (the plain mean, 1001.5 plus rounding, would leave scores a few ulps apart).
void check_exact_ties_on_a_grid(std::mt19937& generator) {
  const int64_t N = 500, K = 97, D = 3;
  std::vector<float> z(N * D), codebook(K * D);
  for (auto& value : codebook) value = 1000.0f + static_cast<float>(generator() % 4);
  for (auto& value : z) value = 1000.0f + static_cast<float>(generator() % 4);
  std::vector<int64_t> indices;
  std::vector<float> distances;
  if (!search(z, codebook, N, K, D, fastvq::cuda::Metric::L2, indices, distances)) return expect(false, "grid", 0);
  for (int64_t i = 0; i < N; ++i) {
    double best = std::numeric_limits<double>::infinity();
    int64_t lowest = -1;
    for (int64_t k = 0; k < K; ++k) {
      double total = 0;
      for (int64_t d = 0; d < D; ++d) {
        const double diff = double{z[i * D + d]} - codebook[k * D + d];
        total += diff * diff;
      }
      if (total < best) {
        best = total;
        lowest = k;
      }
    }
    expect(indices[i] == lowest, "grid tie: the lowest index among the nearest codes", i);
    expect(distances[i] == static_cast<float>(best), "grid tie: the exact distance", i);
  }
}

// Cosine rows with an Inf (+Inf, -Inf, Inf with a NaN) or only NaNs get index 0 and a NaN distance.
// Code 0 points along -x, so a search that ranked the +Inf row by its scores (-Inf for every code
// with a positive x) would pick another code.
void check_nonfinite_cosine_rows(std::mt19937& generator) {
  const int64_t N = 70, K = 41, D = 19;
  std::normal_distribution<float> normal;
  std::vector<float> z(N * D), codebook(K * D);
  for (auto& value : codebook) value = normal(generator);
  for (auto& value : z) value = normal(generator);
  codebook[0] = -1.0f;
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  const std::vector<int64_t> nonfinite_rows = {2, 33, 64, 69};
  z[2 * D] = inf;
  z[33 * D + 5] = -inf;
  z[64 * D + 1] = inf;
  z[64 * D + 7] = nan;
  for (int64_t d = 0; d < D; ++d) z[69 * D + d] = nan;
  std::vector<int64_t> indices;
  std::vector<float> distances;
  if (!search(z, codebook, N, K, D, fastvq::cuda::Metric::Cosine, indices, distances)) {
    return expect(false, "cosine", 0);
  }
  for (int64_t i = 0; i < N; ++i) {
    if (std::find(nonfinite_rows.begin(), nonfinite_rows.end(), i) != nonfinite_rows.end()) {
      expect(indices[i] == 0 && std::isnan(distances[i]), "non-finite cosine row: index 0, distance NaN", i);
      continue;
    }
    double best = std::numeric_limits<double>::infinity(), chosen = 0, z_norm = 0;
    for (int64_t d = 0; d < D; ++d) z_norm += double{z[i * D + d]} * z[i * D + d];
    for (int64_t k = 0; k < K; ++k) {
      double dot = 0, e_norm = 0;
      for (int64_t d = 0; d < D; ++d) {
        dot += double{z[i * D + d]} * codebook[k * D + d];
        e_norm += double{codebook[k * D + d]} * codebook[k * D + d];
      }
      const double distance = 1.0 - dot / (std::sqrt(z_norm) * std::sqrt(e_norm));
      best = std::min(best, distance);
      if (k == indices[i]) chosen = distance;
    }
    expect(indices[i] >= 0 && indices[i] < K, "cosine: index in range", i);
    expect(chosen - best <= 1e-5, "cosine: chosen code within 1e-5 of the best", i);
    expect(std::fabs(distances[i] - chosen) <= 1e-5, "cosine: returned distance is the true one", i);
  }
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

  std::vector<int64_t> indices;
  std::vector<float> distances;
  if (!search(z, codebook, N, K, D, fastvq::cuda::Metric::L2, indices, distances)) return 1;
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
  segment.values = to_device(z);
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
  check_exact_ties_on_a_grid(generator);
  check_nonfinite_cosine_rows(generator);
  std::printf(failures ? "FAILED: %d mismatches\n" : "ok\n", failures);
  return failures ? 1 : 0;
}
