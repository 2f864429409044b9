// Dynamic task scheduling over ATen's intra-op threads, shared by the attention and float32
// linear kernels (attention.cpp, linear_f32.cpp); part of each one's build key
// (kernels/cpu/build.py).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace radixserve_tasks {

// Runs body(t, buffers) for t = 0 .. n - 1 on the intra-op threads, each thread taking the next
// task from a shared counter as it finishes one, so that tasks of unequal cost, or a thread the
// OS deschedules, do not leave the other threads idle as a static split of the range would.
// `make_buffers()` gives each thread its scratch. Where every task writes only its own outputs,
// the result does not depend on which thread ran it.
template <typename MakeBuffers, typename Body>
void for_each_task(int64_t n, const MakeBuffers& make_buffers, const Body& body) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    auto buffers = make_buffers();
    for (int64_t t = next.fetch_add(1); t < n; t = next.fetch_add(1)) body(t, buffers);
  });
}

}  // namespace radixserve_tasks
