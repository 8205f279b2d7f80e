// LibTorch SophiaH / SophiaG: the update against a torch-ops reference, the
// Hutchinson and GNB estimators, the update_hessian schedule, checkpoints
// and option checks.
#include <gtest/gtest.h>
#include <torch/torch.h>
#include <torchopt_ext/torchopt_ext.h>

#include <sstream>
#include <string>
#include <vector>

#include "test_utils.h"

namespace {

namespace optim = torchopt_ext::optim;
namespace hessian = torchopt_ext::hessian;
using namespace torchopt_ext::testing;

struct RefConfig {
  double lr, beta1, beta2, gamma, eps, weight_decay;
  std::string eps_mode;
  bool maximize;
};

// classic.md §12 op by op, in float64.
void reference_step(std::vector<torch::Tensor>& params, const std::vector<torch::Tensor>& grads,
                    std::vector<torch::Tensor>& m, const std::vector<torch::Tensor>& h, const RefConfig& c) {
  for (size_t i = 0; i < params.size(); ++i) {
    const auto g = c.maximize ? -grads[i] : grads[i];
    params[i].mul_(1 - c.lr * c.weight_decay);
    m[i].mul_(c.beta1).add_((1 - c.beta1) * g);
    const auto scaled = c.gamma * h[i];
    const auto denom = c.eps_mode == "add" ? scaled + c.eps : scaled.clamp_min(c.eps);
    params[i].sub_(c.lr * (m[i] / denom).clamp(-1.0, 1.0));
  }
}

class SophiaParity : public ::testing::TestWithParam<std::tuple<torch::Dtype, std::string, bool>> {};

TEST_P(SophiaParity, TwentyStepsMatchTorchOpsReference) {
  const auto [dtype, eps_mode, maximize] = GetParam();
  const RefConfig c{0.02, 0.9, 0.7, 0.5, 1e-3, 0.05, eps_mode, maximize};
  auto params = make_params(dtype);
  std::vector<torch::Tensor> ref, m, h;
  for (const auto& p : params) {
    ref.push_back(p.to(torch::kFloat64));
    m.push_back(torch::zeros_like(ref.back()));
    h.push_back(torch::zeros_like(ref.back()));
  }
  optim::SophiaH opt(params, optim::SophiaHOptions(c.lr)
                                 .betas({c.beta1, c.beta2})
                                 .gamma(c.gamma)
                                 .eps(c.eps)
                                 .weight_decay(c.weight_decay)
                                 .eps_mode(eps_mode)
                                 .maximize(maximize));
  const auto grads = make_grads(params, 20);
  torch::manual_seed(5);
  int64_t clipped = 0, unclipped = 0;
  for (int t = 0; t < 20; ++t) {
    if (t % 4 == 0) {
      std::vector<torch::Tensor> estimates;
      for (size_t i = 0; i < params.size(); ++i) {
        estimates.push_back(torch::rand_like(params[i]) * 2);
        h[i].mul_(c.beta2).add_((1 - c.beta2) * estimates.back().to(torch::kFloat64));
      }
      opt.update_hessian(estimates);
    }
    std::vector<torch::Tensor> g64;
    for (size_t i = 0; i < params.size(); ++i) {
      params[i].mutable_grad() = grads[t][i].clone();
      g64.push_back(grads[t][i].to(torch::kFloat64));
    }
    opt.step();
    reference_step(ref, g64, m, h, c);
    for (size_t i = 0; i < m.size(); ++i) {
      const auto ratio = (m[i] / (c.gamma * h[i]).clamp_min(c.eps)).abs();
      clipped += (ratio > 1).sum().item<int64_t>();
      unclipped += (ratio < 1).sum().item<int64_t>();
    }
  }
  EXPECT_GT(clipped, 100);
  EXPECT_GT(unclipped, 100);
  const double tol = dtype == torch::kFloat64 ? 1e-12 : 2e-6;
  std::vector<torch::Tensor> ours64;
  for (const auto& p : params) {
    ours64.push_back(p.to(torch::kFloat64));
  }
  expect_close_within(ours64, ref, tol, tol, "SophiaH vs reference");
}

INSTANTIATE_TEST_SUITE_P(Sophia, SophiaParity,
                         ::testing::Combine(::testing::Values(torch::kFloat32, torch::kFloat64),
                                            ::testing::Values(std::string("max"), std::string("add")),
                                            ::testing::Values(false, true)));

TEST(Sophia, NoEstimateIsASignMomentumStep) {
  auto p = torch::randn({64}, torch::kFloat64);
  const auto start = p.clone();
  const auto g = torch::randn({64}, torch::kFloat64);
  optim::SophiaG opt(std::vector<torch::Tensor>{p}, optim::SophiaGOptions(0.01).weight_decay(0.0));
  p.mutable_grad() = g.clone();
  opt.step();
  EXPECT_TRUE(torch::allclose(p, start - 0.01 * torch::sign(g), 0.0, 1e-15));
}

// 0.5 [x1; x2]^T A [x1; x2] with a symmetric positive A.
torch::Tensor quadratic_matrix(int64_t n) {
  torch::manual_seed(7);
  const auto b = torch::randn({n, n}, torch::kFloat64);
  return b.matmul(b.t()) + torch::eye(n, torch::kFloat64);
}

TEST(SophiaHessian, HutchinsonIsZTimesHzOnAQuadratic) {
  const auto a = quadratic_matrix(7);
  auto x1 = torch::randn({3}, torch::kFloat64).requires_grad_(true);
  auto x2 = torch::randn({4}, torch::kFloat64).requires_grad_(true);
  const auto x = torch::cat({x1, x2});
  const auto loss = 0.5 * x.dot(a.mv(x));
  const auto est = hessian::hutchinson(loss, {x1, x2}, at::make_generator<at::CPUGeneratorImpl>(11));
  const auto probes = hessian::sample_probes({x1, x2}, at::make_generator<at::CPUGeneratorImpl>(11));
  const auto z = torch::cat(probes);
  EXPECT_TRUE(torch::equal(z.abs(), torch::ones_like(z)));  // Rademacher: +-1
  const auto expected = z * a.mv(z);
  EXPECT_TRUE(torch::allclose(torch::cat(est), expected, 1e-13, 1e-13));
}

TEST(SophiaHessian, HutchinsonMeanApproachesTheDiagonal) {
  const auto a = quadratic_matrix(5);
  auto x = torch::randn({5}, torch::kFloat64).requires_grad_(true);
  const auto est = hessian::hutchinson(0.5 * x.dot(a.mv(x)), {x}, at::make_generator<at::CPUGeneratorImpl>(0), 4000);
  EXPECT_LT((est[0] - a.diag()).abs().max().item<double>(), 0.25);
}

TEST(SophiaHessian, GaussNewtonBartlettMatchesDirectComputation) {
  torch::manual_seed(3);
  const auto x = torch::randn({6, 4}, torch::kFloat64);
  auto w = torch::randn({3, 4}, torch::kFloat64).requires_grad_(true);
  const auto logits = x.matmul(w.t());
  const auto est = hessian::gauss_newton_bartlett(logits, {w}, at::make_generator<at::CPUGeneratorImpl>(9));
  torch::NoGradGuard no_grad;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(9);
  const auto labels = at::multinomial(torch::softmax(logits.to(torch::kFloat32), -1), 1, true, gen).squeeze(-1);
  const auto dlogits = (torch::softmax(logits, -1) - torch::one_hot(labels, 3).to(torch::kFloat64)) / 6.0;
  const auto gw = dlogits.t().matmul(x);
  EXPECT_TRUE(torch::allclose(est[0], 6.0 * gw * gw, 1e-12, 1e-15));
}

TEST(Sophia, UpdateHessianRunsTheClosureEveryPeriod) {
  auto x = torch::randn({4}).requires_grad_(true);
  optim::SophiaH opt(std::vector<torch::Tensor>{x}, optim::SophiaHOptions().update_period(3));
  std::vector<int> evaluated;
  for (int call = 0; call < 8; ++call) {
    const auto out = opt.update_hessian([&] {
      evaluated.push_back(call);
      return x.pow(4).sum();
    });
    EXPECT_EQ(out.defined(), call % 3 == 0) << "call " << call;
  }
  EXPECT_EQ(evaluated, (std::vector<int>{0, 3, 6}));
  EXPECT_EQ(opt.hessian_calls(), 8);
}

TEST(Sophia, SophiaGRefreshIsTheEmaOfGnb) {
  torch::manual_seed(4);
  auto w = torch::randn({5, 3}, torch::kFloat64).requires_grad_(true);
  const auto x = torch::randn({2, 7, 3}, torch::kFloat64);
  optim::SophiaG opt(std::vector<torch::Tensor>{w}, optim::SophiaGOptions().seed(5));
  opt.update_hessian([&] { return x.matmul(w.t()); });
  const auto est = hessian::gauss_newton_bartlett(x.matmul(w.t()), {w}, at::make_generator<at::CPUGeneratorImpl>(5));
  const auto& state = static_cast<const optim::SophiaParamState&>(*opt.state().at(w.unsafeGetTensorImpl()));
  EXPECT_TRUE(torch::allclose(state.hessian(), 0.01 * est[0], 1e-14, 0.0));
}

// Train with closure refreshes, save, continue: a loaded copy continues
// bitwise (state, refresh schedule and probe stream).
TEST(Sophia, SaveLoadContinuesWithScheduleAndGenerator) {
  auto make = [](std::vector<torch::Tensor>& params) {
    return optim::SophiaH(params, optim::SophiaHOptions(1e-2).update_period(3).gamma(0.5).seed(7));
  };
  auto iterate = [](optim::SophiaH& opt, std::vector<torch::Tensor>& params, int n) {
    for (int i = 0; i < n; ++i) {
      opt.update_hessian([&] { return params[0].pow(4).sum() + params[1].pow(3).sum(); });
      for (auto& p : params) {
        p.mutable_grad() = torch::ones_like(p);
      }
      opt.step();
    }
  };
  torch::manual_seed(0);
  std::vector<torch::Tensor> params{torch::randn({4, 3}).requires_grad_(true), torch::randn({5}).requires_grad_(true)};
  auto opt = make(params);
  iterate(opt, params, 4);
  const auto bytes = checkpoint_bytes(opt);
  std::vector<torch::Tensor> resumed_params;
  for (const auto& p : params) {
    resumed_params.push_back(p.detach().clone().requires_grad_(true));
  }
  iterate(opt, params, 5);
  auto resumed = optim::SophiaH(resumed_params, optim::SophiaHOptions(1e-2).update_period(3).gamma(0.5).seed(99));
  load_bytes(resumed, bytes);
  EXPECT_EQ(resumed.hessian_calls(), 4);
  iterate(resumed, resumed_params, 5);
  for (size_t i = 0; i < params.size(); ++i) {
    EXPECT_TRUE(torch::equal(params[i], resumed_params[i])) << "param " << i;
  }
}

TEST(Sophia, CheckpointRoundTripRestoresOptionsAndState) {
  check_checkpoint_round_trip<optim::SophiaG, optim::SophiaGOptions, optim::SophiaParamState>(
      optim::SophiaGOptions(1e-2).rho(0.5).eps_mode("max").eps(1e-9), optim::SophiaGOptions(1.0),
      make_params(torch::kFloat32), 6, 6);
  check_checkpoint_round_trip<optim::SophiaH, optim::SophiaHOptions, optim::SophiaParamState>(
      optim::SophiaHOptions(1e-2).n_samples(3).distribution("gaussian").state_dtype(torch::kFloat64),
      optim::SophiaHOptions(1.0), make_params(torch::kFloat64), 6, 6);
}

TEST(Sophia, BadOptionsThrowNamingTheArgument) {
  auto h = [](optim::SophiaHOptions o) {
    return [o] { optim::SophiaH(std::vector<torch::Tensor>{torch::randn({3})}, o); };
  };
  auto g = [](optim::SophiaGOptions o) {
    return [o] { optim::SophiaG(std::vector<torch::Tensor>{torch::randn({3})}, o); };
  };
  expect_throws_mentioning(h(optim::SophiaHOptions(-1.0)), "lr");
  expect_throws_mentioning(h(optim::SophiaHOptions().betas({1.0, 0.9})), "betas[0]");
  expect_throws_mentioning(h(optim::SophiaHOptions().betas({0.9, -0.1})), "betas[1]");
  expect_throws_mentioning(h(optim::SophiaHOptions().gamma(-1.0)), "gamma");
  expect_throws_mentioning(h(optim::SophiaHOptions().eps(0.0)), "eps");
  expect_throws_mentioning(h(optim::SophiaHOptions().eps_mode("min")), "eps_mode");
  expect_throws_mentioning(h(optim::SophiaHOptions().weight_decay(-0.1)), "weight_decay");
  expect_throws_mentioning(h(optim::SophiaHOptions().update_period(0)), "update_period");
  expect_throws_mentioning(h(optim::SophiaHOptions().n_samples(0)), "n_samples");
  expect_throws_mentioning(h(optim::SophiaHOptions().distribution("uniform")), "distribution");
  expect_throws_mentioning(h(optim::SophiaHOptions().state_dtype(torch::kInt32)), "state_dtype");
  expect_throws_mentioning(g(optim::SophiaGOptions().rho(-0.04)), "rho");
  expect_throws_mentioning(g(optim::SophiaGOptions().eps(-1.0)), "eps");
  optim::SophiaG opt(std::vector<torch::Tensor>{torch::randn({3})});
  expect_throws_mentioning([&] { opt.update_hessian(std::vector<torch::Tensor>{}); }, "estimates");
}

TEST(Sophia, ParamGroupsAndSchedulerUseTheirOwnOptions) {
  auto a = torch::zeros({4}, torch::kFloat64);
  auto b = torch::zeros({4}, torch::kFloat64);
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(std::vector<torch::Tensor>{a});
  groups.emplace_back(std::vector<torch::Tensor>{b},
                      std::make_unique<optim::SophiaGOptions>(optim::SophiaGOptions(0.1).weight_decay(0.0)));
  optim::SophiaG opt(groups, optim::SophiaGOptions(0.01).weight_decay(0.0));
  torch::optim::StepLR scheduler(opt, 1, 0.5);
  for (int i = 0; i < 3; ++i) {
    a.mutable_grad() = torch::ones({4}, torch::kFloat64);
    b.mutable_grad() = torch::ones({4}, torch::kFloat64);
    opt.step();
    scheduler.step();
  }
  // h = 0: each step moves by lr (sign of a positive m); LibTorch's StepLR
  // halves the lr from its second step() on, so the third step uses lr / 2.
  EXPECT_TRUE(torch::allclose(a, torch::full({4}, -(0.01 + 0.01 + 0.005), torch::kFloat64), 0.0, 1e-15));
  EXPECT_TRUE(torch::allclose(b, torch::full({4}, -(0.1 + 0.1 + 0.05), torch::kFloat64), 0.0, 1e-15));
}

}  // namespace
