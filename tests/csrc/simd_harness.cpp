// A stand-alone check of the direct search kernels (no PyTorch): tests/backends/test_simd_kernels.py builds
// it natively and against SIMDe (-DFASTVQ_SIMDE, see simd.h) and runs it.
//
// For each kernel it packs random codebooks into the kernel's documented layout, runs the kernel
// over odd dimensions, one and several panels, padded codes, exact duplicates, NaN codes and an
// all-NaN row, merges each row's lanes (value, then lowest code), and compares with a float64
// brute force over the same values: the chosen code's score must be within 1e-5 of the best,
// relative to the row's scores, the index must be the exact one wherever the best beats the
// second best by more than that, duplicates must resolve to the first copy, and a NaN code must
// never win. Exit status 0: every case passed; 1: a mismatch (printed); 77: no kernel to check on
// this CPU (a native build on a CPU without AVX2).
#include "search_isa.h"

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <utility>
#include <vector>

namespace {

using fastvq::avx512::kLanes;

// Round-to-nearest-even fp32 -> bf16 bits, and back.
uint16_t to_bf16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  bits += 0x7fff + ((bits >> 16) & 1);
  return static_cast<uint16_t>(bits >> 16);
}

float from_bf16(uint16_t half) {
  const uint32_t bits = static_cast<uint32_t>(half) << 16;
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

template <typename T>
T* aligned(std::vector<T>& storage, size_t count) {
  storage.assign(count + 64 / sizeof(T), T{});
  uintptr_t address = reinterpret_cast<uintptr_t>(storage.data());
  address = (address + 63) / 64 * 64;
  return reinterpret_cast<T*>(address);
}

struct Case {
  int64_t rows, codes, dim;
  bool bf16_values;  // values rounded to bf16 (the bf16 kernel's inputs)
};

enum class Which { Avx2, Avx512, Avx512Bf16 };

const char* name(Which which) {
  return which == Which::Avx2 ? "avx2" : which == Which::Avx512 ? "avx512" : "avx512-bf16";
}

int failures = 0;

void check(Which which, const Case& c, uint32_t seed) {
  const int64_t width = which == Which::Avx2 ? fastvq::avx2::kPanelCodes : fastvq::avx512::kPanelCodes;
  const int64_t tile_rows = which == Which::Avx2 ? fastvq::avx2::kTileRows : fastvq::avx512::kTileRows;
  const int64_t rows = (c.rows + tile_rows - 1) / tile_rows * tile_rows;
  const int64_t panels = (c.codes + width - 1) / width;
  std::mt19937 generator(seed);
  std::normal_distribution<float> normal;
  auto value = [&] {
    const float v = normal(generator);
    return c.bf16_values ? from_bf16(to_bf16(v)) : v;
  };
  std::vector<float> z(rows * c.dim), codes(c.codes * c.dim), bias(panels * width), scale(panels * width);
  for (auto& v : z) v = value();
  for (auto& v : codes) v = value();
  // Duplicates: code 1 repeats in the last code and in code 3 (the same panel, another lane), code 2 in the next
  // panel (same lane) where there is one.
  if (c.codes > 3) std::memcpy(&codes[(c.codes - 1) * c.dim], &codes[1 * c.dim], c.dim * sizeof(float));
  if (c.codes > 5) std::memcpy(&codes[3 * c.dim], &codes[1 * c.dim], c.dim * sizeof(float));
  if (c.codes > width + 2) std::memcpy(&codes[(width + 2) * c.dim], &codes[2 * c.dim], c.dim * sizeof(float));
  const int64_t nan_code = c.codes > 5 ? 4 : -1;
  if (nan_code >= 0) codes[nan_code * c.dim] = std::numeric_limits<float>::quiet_NaN();
  // Row 0 sits on code 1 and row 1 on code 2, so they must pick the first copy; the last row is NaN.
  if (c.codes > 3 && c.rows > 2) {
    std::memcpy(&z[0], &codes[1 * c.dim], c.dim * sizeof(float));
    std::memcpy(&z[c.dim], &codes[2 * c.dim], c.dim * sizeof(float));
  }
  const int64_t nan_row = c.rows > 3 ? c.rows - 1 : -1;
  if (nan_row >= 0) z[nan_row * c.dim] = std::numeric_limits<float>::quiet_NaN();
  // Scores of l2 (bias |e|^2, scale -2) for the fp32 kernels; for the bf16 kernel a scale per code,
  // a function of the code so that duplicates still tie.
  for (int64_t k = 0; k < panels * width; ++k) {
    double squares = 0;
    for (int64_t d = 0; k < c.codes && d < c.dim; ++d) squares += double(codes[k * c.dim + d]) * codes[k * c.dim + d];
    bias[k] = k < c.codes ? static_cast<float>(squares) : std::numeric_limits<float>::infinity();
    const bool varied = which == Which::Avx512Bf16 && k < c.codes;
    scale[k] = varied ? -2.0f * (1.0f + 0.25f * std::fabs(codes[k * c.dim])) : -2.0f;
  }
  std::vector<float> lane_best(rows * kLanes, std::numeric_limits<float>::infinity());
  std::vector<int32_t> lane_index(rows * kLanes, 0);
  // The AVX-512 fp32 kernel's one running minimum per row (argmin_scores), checked against the lanes.
  std::vector<float> row_best(rows, std::numeric_limits<float>::infinity());
  std::vector<int32_t> row_index(rows, -1);
  std::vector<float> panel_store, z_store;
  std::vector<uint16_t> panel_bf16_store, z_bf16_store;
  if (which == Which::Avx512Bf16) {
    const int64_t pairs = (c.dim + 1) / 2;
    uint16_t* packed = aligned(panel_bf16_store, panels * pairs * width * 2);
    uint16_t* z_tile = aligned(z_bf16_store, rows * pairs * 2);
    for (int64_t k = 0; k < c.codes; ++k)
      for (int64_t d = 0; d < c.dim; ++d)
        packed[(((k / width) * pairs + d / 2) * width + k % width) * 2 + d % 2] = to_bf16(codes[k * c.dim + d]);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t d = 0; d < c.dim; ++d) z_tile[r * pairs * 2 + d] = to_bf16(z[r * c.dim + d]);
    fastvq::avx512::fold_scores_bf16(z_tile, rows, pairs, packed, bias.data(), scale.data(), panels,
                                     lane_best.data(), lane_index.data());
  } else {
    float* packed = aligned(panel_store, panels * c.dim * width);
    float* z_tile = aligned(z_store, rows * c.dim);
    std::memcpy(z_tile, z.data(), z.size() * sizeof(float));
    for (int64_t k = 0; k < c.codes; ++k)
      for (int64_t d = 0; d < c.dim; ++d) packed[((k / width) * c.dim + d) * width + k % width] = codes[k * c.dim + d];
    auto fold = which == Which::Avx2 ? fastvq::avx2::fold_scores : fastvq::avx512::fold_scores;
    fold(z_tile, rows, c.dim, packed, bias.data(), panels, -2.0f, lane_best.data(), lane_index.data());
    if (which == Which::Avx512) {
      fastvq::avx512::argmin_scores(z_tile, rows, c.dim, packed, bias.data(), panels, -2.0f, row_best.data(),
                                    row_index.data());
    }
  }
  for (int64_t r = 0; r < c.rows; ++r) {
    // The lanes merged by value, ties to the lower code.
    float best = lane_best[r * kLanes];
    int32_t index = lane_index[r * kLanes];
    for (int64_t j = 1; j < kLanes; ++j) {
      const float v = lane_best[r * kLanes + j];
      const int32_t i = lane_index[r * kLanes + j];
      if (v < best || (v == best && i < index)) {
        best = v;
        index = i;
      }
    }
    // argmin_scores must give the merged lanes' code and score exactly; (+inf, -1) where no score is finite.
    const bool argmin_differs =
        which == Which::Avx512 &&
        ((row_index[r] < 0 ? 0 : row_index[r]) != index || std::memcmp(&row_best[r], &best, sizeof(float)) != 0);
    std::vector<double> exact(c.codes);
    double lowest = std::numeric_limits<double>::infinity(), second = lowest, magnitude = 0;
    int64_t lowest_index = 0, finite = 0;
    for (int64_t k = 0; k < c.codes; ++k) {
      double dot = 0;
      for (int64_t d = 0; d < c.dim; ++d) dot += double(z[r * c.dim + d]) * codes[k * c.dim + d];
      exact[k] = double(bias[k]) + double(scale[k]) * dot;
      if (std::isnan(exact[k])) continue;
      magnitude += std::fabs(exact[k]) + std::fabs(2 * dot);
      ++finite;
      if (exact[k] < lowest) {
        second = lowest;
        lowest = exact[k];
        lowest_index = k;
      } else if (exact[k] < second) {
        second = exact[k];
      }
    }
    const double tolerance = 1e-5 * (finite > 0 ? magnitude / finite : 1.0) + 1e-30;
    std::string problem;
    if (argmin_differs) {
      problem = "argmin_scores differs from the merged lanes (code " + std::to_string(row_index[r]) + ")";
    } else if (r == nan_row) {
      if (!(index == 0 && std::isinf(best))) problem = "the all-NaN row must keep code 0 and +inf";
    } else if (index < 0 || index >= c.codes) {
      problem = "index out of range";
    } else if (index == nan_code) {
      problem = "a NaN code won";
    } else if (!(exact[index] <= lowest + tolerance)) {
      problem = "the chosen code is not within tolerance of the best";
    } else if (second - lowest > tolerance && index != lowest_index) {
      problem = "a clear winner was missed";
    } else if (c.codes > 3 && c.rows > 2 && r < 2 && index != r + 1) {
      problem = "a duplicate did not resolve to its first copy";
    }
    if (!problem.empty()) {
      ++failures;
      std::printf("FAIL %s rows=%lld codes=%lld dim=%lld row %lld: %s (got %d score %.9g, best %lld score %.9g)\n",
                  name(which), static_cast<long long>(c.rows), static_cast<long long>(c.codes),
                  static_cast<long long>(c.dim), static_cast<long long>(r), problem.c_str(), index,
                  index >= 0 && index < c.codes ? exact[index] : 0.0, static_cast<long long>(lowest_index), lowest);
    }
  }
}

