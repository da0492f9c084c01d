// fastvq::parallel_for: the parallel loop of every C++ CPU kernel, a drop-in for at::parallel_for
// (same arguments, same body signature) that degrades gracefully on a loaded machine.
//
// at::parallel_for on PyTorch's OpenMP build gives each thread one static share of [begin, end) and
// joins them at a barrier: when the OS deschedules one thread (another process wants the core), the
// caller waits for that thread's whole share, spinning (libgomp spins ~3 ms before it sleeps), and a
// search that takes 0.6-2 ms on one thread took 30-150 ms on two beside a busy process; PyTorch's own
// OpenMP regions cost as much, since waking libgomp's sleeping thread took ~20 ms there (docs/benchmarks.md).
// This loop instead:
// - runs on the calling thread alone, with no thread woken, when [begin, end) is at most `grain`
//   indices or num_threads() is 1, as at::parallel_for does (the callers' grains say how many
//   indices are worth a wake-up);
// - otherwise cuts the range into small chunks (at least `grain` indices, about kChunksPerThread per
//   thread) that the caller and up to threads - 1 helpers of a pool of its own claim one at a time
//   from an atomic counter: a descheduled helper holds at most the one chunk it is running, and the
//   others take the rest;
// - never waits for a helper that has not claimed a chunk: the caller returns as soon as every chunk
//   is done, so a helper that wakes late finds nothing to do (join-free), and the caller is never
//   held by a thread the OS has not run yet;
// - waits for a running chunk by spinning for about two of
//   this call's chunk durations, the time a running helper needs to finish one, and only then sleeping on
//   a condition variable: a caller that slept while its helper finished a 50 us chunk must itself be woken
//   and rescheduled, which a loaded machine delays by up to a scheduler slice; idle helpers sleep (they
//   never spin between calls);
// - backs off by time, not by size, where that wait showed a descheduled helper (a "stall", measured and
//   remembered as the stall cost: about one scheduler slice, whatever the chunk size), and wherever the
//   kernel counts as many runnable threads as CPUs (a helper would then take turns with them, and the caller
//   be preempted for a slice at a time). Such a cautious call runs its first chunk on the caller alone and
//   posts helpers only where that chunk's time says the rest of its work exceeds the stall cost: then a
//   stall can at most about double it (the caller does the rest meanwhile). So a search of tens of ms keeps
//   both threads, and a call that takes less than a stall runs on the caller and never waits on a
//   descheduled helper.
// The body sees the chunks as at::parallel_for's body sees its shares: any number of calls per thread,
// each on a disjoint [chunk_begin, chunk_end), every index exactly once. A body must not depend on
// which thread runs it (at::get_thread_num() is 0 in a helper): results are then the same for every
// thread count and schedule. Inside a body BLAS runs on one thread and a nested fastvq::parallel_for
// runs inline. The first exception a body throws is rethrown on the caller once every claimed chunk
// is done; the chunks not yet claimed are skipped. After fork() the child starts a new pool.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <pthread.h>
#ifdef _OPENMP
#include <omp.h>
#endif

// MKL's per-thread thread count (exported by libtorch_cpu on x86-64 wheels); weak, so null elsewhere.
extern "C" int MKL_Set_Num_Threads_Local(int nt) __attribute__((weak));

