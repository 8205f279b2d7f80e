// white_kron_randn must be at::randn bit for bit (the WhiteKron draws are
// replayed by the float64 reference with torch.randn), at 1 and 2 threads.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <gtest/gtest.h>

#include "torchopt_ext/functional/white_kron_randn.h"

namespace {

using torchopt_ext::functional::white_kron_randn;

TEST(WhiteKronRandn, BitwiseAtenRandnAndSameGeneratorState) {
  const int threads = at::get_num_threads();
  for (int t : {1, 2}) {
    at::set_num_threads(t);
    // Multiples of 16 (the parallel path), others (at::randn itself), and
    // a run of draws on one generator, as a step makes them.
    const std::vector<std::vector<int64_t>> shapes = {{16},   {3, 8, 8},     {5, 4, 8}, {7},
                                                      {3, 5}, {2, 256, 256}, {1, 4, 9}};
    auto ours = at::make_generator<at::CPUGeneratorImpl>(1234);
    auto theirs = at::make_generator<at::CPUGeneratorImpl>(1234);
    for (const auto& shape : shapes) {
      const at::Tensor a = white_kron_randn(ours, shape);
      const at::Tensor b = at::randn(shape, theirs, at::TensorOptions().dtype(at::kDouble));
      ASSERT_TRUE(at::equal(a, b)) << "shape " << at::IntArrayRef(shape) << ", threads " << t;
      // Not a constant: the draws look Gaussian.
      if (a.numel() >= 1024) {
        EXPECT_NEAR(a.mean().item<double>(), 0.0, 0.05);
        EXPECT_NEAR(a.std().item<double>(), 1.0, 0.05);
      }
    }
    // Both generators end in the same state.
    EXPECT_TRUE(at::equal(at::randn({32}, ours, at::kDouble), at::randn({32}, theirs, at::kDouble)));
  }
  at::set_num_threads(threads);
}

}  // namespace
