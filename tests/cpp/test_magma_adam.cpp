// Magma on Adam / AdamW (rollfast.md §5): exact updates against a float64
// reference written from the spec with the core's draws, never-keep, the mask
// rate, checkpoints, option errors, and the masked AdamW fallback of Muon.
#include <gtest/gtest.h>
#include <torch/torch.h>
#include <torchopt_ext/common/magma.h>
#include <torchopt_ext/torchopt_ext.h>

#include <cmath>
#include <vector>

#include "test_utils.h"

namespace {

namespace optim = torchopt_ext::optim;
using namespace torchopt_ext::testing;
using Tensors = std::vector<torch::Tensor>;

struct Reference {
  Tensors params;
  std::vector<float> scores;
};

// AdamW (decoupled) + Magma in float64; the fp32 score as rollfast keeps it.
Reference adamw_magma_reference(Tensors params, const std::vector<Tensors>& grads, double lr, double wd, double p,
                                double tau, int64_t seed) {
  const double b1 = 0.9, b2 = 0.999, eps = 1e-8;
  Tensors m, v;
  std::vector<float> scores(params.size(), 0.5f);
  for (auto& x : params) {
    x = x.to(torch::kFloat64).clone();
    m.push_back(torch::zeros_like(x));
    v.push_back(torch::zeros_like(x));
  }
  const torchopt_ext::common::MagmaOptions magma{p, tau, seed};
  for (size_t t = 1; t <= grads.size(); ++t) {
    for (size_t i = 0; i < params.size(); ++i) {
      const auto g = grads[t - 1][i].to(torch::kFloat64);
      m[i] = b1 * m[i] + (1 - b1) * g;
      v[i] = b2 * v[i] + (1 - b2) * g * g;
      const double dot = (g * m[i]).sum().item<double>();
      const double norms = std::max(g.norm().item<double>() * m[i].norm().item<double>(), 1e-12);
      const double cosine = std::clamp(dot / norms, -1.0, 1.0);
      scores[i] = static_cast<float>(0.9 * scores[i] + 0.1 / (1.0 + std::exp(-cosine / tau)));
      const bool keep = torchopt_ext::common::magma_keep(magma, static_cast<int64_t>(i), static_cast<double>(t));
      const double scale = keep ? scores[i] : 0.0;
      const auto direction =
          (m[i] / (1 - std::pow(b1, t))) / ((v[i] / (1 - std::pow(b2, t))).sqrt() + eps) + wd * params[i];
      params[i] = params[i] - lr * scale * direction;
    }
  }
  return {params, scores};
}

TEST(AdamMagma, MatchesFloat64ReferenceWithTheCoresDraws) {
  auto params = make_params(torch::kFloat64, 4);
  const auto start = clone_all(params);
  const auto grads = make_grads(params, 20, 5);
  optim::AdamW opt(params, optim::AdamWOptions(1e-2).weight_decay(0.1).use_magma(true).seed(17));
  run(opt, params, grads);
  const auto expected = adamw_magma_reference(start, grads, 1e-2, 0.1, 0.5, 2.0, 17);
  for (size_t i = 0; i < params.size(); ++i) {
    EXPECT_TRUE(torch::allclose(params[i], expected.params[i], 1e-12, 1e-12)) << "param " << i;
    const auto& state = static_cast<const optim::AdamParamState&>(*opt.state().at(params[i].unsafeGetTensorImpl()));
    EXPECT_NEAR(state.magma_score().item<float>(), expected.scores[i], 1e-6);
  }
}

TEST(AdamMagma, Fp32ParamsTrackTheReference) {
  auto params = make_params(torch::kFloat32, 6);
  const auto start = clone_all(params);
  const auto grads = make_grads(params, 20, 7);
  optim::AdamW opt(params, optim::AdamWOptions(1e-2).use_magma(true).magma_tau(0.5).seed(2));
  run(opt, params, grads);
  const auto expected = adamw_magma_reference(start, grads, 1e-2, 1e-2, 0.5, 0.5, 2);
  for (size_t i = 0; i < params.size(); ++i) {
    EXPECT_TRUE(torch::allclose(params[i].to(torch::kFloat64), expected.params[i], 2e-6, 2e-6)) << "param " << i;
  }
}

TEST(AdamMagma, NeverKeepFreezesParamsIncludingDecay) {
  auto params = make_params(torch::kFloat32);
  const auto start = clone_all(params);
  optim::AdamW opt(params, optim::AdamWOptions(0.1).weight_decay(0.5).use_magma(true).magma_p(0.0));
  run(opt, params, make_grads(params, 4));
  expect_bitwise_equal(params, start);
  const auto& state = static_cast<const optim::AdamParamState&>(*opt.state().at(params[0].unsafeGetTensorImpl()));
  EXPECT_GT(state.exp_avg().abs().sum().item<double>(), 0.0);
  EXPECT_NE(state.magma_score().item<float>(), 0.5f);
}

TEST(AdamMagma, KeepRateIsP) {
  torch::manual_seed(0);
  Tensors params;
  for (int i = 0; i < 40; ++i) {
    params.push_back(torch::randn({3}));
  }
  optim::AdamW opt(params, optim::AdamWOptions(1e-3).weight_decay(0.0).use_magma(true).magma_p(0.3).seed(9));
  int kept = 0, total = 0;
  for (int step = 0; step < 20; ++step) {
    const auto before = clone_all(params);
    for (auto& p : params) {
      p.mutable_grad() = torch::randn_like(p);
    }
    opt.step();
    for (size_t i = 0; i < params.size(); ++i) {
      kept += torch::equal(params[i], before[i]) ? 0 : 1;
      ++total;
    }
  }
  // 800 draws of p = 0.3: standard deviation 0.016.
  EXPECT_NEAR(static_cast<double>(kept) / total, 0.3, 0.05);
}

TEST(AdamMagma, CheckpointRoundTrip) {
  check_checkpoint_round_trip<optim::AdamW, optim::AdamOptions, optim::AdamParamState>(
      optim::AdamWOptions(1e-2).weight_decay(0.1).use_magma(true).magma_p(0.6).magma_tau(1.5).seed(3),
      optim::AdamWOptions(0.5), make_params(torch::kFloat32), 5, 6);
}

TEST(AdamMagma, BadOptionsThrowNamingTheArgument) {
  auto params = make_params(torch::kFloat32);
  expect_throws_mentioning([&] { optim::AdamW opt(params, optim::AdamWOptions().use_magma(true).magma_p(1.5)); },
                           "magma_p");
  expect_throws_mentioning([&] { optim::Adam opt(params, optim::AdamOptions().magma_tau(0.0)); }, "magma_tau");
}

TEST(AdamMagma, MuonFallbackIsMaskedToo) {
  torch::manual_seed(1);
  Tensors params{torch::randn({6, 5}), torch::randn({5})};
  const auto start = clone_all(params);
  optim::Muon opt(params, optim::MuonOptions(0.05).weight_decay(0.1).use_magma(true).magma_p(0.0));
  run(opt, params, make_grads(params, 3));
  expect_bitwise_equal(params, start);
  const auto& bias = static_cast<const optim::MuonParamState&>(*opt.state().at(params[1].unsafeGetTensorImpl()));
  EXPECT_TRUE(bias.magma_score().defined());
  EXPECT_GT(bias.exp_avg().abs().sum().item<double>(), 0.0);
}

}  // namespace