namespace fastvq {
namespace parallel_detail {

// Chunks per thread a parallel range is cut into: enough that the others absorb a descheduled thread's
// share, few enough that the claims (one atomic add each) and the bodies' per-call set-up stay small.
constexpr int64_t kChunksPerThread = 8;
// How long the caller, out of chunks, spins for a helper's running chunk before it sleeps: two of this call's
// chunk durations (a running helper finishes its chunk within one), at least kMinSpinNs (the cost of a
// sleep and a wake-up, which a loaded machine turns into a scheduler slice) and at most kMaxSpinNs (past
// that the helper is descheduled, and the caller's core is better given up to it).
constexpr int64_t kMinSpinNs = 20'000;
constexpr int64_t kMaxSpinNs = 1'000'000;
// A stall: the caller, out of chunks, waited for a helper's chunk longer than a quarter of its own work (a
// chunk is at most an eighth of a thread's share, so a running helper finishes within that) and longer than
// kMinStallNs: a helper descheduled mid-chunk, which costs about a scheduler slice on a loaded machine.
constexpr int64_t kMinStallNs = 500'000;
// The stall cost a cautious call weighs its remaining work against: kDefaultStallCostNs until a stall is seen
// (about the 4 ms tick on which the scheduler preempts a running thread for a waiting one), then the stalls'
// running mean (weight 1/4 for the newest), at least kMinStallNs and at most kMaxStallCostNs, so that one freak
// wait (a helper preempted for 100 ms) does not take the helpers from every call of tens of ms.
constexpr int64_t kDefaultStallCostNs = 4'000'000;
constexpr int64_t kMaxStallCostNs = 20'000'000;
// Calls are cautious for kBackoffNs after a stall, and whenever /proc/loadavg, read at most every
// kLoadSampleNs, counts no fewer runnable threads than CPUs (no core is free for a helper: a helper then
// takes turns with the other threads, and the caller is preempted for a slice at a time, stall or not).
// FASTVQ_CPU_BACKOFF=0 turns both off.
constexpr int64_t kBackoffNs = 2'000'000'000;
constexpr int64_t kLoadSampleNs = 5'000'000;

inline int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

inline std::atomic<int64_t>& backoff_until_ns() {
  static std::atomic<int64_t> until{0};
  return until;
}

inline std::atomic<int64_t>& stall_cost_ns() {
  static std::atomic<int64_t> cost{kDefaultStallCostNs};
  return cost;
}

// Records a stall of `waited` ns seen at `now`: the stall cost's running mean and a new back-off window.
inline void record_stall(int64_t waited, int64_t now) {
  const int64_t previous = stall_cost_ns().load(std::memory_order_relaxed);
  const int64_t mean = backoff_until_ns().load(std::memory_order_relaxed) == 0 ? waited : (3 * previous + waited) / 4;
  stall_cost_ns().store(std::clamp<int64_t>(mean, kMinStallNs, kMaxStallCostNs), std::memory_order_relaxed);
  backoff_until_ns().store(now + kBackoffNs, std::memory_order_relaxed);
}

// Whether every CPU has a runnable thread (this one included) by the kernel's instantaneous count, the
// fourth field of /proc/loadavg ("runnable/total"); false where it cannot be read.
inline bool read_no_cpu_free() {
  FILE* file = std::fopen("/proc/loadavg", "r");
  if (file == nullptr) return false;
  double load1 = 0, load5 = 0, load15 = 0;
  long runnable = 0;
  const int fields = std::fscanf(file, "%lf %lf %lf %ld/", &load1, &load5, &load15, &runnable);
  std::fclose(file);
  const long cpus = static_cast<long>(std::thread::hardware_concurrency());
  return fields == 4 && cpus > 0 && runnable >= cpus;
}

// read_no_cpu_free() at most every kLoadSampleNs (a read costs a few microseconds, a parallel call at least tens).
inline bool no_cpu_free(int64_t now) {
  static std::atomic<int64_t> sampled_at{std::numeric_limits<int64_t>::min() / 2};
  static std::atomic<bool> busy{false};
  if (now - sampled_at.load(std::memory_order_relaxed) >= kLoadSampleNs) {
    busy.store(read_no_cpu_free(), std::memory_order_relaxed);
    sampled_at.store(now, std::memory_order_relaxed);
  }
  return busy.load(std::memory_order_relaxed);
}

// Whether this call must be cautious (see the file comment): within kBackoffNs of a stall, or while no CPU is free.
inline bool cautious(int64_t now) {
  return now < backoff_until_ns().load(std::memory_order_relaxed) || no_cpu_free(now);
}

inline bool backoff_enabled() {
  const char* setting = std::getenv("FASTVQ_CPU_BACKOFF");
  return setting == nullptr || std::string(setting) != "0";
}

// One call's shared state. Helpers hold it by shared_ptr, so a helper that wakes after the caller
// returned touches only this, never the caller's stack; `body` is read only by the holder of a
// claimed chunk, and the caller does not return while a claimed chunk is running.
struct Loop {
  int64_t begin = 0, end = 0, chunk = 1, num_chunks = 0;
  const std::function<void(int64_t, int64_t)>* body = nullptr;
  std::atomic<int64_t> next_chunk{0};
  std::atomic<int64_t> done_chunks{0};
  std::atomic<int> helper_slots{0};  // helpers still wanted; a woken helper beyond them goes back to sleep
  std::atomic<bool> failed{false};
  std::exception_ptr error;  // the first exception, written once under `mutex`
  std::mutex mutex;
  std::condition_variable all_done;
};

inline thread_local bool in_loop_body = false;

// Runs `body` the way every chunk runs: marked as inside a loop (nested loops run inline) and with
// MKL on this thread alone (as inside an OpenMP region, where MKL runs sequentially).
inline void run_body(const std::function<void(int64_t, int64_t)>& body, int64_t begin, int64_t end) {
  const bool was_in_body = in_loop_body;
  in_loop_body = true;
  const int previous_mkl = MKL_Set_Num_Threads_Local != nullptr ? MKL_Set_Num_Threads_Local(1) : 0;
  try {
    body(begin, end);
  } catch (...) {
    if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(previous_mkl);
    in_loop_body = was_in_body;
    throw;
  }
  if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(previous_mkl);
  in_loop_body = was_in_body;
}

// Claims and runs one chunk; false when none was left. Used by the caller and by every helper.
inline bool run_one_chunk(Loop& loop) {
  const int64_t chunk = loop.next_chunk.fetch_add(1, std::memory_order_relaxed);
  if (chunk >= loop.num_chunks) return false;
  if (!loop.failed.load(std::memory_order_relaxed)) {
    const int64_t chunk_begin = loop.begin + chunk * loop.chunk;
    try {
      run_body(*loop.body, chunk_begin, std::min(loop.end, chunk_begin + loop.chunk));
    } catch (...) {
      std::lock_guard<std::mutex> lock(loop.mutex);
      if (!loop.failed.exchange(true)) loop.error = std::current_exception();
    }
  }
  if (loop.done_chunks.fetch_add(1, std::memory_order_acq_rel) + 1 == loop.num_chunks) {
    std::lock_guard<std::mutex> lock(loop.mutex);  // under the mutex: the caller cannot miss the notify
    loop.all_done.notify_all();
  }
  return true;
}

// Claims and runs chunks until none is left; returns how many this thread ran.
inline int64_t run_chunks(Loop& loop) {
  int64_t ran = 0;
  while (run_one_chunk(loop)) ++ran;
  return ran;
}

// The helpers: threads that sleep until a loop is posted, then claim its chunks. The pool grows to the
// most helpers a call asked for and is never destroyed (its threads are detached and sleep at exit).
class Pool {
 public:
  static Pool& instance() {
    static std::once_flag registered;
    std::call_once(registered, [] { pthread_atfork(nullptr, nullptr, [] { current() = new Pool(); }); });
    Pool*& pool = current();
    if (pool == nullptr) {
      static std::mutex creating;
      std::lock_guard<std::mutex> lock(creating);
      if (pool == nullptr) pool = new Pool();
    }
    return *pool;
  }

