#include "torchopt_ext/common/side_by_side.h"

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>

namespace torchopt_ext::common {

void run_side_by_side(const std::vector<double>& costs, bool cpu, const std::function<void(size_t)>& fn) {
  const size_t n = costs.size();
  const auto threads = static_cast<size_t>(at::get_num_threads());
  if (!cpu || threads < 2 || n < 2 || at::in_parallel_region()) {
    for (size_t u = 0; u < n; ++u) {
      fn(u);
    }
    return;
  }
  std::vector<size_t> order(n);
  for (size_t u = 0; u < n; ++u) {
    order[u] = u;
  }
  // Largest first (ties in index order, so the schedule is deterministic).
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return costs[a] > costs[b]; });
  double left = 0.0;
  for (const double c : costs) {
    left += c;
  }
  // A unit above an even share cannot be balanced against the rest: it runs
  // alone with every thread (its GEMMs split) before the side-by-side part.
  size_t first = 0;
  for (; first < n && n - first >= 2 && costs[order[first]] * static_cast<double>(threads) > left; ++first) {
    fn(order[first]);
    left -= costs[order[first]];
  }
  if (n - first < 2) {
    for (; first < n; ++first) {
      fn(order[first]);
    }
    return;
  }
  // Longest-processing-time assignment of the rest to the threads.
  const size_t lanes = std::min(threads, n - first);
  std::vector<std::vector<size_t>> lane(lanes);
  std::vector<double> load(lanes, 0.0);
  for (size_t k = first; k < n; ++k) {
    const auto least = static_cast<size_t>(std::min_element(load.begin(), load.end()) - load.begin());
    lane[least].push_back(order[k]);
    load[least] += costs[order[k]];
  }
  // Worker threads get the caller's thread-local state (grad / inference
  // mode, dispatch keys), as at::launch does.
  const at::ThreadLocalState state;
  at::parallel_for(0, static_cast<int64_t>(lanes), 1, [&](int64_t lo, int64_t hi) {
    at::ThreadLocalStateGuard guard(state);
    for (int64_t l = lo; l < hi; ++l) {
      for (const size_t u : lane[l]) {
        fn(u);
      }
    }
  });
}

}  // namespace torchopt_ext::common
