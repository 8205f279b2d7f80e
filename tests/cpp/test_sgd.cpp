// torchopt_ext::optim::SGD: parity with LibTorch's torch::optim::SGD, maximize,
// checkpoints, bf16 params with fp32 state, stochastic rounding and bad input.
#include <gtest/gtest.h>
#include <torch/torch.h>
#include <torchopt_ext/torchopt_ext.h>

#include <cmath>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "test_utils.h"

namespace {

namespace optim = torchopt_ext::optim;
using namespace torchopt_ext::testing;

constexpr int kSteps = 25;

// Measured over 25 steps on 17x33, 1001 and 0-d params (all cases, maximize
// too), fp32: params <= 4.8e-7 abs / 3.3e-6 rel, momentum buffers <= 9.5e-7
// abs / 4.8e-7 rel. The buffers grow to ~10 and the updates lr * buf to ~0.5,
// so last-bit differences in the updates add up to <= 2.8e-7 absolute on
// params near 0: hence the 4e-7 floor. fp64: <= 6.7e-16 abs. Plain SGD and
// weight decay alone agree bitwise.
double rtol_for(torch::Dtype dtype) { return dtype == torch::kFloat64 ? 1e-12 : 1e-6; }
double atol_for(torch::Dtype dtype) { return dtype == torch::kFloat64 ? 1e-12 : 4e-7; }

struct SGDCase {
  std::string name;
  optim::SGDOptions ours;
  torch::optim::SGDOptions theirs;
};

std::vector<SGDCase> sgd_cases() {
  return {
      {"Plain", optim::SGDOptions(0.05), torch::optim::SGDOptions(0.05)},
      {"MomentumDampening", optim::SGDOptions(0.05).momentum(0.9).dampening(0.3),
       torch::optim::SGDOptions(0.05).momentum(0.9).dampening(0.3)},
      {"Nesterov", optim::SGDOptions(0.05).momentum(0.9).nesterov(true),
       torch::optim::SGDOptions(0.05).momentum(0.9).nesterov(true)},
      {"WeightDecay", optim::SGDOptions(0.05).weight_decay(0.05), torch::optim::SGDOptions(0.05).weight_decay(0.05)},
      {"MomentumDampeningWeightDecay", optim::SGDOptions(0.03).momentum(0.8).dampening(0.1).weight_decay(0.02),
       torch::optim::SGDOptions(0.03).momentum(0.8).dampening(0.1).weight_decay(0.02)},
      {"NesterovWeightDecay", optim::SGDOptions(0.05).momentum(0.9).nesterov(true).weight_decay(0.01),
       torch::optim::SGDOptions(0.05).momentum(0.9).nesterov(true).weight_decay(0.01)},
  };
}

void PrintTo(const SGDCase& c, std::ostream* os) { *os << c.name; }

class SGDParity : public ::testing::TestWithParam<std::tuple<torch::Dtype, SGDCase>> {};

std::vector<std::vector<torch::Tensor>> negated(std::vector<std::vector<torch::Tensor>> grads) {
  for (auto& step : grads) {
    for (auto& g : step) {
      g = -g;
    }
  }
  return grads;
}

// Params and momentum buffers after kSteps of ours (maximize as given) and of
// LibTorch's SGD fed `their_grads`.
void check_against_libtorch(torch::Dtype dtype, const optim::SGDOptions& ours_options,
                            const torch::optim::SGDOptions& theirs_options, bool maximize, const std::string& label) {
  auto ours_params = make_params(dtype);
  const auto initial = clone_all(ours_params);
  auto theirs_params = clone_all(ours_params);
  const auto grads = make_grads(ours_params, kSteps);
  optim::SGD ours(ours_params, optim::SGDOptions(ours_options).maximize(maximize));
  torch::optim::SGD theirs(theirs_params, theirs_options);
  run(ours, ours_params, grads);
  run(theirs, theirs_params, maximize ? negated(grads) : grads);

  for (size_t i = 0; i < initial.size(); ++i) {
    EXPECT_FALSE(torch::equal(ours_params[i], initial[i])) << "param " << i << " never moved";
  }
  expect_close_within(ours_params, theirs_params, rtol_for(dtype), atol_for(dtype), label + " params");
  if (ours_options.momentum() != 0.0) {
    std::vector<torch::Tensor> ours_buffers, theirs_buffers;
    for (size_t i = 0; i < ours_params.size(); ++i) {
      const auto& mine =
          static_cast<const optim::SGDParamState&>(*ours.state().at(ours_params[i].unsafeGetTensorImpl()));
      const auto& libtorch =
          static_cast<const torch::optim::SGDParamState&>(*theirs.state().at(theirs_params[i].unsafeGetTensorImpl()));
      ours_buffers.push_back(mine.momentum_buffer());
      theirs_buffers.push_back(libtorch.momentum_buffer());
      EXPECT_EQ(mine.step().item<double>(), kSteps);
    }
    expect_close_within(ours_buffers, theirs_buffers, rtol_for(dtype), atol_for(dtype), label + " momentum_buffer");
  }
}

TEST_P(SGDParity, MatchesLibTorchSGD) {
  const auto& [dtype, c] = GetParam();
  check_against_libtorch(dtype, c.ours, c.theirs, /*maximize=*/false, "SGD " + c.name);
}

// LibTorch's SGD has no maximize: maximizing with grad g must track LibTorch
// descending on -g (torch.optim negates the gradient before weight decay).
TEST_P(SGDParity, MaximizeMatchesLibTorchOnNegatedGradients) {
  const auto& [dtype, c] = GetParam();
  check_against_libtorch(dtype, c.ours, c.theirs, /*maximize=*/true, "SGD maximize " + c.name);
}

INSTANTIATE_TEST_SUITE_P(Cases, SGDParity,
                         ::testing::Combine(::testing::Values(torch::kFloat32, torch::kFloat64),
                                            ::testing::ValuesIn(sgd_cases())),
                         [](const auto& info) {
                           return std::get<1>(info.param).name + "_" + c10::toString(std::get<0>(info.param));
                         });

TEST(SGD, MaximizeIsDescentOnNegatedGradientsBitwise) {
  for (const auto dtype : {torch::kFloat32, torch::kFloat64}) {
    for (const auto& options : {optim::SGDOptions(0.05).momentum(0.9).dampening(0.2).weight_decay(0.01),
                                optim::SGDOptions(0.05).momentum(0.9).nesterov(true).weight_decay(0.01)}) {
      auto maximized = make_params(dtype);
      auto descended = clone_all(maximized);
      auto plain = clone_all(maximized);
      const auto grads = make_grads(maximized, 10);
      optim::SGD max_opt(maximized, optim::SGDOptions(options).maximize(true));
      optim::SGD neg_opt(descended, options);
      optim::SGD plain_opt(plain, options);
      run(max_opt, maximized, grads);
      run(neg_opt, descended, negated(grads));
      run(plain_opt, plain, grads);
      expect_bitwise_equal(maximized, descended);
      EXPECT_FALSE(torch::equal(maximized[1], plain[1])) << "maximize had no effect";
    }
  }
}

TEST(SGD, FirstMomentumStepCopiesTheGradient) {
  // torch.optim.SGD: buf = grad on the first step (no dampening applied).
  auto p = torch::zeros({7}, torch::kFloat64);
  optim::SGD opt({p}, optim::SGDOptions(0.5).momentum(0.9).dampening(0.5));
  const auto g = torch::arange(7, torch::kFloat64);
  p.mutable_grad() = g.clone();
  opt.step();
  const auto& state = static_cast<const optim::SGDParamState&>(*opt.state().at(p.unsafeGetTensorImpl()));
  EXPECT_TRUE(torch::equal(state.momentum_buffer(), g));
  EXPECT_TRUE(torch::equal(p, -0.5 * g));
  p.mutable_grad() = g.clone();
  opt.step();
  EXPECT_TRUE(torch::allclose(state.momentum_buffer(), 0.9 * g + 0.5 * g, 0, 1e-15));
}

TEST(SGD, SaveLoadRoundTripContinuesBitwise) {
  for (const auto& options : {optim::SGDOptions(0.05).momentum(0.9).dampening(0.1).weight_decay(0.01),
                              optim::SGDOptions(0.02).momentum(0.7).nesterov(true).maximize(true),
                              optim::SGDOptions(0.1).weight_decay(0.03)}) {
    check_checkpoint_round_trip<optim::SGD, optim::SGDOptions, optim::SGDParamState>(
        options, optim::SGDOptions(0.5).momentum(0.1), make_params(torch::kFloat32), 7, 8);
  }
}

TEST(SGD, SaveLoadThroughAFileContinuesBitwise) {
  check_checkpoint_round_trip<optim::SGD, optim::SGDOptions, optim::SGDParamState>(
      optim::SGDOptions(0.05).momentum(0.9).weight_decay(0.01), optim::SGDOptions(), make_params(torch::kFloat64), 5, 5,
      temp_checkpoint_path("sgd"));
}

TEST(SGD, LoadIntoMismatchedParamGroupsThrows) {
  auto params = make_params(torch::kFloat32);
  optim::SGD opt(params, optim::SGDOptions(0.1).momentum(0.9));
  run(opt, params, make_grads(params, 2));
  const auto bytes = checkpoint_bytes(opt);

  auto fewer = clone_all({params[0], params[1]});
  optim::SGD fewer_opt(fewer, optim::SGDOptions(0.1).momentum(0.9));
  EXPECT_THROW(load_bytes(fewer_opt, bytes), c10::Error);

  auto more = clone_all({params[0], params[1], params[2], params[2]});
  optim::SGD more_opt(more, optim::SGDOptions(0.1).momentum(0.9));
  EXPECT_THROW(load_bytes(more_opt, bytes), c10::Error);

  auto same = clone_all(params);
  optim::SGD two_groups(std::vector<torch::Tensor>{same[0], same[1]}, optim::SGDOptions(0.1).momentum(0.9));
  two_groups.add_param_group(torch::optim::OptimizerParamGroup({same[2]}));
  EXPECT_THROW(load_bytes(two_groups, bytes), c10::Error);

  // The control: a matching optimizer loads the same bytes.
  auto matching = clone_all(params);
  optim::SGD matching_opt(matching, optim::SGDOptions(0.1).momentum(0.9));
  EXPECT_NO_THROW(load_bytes(matching_opt, bytes));
}

TEST(SGD, BadOptionsThrowNamingTheArgument) {
  auto params = make_params(torch::kFloat32);
  auto make = [&](const optim::SGDOptions& options) { return [&params, options] { optim::SGD opt(params, options); }; };
  EXPECT_THROW(make(optim::SGDOptions(-0.1))(), c10::Error);
  expect_throws_mentioning(make(optim::SGDOptions(-0.1)), "lr");
  expect_throws_mentioning(make(optim::SGDOptions(std::numeric_limits<double>::quiet_NaN())), "lr");
  expect_throws_mentioning(make(optim::SGDOptions(std::numeric_limits<double>::infinity())), "lr");
  expect_throws_mentioning(make(optim::SGDOptions(0.1).weight_decay(-1e-4)), "weight_decay");
  expect_throws_mentioning(make(optim::SGDOptions(0.1).momentum(-0.5)), "momentum");
  expect_throws_mentioning(make(optim::SGDOptions(0.1).momentum(0.9).dampening(1.5)), "dampening");
  expect_throws_mentioning(make(optim::SGDOptions(0.1).momentum(0.9).dampening(-0.1)), "dampening");
  expect_throws_mentioning(make(optim::SGDOptions(0.1).nesterov(true)), "nesterov");
  expect_throws_mentioning(make(optim::SGDOptions(0.1).momentum(0.9).dampening(0.1).nesterov(true)), "nesterov");
  expect_throws_mentioning(make(optim::SGDOptions(0.1).state_dtype(torch::kInt32)), "state_dtype");
  // The boundaries are valid.
  EXPECT_NO_THROW(make(optim::SGDOptions(0.0).momentum(0.9).dampening(1.0))());
  EXPECT_NO_THROW(make(optim::SGDOptions(0.1).momentum(0.9).nesterov(true).state_dtype(torch::kFloat32))());
}

TEST(SGD, SparseGradientIsRejected) {
  auto p = torch::zeros({5});
  const auto before = p.clone();
  optim::SGD opt({p}, optim::SGDOptions(0.1).momentum(0.9));
  p.mutable_grad() = torch::sparse_coo_tensor(torch::tensor({{1, 3}}, torch::kLong), torch::tensor({1.0f, 2.0f}), {5});
  EXPECT_THROW(opt.step(), c10::Error);
  expect_throws_mentioning([&] { opt.step(); }, "sparse");
  EXPECT_TRUE(torch::equal(p, before));
}

TEST(SGD, Bf16ParamsKeepFp32MomentumAndTrackFp32Run) {
  torch::manual_seed(0);
  // Params of magnitude ~0.05 keep the bf16 rounding error of 20 steps small
  // (each step rounds to nearest, half an ulp: ~1e-3 at 0.3).
  auto low = std::vector<torch::Tensor>{(0.05 * torch::randn({17, 33})).to(torch::kBFloat16),
                                        (0.05 * torch::randn({1001})).to(torch::kBFloat16),
                                        (0.05 * torch::randn({})).to(torch::kBFloat16)};
  std::vector<torch::Tensor> reference;
  for (const auto& p : low) {
    reference.push_back(p.to(torch::kFloat32));
  }
  const auto start = clone_all(reference);
  auto grads = make_grads(low, 20);  // bf16; the reference sees the same values in fp32
  std::vector<std::vector<torch::Tensor>> fp32_grads;
  for (const auto& step : grads) {
    fp32_grads.emplace_back();
    for (const auto& g : step) {
      fp32_grads.back().push_back(g.to(torch::kFloat32));
    }
  }
  const auto options = optim::SGDOptions(3e-3).momentum(0.9).weight_decay(0.01);
  optim::SGD low_opt(low, optim::SGDOptions(options).state_dtype(torch::kFloat32));
  optim::SGD ref_opt(reference, options);
  run(low_opt, low, grads);
  run(ref_opt, reference, fp32_grads);
  for (const auto& p : low) {
    EXPECT_EQ(p.scalar_type(), torch::kBFloat16);
    const auto& state = static_cast<const optim::SGDParamState&>(*low_opt.state().at(p.unsafeGetTensorImpl()));
    EXPECT_EQ(state.momentum_buffer().scalar_type(), torch::kFloat32);
  }
  // Both runs moved well past the tolerance, so closeness is informative.
  EXPECT_GT((reference[1] - start[1]).abs().max().item<double>(), 0.04);
  EXPECT_GT((low[1].to(torch::kFloat32) - start[1]).abs().max().item<double>(), 0.04);
  expect_close_within(low, reference, 0.0, 1e-2, "SGD bf16 vs fp32");
}

// Updates below half a bf16 ulp: round-to-nearest never moves the params,
// stochastic rounding moves them by the right amount on average.
TEST(SGD, Bf16StochasticRoundingIsUnbiasedWhereNearestStalls) {
  torch::manual_seed(0);
  const auto start = (1.0 + 0.5 * torch::rand({4001})).to(torch::kBFloat16);  // ulp 2^-7 in [1, 2)
  auto train = [&](bool stochastic, int64_t seed) {
    auto p = start.clone();
    optim::SGD opt({p}, optim::SGDOptions(1e-3).stochastic_rounding(stochastic).seed(seed));
    for (int i = 0; i < 20; ++i) {
      p.mutable_grad() = torch::ones_like(p);
      opt.step();
    }
    return p;
  };
  auto reference = start.to(torch::kFloat32);
  {
    optim::SGD opt({reference}, optim::SGDOptions(1e-3));
    for (int i = 0; i < 20; ++i) {
      reference.mutable_grad() = torch::ones_like(reference);
      opt.step();
    }
  }
  const auto nearest = train(false, 0);
  const auto stochastic = train(true, 42);
  EXPECT_TRUE(torch::equal(nearest, start)) << "round-to-nearest should stall on sub-half-ulp updates";
  const double nearest_bias = (nearest.to(torch::kFloat32) - reference).mean().item<double>();
  const double stochastic_bias = (stochastic.to(torch::kFloat32) - reference).mean().item<double>();
  std::cout << "[ bias     ] nearest " << nearest_bias << ", stochastic " << stochastic_bias << "\n";
  EXPECT_NEAR(nearest_bias, 0.02, 1e-3);
  EXPECT_LT(std::abs(stochastic_bias), 1e-3);
  EXPECT_TRUE(torch::equal(train(true, 42), stochastic)) << "same seed, different result";
  EXPECT_FALSE(torch::equal(train(true, 43), stochastic)) << "the seed has no effect";
}

TEST(SGDFunctional, FoundInfSkipsAndGradScaleUnscales) {
  auto params = make_params(torch::kFloat32);
  auto plain = clone_all(params);
  const auto grads = make_grads(params, 3);
  std::vector<torch::Tensor> buffers, steps;
  for (const auto& p : params) {
    buffers.push_back(torch::zeros_like(p));
    steps.push_back(torch::zeros({}));
  }
  auto plain_buffers = clone_all(buffers);
  auto plain_steps = clone_all(steps);
  const auto lr = torch::scalar_tensor(0.05, torch::kFloat64);
  for (const auto& step : grads) {
    std::vector<torch::Tensor> scaled;
    for (const auto& g : step) {
      scaled.push_back(g * 4.0);
    }
    // found_inf: nothing moves, not even the grads.
    const auto before = clone_all(params);
    const auto scaled_before = clone_all(scaled);
    torchopt_ext::functional::sgd_step_(params, scaled, buffers, steps, lr, 0.9, 0.0, 0.01, true, false, false, 0,
                                        torch::scalar_tensor(4.0f), torch::scalar_tensor(1.0f));
    expect_bitwise_equal(params, before);
    expect_bitwise_equal(scaled, scaled_before);
    torchopt_ext::functional::sgd_step_(params, scaled, buffers, steps, lr, 0.9, 0.0, 0.01, true, false, false, 0,
                                        torch::scalar_tensor(4.0f), torch::scalar_tensor(0.0f));
    torchopt_ext::functional::sgd_step_(plain, clone_all(step), plain_buffers, plain_steps, lr, 0.9, 0.0, 0.01, true,
                                        false, false, 0, std::nullopt, std::nullopt);
    expect_bitwise_equal(scaled, step);
  }
  expect_bitwise_equal(params, plain);
  expect_bitwise_equal(buffers, plain_buffers);
  expect_bitwise_equal(steps, plain_steps);
  EXPECT_EQ(steps[0].item<float>(), 3.0f);
}

}  // namespace