  // Offers `loop` to `helpers` helpers, starting threads up to that many.
  void post(const std::shared_ptr<Loop>& loop, int helpers) {
    loop->helper_slots.store(helpers, std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      while (static_cast<int>(threads_started_) < helpers) {
        std::thread(&Pool::serve, this).detach();
        ++threads_started_;
      }
      posted_ = loop;
      ++generation_;
    }
    wake_.notify_all();
  }

 private:
  // The live pool; a fork's child (which has none of the parent's threads) gets a new one. The old one
  // is leaked on purpose: its mutex may have been held by a thread that does not exist in the child.
  static Pool*& current() {
    static Pool* pool = nullptr;
    return pool;
  }

  void serve() {
    // An OpenMP region opened in a body on this thread must not start a team: the count is set to 1 after
    // PyTorch's per-thread initialisation (run by at::get_num_threads()), which would set it back.
    at::get_num_threads();
#ifdef _OPENMP
    omp_set_num_threads(1);
#endif
    uint64_t seen = 0;
    for (;;) {
      std::shared_ptr<Loop> loop;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        loop = posted_;
      }
      if (loop && loop->helper_slots.fetch_sub(1, std::memory_order_relaxed) > 0) run_chunks(*loop);
    }
  }

  std::mutex mutex_;
  std::condition_variable wake_;
  std::shared_ptr<Loop> posted_;
  uint64_t generation_ = 0;
  size_t threads_started_ = 0;
};

// The thread count an op's loops use while SerialTorchOps holds this thread's OpenMP count at 1; 0 outside one.
inline thread_local int guarded_threads = 0;

}  // namespace parallel_detail

