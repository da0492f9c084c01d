// torch.ops.fastvq_C.parallel_for_coverage: fastvq::parallel_for (parallel.h) run on a counting body,
// so that tests/backends/test_cpu_threads.py can check what every kernel relies on: each index of the
// range is visited exactly once, in chunks of at least `grain` indices (the last may be shorter), an
// exception thrown by a body reaches the caller, and a helper stalled mid-chunk makes small loops back off;
// torch.ops.fastvq_C.parallel_for_backoff_state: what the back-off has learnt (and a reset for the tests).
#include "parallel.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

namespace fastvq {
namespace {

// (visits int64 [end - begin]: how many times the body saw each index, chunks int64 [calls, 3]: every body
// call's chunk_begin, chunk_end and 1 where a helper (not the caller) ran it, in the order they started).
// Each index costs `spin` loop steps, so that helpers get to claim chunks; the body throws on index
// `throw_at` when it is in the range; a chunk run by a helper first sleeps `helper_sleep_us` (a stall).
std::tuple<at::Tensor, at::Tensor> parallel_for_coverage(int64_t begin, int64_t end, int64_t grain, int64_t spin,
                                                         int64_t throw_at, int64_t helper_sleep_us) {
  TORCH_CHECK(begin <= end, "parallel_for_coverage: begin ", begin, " > end ", end);
  TORCH_CHECK(spin >= 0, "parallel_for_coverage: spin must be >= 0, got ", spin);
  std::vector<std::atomic<int64_t>> visits(static_cast<size_t>(end - begin));
  std::mutex chunks_mutex;
  std::vector<std::array<int64_t, 3>> chunks;
  const std::thread::id caller = std::this_thread::get_id();
  fastvq::parallel_for(begin, end, grain, [&](int64_t chunk_begin, int64_t chunk_end) {
    const bool on_helper = std::this_thread::get_id() != caller;
    {
      std::lock_guard<std::mutex> lock(chunks_mutex);
      chunks.push_back({chunk_begin, chunk_end, on_helper ? 1 : 0});
    }
    if (on_helper && helper_sleep_us > 0) std::this_thread::sleep_for(std::chrono::microseconds(helper_sleep_us));
    for (int64_t index = chunk_begin; index < chunk_end; ++index) {
      TORCH_CHECK(index != throw_at, "parallel_for_coverage: thrown at index ", index);
      volatile int64_t sink = 0;  // the work: a loop the compiler must not remove
      for (int64_t step = 0; step < spin; ++step) sink = sink + step;
      visits[static_cast<size_t>(index - begin)].fetch_add(1, std::memory_order_relaxed);
    }
  });
  at::Tensor visit_counts = at::empty({end - begin}, at::kLong);
  for (int64_t i = 0; i < end - begin; ++i) visit_counts[i] = visits[static_cast<size_t>(i)].load();
  at::Tensor chunk_table = at::empty({static_cast<int64_t>(chunks.size()), 3}, at::kLong);
  int64_t* table = chunk_table.data_ptr<int64_t>();
  for (size_t i = 0; i < chunks.size(); ++i) std::copy(chunks[i].begin(), chunks[i].end(), table + 3 * i);
  return {visit_counts, chunk_table};
}

// (the stall cost the back-off weighs a cautious call's remaining work against, in ns; the ns left of the
// window after the last stall, 0 where none is running; calls are also cautious while no CPU is free): what the
// back-off has learnt. `reset` first forgets every stall, as a new process would, so that a test starts from the
// quiet state.
std::tuple<int64_t, int64_t> parallel_for_backoff_state(bool reset) {
  using namespace parallel_detail;
  if (reset) {
    backoff_until_ns().store(0, std::memory_order_relaxed);
    stall_cost_ns().store(kDefaultStallCostNs, std::memory_order_relaxed);
  }
  const int64_t until = backoff_until_ns().load(std::memory_order_relaxed);
  return {stall_cost_ns().load(std::memory_order_relaxed), until == 0 ? 0 : std::max<int64_t>(0, until - now_ns())};
}

}  // namespace
}  // namespace fastvq

TORCH_LIBRARY_FRAGMENT(fastvq_C, m) {
  m.def("parallel_for_coverage(int begin, int end, int grain, int spin, int throw_at, int helper_sleep_us) -> "
        "(Tensor, Tensor)", &fastvq::parallel_for_coverage);
  m.def("parallel_for_backoff_state(bool reset) -> (int, int)", &fastvq::parallel_for_backoff_state);
}
