// Work split into chunks, run on the calling thread and on helper threads (the FFI kernels of
// `griffin_jax/cpu_kernels.py`).
//
// Chunks are handed out from a shared counter. The calling thread takes chunks too and then
// waits only for chunks another thread has started, so a helper that arrives late finds
// nothing left and returns: no wait on a thread that has not woken.
//
// The helpers are the library's own threads, one fewer than the CPUs this process may run on.
// After each job a helper polls for the next one for `kSpinMicros` before it sleeps: a forward
// calls the kernels every few microseconds, and a helper woken from sleep (as XLA's CPU pool's
// are) arrives ~10-50 us late, after a decode's products (5-20 us each) have finished on the
// calling thread alone. One caller holds the helpers at a time; another caller meanwhile runs
// its chunks alone. `GRIFFIN_CPU_THREADS=xla` hands chunks to XLA's pool instead, and so does
// `cpu_kernels.set_chunk_threads("xla")` from then on ("helpers" back, None as the variable says).

#pragma once

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace griffin {

struct Chunks {
  int64_t count = 0;
  std::function<void(int64_t)> run;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> finished{0};

  void Take() {
    for (int64_t c; (c = next.fetch_add(1)) < count;) {
      run(c);
      finished.fetch_add(1, std::memory_order_release);
    }
  }
};

inline void Pause() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#else
  std::this_thread::yield();
#endif
}

// Where chunks go: -1 = as `GRIFFIN_CPU_THREADS` says (read once), 0 = the helpers, 1 = XLA's
// pool. `GriffinSetChunkThreads` (`cpu_kernels.set_chunk_threads`) changes it at run time, for
// the calls that start after it; a call's chunks and bits do not depend on it.
inline std::atomic<int>& ChunkThreads() {
  static std::atomic<int> choice{-1};
  return choice;
}

// Whether chunks go to XLA's pool rather than the helpers.
inline bool UseXlaPool() {
  static const bool env_xla = [] {
    const char* choice = std::getenv("GRIFFIN_CPU_THREADS");
    return choice && std::strcmp(choice, "xla") == 0;
  }();
  const int choice = ChunkThreads().load(std::memory_order_relaxed);
  return choice < 0 ? env_xla : choice == 1;
}

class Helpers {
 public:
  static constexpr int64_t kSpinMicros = 300;

  // The process's helpers, started at first use and never stopped (they sleep when idle).
  static Helpers& Get() {
    static Helpers* helpers = new Helpers();  // never destroyed: threads outlive exit's dtors
    return *helpers;
  }

  int64_t count() const { return static_cast<int64_t>(threads_.size()); }

  // Offers `job` to the helpers; false where another caller holds them (or there are none).
  bool TryPost(std::shared_ptr<Chunks> job) {
    if (threads_.empty() || busy_.exchange(true, std::memory_order_acquire)) return false;
    std::atomic_store(&job_, std::move(job));
    generation_.fetch_add(1);
    if (sleeping_.load() > 0) {
      std::lock_guard<std::mutex> lock(mu_);
      wake_.notify_all();
    }
    return true;
  }

  // The caller's job has finished: the helpers may take another caller's.
  void Done() {
    std::atomic_store(&job_, std::shared_ptr<Chunks>());
    busy_.store(false, std::memory_order_release);
  }

 private:
  // Built at the first call that chunks on the helpers (`Get`): a process whose calls all chunk
  // on XLA's pool starts none.
  Helpers() {
    cpu_set_t set;
    int cpus = 1;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) cpus = CPU_COUNT(&set);
    for (int i = 1; i < cpus; ++i) threads_.emplace_back([this] { Loop(); });
    for (auto& t : threads_) t.detach();
  }

  void Loop() {
    uint64_t seen = 0;
    for (;;) {
      const auto start = std::chrono::steady_clock::now();
      int64_t polls = 0;
      while (generation_.load() == seen) {
        Pause();
        if (++polls % 64 != 0) continue;
        // Every 64 polls (~5 us) the core goes to any other thread waiting for it: XLA's pool
        // runs some fusions split in two, and its thread would otherwise wait on this one's
        // time slice (a 5-row embedding gather took 40 us instead of 15).
        std::this_thread::yield();
        if (std::chrono::steady_clock::now() - start > std::chrono::microseconds(kSpinMicros)) {
          std::unique_lock<std::mutex> lock(mu_);
          sleeping_.fetch_add(1);
          wake_.wait(lock, [&] { return generation_.load() != seen; });
          sleeping_.fetch_sub(1);
        }
      }
      seen = generation_.load();
      if (auto job = std::atomic_load(&job_)) job->Take();
    }
  }

  std::vector<std::thread> threads_;
  std::shared_ptr<Chunks> job_;
  std::atomic<bool> busy_{false};
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> sleeping_{0};
  std::mutex mu_;
  std::condition_variable wake_;
};

// Threads a kernel may split its work between: the caller and the helpers (or XLA's pool).
inline int64_t Threads(xla::ffi::ThreadPool& pool) {
  if (UseXlaPool()) return std::max<int64_t>(1, pool.num_threads());
  return 1 + Helpers::Get().count();
}

// Runs run(0) .. run(count - 1), on this thread and on the helpers (or up to count - 1 of
// XLA's pool threads); returns once every one has finished. `run` may refer to the caller's
// stack: it is never called after this returns (a late helper finds no chunk left). With
// `split` false (a call too small to share) every chunk runs here, in order.
inline void RunChunks(xla::ffi::ThreadPool& pool, int64_t count,
                      std::function<void(int64_t)> run, bool split = true) {
  if (count <= 1 || !split) {
    for (int64_t c = 0; c < count; ++c) run(c);
    return;
  }
  auto chunks = std::make_shared<Chunks>();
  chunks->count = count;
  chunks->run = std::move(run);
  bool posted = false;
  if (UseXlaPool()) {
    const int64_t threads = std::max<int64_t>(1, pool.num_threads());
    for (int64_t t = 1; t < std::min(threads, count); ++t)
      pool.Schedule([chunks] { chunks->Take(); });
  } else {
    posted = Helpers::Get().TryPost(chunks);
  }
  chunks->Take();
  while (chunks->finished.load(std::memory_order_acquire) < count) Pause();
  if (posted) Helpers::Get().Done();
}

}  // namespace griffin
