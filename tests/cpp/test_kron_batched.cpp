// Kron's batch_equal_shapes in LibTorch: equal-shape params (and stacked
// slices) updated as one bmm batch agree with the one-at-a-time loop (same
// draws in the same order, so only rounding differs), for every geometry;
// the option survives a checkpoint.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <string>
#include <vector>

#include "test_utils.h"
#include "torchopt_ext/optim/kron.h"

namespace {

using namespace torchopt_ext;
using namespace torchopt_ext::testing;

std::vector<torch::Tensor> run_kron(const std::vector<torch::Tensor>& init, const optim::KronOptions& options,
                                    std::vector<torch::Tensor>* factors) {
  std::vector<torch::Tensor> params;
  for (const auto& p : init) {
    params.push_back(p.clone());
  }
  optim::Kron opt(params, options);
  run(opt, params, make_grads(params, 6));
  for (const auto& p : params) {
    factors->push_back(static_cast<const optim::KronParamState&>(*opt.state().at(p.unsafeGetTensorImpl())).Q().clone());
  }
  return params;
}

class KronBatchedModes : public ::testing::TestWithParam<std::string> {};

TEST_P(KronBatchedModes, EqualShapesBatchedMatchesPerParam) {
  torch::manual_seed(0);
  // Equal shapes interleaved with other shapes: the draws stay in param order.
  const std::vector<torch::Tensor> init{torch::randn({5, 4}, torch::kFloat64), torch::randn({7}, torch::kFloat64),
                                        torch::randn({5, 4}, torch::kFloat64), torch::randn({3, 2, 2}, torch::kFloat64),
                                        torch::randn({5, 4}, torch::kFloat64)};
  const auto base =
      optim::KronOptions(0.02).preconditioner_update_probability(1.0).preconditioner_mode(GetParam()).seed(4);
  std::vector<torch::Tensor> q_batched, q_loop;
  const auto batched = run_kron(init, optim::KronOptions(base).batch_equal_shapes(true), &q_batched);
  const auto loop = run_kron(init, optim::KronOptions(base).batch_equal_shapes(false), &q_loop);
  for (size_t i = 0; i < init.size(); ++i) {
    EXPECT_LE((batched[i] - loop[i]).abs().max().item<double>(), 1e-12) << GetParam() << " param " << i;
    EXPECT_LE((q_batched[i] - q_loop[i]).abs().max().item<double>(), 1e-12) << GetParam() << " factors " << i;
  }
  // The params moved: the comparison is not between two untouched copies.
  EXPECT_GT((batched[0] - init[0]).abs().max().item<double>(), 1e-4);
}

INSTANTIATE_TEST_SUITE_P(Geometries, KronBatchedModes,
                         ::testing::Values("Q0.5EQ1.5", "EQ", "QUAD", "NS", "EXP", "TAYLOR2", "HYPER"));

TEST(KronBatched, StackedBatchedMatchesSliceLoop) {
  torch::manual_seed(1);
  const std::vector<torch::Tensor> init{torch::randn({4, 6, 3}, torch::kFloat64)};
  const auto base = optim::KronOptions(0.02).preconditioner_update_probability(1.0).stacked(true).seed(2);
  std::vector<torch::Tensor> q_batched, q_loop;
  const auto batched =
      run_kron(init, optim::KronOptions(base).batch_equal_shapes(true).stacked_chunk_size(3), &q_batched);
  const auto loop = run_kron(init, optim::KronOptions(base).batch_equal_shapes(false), &q_loop);
  EXPECT_LE((batched[0] - loop[0]).abs().max().item<double>(), 1e-12);
  EXPECT_LE((q_batched[0] - q_loop[0]).abs().max().item<double>(), 1e-12);
}

TEST(KronBatched, CheckpointKeepsBatchEqualShapes) {
  std::vector<torch::Tensor> params{torch::randn({6, 5}), torch::randn({6, 5}), torch::randn({7})};
  const auto options = optim::KronOptions(0.01).batch_equal_shapes(false).seed(3);
  check_checkpoint_round_trip<optim::Kron, optim::KronOptions, optim::KronParamState>(
      options, optim::KronOptions(0.5).batch_equal_shapes(true).seed(8), params, 3, 3);
}

}  // namespace
