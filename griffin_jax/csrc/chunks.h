// Work split into chunks, run on the calling thread and XLA's CPU thread pool (the FFI
// kernels of `griffin_jax/cpu_kernels.py`).
//
// Chunks are handed out from a shared counter. The calling thread takes chunks too and then
// waits only for chunks another thread has started, so a helper task that reaches a busy pool
// late finds nothing left and returns: no wait on a task that has not run.

#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>

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

// Runs run(0) .. run(count - 1), on this thread and on up to count - 1 of the pool's; returns
// once every one has finished. `run` may refer to the caller's stack: it is never called after
// this returns (a late helper finds no chunk left).
inline void RunChunks(xla::ffi::ThreadPool& pool, int64_t count,
                      std::function<void(int64_t)> run) {
  if (count <= 1) {
    if (count == 1) run(0);
    return;
  }
  auto chunks = std::make_shared<Chunks>();
  chunks->count = count;
  chunks->run = std::move(run);
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  for (int64_t t = 1; t < std::min(threads, count); ++t) pool.Schedule([chunks] { chunks->Take(); });
  chunks->Take();
  while (chunks->finished.load(std::memory_order_acquire) < count) std::this_thread::yield();
}

}  // namespace griffin
