// Param groups with their own options, through the constructor and through
// add_param_group (LibTorch >= 2.10 replaces the options of optimizer types it
// does not know with the defaults; OptimizerBase must undo that), and closures.
#include <gtest/gtest.h>
#include <torch/torch.h>
#include <torchopt_ext/torchopt_ext.h>

#include <memory>
#include <string>
#include <vector>

#include "test_utils.h"

namespace {

namespace optim = torchopt_ext::optim;
using namespace torchopt_ext::testing;
using Tensors = std::vector<torch::Tensor>;

template <typename Options>
const Options& options_of(const torch::optim::Optimizer& opt, size_t group) {
  return static_cast<const Options&>(opt.param_groups().at(group).options());
}

// Two groups, {17x33, 1001} with `first` and {0-d} with `second`, built
// through the constructor or added one by one to an empty optimizer; their
// options must survive and each group must step exactly as a single-group
// optimizer with that group's options.
template <typename Optimizer, typename Options>
void check_two_groups(bool via_add_param_group, const Options& defaults, const Options& first, const Options& second) {
  ASSERT_FALSE(first == defaults);
  ASSERT_FALSE(second == defaults);
  ASSERT_NE(first.lr(), second.lr());
  ASSERT_NE(first.weight_decay(), second.weight_decay());
  auto params = make_params(torch::kFloat64);
  auto alone = clone_all(params);
  const auto grads = make_grads(params, 20);

  std::unique_ptr<Optimizer> grouped;
  if (via_add_param_group) {
    grouped = std::make_unique<Optimizer>(std::vector<torch::optim::OptimizerParamGroup>{}, defaults);
    grouped->add_param_group(
        torch::optim::OptimizerParamGroup(Tensors{params[0], params[1]}, std::make_unique<Options>(first)));
    grouped->add_param_group(torch::optim::OptimizerParamGroup(Tensors{params[2]}, std::make_unique<Options>(second)));
  } else {
    std::vector<torch::optim::OptimizerParamGroup> groups;
    groups.emplace_back(Tensors{params[0], params[1]}, std::make_unique<Options>(first));
    groups.emplace_back(Tensors{params[2]}, std::make_unique<Options>(second));
    grouped = std::make_unique<Optimizer>(groups, defaults);
  }
  ASSERT_EQ(grouped->param_groups().size(), 2u);
  EXPECT_EQ(options_of<Options>(*grouped, 0).lr(), first.lr());
  EXPECT_EQ(options_of<Options>(*grouped, 0).weight_decay(), first.weight_decay());
  EXPECT_EQ(options_of<Options>(*grouped, 1).lr(), second.lr());
  EXPECT_EQ(options_of<Options>(*grouped, 1).weight_decay(), second.weight_decay());
  EXPECT_TRUE(options_of<Options>(*grouped, 0) == first);
  EXPECT_TRUE(options_of<Options>(*grouped, 1) == second);
  EXPECT_TRUE(static_cast<const Options&>(grouped->defaults()) == defaults);
  run(*grouped, params, grads);
  // Still the caller's options after stepping.
  EXPECT_TRUE(options_of<Options>(*grouped, 0) == first);
  EXPECT_TRUE(options_of<Options>(*grouped, 1) == second);

  Tensors first_params = {alone[0], alone[1]};
  Tensors second_params = {alone[2]};
  Optimizer first_opt(first_params, first);
  Optimizer second_opt(second_params, second);
  for (const auto& step : grads) {
    first_params[0].mutable_grad() = step[0].clone();
    first_params[1].mutable_grad() = step[1].clone();
    second_params[0].mutable_grad() = step[2].clone();
    first_opt.step();
    second_opt.step();
  }
  expect_bitwise_equal(params, {first_params[0], first_params[1], second_params[0]});
}

const auto kAdamDefaults = optim::AdamOptions(1e-3);
const auto kAdamFirst = optim::AdamOptions(2e-2).weight_decay(0.1).amsgrad(true).betas({0.8, 0.99});
const auto kAdamSecond = optim::AdamOptions(5e-3).weight_decay(0.02).decoupled_weight_decay(true).eps(1e-6);

TEST(ParamGroups, AdamGroupOptionsSurviveTheConstructor) {
  check_two_groups<optim::Adam>(false, kAdamDefaults, kAdamFirst, kAdamSecond);
}

TEST(ParamGroups, AdamGroupOptionsSurviveAddParamGroup) {
  check_two_groups<optim::Adam>(true, kAdamDefaults, kAdamFirst, kAdamSecond);
}

TEST(ParamGroups, AdamWGroupOptionsSurviveTheConstructor) {
  check_two_groups<optim::AdamW, optim::AdamOptions>(false, optim::AdamWOptions(),
                                                     optim::AdamWOptions(1e-2).weight_decay(0.3).amsgrad(true),
                                                     optim::AdamWOptions(3e-2).weight_decay(0.0).maximize(true));
}

TEST(ParamGroups, AdamWGroupOptionsSurviveAddParamGroup) {
  check_two_groups<optim::AdamW, optim::AdamOptions>(true, optim::AdamWOptions(),
                                                     optim::AdamWOptions(1e-2).weight_decay(0.3).amsgrad(true),
                                                     optim::AdamWOptions(3e-2).weight_decay(0.0).maximize(true));
}

const auto kSGDDefaults = optim::SGDOptions(0.1);
const auto kSGDFirst = optim::SGDOptions(0.05).momentum(0.9).dampening(0.2).weight_decay(0.01);
const auto kSGDSecond = optim::SGDOptions(0.01).momentum(0.5).nesterov(true).weight_decay(0.1);

TEST(ParamGroups, SGDGroupOptionsSurviveTheConstructor) {
  check_two_groups<optim::SGD>(false, kSGDDefaults, kSGDFirst, kSGDSecond);
}

TEST(ParamGroups, SGDGroupOptionsSurviveAddParamGroup) {
  check_two_groups<optim::SGD>(true, kSGDDefaults, kSGDFirst, kSGDSecond);
}

TEST(ParamGroups, GroupWithoutOptionsGetsItsOwnCopyOfTheDefaults) {
  auto params = make_params(torch::kFloat32);
  const auto defaults = optim::AdamWOptions(4e-3).weight_decay(0.2).amsgrad(true);
  optim::AdamW opt(std::vector<torch::optim::OptimizerParamGroup>{torch::optim::OptimizerParamGroup({params[0]})},
                   defaults);
  opt.add_param_group(torch::optim::OptimizerParamGroup({params[1]}));
  opt.add_param_group(
      torch::optim::OptimizerParamGroup({params[2]}, std::make_unique<optim::AdamOptions>(optim::AdamWOptions(1.0))));
  EXPECT_TRUE(options_of<optim::AdamOptions>(opt, 0) == defaults);
  EXPECT_TRUE(options_of<optim::AdamOptions>(opt, 1) == defaults);
  EXPECT_EQ(options_of<optim::AdamOptions>(opt, 2).lr(), 1.0);
  // Changing one group's lr leaves the other groups and the defaults alone.
  opt.param_groups()[0].options().set_lr(0.5);
  EXPECT_EQ(options_of<optim::AdamOptions>(opt, 0).lr(), 0.5);
  EXPECT_EQ(options_of<optim::AdamOptions>(opt, 1).lr(), 4e-3);
  EXPECT_EQ(static_cast<const optim::AdamOptions&>(opt.defaults()).lr(), 4e-3);
}

TEST(ParamGroups, WrongOptionsTypeIsRejected) {
  auto params = make_params(torch::kFloat32);
  optim::Adam adam({params[0]});
  expect_throws_mentioning(
      [&] {
        adam.add_param_group(torch::optim::OptimizerParamGroup(
            {params[1]}, std::make_unique<optim::SGDOptions>(optim::SGDOptions(0.1))));
      },
      "options");
  optim::SGD sgd({params[0]}, optim::SGDOptions(0.1));
  expect_throws_mentioning(
      [&] {
        sgd.add_param_group(torch::optim::OptimizerParamGroup(
            {params[1]}, std::make_unique<torch::optim::SGDOptions>(torch::optim::SGDOptions(0.1))));
      },
      "options");
}

TEST(ParamGroups, InvalidGroupOptionsAreRejected) {
  auto params = make_params(torch::kFloat32);
  optim::Adam adam({params[0]});
  expect_throws_mentioning(
      [&] {
        adam.add_param_group(torch::optim::OptimizerParamGroup(
            {params[1]}, std::make_unique<optim::AdamOptions>(optim::AdamOptions().betas({0.9, 1.5}))));
      },
      "betas[1]");
  expect_throws_mentioning(
      [&] {
        std::vector<torch::optim::OptimizerParamGroup> groups;
        groups.emplace_back(Tensors{params[0]});
        groups.emplace_back(Tensors{params[1]}, std::make_unique<optim::SGDOptions>(optim::SGDOptions(-1.0)));
        optim::SGD sgd(groups, optim::SGDOptions(0.1));
      },
      "lr");
  expect_throws_mentioning(
      [&] {
        std::vector<torch::optim::OptimizerParamGroup> groups;
        groups.emplace_back(Tensors{params[0]},
                            std::make_unique<optim::AdamOptions>(optim::AdamWOptions().weight_decay(-1.0)));
        optim::AdamW adamw(groups);
      },
      "weight_decay");
}

// A rejected group must not stay behind: otherwise the optimizer keeps a
// group with the invalid options and every later step() throws.
TEST(ParamGroups, RejectedGroupIsNotAdded) {
  auto params = make_params(torch::kFloat32);
  optim::SGD sgd({params[0]}, optim::SGDOptions(0.1));
  EXPECT_THROW(sgd.add_param_group(torch::optim::OptimizerParamGroup(
                   {params[1]}, std::make_unique<optim::SGDOptions>(optim::SGDOptions(-1.0)))),
               c10::Error);
  EXPECT_THROW(sgd.add_param_group(torch::optim::OptimizerParamGroup(
                   {params[2]}, std::make_unique<optim::AdamOptions>(optim::AdamOptions(0.1)))),
               c10::Error);
  EXPECT_EQ(sgd.param_groups().size(), 1u);
  for (auto& p : params) {
    p.mutable_grad() = torch::ones_like(p);
  }
  const auto before = clone_all(params);
  EXPECT_NO_THROW(sgd.step());
  EXPECT_FALSE(torch::equal(params[0], before[0]));
  EXPECT_TRUE(torch::equal(params[1], before[1]));
  EXPECT_TRUE(torch::equal(params[2], before[2]));
}

TEST(ParamGroups, SaveLoadRestoresEachGroupsOptions) {
  auto params = make_params(torch::kFloat32);
  const auto grads = make_grads(params, 12);
  const std::vector<Tensors> first_half(grads.begin(), grads.begin() + 6);
  const std::vector<Tensors> second_half(grads.begin() + 6, grads.end());
  auto build = [](const Tensors& ps, const optim::AdamOptions& first, const optim::AdamOptions& second) {
    std::vector<torch::optim::OptimizerParamGroup> groups;
    groups.emplace_back(Tensors{ps[0], ps[1]}, std::make_unique<optim::AdamOptions>(first));
    groups.emplace_back(Tensors{ps[2]}, std::make_unique<optim::AdamOptions>(second));
    return std::make_unique<optim::AdamW>(groups);
  };
  auto opt = build(params, kAdamFirst, kAdamSecond);
  run(*opt, params, first_half);
  const auto bytes = checkpoint_bytes(*opt);
  auto resumed_params = clone_all(params);
  auto resumed = build(resumed_params, optim::AdamOptions(0.1), optim::AdamOptions(0.2));
  load_bytes(*resumed, bytes);
  EXPECT_TRUE(options_of<optim::AdamOptions>(*resumed, 0) == kAdamFirst);
  EXPECT_TRUE(options_of<optim::AdamOptions>(*resumed, 1) == kAdamSecond);
  run(*opt, params, second_half);
  run(*resumed, resumed_params, second_half);
  expect_bitwise_equal(params, resumed_params);
}

TEST(ParamGroups, ParamsWithoutGradsAreSkipped) {
  auto params = make_params(torch::kFloat32);
  const auto before = clone_all(params);
  optim::SGD opt({params[0], params[1]}, optim::SGDOptions(0.1).momentum(0.9));
  opt.add_param_group(torch::optim::OptimizerParamGroup(
      {params[2]}, std::make_unique<optim::SGDOptions>(optim::SGDOptions(0.2).weight_decay(0.1))));
  params[1].mutable_grad() = torch::randn_like(params[1]);
  opt.step();
  EXPECT_TRUE(torch::equal(params[0], before[0]));
  EXPECT_FALSE(torch::equal(params[1], before[1]));
  EXPECT_TRUE(torch::equal(params[2], before[2]));
  EXPECT_EQ(opt.state().size(), 1u);
  EXPECT_EQ(opt.state().count(params[1].unsafeGetTensorImpl()), 1u);
}

// step(closure) runs the closure with autograd on (even under NoGradGuard),
// returns its loss, and steps with the gradients it produced.
template <typename Optimizer, typename Options>
void check_closure(const Options& options) {
  torch::manual_seed(0);
  auto w = torch::randn({5}, torch::requires_grad());
  const auto initial = w.detach().clone();
  auto reference = w.detach().clone();
  const auto target = torch::ones({5});
  Optimizer opt({w}, options);
  Optimizer ref_opt({reference}, options);
  int calls = 0;
  torch::Tensor returned;
  double expected_loss = 0.0;
  {
    torch::NoGradGuard no_grad;
    expected_loss = (w - target).pow(2).sum().item<double>();
    returned = opt.step([&] {
      ++calls;
      EXPECT_TRUE(torch::GradMode::is_enabled());
      opt.zero_grad();
      auto loss = (w - target).pow(2).sum();
      EXPECT_TRUE(loss.requires_grad());
      loss.backward();
      return loss;
    });
    EXPECT_FALSE(torch::GradMode::is_enabled()) << "step left grad mode on";
  }
  EXPECT_EQ(calls, 1);
  ASSERT_TRUE(returned.defined());
  EXPECT_EQ(returned.item<double>(), expected_loss);
  // The same step with the gradient set by hand.
  reference.mutable_grad() = 2 * (reference - target);
  ref_opt.step();
  EXPECT_TRUE(torch::allclose(w.detach(), reference, 0, 1e-7));
  EXPECT_FALSE(torch::equal(w.detach(), initial)) << "the closure's gradient was not used";
  EXPECT_FALSE(opt.step().defined()) << "step without a closure returns an undefined tensor";
}

TEST(ParamGroups, ClosureRunsWithGradAndReturnsTheLoss) {
  check_closure<optim::SGD>(optim::SGDOptions(0.1).momentum(0.9));
  check_closure<optim::Adam>(optim::AdamOptions(0.1).weight_decay(0.01));
  check_closure<optim::AdamW>(optim::AdamWOptions(0.1));
}

}  // namespace
