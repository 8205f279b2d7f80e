// WSD schedule in LibTorch: rollfast's boundary values, shapes, per-group
// peaks with our optimizers and torch::optim ones, and option validation.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <numbers>
#include <vector>

#include "torchopt_ext/optim/adam.h"
#include "torchopt_ext/schedules/wsd.h"

namespace {

using torchopt_ext::schedules::WSD;
using torchopt_ext::schedules::WSDOptions;
using torchopt_ext::schedules::WSDShape;

std::vector<double> lrs_over(torch::optim::Optimizer& opt, WSD& sched, int steps, size_t group = 0) {
  std::vector<double> out;
  for (int k = 0; k < steps; ++k) {
    out.push_back(opt.param_groups()[group].options().get_lr());
    sched.step();
  }
  return out;
}

TEST(WSD, RollfastBoundaryValues) {
  auto p = torch::zeros({2}, torch::requires_grad());
  torch::optim::SGD opt({p}, torch::optim::SGDOptions(1.0));
  WSD sched(opt, WSDOptions(20).warmup_fraction(0.1).decay_fraction(0.2).final_lr_ratio(0.1));
  const auto lrs = lrs_over(opt, sched, 20);
  EXPECT_NEAR(lrs[0], 1.0 / 3.0, 1e-15);
  EXPECT_LT(lrs[1], 1.0);
  EXPECT_EQ(lrs[2], 1.0);
  EXPECT_EQ(lrs[16], 1.0);
  EXPECT_LT(lrs[17], 1.0);
  EXPECT_NEAR(lrs[19], 0.1, 1e-15);
}

TEST(WSD, CosineDecayAndHoldAfterTheEnd) {
  WSDOptions options(11);
  options.warmup_steps(0).decay_steps(10).decay_shape(WSDShape::Cosine).final_lr_ratio(0.25);
  // Decay starts after step 1 and spans steps 2..10 (x = (k - 1) / 9).
  for (int64_t k = 2; k <= 10; ++k) {
    const double x = static_cast<double>(k - 1) / 9.0;
    const double expected = 0.25 + 0.75 * (1.0 - 0.5 * (1.0 - std::cos(std::numbers::pi * x)));
    EXPECT_NEAR(torchopt_ext::schedules::wsd_lr_factor(k, options), expected, 1e-15) << k;
  }
  EXPECT_DOUBLE_EQ(torchopt_ext::schedules::wsd_lr_factor(25, options), 0.25);
}

TEST(WSD, ExponentialAndPowerWarmup) {
  WSDOptions exp_options(100);
  exp_options.warmup_steps(9).warmup_shape(WSDShape::Exponential).exponential_rate(5.0);
  WSDOptions pow_options(100);
  pow_options.warmup_steps(9).warmup_shape(WSDShape::Power).warmup_power(2.0);
  for (int64_t k = 0; k <= 9; ++k) {
    const double x = static_cast<double>(k + 1) / 10.0;
    EXPECT_NEAR(torchopt_ext::schedules::wsd_lr_factor(k, exp_options), std::expm1(5.0 * x) / std::expm1(5.0), 1e-15);
    EXPECT_NEAR(torchopt_ext::schedules::wsd_lr_factor(k, pow_options), x * x, 1e-15);
  }
}

TEST(WSD, EachGroupScalesItsOwnPeakWithOurOptimizer) {
  auto a = torch::zeros({3}, torch::requires_grad());
  auto b = torch::zeros({3}, torch::requires_grad());
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(std::vector<torch::Tensor>{a},
                      std::make_unique<torchopt_ext::optim::AdamOptions>(torchopt_ext::optim::AdamOptions(0.1)));
  groups.emplace_back(std::vector<torch::Tensor>{b},
                      std::make_unique<torchopt_ext::optim::AdamOptions>(torchopt_ext::optim::AdamOptions(0.02)));
  torchopt_ext::optim::Adam opt(groups);
  WSDOptions options(10);
  options.warmup_steps(1).decay_steps(2);
  WSD sched(opt, options);
  for (int64_t k = 0; k < 10; ++k) {
    const double factor = torchopt_ext::schedules::wsd_lr_factor(k, options);
    EXPECT_DOUBLE_EQ(opt.param_groups()[0].options().get_lr(), 0.1 * factor) << k;
    EXPECT_DOUBLE_EQ(opt.param_groups()[1].options().get_lr(), 0.02 * factor) << k;
    EXPECT_EQ(sched.last_step(), k);
    a.mutable_grad() = torch::ones({3});
    b.mutable_grad() = torch::ones({3});
    opt.step();
    sched.step();
  }
}

TEST(WSD, InvalidOptionsNameTheArgument) {
  auto p = torch::zeros({1}, torch::requires_grad());
  torch::optim::SGD opt({p}, torch::optim::SGDOptions(0.1));
  auto expect_error = [&](const WSDOptions& options, const std::string& argument) {
    try {
      WSD sched(opt, options);
      ADD_FAILURE() << "no error for " << argument;
    } catch (const c10::ValueError& e) {
      EXPECT_NE(std::string(e.what()).find("invalid " + argument), std::string::npos) << e.what();
    }
    EXPECT_EQ(opt.param_groups()[0].options().get_lr(), 0.1);
  };
  expect_error(WSDOptions(0), "total_steps");
  expect_error(WSDOptions(10).warmup_fraction(1.5), "warmup_fraction");
  expect_error(WSDOptions(10).decay_fraction(-0.5), "decay_fraction");
  expect_error(WSDOptions(10).warmup_steps(6).decay_steps(5), "warmup_steps + decay_steps");
  expect_error(WSDOptions(10).warmup_steps(-1), "warmup_steps");
  expect_error(WSDOptions(10).final_lr_ratio(1.5), "final_lr_ratio");
  expect_error(WSDOptions(10).warmup_power(0.0), "warmup_power");
  expect_error(WSDOptions(10).decay_power(-2.0), "decay_power");
  expect_error(WSDOptions(10).exponential_rate(0.0), "exponential_rate");
  EXPECT_THROW(torchopt_ext::schedules::parse_wsd_shape("cubic", "decay_shape"), c10::ValueError);
  EXPECT_EQ(torchopt_ext::schedules::parse_wsd_shape("CoSiNe", "decay_shape"), WSDShape::Cosine);
}

}  // namespace
