// torchopt_ext::optim::SpikeGuard: the raw global-norm clip in front of any
// LibTorch optimizer, permissive (clip and step) and strict (skip the step).
#include <gtest/gtest.h>
#include <torch/torch.h>
#include <torchopt_ext/torchopt_ext.h>

#include <vector>

#include "test_utils.h"

namespace {

namespace optim = torchopt_ext::optim;
using namespace torchopt_ext::testing;
using Tensors = std::vector<torch::Tensor>;

double global_norm(const Tensors& ts) {
  double sum = 0.0;
  for (const auto& t : ts) {
    sum += t.to(torch::kFloat64).square().sum().item<double>();
  }
  return std::sqrt(sum);
}

// Every third step's grads are 100x larger: spikes for max_norm 100 (make_params'
// 1563 elements give norms near 40 otherwise).
std::vector<Tensors> spiky_grads(const Tensors& params, int steps) {
  auto grads = make_grads(params, steps, 4);
  for (int k = 2; k < steps; k += 3) {
    for (auto& g : grads[k]) {
      g.mul_(100.0);
    }
  }
  return grads;
}

TEST(SpikeGuard, PermissiveIsTheOptimizerOnClippedGrads) {
  auto a = make_params(torch::kFloat64);
  auto b = clone_all(a);
  optim::SpikeGuard guard(std::make_shared<optim::AdamW>(a, optim::AdamWOptions(1e-2)),
                          optim::SpikeGuardOptions(100.0));
  optim::AdamW plain(b, optim::AdamWOptions(1e-2));
  const auto grads = spiky_grads(a, 9);
  for (const auto& step : grads) {
    const double norm = global_norm(step);
    for (size_t i = 0; i < a.size(); ++i) {
      a[i].mutable_grad() = step[i].clone();
      b[i].mutable_grad() = norm > 100.0 ? step[i] * (100.0 / norm) : step[i].clone();
    }
    guard.step();
    EXPECT_EQ(guard.last_spike(), norm > 100.0);
    EXPECT_FALSE(guard.last_skipped());
    if (norm > 100.0) {
      Tensors after;
      for (auto& p : a) {
        after.push_back(p.grad());
      }
      EXPECT_NEAR(global_norm(after), 100.0, 1e-12);
    }
    plain.step();
  }
  expect_close_within(a, b, 1e-12, 1e-14, "guarded vs clipped by hand");
  EXPECT_EQ(guard.num_spikes(), 3);
}

TEST(SpikeGuard, StrictSkipsTheWholeStep) {
  auto params = make_params(torch::kFloat32);
  auto base = std::make_shared<optim::AdamW>(params, optim::AdamWOptions(1e-2).weight_decay(0.1));
  optim::SpikeGuard guard(base, optim::SpikeGuardOptions(100.0).permissive(false));
  const auto grads = spiky_grads(params, 3);
  run(*base, params, {grads[0], grads[1]});
  const auto before = clone_all(params);
  const auto& state = static_cast<const optim::AdamParamState&>(*base->state().at(params[0].unsafeGetTensorImpl()));
  const auto exp_avg = state.exp_avg().clone();
  for (size_t i = 0; i < params.size(); ++i) {
    params[i].mutable_grad() = grads[2][i].clone();
  }
  guard.step();
  EXPECT_TRUE(guard.last_skipped());
  expect_bitwise_equal(params, before);
  EXPECT_TRUE(torch::equal(state.exp_avg(), exp_avg));
  EXPECT_EQ(state.step().item<float>(), 2.0f);
  EXPECT_EQ(guard.num_skipped(), 1);
}

TEST(SpikeGuard, BadOptionsThrowNamingTheArgument) {
  auto params = make_params(torch::kFloat32);
  expect_throws_mentioning(
      [&] { optim::SpikeGuard g(std::make_shared<optim::AdamW>(params), optim::SpikeGuardOptions(0.0)); }, "max_norm");
  expect_throws_mentioning([&] { optim::SpikeGuard g(nullptr, optim::SpikeGuardOptions(1.0)); }, "optimizer");
}

}  // namespace
