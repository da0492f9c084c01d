// The FMA-throughput probe behind the benchmarks' `fraction_of_peak`: how many fp32 flops a second
// this machine's cores retire in fused multiply-adds (or, for AVX512-BF16, in vdpbf16ps), measured
// rather than taken from a data sheet, since clocks, SMT, virtualisation and AVX-512 frequency
// licences all move the real ceiling.
//
// Each thread runs independent accumulator chains, more of them than the FMA latency times the
// FMA pipes (4 cycles x 2 pipes on current x86 cores), on register operands only, so nothing but
// the FMA units limits it. The threads start together and the figure is the total flop count over
// the wall time of the slowest.
#include "../fastvq.h"

#include "simd.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <string>
#include <thread>
#include <vector>

namespace fastvq {
namespace {

#ifdef FASTVQ_X86_KERNELS

// Chains per thread: 12 ymm (with the two operands, 14 of AVX2's 16 registers; more would spill),
// 16 zmm of AVX-512's 32.
constexpr int kChainsAvx2 = 12;
constexpr int kChains = 16;

// Flops per iteration: chains x lanes x 2 (multiply and add); vdpbf16ps does two products a lane.
FASTVQ_TARGET("avx2,fma")
double fma_avx2(int64_t iterations, float multiplier) {
  __m256 chains[kChainsAvx2];
  const __m256 factor = _mm256_set1_ps(multiplier), offset = _mm256_set1_ps(1e-3f);
  for (int c = 0; c < kChainsAvx2; ++c) chains[c] = _mm256_set1_ps(static_cast<float>(c));
  for (int64_t i = 0; i < iterations; ++i) {
#pragma GCC unroll 12
    for (int c = 0; c < kChainsAvx2; ++c) chains[c] = _mm256_fmadd_ps(chains[c], factor, offset);
  }
  float sink = 0, lanes[8];
  for (int c = 0; c < kChainsAvx2; ++c) {
    _mm256_storeu_ps(lanes, chains[c]);
    sink += lanes[0];
  }
  return sink;
}

FASTVQ_TARGET("avx512f")
double fma_avx512(int64_t iterations, float multiplier) {
  __m512 chains[kChains];
  const __m512 factor = _mm512_set1_ps(multiplier), offset = _mm512_set1_ps(1e-3f);
  for (int c = 0; c < kChains; ++c) chains[c] = _mm512_set1_ps(static_cast<float>(c));
  for (int64_t i = 0; i < iterations; ++i) {
#pragma GCC unroll 16
    for (int c = 0; c < kChains; ++c) chains[c] = _mm512_fmadd_ps(chains[c], factor, offset);
  }
  double sink = 0;
  for (int c = 0; c < kChains; ++c) sink += _mm512_reduce_add_ps(chains[c]);
  return sink;
}

FASTVQ_TARGET("avx512f,avx512bf16")
double dot_avx512bf16(int64_t iterations, float) {
  __m512 chains[kChains];
  // bf16 0.001 in both operands: the sums grow by 2e-6 a step and stay normal and finite.
  const __m512bh operand = (__m512bh)_mm512_set1_epi32(0x3a833a83);
  for (int c = 0; c < kChains; ++c) chains[c] = _mm512_set1_ps(static_cast<float>(c));
  for (int64_t i = 0; i < iterations; ++i) {
#pragma GCC unroll 16
    for (int c = 0; c < kChains; ++c) chains[c] = _mm512_dpbf16_ps(chains[c], operand, operand);
  }
  double sink = 0;
  for (int c = 0; c < kChains; ++c) sink += _mm512_reduce_add_ps(chains[c]);
  return sink;
}

#endif

struct Probe {
  double (*run)(int64_t, float);
  double flops_per_iteration;
};

Probe probe_for(const std::string& isa) {
#ifdef FASTVQ_X86_KERNELS
  if (isa == "avx2") {
    TORCH_CHECK_VALUE(FASTVQ_CPU_SUPPORTS("avx2") && FASTVQ_CPU_SUPPORTS("fma"), "this CPU has no AVX2 + FMA");
    return {fma_avx2, kChainsAvx2 * 8 * 2.0};
  }
  if (isa == "avx512f") {
    TORCH_CHECK_VALUE(FASTVQ_CPU_SUPPORTS("avx512f"), "this CPU has no AVX-512F");
    return {fma_avx512, kChains * 16 * 2.0};
  }
  if (isa == "avx512bf16") {
    TORCH_CHECK_VALUE(FASTVQ_CPU_SUPPORTS("avx512f") && FASTVQ_CPU_SUPPORTS("avx512bf16"),
                      "this CPU has no AVX512-BF16");
    return {dot_avx512bf16, kChains * 16 * 2 * 2.0};
  }
#endif
  TORCH_CHECK_VALUE(false, "cpu_peak_gflops: isa must be avx2, avx512f or avx512bf16 (on x86-64), got '", isa, "'");
}

}  // namespace

double cpu_peak_gflops(const std::string& isa, int64_t threads, int64_t iterations) {
  TORCH_CHECK_VALUE(threads >= 1 && iterations >= 1, "cpu_peak_gflops needs threads >= 1 and iterations >= 1, got ",
                    threads, " and ", iterations);
  const Probe probe = probe_for(isa);
  std::atomic<int64_t> ready{0};
  std::atomic<bool> go{false};
  std::vector<double> sinks(threads);
  std::vector<std::thread> workers;
  for (int64_t t = 0; t < threads; ++t) {
    workers.emplace_back([&, t] {
      ready.fetch_add(1);
      while (!go.load(std::memory_order_acquire)) {
      }
      sinks[t] = probe.run(iterations, 0.999f);
    });
  }
  while (ready.load() < threads) {
  }
  const auto start = std::chrono::steady_clock::now();
  go.store(true, std::memory_order_release);
  for (auto& worker : workers) worker.join();
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  // Read into a volatile: the chains' results are used, so the compiler may not drop them.
  volatile double total = 0;
  for (const double sink : sinks) total = total + sink;
  return probe.flops_per_iteration * static_cast<double>(iterations) * static_cast<double>(threads) / seconds / 1e9;
}

std::string cpu_isa() {
  std::string isa;
#ifdef FASTVQ_X86_KERNELS
  if (FASTVQ_CPU_SUPPORTS("avx2") && FASTVQ_CPU_SUPPORTS("fma")) isa += "\"avx2\", ";
  if (FASTVQ_CPU_SUPPORTS("avx512f")) isa += "\"avx512f\", ";
  if (FASTVQ_CPU_SUPPORTS("avx512f") && FASTVQ_CPU_SUPPORTS("avx512bf16")) isa += "\"avx512bf16\", ";
#endif
  return "[" + (isa.empty() ? isa : isa.substr(0, isa.size() - 2)) + "]";
}

}  // namespace fastvq
