// PRISM in LibTorch: parity with a reference written here from rollfast.md
// §3.3 on plain ATen ops (rollfast's (in, out) orientation, so the test also
// checks where the augmentation goes), the shared clipping core, strict spike
// skips, the AdamW fallback, checkpoints and errors.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "test_utils.h"
#include "torchopt_ext/common/clipping.h"
#include "torchopt_ext/optim/prism.h"

namespace {

using namespace torchopt_ext;
using namespace torchopt_ext::testing;

// rollfast's quintic NS in fp64: transpose wide-tall, X / (|X|_F + 1e-8).
torch::Tensor reference_ns(torch::Tensor z) {
  const bool tall = z.size(0) > z.size(1);
  torch::Tensor x = tall ? z.t() : z;
  x = x / (x.norm() + 1e-8);
  for (int i = 0; i < 5; ++i) {
    const auto a = torch::mm(x, x.t());
    x = 3.4445 * x + torch::mm(-4.775 * a + 2.0315 * torch::mm(a, a), x);
  }
  return tall ? x.t() : x;
}

// One default-option PRISM step ("original", EMA, Nesterov-shaped, post-clip
// (a_rms, a_el)) on torch (out, in) params, computed as rollfast does on G = W^T.
void reference_prism(std::vector<torch::Tensor>& params, std::vector<torch::Tensor>& mus,
                     const std::vector<torch::Tensor>& grads, double lr, double wd, double beta, double gamma,
                     double a_rms, double a_el) {
  for (size_t i = 0; i < params.size(); ++i) {
    const auto g = grads[i].t();
    const auto m = (1 - beta) * g + beta * mus[i].t();
    mus[i] = m.t().clone();
    const auto target = beta * m + (1 - beta) * g;
    const auto d = g - m;
    auto o = reference_ns(torch::cat({target, gamma * d}, 0)).narrow(0, 0, target.size(0));
    const double rms = o.square().mean().sqrt().item<double>();
    o = (o * std::min(1.0, a_rms / (rms + 1e-9))).clamp(-a_el, a_el);
    params[i] = params[i] - lr * (o.t() + wd * params[i]);
  }
}

std::vector<torch::Tensor> matrices() {
  torch::manual_seed(0);
  return {torch::randn({17, 9}, torch::kFloat64), torch::randn({6, 20}, torch::kFloat64),
          torch::randn({12, 12}, torch::kFloat64)};
}

void check_parity(double a_rms, double a_el) {
  auto params = matrices();
  auto ref = clone_all(params);
  std::vector<torch::Tensor> mus;
  for (const auto& p : ref) {
    mus.push_back(torch::zeros_like(p));
  }
  const auto grads = make_grads(params, 20);
  optim::PRISM opt(params, optim::PRISMOptions(0.02)
                               .weight_decay(0.1)
                               .gamma(0.7)
                               .ns_dtype(std::nullopt)
                               .grad_clip_max_amps(std::make_tuple(a_rms, a_el)));
  run(opt, params, grads);
  for (const auto& step : grads) {
    reference_prism(ref, mus, step, 0.02, 0.1, 0.95, 0.7, a_rms, a_el);
  }
  expect_close_within(params, ref, 1e-11, 1e-11, "prism fp64");
}

TEST(PRISM, MatchesSpecReferenceInFloat64) { check_parity(2.0, 10.0); }

TEST(PRISM, MatchesSpecReferenceWithBindingClips) { check_parity(0.05, 0.02); }

TEST(PRISM, StrictSpikeSkipsAndPermissiveClips) {
  auto params = matrices();
  optim::PRISM strict(params, optim::PRISMOptions(0.02).raw_global_grad_clip(1.0).permissive_spike_protection(false));
  for (auto& p : params) {
    p.mutable_grad() = torch::randn_like(p);  // norm ~ 20 > 1: a spike
  }
  const auto before = clone_all(params);
  strict.step();
  expect_bitwise_equal(params, before);
  const auto& state = static_cast<const optim::PRISMParamState&>(*strict.state().at(params[0].unsafeGetTensorImpl()));
  EXPECT_EQ(state.step().item<double>(), 0.0);
  EXPECT_EQ(state.mu().abs().sum().item<double>(), 0.0);

  // Permissive: the same spike is scaled to norm 1, which equals stepping on
  // grads pre-divided by the norm.
  auto a = matrices();
  auto b = clone_all(a);
  optim::PRISM clipped(a, optim::PRISMOptions(0.02).raw_global_grad_clip(1.0).ns_dtype(std::nullopt));
  optim::PRISM plain(b, optim::PRISMOptions(0.02).ns_dtype(std::nullopt));
  std::vector<torch::Tensor> gs;
  for (auto& p : a) {
    gs.push_back(torch::randn_like(p));
  }
  const double norm = common::global_l2_norm(gs).item<double>();
  for (size_t i = 0; i < a.size(); ++i) {
    a[i].mutable_grad() = gs[i].clone();
    b[i].mutable_grad() = gs[i] / (norm + std::numeric_limits<float>::min());
  }
  clipped.step();
  plain.step();
  expect_close_within(a, b, 1e-12, 1e-12, "permissive clip");
}

TEST(PRISM, ClippingCore) {
  auto u = torch::full({4, 4}, 3.0, torch::kFloat64);
  u[0][0] = 40.0;
  common::PostClipOptions per_tensor{2.0, 10.0};
  auto v = u.clone();
  common::clip_update_per_tensor_rms_(v, per_tensor);
  const double rms = u.square().mean().sqrt().item<double>();
  EXPECT_NEAR(v[1][1].item<double>(), 3.0 * 2.0 / (rms + 1e-9), 1e-12);
  EXPECT_LE(v.abs().max().item<double>(), 10.0);
  // Global RMS: one factor over both tensors, no element cap.
  std::vector<torch::Tensor> us{u.clone(), torch::ones({8}, torch::kFloat64)};
  common::PostClipOptions global{1.0, std::nullopt, common::GradClipMode::GlobalRMS};
  common::clip_updates_(us, global);
  const double total = std::sqrt((u.square().sum().item<double>() + 8.0) / 24.0);
  EXPECT_NEAR(us[1][0].item<double>(), 1.0 / total, 1e-12);
  EXPECT_NEAR(us[0][0][0].item<double>(), 40.0 / total, 1e-12);
  const auto raw = common::raw_global_clip({torch::full({4}, 3.0)}, 2.0, false);
  EXPECT_TRUE(raw.spike && raw.skip);
  EXPECT_NEAR(raw.scale, 2.0 / 6.0, 1e-6);
  EXPECT_FALSE(common::raw_global_clip({torch::full({4}, 0.1)}, 2.0, true).spike);
  expect_throws_mentioning([] { common::parse_grad_clip_mode("l2", "grad_clip_mode"); }, "grad_clip_mode");
}

TEST(PRISM, NonMatricesTakeTheAdamWFallback) {
  torch::manual_seed(2);
  std::vector<torch::Tensor> params{torch::randn({5, 4}), torch::randn({7})};
  std::vector<torch::Tensor> vec{params[1].clone()};
  optim::PRISM opt(params, optim::PRISMOptions(0.02).adam_lr(0.01).weight_decay(0.1));
  torch::optim::AdamW adamw(vec, torch::optim::AdamWOptions(0.01).weight_decay(0.1));
  for (int i = 0; i < 5; ++i) {
    for (auto& p : params) {
      p.mutable_grad() = torch::randn_like(p);
    }
    vec[0].mutable_grad() = params[1].grad().clone();
    opt.step();
    adamw.step();
  }
  expect_close({params[1]}, vec);
}

// rollfast §3.4 with nesterov, written here in float64: Nesterov-corrected
// first moment, bias-corrected second moment, decoupled decay.
TEST(PRISM, AdamNesterovFallbackMatchesReference) {
  torch::manual_seed(5);
  std::vector<torch::Tensor> params{torch::randn({6}, torch::kFloat64), torch::randn({2, 3, 4}, torch::kFloat64)};
  auto ref = std::vector<torch::Tensor>{params[0].clone(), params[1].clone()};
  std::vector<torch::Tensor> m{torch::zeros_like(ref[0]), torch::zeros_like(ref[1])};
  std::vector<torch::Tensor> v{torch::zeros_like(ref[0]), torch::zeros_like(ref[1])};
  const double lr = 0.003, b1 = 0.8, b2 = 0.99, eps = 1e-8, wd = 0.1;
  optim::PRISM opt(params, optim::PRISMOptions(lr)
                               .weight_decay(wd)
                               .adam_betas(std::make_tuple(b1, b2))
                               .adam_nesterov(true)
                               .mu_dtype(at::kDouble));
  for (int t = 1; t <= 20; ++t) {
    for (size_t i = 0; i < params.size(); ++i) {
      const auto g = torch::randn_like(params[i]);
      params[i].mutable_grad() = g;
      m[i] = (1 - b1) * g + b1 * m[i];
      v[i] = (1 - b2) * g * g + b2 * v[i];
      const auto m_hat = b1 * m[i] / (1 - std::pow(b1, t + 1)) + (1 - b1) * g / (1 - std::pow(b1, t));
      const auto u = m_hat / ((v[i] / (1 - std::pow(b2, t))).sqrt() + eps);
      ref[i] = ref[i] - lr * (u + wd * ref[i]);
    }
    opt.step();
  }
  for (size_t i = 0; i < params.size(); ++i) {
    EXPECT_LT((params[i] - ref[i]).abs().max().item<double>(), 1e-12);
  }
}

// The raw global clip's norm spans every group that enables it: two groups
// whose grads each stay under the threshold but spike together behave as one
// group holding all the params.
TEST(PRISM, RawGlobalClipSpansAllGroups) {
  torch::manual_seed(12);
  const std::vector<torch::Tensor> start{torch::randn({6, 5}, torch::kFloat64), torch::randn({4, 7}, torch::kFloat64)};
  std::vector<std::vector<torch::Tensor>> grads;
  double max_single = 0.0, min_joint = 1e300;
  for (int k = 0; k < 4; ++k) {
    // Per group at most 3.9, together at least sqrt(18) ~ 4.24.
    auto a_grad = torch::randn({6, 5}, torch::kFloat64);
    auto b_grad = torch::randn({4, 7}, torch::kFloat64);
    // Varying scales (1, 1.1, 1.2, 1.3): the clip's per-step factor then matters.
    const double scale = 3.0 * (1.0 + 0.1 * k);
    grads.push_back({scale * a_grad / a_grad.norm(), scale * b_grad / b_grad.norm()});
    const double a = grads.back()[0].norm().item<double>(), b = grads.back()[1].norm().item<double>();
    max_single = std::max({max_single, a, b});
    min_joint = std::min(min_joint, std::sqrt(a * a + b * b));
  }
  ASSERT_LT(max_single, min_joint);
  const double clip = 0.5 * (max_single + min_joint);
  const auto options = optim::PRISMOptions(0.02).ns_dtype(at::kDouble).raw_global_grad_clip(clip);
  auto run = [&](bool split, const optim::PRISMOptions& opts) {
    std::vector<torch::Tensor> params{start[0].clone(), start[1].clone()};
    std::vector<torch::optim::OptimizerParamGroup> groups;
    if (split) {
      groups.emplace_back(std::vector<torch::Tensor>{params[0]});
      groups.emplace_back(std::vector<torch::Tensor>{params[1]});
    } else {
      groups.emplace_back(params);
    }
    optim::PRISM opt(groups, opts);
    for (const auto& step : grads) {
      params[0].mutable_grad() = step[0].clone();
      params[1].mutable_grad() = step[1].clone();
      opt.step();
    }
    return params;
  };
  const auto split = run(true, options);
  const auto joined = run(false, options);
  const auto unclipped = run(true, optim::PRISMOptions(options).raw_global_grad_clip(std::nullopt));
  for (size_t i = 0; i < 2; ++i) {
    EXPECT_LT((split[i] - joined[i]).abs().max().item<double>(), 1e-13);
    EXPECT_GT((split[i] - unclipped[i]).abs().max().item<double>(), 1e-6);
  }
  const auto strict = run(true, optim::PRISMOptions(options).permissive_spike_protection(false));
  EXPECT_TRUE(torch::equal(strict[0], start[0]) && torch::equal(strict[1], start[1]));
}

TEST(PRISM, CheckpointRoundTrip) {
  std::vector<torch::Tensor> params{torch::randn({6, 5}), torch::randn({7}), torch::randn({5, 9})};
  const auto options = optim::PRISMOptions(0.01)
                           .b1(0.9)
                           .gamma(0.5)
                           .mode("bidirectional")
                           .gamma_l(0.3)
                           .grad_clip_max_amps(std::nullopt)
                           .raw_global_grad_clip(50.0)
                           .momentum_accumulator("heavy_ball")
                           .adam_lr(0.003)
                           .initial_lr(0.01)
                           .use_magma(true)
                           .seed(3);
  check_checkpoint_round_trip<optim::PRISM, optim::PRISMOptions, optim::PRISMParamState>(
      options, optim::PRISMOptions(0.5), params, 4, 4);
}

TEST(PRISM, BadOptionsNameTheArgument) {
  const std::vector<torch::Tensor> params{torch::randn({3, 3})};
  expect_throws_mentioning([&] { optim::PRISM(params, optim::PRISMOptions(-1.0)); }, "lr");
  expect_throws_mentioning([&] { optim::PRISM(params, optim::PRISMOptions().b1(1.0)); }, "b1");
  expect_throws_mentioning([&] { optim::PRISM(params, optim::PRISMOptions().gamma(-0.1)); }, "gamma");
  expect_throws_mentioning([&] { optim::PRISM(params, optim::PRISMOptions().adam_nesterov(true).use_magma(true)); },
                           "adam_nesterov");
  expect_throws_mentioning([&] { optim::PRISM(params, optim::PRISMOptions().mode("both")); }, "mode");
  expect_throws_mentioning([&] { optim::PRISM(params, optim::PRISMOptions().ns_iters(0)); }, "ns_iters");
  expect_throws_mentioning([&] { optim::PRISM(params, optim::PRISMOptions().ns_coeffs({1.0})); }, "ns_coeffs");
  expect_throws_mentioning([&] { optim::PRISM(params, optim::PRISMOptions().momentum_accumulator("x")); },
                           "momentum_accumulator");
  expect_throws_mentioning(
      [&] { optim::PRISM(params, optim::PRISMOptions().grad_clip_max_amps(std::make_tuple(0.0, 1.0))); },
      "grad_clip_max_amps");
  expect_throws_mentioning([&] { optim::PRISM(params, optim::PRISMOptions().raw_global_grad_clip(-1.0)); },
                           "raw_global_grad_clip");
  expect_throws_mentioning([&] { optim::PRISM({torch::randn({4})}, optim::PRISMOptions().use_prism(true)); },
                           "use_prism");
}

}  // namespace
