// What every torchopt_ext LibTorch optimizer inherits: per-group options that
// survive LibTorch's add_param_group (torch >= 2.10 drops custom options),
// closures, LR schedulers and option validation with named arguments.
#include <gtest/gtest.h>
#include <torch/torch.h>
#include <torchopt_ext/torchopt_ext.h>

#include <memory>

#include "test_utils.h"

namespace {

namespace optim = torchopt_ext::optim;
using namespace torchopt_ext::testing;

TEST(OptimizerBase, GroupOptionsFromTheConstructorSurvive) {
  auto params = make_params(torch::kFloat64);
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(std::vector<torch::Tensor>{params[0]});
  groups.emplace_back(std::vector<torch::Tensor>{params[1], params[2]},
                      std::make_unique<optim::AdamOptions>(optim::AdamWOptions(5e-3).weight_decay(0.3)));
  optim::AdamW opt(groups, optim::AdamWOptions(1e-2));
  const auto& second = static_cast<const optim::AdamOptions&>(opt.param_groups()[1].options());
  EXPECT_EQ(second.lr(), 5e-3);
  EXPECT_EQ(second.weight_decay(), 0.3);
  const auto& first = static_cast<const optim::AdamOptions&>(opt.param_groups()[0].options());
  EXPECT_EQ(first.lr(), 1e-2);
}

TEST(OptimizerBase, EachGroupStepsWithItsOwnOptions) {
  auto params = make_params(torch::kFloat64);
  auto alone = clone_all(params);
  const auto grads = make_grads(params, 20);
  optim::SGD grouped({params[0], params[1]}, optim::SGDOptions(0.05).momentum(0.9));
  grouped.add_param_group(torch::optim::OptimizerParamGroup(
      {params[2]}, std::make_unique<optim::SGDOptions>(optim::SGDOptions(0.01).momentum(0.5).weight_decay(0.1))));
  run(grouped, params, grads);

  std::vector<torch::Tensor> first_two = {alone[0], alone[1]};
  std::vector<torch::Tensor> last = {alone[2]};
  optim::SGD first_opt(first_two, optim::SGDOptions(0.05).momentum(0.9));
  optim::SGD last_opt(last, optim::SGDOptions(0.01).momentum(0.5).weight_decay(0.1));
  for (const auto& step : grads) {
    first_two[0].mutable_grad() = step[0].clone();
    first_two[1].mutable_grad() = step[1].clone();
    last[0].mutable_grad() = step[2].clone();
    first_opt.step();
    last_opt.step();
  }
  expect_bitwise_equal(params, {first_two[0], first_two[1], last[0]});
}

TEST(OptimizerBase, ClosureRunsWithGradAndReturnsLoss) {
  auto w = torch::randn({4}, torch::requires_grad());
  optim::Adam opt({w}, optim::AdamOptions(0.1));
  const auto target = torch::ones({4});
  const double before = (w.detach() - target).pow(2).sum().item<double>();
  auto loss = opt.step([&] {
    opt.zero_grad();
    EXPECT_TRUE(torch::GradMode::is_enabled());
    auto l = (w - target).pow(2).sum();
    l.backward();
    return l;
  });
  EXPECT_DOUBLE_EQ(loss.item<double>(), before);
  EXPECT_LT((w.detach() - target).pow(2).sum().item<double>(), before);
}

TEST(OptimizerBase, StepLRScheduleMatchesLibTorchAdamW) {
  auto ours_params = make_params(torch::kFloat64);
  auto theirs_params = clone_all(ours_params);
  optim::AdamW ours(ours_params, optim::AdamWOptions(1e-2));
  torch::optim::AdamW theirs(theirs_params, torch::optim::AdamWOptions(1e-2));
  torch::optim::StepLR ours_sched(ours, 3, 0.5);
  torch::optim::StepLR theirs_sched(theirs, 3, 0.5);
  const auto grads = make_grads(ours_params, 12);
  for (const auto& step : grads) {
    for (size_t i = 0; i < step.size(); ++i) {
      ours_params[i].mutable_grad() = step[i].clone();
      theirs_params[i].mutable_grad() = step[i].clone();
    }
    ours.step();
    theirs.step();
    ours_sched.step();
    theirs_sched.step();
  }
  EXPECT_DOUBLE_EQ(ours.param_groups()[0].options().get_lr(), theirs.param_groups()[0].options().get_lr());
  EXPECT_LT(ours.param_groups()[0].options().get_lr(), 1e-2);
  expect_close(ours_params, theirs_params);
}

TEST(OptimizerBase, BadOptionsNameTheArgument) {
  auto params = make_params(torch::kFloat32);
  expect_error_naming([&] { optim::Adam(params, optim::AdamOptions(-1.0)); }, "lr");
  expect_error_naming([&] { optim::Adam(params, optim::AdamOptions().eps(-1e-8)); }, "eps");
  expect_error_naming([&] { optim::AdamW(params, optim::AdamWOptions().betas({1.0, 0.999})); }, "betas[0]");
  expect_error_naming([&] { optim::AdamW(params, optim::AdamWOptions().betas({0.9, -0.1})); }, "betas[1]");
  expect_error_naming([&] { optim::AdamW(params, optim::AdamWOptions().weight_decay(-0.1)); }, "weight_decay");
  expect_error_naming([&] { optim::SGD(params, optim::SGDOptions(0.1).nesterov(true)); }, "nesterov");
  expect_error_naming([&] { optim::SGD(params, optim::SGDOptions(0.1).momentum(-1)); }, "momentum");
  expect_error_naming([&] { optim::SGD(params, optim::SGDOptions(0.1).dampening(2)); }, "dampening");
  expect_error_naming([&] { optim::Adam(params, optim::AdamOptions().state_dtype(torch::kInt32)); }, "state_dtype");
}

TEST(OptimizerBase, BadGroupAddedLaterIsRejected) {
  auto params = make_params(torch::kFloat32);
  optim::SGD opt({params[0]}, optim::SGDOptions(0.1));
  expect_error_naming(
      [&] {
        opt.add_param_group(torch::optim::OptimizerParamGroup(
            {params[1]}, std::make_unique<optim::SGDOptions>(optim::SGDOptions(0.1).weight_decay(-1))));
      },
      "weight_decay");
}

TEST(OptimizerBase, SparseGradientsAreRejected) {
  auto p = torch::zeros({5});
  optim::AdamW opt({p});
  p.mutable_grad() = torch::sparse_coo_tensor(torch::tensor({{1, 3}}), torch::tensor({1.0f, 2.0f}), {5});
  expect_error_naming([&] { opt.step(); }, "sparse");
}

TEST(OptimizerBase, StateIsCreatedLazilyOnlyForParamsWithGrads) {
  auto params = make_params(torch::kFloat32);
  optim::AdamW opt(params);
  EXPECT_TRUE(opt.state().empty());
  params[1].mutable_grad() = torch::randn_like(params[1]);
  opt.step();
  EXPECT_EQ(opt.state().size(), 1u);
  const auto& state = static_cast<const optim::AdamParamState&>(*opt.state().at(params[1].unsafeGetTensorImpl()));
  EXPECT_EQ(state.step().item<float>(), 1.0f);
  EXPECT_FALSE(state.max_exp_avg_sq().defined());
}

}  // namespace