// The top-k kernels (fp32): each row's list must ascend, hold codes whose exact scores are within
// tolerance of the exact j-th best, the exact codes wherever the j-th and (j+1)-th best are clearly
// apart, both copies of a duplicate in index order, never a NaN code; the all-NaN row stays unfilled.
void check_topk(Which which, const Case& c, int64_t k, uint32_t seed) {
  const int64_t width = which == Which::Avx2 ? fastvq::avx2::kPanelCodes : fastvq::avx512::kPanelCodes;
  const int64_t tile_rows = which == Which::Avx2 ? fastvq::avx2::kTileRows : fastvq::avx512::kTileRows;
  const int64_t rows = (c.rows + tile_rows - 1) / tile_rows * tile_rows;
  const int64_t panels = (c.codes + width - 1) / width;
  std::mt19937 generator(seed);
  std::normal_distribution<float> normal;
  std::vector<float> z(rows * c.dim), codes(c.codes * c.dim), bias(panels * width);
  for (auto& v : z) v = normal(generator);
  for (auto& v : codes) v = normal(generator);
  if (c.codes > 3) std::memcpy(&codes[(c.codes - 1) * c.dim], &codes[1 * c.dim], c.dim * sizeof(float));
  const int64_t nan_code = c.codes > 5 ? 4 : -1;
  if (nan_code >= 0) codes[nan_code * c.dim] = std::numeric_limits<float>::quiet_NaN();
  if (c.codes > 3 && c.rows > 2) std::memcpy(&z[0], &codes[1 * c.dim], c.dim * sizeof(float));
  const int64_t nan_row = c.rows > 3 ? c.rows - 1 : -1;
  if (nan_row >= 0) z[nan_row * c.dim] = std::numeric_limits<float>::quiet_NaN();
  for (int64_t j = 0; j < panels * width; ++j) {
    double squares = 0;
    for (int64_t d = 0; j < c.codes && d < c.dim; ++d) squares += double(codes[j * c.dim + d]) * codes[j * c.dim + d];
    bias[j] = j < c.codes ? static_cast<float>(squares) : std::numeric_limits<float>::infinity();
  }
  std::vector<float> panel_store, z_store;
  float* packed = aligned(panel_store, panels * c.dim * width);
  float* z_tile = aligned(z_store, rows * c.dim);
  std::memcpy(z_tile, z.data(), z.size() * sizeof(float));
  for (int64_t j = 0; j < c.codes; ++j)
    for (int64_t d = 0; d < c.dim; ++d) packed[((j / width) * c.dim + d) * width + j % width] = codes[j * c.dim + d];
  std::vector<float> best(rows * k, std::numeric_limits<float>::infinity());
  std::vector<int32_t> index(rows * k, -1);
  auto topk = which == Which::Avx2 ? fastvq::avx2::topk_scores : fastvq::avx512::topk_scores;
  topk(z_tile, rows, c.dim, packed, bias.data(), panels, -2.0f, k, best.data(), index.data());
  for (int64_t r = 0; r < c.rows; ++r) {
    std::vector<std::pair<double, int64_t>> exact;
    double magnitude = 0;
    for (int64_t j = 0; j < c.codes; ++j) {
      double dot = 0;
      for (int64_t d = 0; d < c.dim; ++d) dot += double(z[r * c.dim + d]) * codes[j * c.dim + d];
      const double score = double(bias[j]) - 2 * dot;
      if (std::isnan(score)) continue;
      magnitude += std::fabs(score) + std::fabs(2 * dot);
      exact.emplace_back(score, j);
    }
    std::stable_sort(exact.begin(), exact.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
    const double tolerance = 1e-5 * (exact.empty() ? 1.0 : magnitude / exact.size()) + 1e-30;
    std::string problem;
    const float* row_best = best.data() + r * k;
    const int32_t* row_index = index.data() + r * k;
    for (int64_t j = 0; j < k && problem.empty(); ++j) {
      if (r == nan_row) {
        if (row_index[j] != -1) problem = "the all-NaN row took a code";
        continue;
      }
      if (j >= static_cast<int64_t>(exact.size())) break;
      if (row_index[j] < 0 || row_index[j] >= c.codes) problem = "index out of range";
      else if (row_index[j] == nan_code) problem = "a NaN code entered";
      else if (j > 0 && row_best[j] < row_best[j - 1]) problem = "the list does not ascend";
      else {
        double score = 0;
        for (const auto& pair : exact) if (pair.second == row_index[j]) score = pair.first;
        const bool clear = (j == 0 || exact[j].first - exact[j - 1].first > tolerance) &&
                           (j + 1 >= static_cast<int64_t>(exact.size()) || exact[j + 1].first - exact[j].first > tolerance);
        if (std::fabs(score - exact[j].first) > tolerance) problem = "a code is not within tolerance of the j-th best";
        else if (clear && row_index[j] != exact[j].second) problem = "a clear j-th best was missed";
      }
    }
    if (problem.empty() && r == 0 && c.codes > 3 && c.rows > 2 && k >= 2 &&
        !(row_index[0] == 1 && row_index[1] == c.codes - 1)) {
      problem = "a duplicate was not listed after its first copy";
    }
    if (!problem.empty()) {
      ++failures;
      std::printf("FAIL %s top-%lld rows=%lld codes=%lld dim=%lld row %lld: %s\n", name(which),
                  static_cast<long long>(k), static_cast<long long>(c.rows), static_cast<long long>(c.codes),
                  static_cast<long long>(c.dim), static_cast<long long>(r), problem.c_str());
    }
  }
}

}  // namespace

