// Schedule-Free+ in the C++ wrapper (rollfast.md §4.2): the Polyak scalar rho
// against a float64 reference of the recurrences, lr_max_init, the base lr
// restored after a Polyak step, and checkpoints carrying the Polyak state.
#include <gtest/gtest.h>
#include <torch/torch.h>
#include <torchopt_ext/torchopt_ext.h>

#include <cmath>
#include <sstream>
#include <vector>

#include "test_utils.h"

namespace {

namespace optim = torchopt_ext::optim;
using namespace torchopt_ext::testing;
using Tensors = std::vector<torch::Tensor>;

// Schedule-Free over SGD (delta = -gamma_eff g) with Polyak, "practical"
// weights, written from the spec; constant lr.
struct PolyakReference {
  Tensors y, z;
  double b1, lr, beta, f_star, polyak_beta;
  double k = 0, weight_sum = 0, lr_max = 1e-8, ema = 0, count = 0, rho = 1;

  void step(const Tensors& grads, double loss) {
    torch::NoGradGuard no_grad;
    const double beta_prev = std::max(b1, 1e-8), beta_next = b1;
    double inner = 0, l1 = 0;
    for (size_t i = 0; i < y.size(); ++i) {
      inner += (grads[i] * (z[i] - y[i])).sum().item<double>();
      l1 += grads[i].abs().sum().item<double>();
    }
    count += 1;
    ema = polyak_beta * ema + (1 - polyak_beta) * std::sqrt(std::acos(-1.0) / 2) * l1;
    const double g1 = ema / (1 - std::pow(polyak_beta, count));
    rho = std::max(0.0, loss - f_star + beta_next / beta_prev * inner) / std::max(g1, 1e-30);
    const double gamma = rho * lr;
    lr_max = std::max(lr_max, gamma);
    const double w = gamma * gamma;
    weight_sum += w;
    const double c = weight_sum > 0 ? w / weight_sum : 0.0;
    for (size_t i = 0; i < y.size(); ++i) {
      const auto z_next = z[i] - gamma * grads[i];
      y[i] = (beta_next / beta_prev) * (1 - c) * (y[i] - (1 - beta_prev) * z[i]) +
             (beta_next * c + 1 - beta_next) * z_next;
      z[i] = z_next;
    }
    k += 1;
  }
};

TEST(ScheduleFreePlus, PolyakMatchesFloat64Reference) {
  auto params = make_params(torch::kFloat64, 2);
  const auto grads = make_grads(params, 15, 3);
  const double lr = 0.05;
  auto base = std::make_shared<torch::optim::SGD>(params, torch::optim::SGDOptions(lr));
  optim::ScheduleFree opt(base, optim::ScheduleFreeOptions().polyak(true).polyak_beta(0.7).polyak_f_star(0.2));
  PolyakReference ref{clone_all(params), clone_all(params), 0.9, lr, 0.9, 0.2, 0.7};
  for (size_t k = 0; k < grads.size(); ++k) {
    for (size_t i = 0; i < params.size(); ++i) {
      params[i].mutable_grad() = grads[k][i].clone();
    }
    const double loss = 1.0 + 0.5 * std::sin(static_cast<double>(k));
    opt.step(nullptr, torch::tensor(loss, torch::kFloat64));
    ref.step(grads[k], loss);
    EXPECT_NEAR(opt.polyak_state()[2].item<double>(), ref.rho, 1e-12 * std::max(1.0, ref.rho)) << "step " << k;
    expect_close_within(params, ref.y, 1e-12, 1e-12, "y step " + std::to_string(k));
    EXPECT_EQ(base->param_groups()[0].options().get_lr(), lr);  // restored after the step
  }
  EXPECT_NEAR(opt.sf_state(0)[1].item<double>(), ref.weight_sum, 1e-12 * ref.weight_sum);
}

TEST(ScheduleFreePlus, PolyakNeedsTheLoss) {
  auto params = make_params(torch::kFloat32);
  optim::ScheduleFree opt(std::make_shared<torch::optim::SGD>(params, torch::optim::SGDOptions(0.1)),
                          optim::ScheduleFreeOptions().polyak(true));
  for (auto& p : params) {
    p.mutable_grad() = torch::randn_like(p);
  }
  expect_throws_mentioning([&] { opt.step(); }, "needs the loss");
  // A closure's loss is used.
  opt.step([] { return torch::tensor(1.0); });
  EXPECT_EQ(opt.polyak_state()[1].item<double>(), 1.0);
}

TEST(ScheduleFreePlus, LrMaxInitStartsTheRunningMax) {
  auto params = make_params(torch::kFloat64);
  optim::ScheduleFree opt(std::make_shared<torch::optim::SGD>(params, torch::optim::SGDOptions(0.1)),
                          optim::ScheduleFreeOptions().use_lr_max(true).lr_max_init(0.5));
  EXPECT_EQ(opt.sf_state(0)[2].item<double>(), 0.5);
  for (auto& p : params) {
    p.mutable_grad() = torch::randn_like(p);
  }
  opt.step();
  EXPECT_EQ(opt.sf_state(0)[2].item<double>(), 0.5);  // lr 0.1 stays below it
  EXPECT_DOUBLE_EQ(opt.sf_state(0)[1].item<double>(), 0.25);
  optim::ScheduleFree fresh(std::make_shared<torch::optim::SGD>(params, torch::optim::SGDOptions(0.1)));
  EXPECT_EQ(fresh.sf_state(0)[2].item<double>(), 1e-8);  // rollfast's default
}

TEST(ScheduleFreePlus, BadOptionsThrowNamingTheArgument) {
  auto params = make_params(torch::kFloat32);
  auto make = [&](const optim::ScheduleFreeOptions& options) {
    return [&params, options] {
      optim::ScheduleFree opt(std::make_shared<torch::optim::SGD>(params, torch::optim::SGDOptions(0.1)), options);
    };
  };
  expect_throws_mentioning(make(optim::ScheduleFreeOptions().polyak_beta(1.0)), "polyak_beta");
  expect_throws_mentioning(make(optim::ScheduleFreeOptions().polyak_eps(0.0)), "polyak_eps");
  expect_throws_mentioning(make(optim::ScheduleFreeOptions().lr_max_init(-1.0)), "lr_max_init");
}

TEST(ScheduleFreePlus, CheckpointCarriesPolyakStateInBothModes) {
  for (bool in_eval : {false, true}) {
    auto params = make_params(torch::kFloat32);
    const auto grads = make_grads(params, 10);
    const auto options = optim::ScheduleFreeOptions().polyak(true).polyak_beta(0.5).b1_anneal_steps(4);
    auto run = [](optim::ScheduleFree& opt, Tensors& ps, const std::vector<Tensors>& gs, size_t from, size_t to) {
      for (size_t k = from; k < to; ++k) {
        for (size_t i = 0; i < ps.size(); ++i) {
          ps[i].mutable_grad() = gs[k][i].clone();
        }
        opt.step(nullptr, torch::tensor(2.0 + static_cast<double>(k)));
      }
    };
    optim::ScheduleFree opt(std::make_shared<optim::AdamW>(params, optim::AdamWOptions(1e-2)), options);
    run(opt, params, grads, 0, 5);
    if (in_eval) {
      opt.eval();
    }
    auto resumed_params = clone_all(params);
    torch::serialize::OutputArchive out;
    opt.save(out);
    std::stringstream buffer;
    out.save_to(buffer);
    opt.train();
    run(opt, params, grads, 5, 10);
    optim::ScheduleFree resumed(std::make_shared<optim::AdamW>(resumed_params, optim::AdamWOptions(1e-2)), options);
    torch::serialize::InputArchive in;
    in.load_from(buffer);
    resumed.load(in);
    resumed.train();
    run(resumed, resumed_params, grads, 5, 10);
    expect_bitwise_equal(params, resumed_params);
    EXPECT_TRUE(torch::equal(opt.polyak_state(), resumed.polyak_state()));
  }
}

// schedule_free_prism is ScheduleFree(PRISM with a matrix group and a
// fallback group at its own peak lr) + WSD: equal, bitwise, to that
// composition built by hand; both groups follow the WSD shape from their peaks.
TEST(ScheduleFreePlus, SchedulFreePrismIsTheCompositionWithTwoGroups) {
  for (const bool adamc : {false, true}) {
    torch::manual_seed(9);
    Tensors a{torch::randn({6, 4}), torch::randn({5}), torch::randn({4, 6})};
    auto b = clone_all(a);
    const auto wsd = torchopt_ext::schedules::WSDOptions(16).warmup_fraction(0.1).decay_fraction(0.25);
    auto made = optim::schedule_free_prism(
        a, 0.02, wsd, optim::ScheduleFreePrismConfig().weight_decay(0.1).adam_lr(0.005).use_adamc(adamc));
    const auto options = optim::PRISMOptions(0.02).b1(0.0).nesterov(false).adam_betas(std::make_tuple(0.0, 0.999));
    std::vector<torch::optim::OptimizerParamGroup> groups;
    groups.emplace_back(Tensors{b[0], b[2]}, std::make_unique<optim::PRISMOptions>(options));
    groups.emplace_back(Tensors{b[1]},
                        std::make_unique<optim::PRISMOptions>(optim::PRISMOptions(options).lr(0.005).use_prism(false)));
    auto base = std::make_shared<optim::PRISM>(groups, options);
    optim::ScheduleFree manual(
        base, optim::ScheduleFreeOptions().weight_decay_at_y(adamc ? 0.0 : 0.1).adamc_weight_decay(adamc ? 0.1 : 0.0));
    torchopt_ext::schedules::WSD manual_schedule(*base, wsd);
    auto& made_groups = made.optimizer->base().param_groups();
    ASSERT_EQ(made_groups.size(), 2u);
    for (int64_t k = 0; k < 16; ++k) {
      const double factor = torchopt_ext::schedules::wsd_lr_factor(k, wsd);
      EXPECT_DOUBLE_EQ(made_groups[0].options().get_lr(), 0.02 * factor);
      EXPECT_DOUBLE_EQ(made_groups[1].options().get_lr(), 0.005 * factor);
      for (size_t i = 0; i < a.size(); ++i) {
        const auto g = torch::randn_like(a[i]);
        a[i].mutable_grad() = g.clone();
        b[i].mutable_grad() = g.clone();
      }
      made.optimizer->step();
      made.scheduler->step();
      manual.step();
      manual_schedule.step();
    }
    expect_bitwise_equal(a, b);
  }
}

// schedule_free_kron is ScheduleFree(Kron with b1 = 0, whiten_grad) + WSD:
// equal, bitwise, to that composition built by hand.
TEST(ScheduleFreePlus, ScheduleFreeKronIsTheComposition) {
  for (const bool adamc : {false, true}) {
    torch::manual_seed(4);
    Tensors a{torch::randn({6, 4}), torch::randn({5}), torch::randn({3, 2, 4})};
    auto b = clone_all(a);
    const auto wsd = torchopt_ext::schedules::WSDOptions(16).warmup_fraction(0.1).decay_fraction(0.25);
    const auto kron = optim::KronOptions().preconditioner_mode("QUAD").seed(3);
    auto made = optim::schedule_free_kron(
        a, 0.01, wsd, optim::ScheduleFreeKronConfig().weight_decay(0.1).use_adamc(adamc).kron(kron));
    auto base = std::make_shared<optim::Kron>(b, optim::KronOptions(kron).lr(0.01).b1(0.0));
    optim::ScheduleFree manual(
        base, optim::ScheduleFreeOptions().weight_decay_at_y(adamc ? 0.0 : 0.1).adamc_weight_decay(adamc ? 0.1 : 0.0));
    torchopt_ext::schedules::WSD manual_schedule(*base, wsd);
    for (int64_t k = 0; k < 16; ++k) {
      for (size_t i = 0; i < a.size(); ++i) {
        const auto g = torch::randn_like(a[i]);
        a[i].mutable_grad() = g.clone();
        b[i].mutable_grad() = g.clone();
      }
      made.optimizer->step();
      made.scheduler->step();
      manual.step();
      manual_schedule.step();
    }
    EXPECT_EQ(static_cast<const optim::KronOptions&>(made.optimizer->base().param_groups()[0].options()).b1(), 0.0);
    expect_bitwise_equal(a, b);
  }
}

TEST(ScheduleFreePlus, ConvenienceKnobsInheritScheduleFreePlus) {
  Tensors params{torch::randn({4, 3}), torch::randn({3})};
  const auto wsd = torchopt_ext::schedules::WSDOptions(10);
  auto plus = optim::schedule_free_prism(params, 0.01, wsd,
                                         optim::ScheduleFreePrismConfig().weight_decay(0.1).sf_plus(
                                             optim::ScheduleFreePlusKnobs().schedule_free_plus(true)));
  EXPECT_TRUE(plus.optimizer->options().polyak());
  EXPECT_TRUE(plus.optimizer->options().use_lr_max());
  EXPECT_EQ(plus.optimizer->options().adamc_weight_decay(), 0.1);
  EXPECT_EQ(plus.optimizer->options().weight_decay_at_y(), 0.0);
  const auto& fallback = static_cast<const optim::PRISMOptions&>(plus.optimizer->base().param_groups()[1].options());
  EXPECT_EQ(std::get<0>(fallback.adam_betas()), 0.9);
  EXPECT_EQ(std::get<1>(fallback.adam_betas()), 0.95);
  auto overridden =
      optim::schedule_free_adamw(params, 0.01, wsd,
                                 optim::ScheduleFreeAdamWConfig().use_adamc(false).sf_plus(
                                     optim::ScheduleFreePlusKnobs().schedule_free_plus(true).polyak(false)));
  EXPECT_FALSE(overridden.optimizer->options().polyak());
  EXPECT_TRUE(overridden.optimizer->options().use_lr_max());
  EXPECT_EQ(overridden.optimizer->options().adamc_weight_decay(), 0.0);
  // With Polyak the step needs the loss.
  for (auto& p : params) {
    p.mutable_grad() = torch::randn_like(p);
  }
  plus.optimizer->step(nullptr, torch::tensor(1.0));
  plus.scheduler->step();
  EXPECT_EQ(plus.optimizer->polyak_state()[1].item<double>(), 1.0);
}

}  // namespace
