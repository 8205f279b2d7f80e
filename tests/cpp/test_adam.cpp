// torchopt_ext::optim::Adam and AdamW: parity with LibTorch's torch::optim::Adam
// and AdamW, checkpoints, LR schedulers, bad input, bf16 params with fp32
// state, stochastic rounding, and the AMP contract of functional::adam_step_.
#include <gtest/gtest.h>
#include <torch/torch.h>
#include <torchopt_ext/torchopt_ext.h>

#include <cmath>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "test_utils.h"

namespace {

namespace optim = torchopt_ext::optim;
using namespace torchopt_ext::testing;
using Tensors = std::vector<torch::Tensor>;

constexpr int kSteps = 25;

// Measured over 25 steps on 17x33, 1001 and 0-d params (all cases): params
// differ by <= 4.8e-7 abs / 1.6e-5 rel in fp32 (1-2 ulps, relative only where
// a param is near 0) and <= 4.5e-16 abs in fp64. exp_avg is kept as a lerp
// (torch.optim's order) while LibTorch uses mul_ + add_: <= 2.0e-7 abs in fp32
// on values of magnitude ~1, and near 0 the EMA cancels, so the states get an
// absolute floor of 3e-7 (fp32).
double rtol_for(torch::Dtype dtype) { return dtype == torch::kFloat64 ? 1e-12 : 1e-6; }
double atol_for(torch::Dtype dtype) { return dtype == torch::kFloat64 ? 1e-12 : 1e-7; }
double state_atol_for(torch::Dtype dtype) { return dtype == torch::kFloat64 ? 1e-12 : 3e-7; }

// exp_avg, exp_avg_sq, max_exp_avg_sq (undefined without amsgrad) of one param.
using StateOf = std::function<Tensors(const torch::optim::Optimizer&, const torch::Tensor&)>;

template <typename ParamState>
StateOf state_getter() {
  return [](const torch::optim::Optimizer& opt, const torch::Tensor& p) {
    const auto& s = static_cast<const ParamState&>(*opt.state().at(p.unsafeGetTensorImpl()));
    return Tensors{s.exp_avg(), s.exp_avg_sq(), s.max_exp_avg_sq()};
  };
}

struct AdamCase {
  std::string name;
  std::function<std::unique_ptr<torch::optim::Optimizer>(Tensors)> ours;
  std::function<std::unique_ptr<torch::optim::Optimizer>(Tensors)> theirs;
  StateOf theirs_state;
};

template <typename Opt, typename Options>
std::function<std::unique_ptr<torch::optim::Optimizer>(Tensors)> factory(Options options) {
  return [options](Tensors params) { return std::make_unique<Opt>(std::move(params), options); };
}

AdamCase adam_case(std::string name, const optim::AdamOptions& ours, const torch::optim::AdamOptions& theirs) {
  return {std::move(name), factory<optim::Adam>(ours), factory<torch::optim::Adam>(theirs),
          state_getter<torch::optim::AdamParamState>()};
}

template <typename Ours>
AdamCase adamw_case(std::string name, const optim::AdamOptions& ours, const torch::optim::AdamWOptions& theirs) {
  return {std::move(name), factory<Ours>(ours), factory<torch::optim::AdamW>(theirs),
          state_getter<torch::optim::AdamWParamState>()};
}

std::vector<AdamCase> adam_cases() {
  using torch::optim::AdamOptions;
  using torch::optim::AdamWOptions;
  return {
      adam_case("Adam", optim::AdamOptions(1e-2), AdamOptions(1e-2)),
      adam_case("AdamCoupledWeightDecay", optim::AdamOptions(1e-2).betas({0.8, 0.99}).eps(1e-6).weight_decay(0.05),
                AdamOptions(1e-2).betas({0.8, 0.99}).eps(1e-6).weight_decay(0.05)),
      adam_case("AdamAmsgrad", optim::AdamOptions(1e-2).amsgrad(true), AdamOptions(1e-2).amsgrad(true)),
      adam_case("AdamCoupledWeightDecayAmsgrad", optim::AdamOptions(2e-2).weight_decay(0.1).amsgrad(true),
                AdamOptions(2e-2).weight_decay(0.1).amsgrad(true)),
      // Adam with decoupled_weight_decay is AdamW.
      adamw_case<optim::Adam>("AdamDecoupledIsAdamW",
                              optim::AdamOptions(1e-2).weight_decay(0.1).decoupled_weight_decay(true),
                              AdamWOptions(1e-2).weight_decay(0.1)),
      adamw_case<optim::AdamW>("AdamWDefaults", optim::AdamWOptions(1e-2), AdamWOptions(1e-2)),
      adamw_case<optim::AdamW>("AdamWWeightDecay", optim::AdamWOptions(1e-2).weight_decay(0.1),
                               AdamWOptions(1e-2).weight_decay(0.1)),
      adamw_case<optim::AdamW>("AdamWAmsgrad", optim::AdamWOptions(1e-2).amsgrad(true),
                               AdamWOptions(1e-2).amsgrad(true)),
      adamw_case<optim::AdamW>("AdamWWeightDecayAmsgrad",
                               optim::AdamWOptions(2e-2).betas({0.85, 0.995}).eps(1e-7).weight_decay(0.2).amsgrad(true),
                               AdamWOptions(2e-2).betas({0.85, 0.995}).eps(1e-7).weight_decay(0.2).amsgrad(true)),
      // AdamW decouples even when handed plain AdamOptions.
      adamw_case<optim::AdamW>("AdamWWithAdamOptions", optim::AdamOptions(1e-2).weight_decay(0.1),
                               AdamWOptions(1e-2).weight_decay(0.1)),
  };
}

void PrintTo(const AdamCase& c, std::ostream* os) { *os << c.name; }

class AdamParity : public ::testing::TestWithParam<std::tuple<torch::Dtype, AdamCase>> {};

TEST_P(AdamParity, MatchesLibTorch) {
  const auto& [dtype, c] = GetParam();
  auto ours_params = make_params(dtype);
  const auto initial = clone_all(ours_params);
  auto theirs_params = clone_all(ours_params);
  const auto grads = make_grads(ours_params, kSteps);
  auto ours = c.ours(ours_params);
  auto theirs = c.theirs(theirs_params);
  run(*ours, ours_params, grads);
  run(*theirs, theirs_params, grads);
  for (size_t i = 0; i < initial.size(); ++i) {
    EXPECT_FALSE(torch::equal(ours_params[i], initial[i])) << "param " << i << " never moved";
  }
  expect_close_within(ours_params, theirs_params, rtol_for(dtype), atol_for(dtype), c.name + " params");

  const auto ours_state = state_getter<optim::AdamParamState>();
  const char* names[] = {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"};
  for (size_t k = 0; k < 3; ++k) {
    Tensors mine, libtorch;
    for (size_t i = 0; i < ours_params.size(); ++i) {
      const auto a = ours_state(*ours, ours_params[i])[k];
      const auto b = c.theirs_state(*theirs, theirs_params[i])[k];
      ASSERT_EQ(a.defined(), b.defined()) << names[k] << " of param " << i;
      if (a.defined()) {
        mine.push_back(a);
        libtorch.push_back(b);
      }
    }
    if (!mine.empty()) {
      expect_close_within(mine, libtorch, rtol_for(dtype), state_atol_for(dtype), c.name + " " + names[k]);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Cases, AdamParity,
                         ::testing::Combine(::testing::Values(torch::kFloat32, torch::kFloat64),
                                            ::testing::ValuesIn(adam_cases())),
                         [](const auto& info) {
                           return std::get<1>(info.param).name + "_" + c10::toString(std::get<0>(info.param));
                         });

TEST(Adam, MaximizeIsDescentOnNegatedGradientsBitwise) {
  for (const auto dtype : {torch::kFloat32, torch::kFloat64}) {
    for (const bool decoupled : {false, true}) {
      const auto options = optim::AdamOptions(1e-2).weight_decay(0.05).amsgrad(true).decoupled_weight_decay(decoupled);
      auto maximized = make_params(dtype);
      auto descended = clone_all(maximized);
      auto grads = make_grads(maximized, 10);
      optim::Adam max_opt(maximized, optim::AdamOptions(options).maximize(true));
      optim::Adam neg_opt(descended, options);
      run(max_opt, maximized, grads);
      for (auto& step : grads) {
        for (auto& g : step) {
          g = -g;
        }
      }
      run(neg_opt, descended, grads);
      expect_bitwise_equal(maximized, descended);
    }
  }
}

TEST(Adam, SaveLoadRoundTripContinuesBitwise) {
  check_checkpoint_round_trip<optim::Adam, optim::AdamOptions, optim::AdamParamState>(
      optim::AdamOptions(1e-2).weight_decay(0.01).amsgrad(true), optim::AdamOptions(0.5).betas({0.5, 0.5}),
      make_params(torch::kFloat32), 7, 8);
  check_checkpoint_round_trip<optim::Adam, optim::AdamOptions, optim::AdamParamState>(
      optim::AdamOptions(3e-3).betas({0.8, 0.95}).maximize(true), optim::AdamOptions(), make_params(torch::kFloat64), 6,
      6);
}

TEST(AdamW, SaveLoadRoundTripContinuesBitwise) {
  check_checkpoint_round_trip<optim::AdamW, optim::AdamOptions, optim::AdamParamState>(
      optim::AdamWOptions(1e-2).weight_decay(0.1).amsgrad(true), optim::AdamWOptions(), make_params(torch::kFloat32), 7,
      8);
  check_checkpoint_round_trip<optim::AdamW, optim::AdamOptions, optim::AdamParamState>(
      optim::AdamWOptions(1e-2), optim::AdamWOptions(0.1), make_params(torch::kFloat32), 10, 10,
      temp_checkpoint_path("adamw"));
}

// The storage options travel with the checkpoint: a fresh optimizer built
// with defaults resumes bf16 training with fp32 state and the same rounding stream.
TEST(AdamW, SaveLoadKeepsStorageOptionsBitwise) {
  std::vector<torch::Tensor> params;
  for (const auto& p : make_params(torch::kFloat32)) {
    params.push_back(p.to(torch::kBFloat16));
  }
  check_checkpoint_round_trip<optim::AdamW, optim::AdamOptions, optim::AdamParamState>(
      optim::AdamWOptions(1e-3).state_dtype(torch::kFloat32).stochastic_rounding(true).seed(11),
      optim::AdamWOptions(1e-3), params, 5, 5);
}

TEST(AdamW, LoadIntoMismatchedParamGroupThrows) {
  auto params = make_params(torch::kFloat32);
  optim::AdamW opt(params, optim::AdamWOptions(1e-2).amsgrad(true));
  run(opt, params, make_grads(params, 2));
  const auto bytes = checkpoint_bytes(opt);
  auto fewer = clone_all({params[0], params[2]});
  optim::AdamW fewer_opt(fewer);
  EXPECT_THROW(load_bytes(fewer_opt, bytes), c10::Error);
  auto more = clone_all({params[0], params[1], params[2], params[0]});
  optim::Adam more_opt(more);
  EXPECT_THROW(load_bytes(more_opt, bytes), c10::Error);
  auto matching = clone_all(params);
  optim::AdamW matching_opt(matching);
  EXPECT_NO_THROW(load_bytes(matching_opt, bytes));
}

TEST(AdamW, StepLRDrivesTheLrAndMatchesLibTorch) {
  auto ours_params = make_params(torch::kFloat64);
  auto theirs_params = clone_all(ours_params);
  const double lr0 = 1e-2;
  const int64_t step_size = 4;
  const double gamma = 0.5;
  optim::AdamW ours(ours_params, optim::AdamWOptions(lr0).weight_decay(0.1).amsgrad(true));
  torch::optim::AdamW theirs(theirs_params, torch::optim::AdamWOptions(lr0).weight_decay(0.1).amsgrad(true));
  torch::optim::StepLR ours_sched(ours, step_size, gamma);
  torch::optim::StepLR theirs_sched(theirs, step_size, gamma);
  const auto grads = make_grads(ours_params, 20);
  for (size_t n = 0; n < grads.size(); ++n) {
    // LibTorch's StepLR decays when its own count (calls so far) is a
    // positive multiple of step_size: on calls 5, 9, 13, ...
    const double expected_lr = lr0 * std::pow(gamma, n == 0 ? 0 : (static_cast<int64_t>(n) - 1) / step_size);
    EXPECT_DOUBLE_EQ(ours.param_groups()[0].options().get_lr(), expected_lr) << "before step " << n;
    EXPECT_EQ(ours.param_groups()[0].options().get_lr(), theirs.param_groups()[0].options().get_lr());
    for (size_t i = 0; i < ours_params.size(); ++i) {
      ours_params[i].mutable_grad() = grads[n][i].clone();
      theirs_params[i].mutable_grad() = grads[n][i].clone();
    }
    ours.step();
    theirs.step();
    ours_sched.step();
    theirs_sched.step();
  }
  EXPECT_DOUBLE_EQ(ours.param_groups()[0].options().get_lr(), lr0 * std::pow(gamma, 4));
  EXPECT_DOUBLE_EQ(static_cast<const optim::AdamOptions&>(ours.param_groups()[0].options()).lr(),
                   lr0 * std::pow(gamma, 4));
  expect_close_within(ours_params, theirs_params, 1e-12, 1e-12, "AdamW StepLR");
}

TEST(Adam, BadOptionsThrowNamingTheArgument) {
  auto params = make_params(torch::kFloat32);
  auto adam = [&](const optim::AdamOptions& options) {
    return [&params, options] { optim::Adam opt(params, options); };
  };
  auto adamw = [&](const optim::AdamOptions& options) {
    return [&params, options] { optim::AdamW opt(params, options); };
  };
  EXPECT_THROW(adam(optim::AdamOptions(-1e-3))(), c10::Error);
  EXPECT_THROW(adamw(optim::AdamWOptions(-1e-3))(), c10::Error);
  expect_throws_mentioning(adam(optim::AdamOptions(-1e-3)), "lr");
  expect_throws_mentioning(adamw(optim::AdamWOptions(std::numeric_limits<double>::quiet_NaN())), "lr");
  expect_throws_mentioning(adam(optim::AdamOptions().eps(-1e-8)), "eps");
  expect_throws_mentioning(adamw(optim::AdamWOptions().eps(-1e-8)), "eps");
  expect_throws_mentioning(adam(optim::AdamOptions().betas({1.0, 0.999})), "betas[0]");
  expect_throws_mentioning(adam(optim::AdamOptions().betas({-0.1, 0.999})), "betas[0]");
  expect_throws_mentioning(adamw(optim::AdamWOptions().betas({0.9, 1.0})), "betas[1]");
  expect_throws_mentioning(adamw(optim::AdamWOptions().betas({0.9, -1e-3})), "betas[1]");
  expect_throws_mentioning(adam(optim::AdamOptions().weight_decay(-0.1)), "weight_decay");
  expect_throws_mentioning(adamw(optim::AdamWOptions().weight_decay(-0.1)), "weight_decay");
  expect_throws_mentioning(adamw(optim::AdamWOptions().state_dtype(torch::kInt64)), "state_dtype");
  // The boundaries are valid.
  EXPECT_NO_THROW(adam(optim::AdamOptions(0.0).betas({0.0, 0.0}).eps(0.0).weight_decay(0.0))());
  EXPECT_NO_THROW(adamw(optim::AdamWOptions().state_dtype(torch::kBFloat16))());
}

TEST(Adam, SparseGradientIsRejected) {
  for (const bool decoupled : {false, true}) {
    auto p = torch::zeros({5});
    const auto before = p.clone();
    optim::Adam opt({p}, optim::AdamOptions(0.1).decoupled_weight_decay(decoupled).weight_decay(0.01));
    p.mutable_grad() =
        torch::sparse_coo_tensor(torch::tensor({{0, 4}}, torch::kLong), torch::tensor({1.0f, -2.0f}), {5});
    EXPECT_THROW(opt.step(), c10::Error);
    expect_throws_mentioning([&] { opt.step(); }, "sparse");
    EXPECT_TRUE(torch::equal(p, before));
  }
}

TEST(Adam, AmsgradTurnedOnAfterTheFirstStepIsAnError) {
  auto params = make_params(torch::kFloat32);
  optim::Adam opt(params, optim::AdamOptions(1e-2));
  run(opt, params, make_grads(params, 1));
  static_cast<optim::AdamOptions&>(opt.param_groups()[0].options()).amsgrad(true);
  for (auto& p : params) {
    p.mutable_grad() = torch::randn_like(p);
  }
  expect_throws_mentioning([&] { opt.step(); }, "amsgrad");
}

// bf16 params of magnitude ~0.1 with fp32 state, next to an fp32 run that
// sees the same (bf16-rounded) start and gradients.
TEST(AdamMixedPrecision, Bf16ParamsKeepFp32StateAndTrackFp32Run) {
  torch::manual_seed(0);
  Tensors low = {(0.1 * torch::randn({17, 33})).to(torch::kBFloat16), (0.1 * torch::randn({1001})).to(torch::kBFloat16),
                 (0.1 * torch::randn({})).to(torch::kBFloat16)};
  Tensors reference;
  for (const auto& p : low) {
    reference.push_back(p.to(torch::kFloat32));
  }
  const auto start = clone_all(reference);
  const auto grads = make_grads(low, 20);
  std::vector<Tensors> fp32_grads;
  for (const auto& step : grads) {
    fp32_grads.emplace_back();
    for (const auto& g : step) {
      fp32_grads.back().push_back(g.to(torch::kFloat32));
    }
  }
  const auto options = optim::AdamWOptions(1e-2).weight_decay(0.1).amsgrad(true);
  optim::AdamW low_opt(low, optim::AdamOptions(options).state_dtype(torch::kFloat32));
  optim::AdamW ref_opt(reference, options);
  run(low_opt, low, grads);
  run(ref_opt, reference, fp32_grads);
  for (const auto& p : low) {
    EXPECT_EQ(p.scalar_type(), torch::kBFloat16);
    const auto& state = static_cast<const optim::AdamParamState&>(*low_opt.state().at(p.unsafeGetTensorImpl()));
    EXPECT_EQ(state.exp_avg().scalar_type(), torch::kFloat32);
    EXPECT_EQ(state.exp_avg_sq().scalar_type(), torch::kFloat32);
    EXPECT_EQ(state.max_exp_avg_sq().scalar_type(), torch::kFloat32);
    EXPECT_EQ(state.step().item<float>(), 20.0f);
  }
  // Both runs moved well past the tolerance, so closeness is informative.
  EXPECT_GT((reference[1] - start[1]).abs().max().item<double>(), 0.1);
  EXPECT_GT((low[1].to(torch::kFloat32) - start[1]).abs().max().item<double>(), 0.1);
  expect_close_within(low, reference, 0.0, 1e-2, "AdamW bf16 vs fp32");
}

TEST(AdamMixedPrecision, StochasticRoundingIsSeededAndDiffersFromNearest) {
  auto train = [](bool stochastic, int64_t seed) {
    Tensors low;
    for (const auto& p : make_params(torch::kFloat32)) {
      low.push_back(p.to(torch::kBFloat16));
    }
    optim::AdamW opt(low,
                     optim::AdamWOptions(1e-3).state_dtype(torch::kFloat32).stochastic_rounding(stochastic).seed(seed));
    run(opt, low, make_grads(low, 20));
    return low;
  };
  const auto first = train(true, 7);
  expect_bitwise_equal(first, train(true, 7));
  const auto nearest = train(false, 7);
  const auto other_seed = train(true, 8);
  for (size_t i = 0; i < 2; ++i) {  // the 0-d param may well agree by chance
    EXPECT_FALSE(torch::equal(first[i], nearest[i])) << "tensor " << i << ": stochastic rounding had no effect";
    EXPECT_FALSE(torch::equal(first[i], other_seed[i])) << "tensor " << i << ": the seed had no effect";
  }
}

// Fresh Adam state for functional calls: exp_avg, exp_avg_sq, max_exp_avg_sq, steps.
struct AdamLists {
  Tensors exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps;
  explicit AdamLists(const Tensors& params) {
    for (const auto& p : params) {
      exp_avgs.push_back(torch::zeros_like(p));
      exp_avg_sqs.push_back(torch::zeros_like(p));
      max_exp_avg_sqs.push_back(torch::zeros_like(p));
      steps.push_back(torch::zeros({}));
    }
  }
  std::vector<Tensors> all() const {
    return {clone_all(exp_avgs), clone_all(exp_avg_sqs), clone_all(max_exp_avg_sqs), clone_all(steps)};
  }
};

void functional_adam(Tensors& params, const Tensors& grads, AdamLists& s, std::optional<torch::Tensor> grad_scale,
                     std::optional<torch::Tensor> found_inf) {
  torchopt_ext::functional::adam_step_(params, grads, s.exp_avgs, s.exp_avg_sqs, s.max_exp_avg_sqs, s.steps,
                                       torch::scalar_tensor(1e-2, torch::kFloat64), 0.9, 0.999, 1e-8, 0.05,
                                       /*decoupled_weight_decay=*/false, /*amsgrad=*/true, /*maximize=*/false,
                                       /*stochastic_rounding=*/false, 0, grad_scale, found_inf);
}

TEST(AdamFunctional, FoundInfChangesNothing) {
  auto params = make_params(torch::kFloat32);
  AdamLists state(params);
  functional_adam(params, make_grads(params, 1, 5)[0], state, std::nullopt, std::nullopt);  // nonzero state
  const auto params_before = clone_all(params);
  const auto state_before = state.all();
  auto grads = make_grads(params, 1, 6)[0];
  const auto grads_before = clone_all(grads);

  functional_adam(params, grads, state, torch::scalar_tensor(4.0), torch::scalar_tensor(1.0));
  expect_bitwise_equal(params, params_before);
  expect_bitwise_equal(grads, grads_before);
  const auto state_after = state.all();
  for (size_t k = 0; k < state_after.size(); ++k) {
    expect_bitwise_equal(state_after[k], state_before[k]);
  }
  EXPECT_EQ(state.steps[0].item<float>(), 1.0f);

  // The control: found_inf = 0 steps.
  functional_adam(params, grads, state, std::nullopt, torch::scalar_tensor(0.0));
  EXPECT_FALSE(torch::equal(params[0], params_before[0]));
  EXPECT_EQ(state.steps[0].item<float>(), 2.0f);
}

TEST(AdamFunctional, GradScaleUnscalesGradsInPlaceAndMatchesUnscaledRun) {
  torch::manual_seed(0);
  // A transposed (non-contiguous) param and grad too: the unscaled grads are written back through the copy.
  Tensors scaled_params = {torch::randn({33, 17}).t(), torch::randn({1001}), torch::randn({})};
  Tensors plain_params = clone_all(scaled_params);
  AdamLists scaled_state(scaled_params), plain_state(plain_params);
  for (const auto& step : make_grads(scaled_params, 5)) {
    Tensors scaled_grads;
    for (const auto& g : step) {
      scaled_grads.push_back(g * 4.0);
    }
    scaled_grads[0] = (step[0] * 4.0).t().contiguous().t();  // same values, transposed layout
    ASSERT_FALSE(scaled_grads[0].is_contiguous());
    functional_adam(scaled_params, scaled_grads, scaled_state, torch::scalar_tensor(4.0), torch::scalar_tensor(0.0));
    functional_adam(plain_params, clone_all(step), plain_state, std::nullopt, std::nullopt);
    expect_bitwise_equal(scaled_grads, step);  // divided by 4 in place
  }
  expect_bitwise_equal(scaled_params, plain_params);
  const auto a = scaled_state.all(), b = plain_state.all();
  for (size_t k = 0; k < a.size(); ++k) {
    expect_bitwise_equal(a[k], b[k]);
  }
  EXPECT_EQ(scaled_state.steps[1].item<float>(), 5.0f);
}

TEST(AdamW, DefaultsMatchLibTorch) {
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

}  // namespace
