// SGD, Adam and AdamW against LibTorch's own torch::optim implementations,
// plus checkpoints, mixed precision and the AMP contract of the functional layer.
#include <gtest/gtest.h>
#include <torch/torch.h>
#include <torchopt_ext/torchopt_ext.h>

#include <sstream>
#include <tuple>

#include "test_utils.h"

namespace {

namespace optim = torchopt_ext::optim;
using namespace torchopt_ext::testing;

class ClassicParity : public ::testing::TestWithParam<torch::Dtype> {};

template <typename Ours, typename OursOptions, typename Theirs, typename TheirsOptions>
void check_parity(torch::Dtype dtype, const OursOptions& ours_options, const TheirsOptions& theirs_options) {
  auto ours_params = make_params(dtype);
  auto theirs_params = clone_all(ours_params);
  const auto grads = make_grads(ours_params, 20);
  Ours ours(ours_params, ours_options);
  Theirs theirs(theirs_params, theirs_options);
  run(ours, ours_params, grads);
  run(theirs, theirs_params, grads);
  expect_close(ours_params, theirs_params);
}

TEST_P(ClassicParity, SGDMatchesLibTorch) {
  const auto dtype = GetParam();
  check_parity<optim::SGD, optim::SGDOptions, torch::optim::SGD, torch::optim::SGDOptions>(
      dtype, optim::SGDOptions(0.05), torch::optim::SGDOptions(0.05));
  check_parity<optim::SGD, optim::SGDOptions, torch::optim::SGD, torch::optim::SGDOptions>(
      dtype, optim::SGDOptions(0.05).momentum(0.9).dampening(0.3).weight_decay(0.01),
      torch::optim::SGDOptions(0.05).momentum(0.9).dampening(0.3).weight_decay(0.01));
  check_parity<optim::SGD, optim::SGDOptions, torch::optim::SGD, torch::optim::SGDOptions>(
      dtype, optim::SGDOptions(0.05).momentum(0.9).nesterov(true).weight_decay(0.02),
      torch::optim::SGDOptions(0.05).momentum(0.9).nesterov(true).weight_decay(0.02));
}

TEST_P(ClassicParity, AdamMatchesLibTorch) {
  const auto dtype = GetParam();
  check_parity<optim::Adam, optim::AdamOptions, torch::optim::Adam, torch::optim::AdamOptions>(
      dtype, optim::AdamOptions(1e-2), torch::optim::AdamOptions(1e-2));
  check_parity<optim::Adam, optim::AdamOptions, torch::optim::Adam, torch::optim::AdamOptions>(
      dtype, optim::AdamOptions(1e-2).betas({0.8, 0.99}).eps(1e-6).weight_decay(0.05).amsgrad(true),
      torch::optim::AdamOptions(1e-2).betas({0.8, 0.99}).eps(1e-6).weight_decay(0.05).amsgrad(true));
}

TEST_P(ClassicParity, AdamWMatchesLibTorch) {
  const auto dtype = GetParam();
  check_parity<optim::AdamW, optim::AdamOptions, torch::optim::AdamW, torch::optim::AdamWOptions>(
      dtype, optim::AdamWOptions(1e-2), torch::optim::AdamWOptions(1e-2));
  check_parity<optim::AdamW, optim::AdamOptions, torch::optim::AdamW, torch::optim::AdamWOptions>(
      dtype, optim::AdamWOptions(1e-2).weight_decay(0.1).amsgrad(true),
      torch::optim::AdamWOptions(1e-2).weight_decay(0.1).amsgrad(true));
}

INSTANTIATE_TEST_SUITE_P(Dtypes, ClassicParity, ::testing::Values(torch::kFloat32, torch::kFloat64));

TEST(Classic, DefaultsMatchLibTorch) {
  const optim::AdamWOptions adamw;
  const torch::optim::AdamWOptions theirs;
  EXPECT_EQ(adamw.lr(), theirs.lr());
  EXPECT_EQ(adamw.betas(), theirs.betas());
  EXPECT_EQ(adamw.eps(), theirs.eps());
  EXPECT_EQ(adamw.weight_decay(), theirs.weight_decay());
  EXPECT_TRUE(adamw.decoupled_weight_decay());
  const optim::AdamOptions adam;
  EXPECT_EQ(adam.weight_decay(), torch::optim::AdamOptions().weight_decay());
  EXPECT_FALSE(adam.decoupled_weight_decay());
}

TEST(Classic, SGDMaximizeIsDescentOnNegatedGradient) {
  auto maximized = make_params(torch::kFloat64);
  auto negated = clone_all(maximized);
  auto grads = make_grads(maximized, 10);
  optim::SGD max_opt(maximized, optim::SGDOptions(0.05).momentum(0.9).maximize(true));
  optim::SGD neg_opt(negated, optim::SGDOptions(0.05).momentum(0.9));
  run(max_opt, maximized, grads);
  for (auto& step : grads) {
    for (auto& g : step) {
      g = -g;
    }
  }
  run(neg_opt, negated, grads);
  expect_bitwise_equal(maximized, negated);
}

TEST(Classic, SaveLoadContinuesBitwise) {
  check_save_load_continues_bitwise<optim::SGD>(optim::SGDOptions(0.05).momentum(0.9).dampening(0.1));
  check_save_load_continues_bitwise<optim::Adam>(optim::AdamOptions(1e-2).amsgrad(true).weight_decay(0.01));
  check_save_load_continues_bitwise<optim::AdamW>(optim::AdamWOptions(1e-2).weight_decay(0.1));
}

TEST(Classic, LoadIntoGroupOfAnotherSizeFails) {
  auto params = make_params(torch::kFloat32);
  optim::AdamW opt(params);
  run(opt, params, make_grads(params, 1));
  std::stringstream buffer;
  torch::save(opt, buffer);
  std::vector<torch::Tensor> fewer = {params[0].clone()};
  optim::AdamW other(fewer);
  EXPECT_THROW(torch::load(other, buffer), c10::Error);
}

TEST(Classic, Bf16ParamsWithFp32StateTrackFp32Run) {
  auto reference = make_params(torch::kFloat32);
  std::vector<torch::Tensor> low;
  for (auto& p : reference) {
    low.push_back(p.to(torch::kBFloat16));
    p = low.back().to(torch::kFloat32);  // both runs start from the same rounded values
  }
  const auto grads = make_grads(reference, 20);
  std::vector<std::vector<torch::Tensor>> low_grads;
  for (const auto& step : grads) {
    low_grads.emplace_back();
    for (const auto& g : step) {
      low_grads.back().push_back(g.to(torch::kBFloat16));
    }
  }
  optim::AdamW low_opt(low, optim::AdamWOptions(1e-2).state_dtype(torch::kFloat32));
  optim::AdamW ref_opt(reference, optim::AdamWOptions(1e-2));
  run(low_opt, low, low_grads);
  // The reference sees the bf16-rounded gradients too.
  std::vector<std::vector<torch::Tensor>> rounded = low_grads;
  for (auto& step : rounded) {
    for (auto& g : step) {
      g = g.to(torch::kFloat32);
    }
  }
  run(ref_opt, reference, rounded);
  auto& state = static_cast<optim::AdamParamState&>(*low_opt.state().at(low[0].unsafeGetTensorImpl()));
  EXPECT_EQ(state.exp_avg().scalar_type(), torch::kFloat32);
  for (size_t i = 0; i < low.size(); ++i) {
    const double scale = reference[i].abs().max().item<double>();
    EXPECT_LE((low[i].to(torch::kFloat32) - reference[i]).abs().max().item<double>(), 4 * 0.0078125 * scale);
  }
}

TEST(Classic, StochasticRoundingIsSeededAndDiffersFromNearest) {
  auto run_bf16 = [](bool stochastic, int64_t seed) {
    auto params = make_params(torch::kFloat32);
    std::vector<torch::Tensor> low;
    for (const auto& p : params) {
      low.push_back(p.to(torch::kBFloat16));
    }
    auto grads = make_grads(low, 10);
    optim::AdamW opt(low,
                     optim::AdamWOptions(1e-3).state_dtype(torch::kFloat32).stochastic_rounding(stochastic).seed(seed));
    run(opt, low, grads);
    return low;
  };
  expect_bitwise_equal(run_bf16(true, 7), run_bf16(true, 7));
  EXPECT_FALSE(torch::equal(run_bf16(true, 7)[0], run_bf16(true, 8)[0]));
  EXPECT_FALSE(torch::equal(run_bf16(true, 7)[0], run_bf16(false, 7)[0]));
}

TEST(Classic, FoundInfSkipsEverything) {
  auto params = make_params(torch::kFloat32);
  auto grads = make_grads(params, 1)[0];
  std::vector<torch::Tensor> m, v, steps;
  for (const auto& p : params) {
    m.push_back(torch::randn_like(p));
    v.push_back(torch::rand_like(p));
    steps.push_back(torch::full({}, 3.0f));
  }
  const auto before = std::make_tuple(clone_all(params), clone_all(m), clone_all(v), clone_all(steps));
  torchopt_ext::functional::adam_step_(params, grads, m, v, {}, steps, torch::scalar_tensor(0.1, torch::kFloat64), 0.9,
                                       0.999, 1e-8, 0.01, true, false, false, false, 0, torch::scalar_tensor(8.0f),
                                       torch::scalar_tensor(1.0f));
  expect_bitwise_equal(params, std::get<0>(before));
  expect_bitwise_equal(m, std::get<1>(before));
  expect_bitwise_equal(v, std::get<2>(before));
  expect_bitwise_equal(steps, std::get<3>(before));
}

TEST(Classic, GradScaleUnscalesInPlaceAndMatchesUnscaledRun) {
  auto scaled = make_params(torch::kFloat64);
  auto plain = clone_all(scaled);
  const auto grads = make_grads(scaled, 1)[0];
  auto make_state = [](const std::vector<torch::Tensor>& ps) {
    std::vector<torch::Tensor> out;
    for (const auto& p : ps) {
      out.push_back(torch::zeros_like(p));
    }
    return out;
  };
  auto m1 = make_state(scaled), v1 = make_state(scaled), m2 = make_state(plain), v2 = make_state(plain);
  std::vector<torch::Tensor> s1 = {torch::zeros({}), torch::zeros({}), torch::zeros({})};
  std::vector<torch::Tensor> s2 = clone_all(s1);
  std::vector<torch::Tensor> scaled_grads;
  for (const auto& g : grads) {
    scaled_grads.push_back(g * 1024.0);
  }
  const auto lr = torch::scalar_tensor(0.1, torch::kFloat64);
  torchopt_ext::functional::adam_step_(scaled, scaled_grads, m1, v1, {}, s1, lr, 0.9, 0.999, 1e-8, 0.0, true, false,
                                       false, false, 0, torch::scalar_tensor(1024.0), torch::scalar_tensor(0.0f));
  torchopt_ext::functional::adam_step_(plain, clone_all(grads), m2, v2, {}, s2, lr, 0.9, 0.999, 1e-8, 0.0, true, false,
                                       false, false, 0, std::nullopt, std::nullopt);
  expect_bitwise_equal(scaled_grads, grads);
  expect_bitwise_equal(scaled, plain);
}

}  // namespace
