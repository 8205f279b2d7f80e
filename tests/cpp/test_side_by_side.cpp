// common::run_side_by_side: every unit runs exactly once whatever the thread
// count and costs; in order where it must stay serial (one thread, not the
// CPU, inside a parallel region); the caller's thread-local state (inference
// mode) reaches the workers; an error in a unit reaches the caller.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <gtest/gtest.h>

#include <atomic>
#include <mutex>
#include <stdexcept>
#include <vector>

#include "torchopt_ext/common/side_by_side.h"

namespace {

using torchopt_ext::common::run_side_by_side;

// Restores the intra-op thread count a test changes.
struct Threads {
  int saved = at::get_num_threads();
  explicit Threads(int n) { at::set_num_threads(n); }
  ~Threads() { at::set_num_threads(saved); }
};

std::vector<int> run_counts(const std::vector<double>& costs, bool cpu) {
  std::vector<std::atomic<int>> runs(costs.size());
  run_side_by_side(costs, cpu, [&](size_t u) { runs[u].fetch_add(1); });
  std::vector<int> out;
  for (auto& r : runs) {
    out.push_back(r.load());
  }
  return out;
}

TEST(SideBySide, EveryUnitRunsOnce) {
  const std::vector<std::vector<double>> cases = {{},
                                                  {1.0},
                                                  {1.0, 1.0, 1.0, 1.0},
                                                  {100.0, 1.0, 1.0},  // one unit above an even share runs alone first
                                                  {5.0, 4.0, 3.0, 2.0, 1.0},  // longest-first assignment
                                                  {0.0, 0.0, 7.0, 0.0, 2.0, 2.0}};
  for (const int threads : {1, 2, 3}) {
    Threads guard(threads);
    for (const auto& costs : cases) {
      for (const bool cpu : {true, false}) {
        EXPECT_EQ(run_counts(costs, cpu), std::vector<int>(costs.size(), 1))
            << "threads " << threads << ", " << costs.size() << " units, cpu " << cpu;
      }
    }
  }
}

std::vector<size_t> run_order(const std::vector<double>& costs, bool cpu) {
  std::mutex lock;
  std::vector<size_t> order;
  run_side_by_side(costs, cpu, [&](size_t u) {
    std::lock_guard<std::mutex> held(lock);
    order.push_back(u);
  });
  return order;
}

TEST(SideBySide, SerialWhereItMustBe) {
  const std::vector<double> costs = {1.0, 3.0, 2.0, 5.0};
  const std::vector<size_t> in_order = {0, 1, 2, 3};
  {
    Threads guard(1);
    EXPECT_EQ(run_order(costs, true), in_order);
  }
  Threads guard(2);
  EXPECT_EQ(run_order(costs, false), in_order);  // not the CPU (CUDA streams keep their order)
  // Inside a parallel region (two units side by side, the library's own
  // OpenMP region: this test is not built with OpenMP) the inner call runs
  // its units in order on the calling thread.
  std::vector<std::vector<size_t>> nested(2);
  run_side_by_side({1.0, 1.0}, true, [&](size_t u) { nested[u] = run_order(costs, true); });
  EXPECT_EQ(nested[0], in_order);
  EXPECT_EQ(nested[1], in_order);
}

TEST(SideBySide, WorkersSeeTheCallersInferenceMode) {
  Threads guard(2);
  const std::vector<double> costs = {1.0, 1.0, 1.0, 1.0};
  std::vector<std::atomic<int>> enabled(costs.size());
  {
    c10::InferenceMode inference;
    run_side_by_side(costs, true, [&](size_t u) { enabled[u] = c10::InferenceMode::is_enabled() ? 1 : 0; });
  }
  for (auto& e : enabled) {
    EXPECT_EQ(e.load(), 1);
  }
  // And tensors made and written there are usable by the caller.
  std::vector<at::Tensor> made(costs.size());
  run_side_by_side(costs, true, [&](size_t u) { made[u] = at::full({4}, static_cast<double>(u)).mul_(2.0); });
  for (size_t u = 0; u < made.size(); ++u) {
    EXPECT_TRUE(made[u].equal(at::full({4}, 2.0 * static_cast<double>(u))));
  }
}

TEST(SideBySide, ErrorsReachTheCaller) {
  for (const int threads : {1, 2}) {
    Threads guard(threads);
    EXPECT_THROW(run_side_by_side({1.0, 1.0, 1.0}, true,
                                  [](size_t u) {
                                    if (u == 1) {
                                      throw std::runtime_error("unit 1 failed");
                                    }
                                  }),
                 std::runtime_error);
  }
}

}  // namespace
