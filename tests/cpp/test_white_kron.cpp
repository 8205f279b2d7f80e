// WhiteKron in LibTorch: the 1-D diagonal path against a reference written
// here from white_kron.md (noise off, so no draws), state layouts of every
// path, save/load, LR schedulers and errors. The tile / strip math is checked
// against the float64 reference in tests/python/test_white_kron.py.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "test_utils.h"
#include "torchopt_ext/optim/white_kron.h"

namespace {

using namespace torchopt_ext;
using namespace torchopt_ext::testing;

void check_one_d(bool skew) {
  torch::manual_seed(0);
  std::vector<torch::Tensor> params{torch::randn({37}, torch::kFloat64)};
  auto w = params[0].clone();
  const double lr = 0.05, b1 = 0.9, wd = 0.1, plr0 = 0.9;
  optim::WhiteKron opt(
      params, optim::WhiteKronOptions(lr).b1(b1).weight_decay(wd).preconditioner_lr(plr0).noise_scale(0.0).update_style(
                  skew ? "skew" : "quad"));
  auto mu = torch::zeros_like(w);
  auto q = torch::ones_like(w);
  double lip = 0.0;
  const auto grads = make_grads(params, 20);
  run(opt, params, grads);
  for (size_t t = 1; t <= grads.size(); ++t) {
    const auto& g = grads[t - 1][0];
    mu = b1 * mu + (1 - b1) * g;
    const auto u = mu / (1 - std::pow(b1, t));
    const double plr = std::max(plr0 / std::sqrt(1.0 + t / 10000.0), 0.4);
    const auto pg = q * q * u;
    const auto term1 = pg * pg;
    const double ell = term1.max().item<double>() + 1.0;
    lip = std::max(0.95 * lip + 0.05 * ell, ell);
    const double z = skew ? plr / lip : plr / (2 * lip);
    const auto gain = 1 - z * (term1 - 1.0);
    q = skew ? q * gain : q * gain * gain;
    auto out = q * q * u;
    out = out * (1.1 / std::max(out.square().mean().sqrt().item<double>(), 1.1)) / 5.0;
    w = w * (1 - lr * wd) - lr * out;
  }
  expect_close_within(params, {w}, 1e-12, 1e-12, skew ? "one_d skew" : "one_d quad");
}

TEST(WhiteKron, OneDPathMatchesSpecSkew) { check_one_d(true); }

TEST(WhiteKron, OneDPathMatchesSpecQuad) { check_one_d(false); }

TEST(WhiteKron, StateLayoutsOfEveryPath) {
  // block 4, max_size_dense 10: dense (9, 6) -> 3 x 2 tiles; (6, 11) row
  // strips; (12, 5) column strips; (11, 12) diagonal; (2, 3, 4) -> (6, 4).
  std::vector<torch::Tensor> params{torch::randn({9, 6}),   torch::randn({6, 11}),   torch::randn({12, 5}),
                                    torch::randn({11, 12}), torch::randn({2, 3, 4}), torch::randn({5})};
  optim::WhiteKron opt(params, optim::WhiteKronOptions(0.01).block_size(4).max_size_dense(10).dtype(at::kFloat));
  run(opt, params, make_grads(params, 2));
  auto state = [&](size_t i) -> const optim::WhiteKronParamState& {
    return static_cast<const optim::WhiteKronParamState&>(*opt.state().at(params[i].unsafeGetTensorImpl()));
  };
  EXPECT_EQ(state(0).ql().sizes(), (std::vector<int64_t>{6, 4, 4}));
  EXPECT_EQ(state(0).lip_l().sizes(), (std::vector<int64_t>{6}));
  EXPECT_EQ(state(1).ql().sizes(), (std::vector<int64_t>{2, 4, 4}));
  EXPECT_EQ(state(1).qr().sizes(), (std::vector<int64_t>{2, 11}));
  EXPECT_EQ(state(2).ql().sizes(), (std::vector<int64_t>{2, 12}));
  EXPECT_EQ(state(2).qr().sizes(), (std::vector<int64_t>{2, 4, 4}));
  EXPECT_EQ(state(3).ql().sizes(), (std::vector<int64_t>{11}));
  EXPECT_EQ(state(3).qr().sizes(), (std::vector<int64_t>{12}));
  EXPECT_EQ(state(4).ql().sizes(), (std::vector<int64_t>{2, 4, 4}));
  EXPECT_EQ(state(5).ql().sizes(), (std::vector<int64_t>{5}));
  // Padding of the last tile row of (9, 6) (1 valid row) stays zero.
  EXPECT_EQ(state(0).ql().narrow(0, 4, 2).narrow(1, 1, 3).abs().max().item<double>(), 0.0);
  for (size_t i = 0; i < params.size(); ++i) {
    EXPECT_TRUE(torch::isfinite(params[i]).all().item<bool>());
  }
}

TEST(WhiteKron, SaveLoadContinuesBitwise) {
  check_save_load_continues_bitwise<optim::WhiteKron>(optim::WhiteKronOptions(0.01).block_size(8).seed(5));
}

TEST(WhiteKron, Bf16FactorsByDefault) {
  auto params = make_params(torch::kFloat32);
  optim::WhiteKron opt(params, optim::WhiteKronOptions(0.01).block_size(8));
  run(opt, params, make_grads(params, 3));
  const auto& state = static_cast<const optim::WhiteKronParamState&>(*opt.state().at(params[0].unsafeGetTensorImpl()));
  EXPECT_EQ(state.ql().scalar_type(), at::kBFloat16);
  EXPECT_EQ(state.mu().scalar_type(), at::kBFloat16);
  EXPECT_EQ(state.lip_l().scalar_type(), at::kFloat);
}

TEST(WhiteKron, SchedulerLrIsUsed) {
  auto a = make_params(torch::kFloat64);
  auto b = clone_all(a);
  optim::WhiteKron scheduled(a, optim::WhiteKronOptions(0.1).block_size(8).seed(1));
  torch::optim::StepLR scheduler(scheduled, 1, 0.5);
  optim::WhiteKron manual(b, optim::WhiteKronOptions(0.1).block_size(8).seed(1));
  const auto grads = make_grads(a, 3);
  for (size_t k = 0; k < grads.size(); ++k) {
    manual.param_groups()[0].options().set_lr(scheduled.param_groups()[0].options().get_lr());
    for (size_t i = 0; i < a.size(); ++i) {
      a[i].mutable_grad() = grads[k][i].clone();
      b[i].mutable_grad() = grads[k][i].clone();
    }
    scheduled.step();
    manual.step();
    scheduler.step();
  }
  EXPECT_LT(scheduled.param_groups()[0].options().get_lr(), 0.1);
  expect_bitwise_equal(a, b);
}

TEST(WhiteKron, BadOptionsNameTheArgument) {
  auto params = make_params(torch::kFloat32);
  using O = optim::WhiteKronOptions;
  expect_throws_mentioning([&] { optim::WhiteKron(params, O().update_style("cubic")); }, "update_style");
  expect_throws_mentioning([&] { optim::WhiteKron(params, O().lr_style("sgd")); }, "lr_style");
  expect_throws_mentioning([&] { optim::WhiteKron(params, O().dtype(at::kHalf)); }, "dtype");
  expect_throws_mentioning([&] { optim::WhiteKron(params, O().block_size(0)); }, "block_size");
  expect_throws_mentioning([&] { optim::WhiteKron(params, O().b1(1.0)); }, "b1");
  expect_throws_mentioning([&] { optim::WhiteKron(params, O().preconditioner_lr(0)); }, "preconditioner_lr");
  expect_throws_mentioning([&] { optim::WhiteKron(params, O().noise_scale(-1)); }, "noise_scale");
}

// Stacked (L, ...) params hand their slices to the functional as params
// (views), so all their dense tiles join the one tile stack and the draws are
// those of the slices listed as params: bitwise equal to separate params.
TEST(WhiteKron, StackedEqualsSeparateSlices) {
  torch::manual_seed(0);
  // (L, 20, 12) with block_size 8: 3 x 2 dense tiles per slice; (L, 9): 1-D slices.
  const std::vector<torch::Tensor> inits{torch::randn({3, 20, 12}), torch::randn({2, 9}), torch::randn({2, 4, 3, 5})};
  const auto base = optim::WhiteKronOptions(0.02).block_size(8).balance_every(3).dtype(at::kFloat).seed(4);
  std::vector<torch::Tensor> stacked, separate;
  for (const auto& init : inits) {
    stacked.push_back(init.clone());
    for (int64_t i = 0; i < init.size(0); ++i) {
      separate.push_back(init[i].clone());
    }
  }
  optim::WhiteKron stacked_opt(stacked, optim::WhiteKronOptions(base).stacked(true));
  optim::WhiteKron separate_opt(separate, base);
  const auto grads = make_grads(stacked, 8, 2);
  for (const auto& step : grads) {
    std::vector<torch::Tensor> sliced;
    for (const auto& g : step) {
      for (int64_t i = 0; i < g.size(0); ++i) {
        sliced.push_back(g[i].clone());
      }
    }
    run(stacked_opt, stacked, {step});
    run(separate_opt, separate, {sliced});
  }
  size_t k = 0;
  for (const auto& p : stacked) {
    const auto& s = static_cast<const optim::WhiteKronParamState&>(*stacked_opt.state().at(p.unsafeGetTensorImpl()));
    EXPECT_EQ(s.step().item<double>(), 8.0);
    for (int64_t i = 0; i < p.size(0); ++i, ++k) {
      const auto& r =
          static_cast<const optim::WhiteKronParamState&>(*separate_opt.state().at(separate[k].unsafeGetTensorImpl()));
      EXPECT_TRUE(torch::equal(p[i], separate[k]));
      EXPECT_TRUE(torch::equal(s.ql()[i], r.ql()));
      EXPECT_TRUE(torch::equal(s.qr()[i], r.qr()));
      EXPECT_TRUE(torch::equal(s.lip_l()[i], r.lip_l()));
      EXPECT_TRUE(torch::equal(s.lip_r()[i], r.lip_r()));
      EXPECT_TRUE(torch::equal(s.mu()[i], r.mu()));
    }
  }
  EXPECT_EQ(k, separate.size());
}

TEST(WhiteKron, StackedRejectsParamsWithoutLayerAxis) {
  std::vector<torch::Tensor> params{torch::randn({4})};
  optim::WhiteKron opt(params, optim::WhiteKronOptions(0.01).stacked(true));
  params[0].mutable_grad() = torch::randn({4});
  expect_throws_mentioning([&] { opt.step(); }, "stacked");
}

TEST(WhiteKron, StackedCheckpointRoundTrip) {
  std::vector<torch::Tensor> params{torch::randn({3, 10, 9}), torch::randn({2, 7})};
  check_checkpoint_round_trip<optim::WhiteKron, optim::WhiteKronOptions, optim::WhiteKronParamState>(
      optim::WhiteKronOptions(0.01).block_size(4).stacked(true).seed(3), optim::WhiteKronOptions(0.5).seed(8), params,
      3, 3);
}

}  // namespace