// The threads fastvq::parallel_for uses on this thread: at::get_num_threads(), also inside a SerialTorchOps.
inline int num_threads() {
  return parallel_detail::guarded_threads > 0 ? parallel_detail::guarded_threads : at::get_num_threads();
}

// Held by an op's entry point for the whole call: the PyTorch ops it runs on this thread (allocations, fills,
// dtype conversions) run inline instead of in an OpenMP region, whose wake-up of libgomp's sleeping threads
// took ~20 ms on a loaded 2-core machine even for a 64 Ki-element fill, while fastvq::parallel_for and
// num_threads() keep the caller's thread count. It sets this thread's OpenMP count (a per-thread setting, which
// at::get_num_threads() reads) to 1 and restores it on exit; without OpenMP it changes nothing.
class SerialTorchOps {
 public:
  SerialTorchOps() : outer_guarded_(parallel_detail::guarded_threads), threads_(at::get_num_threads()) {
    if (outer_guarded_ == 0) parallel_detail::guarded_threads = threads_;
#ifdef _OPENMP
    omp_set_num_threads(1);
#endif
  }
  ~SerialTorchOps() {
#ifdef _OPENMP
    omp_set_num_threads(threads_);
#endif
    parallel_detail::guarded_threads = outer_guarded_;
  }
  SerialTorchOps(const SerialTorchOps&) = delete;
  SerialTorchOps& operator=(const SerialTorchOps&) = delete;

 private:
  int outer_guarded_;
  int threads_;  // at::get_num_threads() on entry (it also runs PyTorch's per-thread lazy initialisation first)
};

// at::parallel_for's contract on fastvq's own pool: f(chunk_begin, chunk_end) over disjoint chunks that
// cover [begin, end) exactly once; see the file comment for the threading policy.
template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  using namespace parallel_detail;
  if (begin >= end) return;
  const int64_t range = end - begin;
  grain = std::max<int64_t>(grain, 1);
  const int64_t threads = std::min<int64_t>(num_threads(), (range + grain - 1) / grain);
  const std::function<void(int64_t, int64_t)> body = std::cref(f);
  if (threads <= 1 || in_loop_body || at::in_parallel_region()) {
    run_body(body, begin, end);
    return;
  }
  auto loop = std::make_shared<Loop>();
  loop->begin = begin;
  loop->end = end;
  loop->chunk = std::max(grain, (range + threads * kChunksPerThread - 1) / (threads * kChunksPerThread));
  loop->num_chunks = (range + loop->chunk - 1) / loop->chunk;
  loop->body = &body;
  const int64_t start = now_ns();
  const bool backoff = backoff_enabled();
  int64_t caller_chunks = 0;
  if (backoff && cautious(start)) {
    // Cautious: the caller runs the first chunk alone, and the rest too unless that chunk's time says the
    // rest takes longer than a stall.
    run_one_chunk(*loop);
    caller_chunks = 1;
    if (loop->error) std::rethrow_exception(loop->error);
    const int64_t rest = (now_ns() - start) * (loop->num_chunks - 1);
    if (rest < stall_cost_ns().load(std::memory_order_relaxed)) {
      run_body(body, begin + loop->chunk, end);
      return;
    }
  }
  Pool::instance().post(loop, static_cast<int>(threads - 1));
  caller_chunks += run_chunks(*loop);
  const int64_t ran_out = now_ns();
  const int64_t spin_ns =
      std::clamp<int64_t>(2 * (ran_out - start) / std::max<int64_t>(caller_chunks, 1), kMinSpinNs, kMaxSpinNs);
  while (loop->done_chunks.load(std::memory_order_acquire) < loop->num_chunks && now_ns() - ran_out < spin_ns) {
    // No sched_yield(): on a loaded machine it hands the core to whichever thread waits, a busy competitor
    // included, for its whole slice (and the switch counts as a preemption of this thread).
    for (int pause = 0; pause < 64; ++pause) {
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#endif
    }
  }
  {
    std::unique_lock<std::mutex> lock(loop->mutex);
    loop->all_done.wait(lock, [&] { return loop->done_chunks.load(std::memory_order_acquire) == loop->num_chunks; });
  }
  // Every chunk was claimed and is done: no helper reads `body` again.
  const int64_t finished = now_ns();
  const int64_t waited = finished - ran_out;
  if (backoff && waited > std::max((ran_out - start) / 4, kMinStallNs)) record_stall(waited, finished);
  if (loop->error) std::rethrow_exception(loop->error);
}

}  // namespace fastvq