int main() {
  std::vector<Which> kernels;
  if (fastvq::avx2::available()) kernels.push_back(Which::Avx2);
  if (fastvq::avx512::available()) kernels.push_back(Which::Avx512);
  if (fastvq::avx512::bf16_available()) kernels.push_back(Which::Avx512Bf16);
  if (kernels.empty()) {
    std::printf("no direct kernel runs on this CPU\n");
    return 77;
  }
  const Case cases[] = {{1, 1, 1, false},  {5, 3, 2, false},   {14, 33, 3, false},  {29, 70, 17, true},
                        {30, 100, 64, true}, {7, 513, 70, false}, {43, 64, 33, true}};
  int checked = 0;
  for (const Which which : kernels) {
    uint32_t seed = 1;
    for (const Case& c : cases) {
      Case run = c;
      run.bf16_values = run.bf16_values || which == Which::Avx512Bf16;
      check(which, run, seed++);
      ++checked;
      if (which != Which::Avx512Bf16 && !run.bf16_values) {
        for (const int64_t k : {int64_t{1}, int64_t{2}, int64_t{7}, int64_t{64}}) {
          if (k > c.codes) continue;
          check_topk(which, run, k, seed++);
          ++checked;
        }
      }
    }
    std::printf("%s: checked\n", name(which));
  }
  std::printf("%d cases, %d failures\n", checked, failures);
  return failures == 0 ? 0 : 1;
}
