#pragma once

// A minimal parallel loop on std::thread. Not OpenMP: ONNX Runtime keeps its own thread pool in
// the same process, and a second spinning OpenMP pool would fight it for the cores.

#include <algorithm>
#include <cstdint>
#include <exception>
#include <thread>
#include <vector>

namespace safron::detail {

// 0 means one thread per hardware thread.
inline int resolve_thread_count(int requested) {
  if (requested > 0) return requested;
  return static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
}

// Calls body(chunk_begin, chunk_end) on contiguous chunks of [begin, end), one chunk per thread,
// the last on the calling thread. Contiguous chunks let a body own whole output rows, so
// overlapping patches never make two threads write the same pixel. Rethrows the first exception.
template <class Body>
void parallel_for(std::int64_t begin, std::int64_t end, int num_threads, const Body& body) {
  const std::int64_t items = end - begin;
  if (items <= 0) return;
  const std::int64_t chunks = std::min<std::int64_t>(std::max(num_threads, 1), items);
  if (chunks == 1) {
    body(begin, end);
    return;
  }
  const auto chunk_start = [&](std::int64_t chunk) { return begin + items * chunk / chunks; };
  std::vector<std::exception_ptr> errors(static_cast<std::size_t>(chunks));
  const auto run_chunk = [&](std::int64_t chunk) {
    try {
      body(chunk_start(chunk), chunk_start(chunk + 1));
    } catch (...) {
      errors[static_cast<std::size_t>(chunk)] = std::current_exception();
    }
  };
  {
    std::vector<std::thread> workers;
    workers.reserve(static_cast<std::size_t>(chunks - 1));
    // Joins on leaving the scope, even when starting a thread throws, so no worker outlives the
    // state it uses.
    struct JoinAll {
      std::vector<std::thread>& threads;
      ~JoinAll() {
        for (auto& thread : threads) thread.join();
      }
    } join_all{workers};
    for (std::int64_t chunk = 0; chunk + 1 < chunks; ++chunk)
      workers.emplace_back(run_chunk, chunk);
    run_chunk(chunks - 1);
  }
  for (const auto& error : errors) {
    if (error) std::rethrow_exception(error);
  }
}

}  // namespace safron::detail
