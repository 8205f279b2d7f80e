// KronPSGD in LibTorch: parity with a dense reference of rlx-optim's KronPsgd
// (seed 002) written here with explicit inverses (the functional uses
// triangular solves), the identity fixed point, the SGD fallback, save/load,
// LR schedulers, param groups and errors.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <vector>

#include "test_utils.h"
#include "torchopt_ext/optim/kron_psgd.h"

namespace {

using namespace torchopt_ext;
using namespace torchopt_ext::testing;

torch::Tensor factor_step(const torch::Tensor& q, const torch::Tensor& d, double plr, double eps) {
  const double scale = plr / (d.norm().item<double>() + eps);
  return q - scale * torch::mm(q, torch::triu(d));
}

struct Reference {
  double lr, plr, mu, wd, eps, clip;
  std::vector<torch::Tensor> v, ql, qr;

  void step(std::vector<torch::Tensor>& params, const std::vector<torch::Tensor>& grads) {
    for (size_t i = 0; i < params.size(); ++i) {
      const auto& g = grads[i];
      torch::Tensor direction = g;
      if (params[i].dim() == 2) {
        const auto a = torch::mm(torch::mm(ql[i], g), qr[i].t());
        const auto b = torch::mm(torch::mm(torch::inverse(ql[i]).t(), g), torch::inverse(qr[i]));
        const auto ql_new = factor_step(ql[i], torch::mm(a, a.t()) - torch::mm(b, b.t()), plr, eps);
        const auto qr_new = factor_step(qr[i], torch::mm(a.t(), a) - torch::mm(b.t(), b), plr, eps);
        ql[i] = ql_new;
        qr[i] = qr_new;
        auto pg = torch::mm(torch::mm(torch::mm(ql_new.t(), ql_new), g), torch::mm(qr_new, qr_new.t()));
        const double max_abs = pg.abs().max().item<double>();
        direction = max_abs > clip ? pg * (clip / max_abs) : pg;
      }
      v[i] = mu * v[i] + direction + wd * params[i];
      params[i] = params[i] - lr * v[i];
    }
  }
};

torch::Tensor triangular_start(int64_t n) {
  return torch::eye(n, torch::kFloat64) + torch::triu(torch::randn({n, n}, torch::kFloat64)) * 0.3;
}

TEST(KronPSGD, MatchesDenseReferenceInFloat64) {
  torch::manual_seed(0);
  std::vector<torch::Tensor> params{torch::randn({11, 6}, torch::kFloat64), torch::randn({4, 9}, torch::kFloat64),
                                    torch::randn({7}, torch::kFloat64), torch::randn({2, 3, 2}, torch::kFloat64)};
  auto ref_params = clone_all(params);
  const auto opts = optim::KronPSGDOptions(0.03).precond_lr(0.2).momentum(0.7).weight_decay(0.01).clip(0.5);
  optim::KronPSGD opt(params, opts);
  Reference ref{0.03, 0.2, 0.7, 0.01, 1e-8, 0.5};
  for (const auto& p : params) {
    ref.v.push_back(torch::zeros_like(p));
    ref.ql.push_back(p.dim() == 2 ? triangular_start(p.size(0)) : torch::Tensor());
    ref.qr.push_back(p.dim() == 2 ? triangular_start(p.size(1)) : torch::Tensor());
  }
  // Start the optimizer from the same factors (from the identity they never move).
  for (size_t i = 0; i < 2; ++i) {
    auto state = std::make_unique<optim::KronPSGDParamState>();
    state->step(torch::zeros({}, torch::kFloat32));
    state->momentum_buffer(torch::zeros_like(params[i]));
    state->ql(ref.ql[i].clone());
    state->qr(ref.qr[i].clone());
    opt.state()[params[i].unsafeGetTensorImpl()] = std::move(state);
  }
  const auto grads = make_grads(params, 25);
  run(opt, params, grads);
  for (const auto& step : grads) {
    ref.step(ref_params, step);
  }
  expect_close_within(params, ref_params, 1e-10, 1e-10, "kron_psgd fp64");
}

TEST(KronPSGD, FactorsStayAtTheIdentityAsInTheCrate) {
  auto params = make_params(torch::kFloat32);
  optim::KronPSGD opt(params, optim::KronPSGDOptions(0.01));
  run(opt, params, make_grads(params, 5));
  const auto& state = static_cast<const optim::KronPSGDParamState&>(*opt.state().at(params[0].unsafeGetTensorImpl()));
  EXPECT_TRUE(torch::equal(state.ql(), torch::eye(17)));
  EXPECT_TRUE(torch::equal(state.qr(), torch::eye(33)));
  const auto& vector_state =
      static_cast<const optim::KronPSGDParamState&>(*opt.state().at(params[1].unsafeGetTensorImpl()));
  EXPECT_FALSE(vector_state.ql().defined());
}

TEST(KronPSGD, NonMatricesTakeSgdWithMomentum) {
  torch::manual_seed(0);
  std::vector<torch::Tensor> params{torch::randn({9}, torch::kFloat64), torch::randn({}, torch::kFloat64),
                                    torch::randn({2, 2, 3}, torch::kFloat64)};
  auto ref_params = clone_all(params);
  optim::KronPSGD opt(params, optim::KronPSGDOptions(0.1).momentum(0.8).weight_decay(0.05));
  torch::optim::SGD sgd(ref_params, torch::optim::SGDOptions(0.1).momentum(0.8).weight_decay(0.05));
  const auto grads = make_grads(params, 10);
  run(opt, params, grads);
  run(sgd, ref_params, grads);
  expect_close_within(params, ref_params, 1e-14, 1e-14, "fallback");
}

TEST(KronPSGD, SaveLoadContinuesBitwise) {
  check_save_load_continues_bitwise<optim::KronPSGD>(optim::KronPSGDOptions(0.01).weight_decay(0.01));
}

TEST(KronPSGD, StepLRScheduleChangesTheLr) {
  auto a = make_params(torch::kFloat64);
  auto b = clone_all(a);
  optim::KronPSGD scheduled(a, optim::KronPSGDOptions(0.1));
  torch::optim::StepLR scheduler(scheduled, 2, 0.5);
  const auto grads = make_grads(a, 4);
  for (size_t k = 0; k < grads.size(); ++k) {
    for (size_t i = 0; i < a.size(); ++i) {
      a[i].mutable_grad() = grads[k][i].clone();
    }
    scheduled.step();
    scheduler.step();
  }
  // LibTorch's StepLR halves the lr on its third call (step count 2).
  EXPECT_DOUBLE_EQ(scheduled.param_groups()[0].options().get_lr(), 0.05);
  // The same run with the lr set by hand.
  optim::KronPSGD manual(b, optim::KronPSGDOptions(0.1));
  for (size_t k = 0; k < grads.size(); ++k) {
    manual.param_groups()[0].options().set_lr(k < 3 ? 0.1 : 0.05);
    for (size_t i = 0; i < b.size(); ++i) {
      b[i].mutable_grad() = grads[k][i].clone();
    }
    manual.step();
  }
  expect_bitwise_equal(a, b);
}

TEST(KronPSGD, ParamGroupsKeepTheirOptions) {
  auto params = make_params(torch::kFloat64);
  auto ref = clone_all(params);
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(std::vector<torch::Tensor>{params[0]});
  groups.emplace_back(std::vector<torch::Tensor>{params[1], params[2]},
                      std::make_unique<optim::KronPSGDOptions>(optim::KronPSGDOptions(0.01).momentum(0.0)));
  optim::KronPSGD opt(groups, optim::KronPSGDOptions(0.05));
  optim::KronPSGD first(std::vector<torch::Tensor>{ref[0]}, optim::KronPSGDOptions(0.05));
  optim::KronPSGD second(std::vector<torch::Tensor>{ref[1], ref[2]}, optim::KronPSGDOptions(0.01).momentum(0.0));
  const auto grads = make_grads(params, 3);
  for (const auto& step : grads) {
    for (size_t i = 0; i < params.size(); ++i) {
      params[i].mutable_grad() = step[i].clone();
      ref[i].mutable_grad() = step[i].clone();
    }
    opt.step();
    first.step();
    second.step();
  }
  expect_bitwise_equal(params, ref);
}

TEST(KronPSGD, BadOptionsNameTheArgument) {
  auto params = make_params(torch::kFloat32);
  expect_throws_mentioning([&] { optim::KronPSGD(params, optim::KronPSGDOptions(-1.0)); }, "lr");
  expect_throws_mentioning([&] { optim::KronPSGD(params, optim::KronPSGDOptions(0.1).precond_lr(-1)); }, "precond_lr");
  expect_throws_mentioning([&] { optim::KronPSGD(params, optim::KronPSGDOptions(0.1).momentum(1.0)); }, "momentum");
  expect_throws_mentioning([&] { optim::KronPSGD(params, optim::KronPSGDOptions(0.1).weight_decay(-1)); },
                           "weight_decay");
  expect_throws_mentioning([&] { optim::KronPSGD(params, optim::KronPSGDOptions(0.1).eps(0.0)); }, "eps");
  expect_throws_mentioning([&] { optim::KronPSGD(params, optim::KronPSGDOptions(0.1).clip(0.0)); }, "clip");
}

}  // namespace
