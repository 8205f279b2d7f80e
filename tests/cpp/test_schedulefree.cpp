// Schedule-Free in LibTorch: ScheduleFreeAdamW / ScheduleFreeSGD against a
// torch-ops reference of the schedulefree package's algorithm (x, y, z kept
// explicitly), the ScheduleFree wrapper around torch::optim::SGD / Adam
// against the same reference driving its own base optimizer on z, train/eval
// switching, checkpoints in both modes, and option checks.
#include <gtest/gtest.h>
#include <torch/torch.h>
#include <torchopt_ext/torchopt_ext.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <memory>
#include <sstream>
#include <vector>

#include "test_utils.h"

namespace {

namespace optim = torchopt_ext::optim;
using namespace torchopt_ext::testing;

constexpr int kSteps = 20;
constexpr int kSwitchAt = 9;  // eval() and train() after this step

// The schedulefree package's reference algorithm (AdamWScheduleFreeReference /
// SGDScheduleFreeReference) in torch ops on float64 x, y, z.
struct Reference {
  std::vector<torch::Tensor> x, y, z, v;
  double weight_sum = 0.0, lr_max = -1.0;
  int64_t k = 0;
  bool adam;
  double lr, beta1, beta2, eps, wd, r, power;
  int64_t warmup;

  Reference(const std::vector<torch::Tensor>& params, bool adam, double lr, double beta1, double beta2, double eps,
            double wd, int64_t warmup, double r, double power)
      : adam(adam), lr(lr), beta1(beta1), beta2(beta2), eps(eps), wd(wd), r(r), power(power), warmup(warmup) {
    for (const auto& p : params) {
      x.push_back(p.to(torch::kFloat64).clone());
      y.push_back(x.back().clone());
      z.push_back(x.back().clone());
      v.push_back(torch::zeros_like(x.back()));
    }
  }

  void step(const std::vector<torch::Tensor>& grads) {
    const double sched = k < warmup ? static_cast<double>(k + 1) / static_cast<double>(warmup) : 1.0;
    const double lr_k = lr * sched;
    lr_max = std::max(lr_max, lr_k);
    const double w = std::pow(static_cast<double>(k + 1), r) * std::pow(lr_max, power);
    weight_sum += w;
    const double c = w / weight_sum;
    for (size_t i = 0; i < y.size(); ++i) {
      auto g = grads[i].to(torch::kFloat64);
      torch::Tensor d = g;
      if (adam) {
        v[i] = v[i] * beta2 + (1 - beta2) * g * g;
        const double bc2 = 1 - std::pow(beta2, static_cast<double>(k + 1));
        d = g / ((v[i] / bc2).sqrt() + eps);
      }
      z[i] = z[i] - lr_k * (d + wd * y[i]);
      x[i] = (1 - c) * x[i] + c * z[i];
      y[i] = beta1 * x[i] + (1 - beta1) * z[i];
    }
    ++k;
  }
};

template <typename Optimizer>
void run_with_switch(Optimizer& opt, std::vector<torch::Tensor>& params, Reference& ref,
                     const std::vector<std::vector<torch::Tensor>>& grads) {
  for (int k = 0; k < static_cast<int>(grads.size()); ++k) {
    for (size_t i = 0; i < params.size(); ++i) {
      params[i].mutable_grad() = grads[k][i].clone();
    }
    opt.step();
    ref.step(grads[k]);
    expect_close_within(params, ref.y, 1e-12, 1e-12, "y after step " + std::to_string(k));
    if (k == kSwitchAt) {
      opt.eval();
      expect_close_within(params, ref.x, 1e-12, 1e-12, "x at the switch");
      opt.train();
      expect_close_within(params, ref.y, 1e-12, 1e-12, "y after train()");
    }
  }
  opt.eval();
  expect_close_within(params, ref.x, 1e-12, 1e-12, "final x");
}

TEST(ScheduleFree, AdamWMatchesTorchOpsReference) {
  auto params = make_params(torch::kFloat64);
  const auto grads = make_grads(params, kSteps);
  optim::ScheduleFreeAdamW opt(
      params, optim::ScheduleFreeAdamWOptions(1e-2).betas({0.9, 0.99}).weight_decay(0.1).warmup_steps(5).r(0.5));
  Reference ref(params, true, 1e-2, 0.9, 0.99, 1e-8, 0.1, 5, 0.5, 2.0);
  run_with_switch(opt, params, ref, grads);
}

TEST(ScheduleFree, SGDMatchesTorchOpsReference) {
  auto params = make_params(torch::kFloat64);
  const auto grads = make_grads(params, kSteps);
  optim::ScheduleFreeSGD opt(
      params, optim::ScheduleFreeSGDOptions(0.05).momentum(0.8).weight_decay(0.01).warmup_steps(4).weight_lr_power(1));
  Reference ref(params, false, 0.05, 0.8, 0.0, 0.0, 0.01, 4, 0.0, 1.0);
  run_with_switch(opt, params, ref, grads);
}

TEST(ScheduleFree, Float32TracksFloat64) {
  auto params = make_params(torch::kFloat32);
  const auto grads = make_grads(params, kSteps);
  optim::ScheduleFreeAdamW opt(params, optim::ScheduleFreeAdamWOptions(1e-2).warmup_steps(3));
  Reference ref(params, true, 1e-2, 0.9, 0.999, 1e-8, 0.0, 3, 0.0, 2.0);
  for (const auto& g : grads) {
    for (size_t i = 0; i < params.size(); ++i) {
      params[i].mutable_grad() = g[i].clone();
    }
    opt.step();
    ref.step(g);
  }
  expect_close_within(params, ref.y, 1e-5, 1e-5, "fp32 y");
}

// Train, optionally eval(), checkpoint; then train() and continue. A fresh
// optimizer loaded from the checkpoint continues bitwise.
template <typename Optimizer, typename Options>
void check_resume(const Options& options, bool in_eval) {
  auto params = make_params(torch::kFloat32);
  const auto grads = make_grads(params, 16);
  const std::vector<std::vector<torch::Tensor>> first(grads.begin(), grads.begin() + 8);
  const std::vector<std::vector<torch::Tensor>> second(grads.begin() + 8, grads.end());
  Optimizer opt(params, options);
  run(opt, params, first);
  if (in_eval) {
    opt.eval();
  }
  auto resumed_params = clone_all(params);
  std::stringstream buffer;
  torch::save(opt, buffer);
  opt.train();
  run(opt, params, second);
  Optimizer resumed(resumed_params, options);
  torch::load(resumed, buffer);
  EXPECT_EQ(static_cast<const Options&>(resumed.param_groups()[0].options()).train_mode(), !in_eval);
  resumed.train();
  run(resumed, resumed_params, second);
  expect_bitwise_equal(params, resumed_params);
}

TEST(ScheduleFree, SaveLoadContinuesBitwiseInBothModes) {
  for (bool in_eval : {false, true}) {
    check_resume<optim::ScheduleFreeAdamW>(optim::ScheduleFreeAdamWOptions(1e-2).weight_decay(0.1).warmup_steps(3),
                                           in_eval);
    check_resume<optim::ScheduleFreeSGD>(optim::ScheduleFreeSGDOptions(0.1).r(1.0).warmup_steps(2), in_eval);
  }
}

TEST(ScheduleFree, StepInEvalModeThrows) {
  auto params = make_params(torch::kFloat32);
  optim::ScheduleFreeSGD opt(params);
  opt.eval();
  for (auto& p : params) {
    p.mutable_grad() = torch::randn_like(p);
  }
  expect_throws_mentioning([&] { opt.step(); }, "eval mode", /*value_error=*/false);
}

TEST(ScheduleFree, InvalidOptionsThrowNamingTheArgument) {
  auto params = make_params(torch::kFloat32);
  expect_throws_mentioning(
      [&] { optim::ScheduleFreeAdamW(params, optim::ScheduleFreeAdamWOptions().betas({0.0, 0.999})); }, "betas[0]");
  expect_throws_mentioning(
      [&] { optim::ScheduleFreeAdamW(params, optim::ScheduleFreeAdamWOptions().betas({0.9, 1.0})); }, "betas[1]");
  expect_throws_mentioning([&] { optim::ScheduleFreeAdamW(params, optim::ScheduleFreeAdamWOptions().eps(-1)); }, "eps");
  expect_throws_mentioning([&] { optim::ScheduleFreeAdamW(params, optim::ScheduleFreeAdamWOptions(-1.0)); }, "lr");
  expect_throws_mentioning([&] { optim::ScheduleFreeSGD(params, optim::ScheduleFreeSGDOptions().momentum(1.0)); },
                           "momentum");
  expect_throws_mentioning([&] { optim::ScheduleFreeSGD(params, optim::ScheduleFreeSGDOptions().warmup_steps(-1)); },
                           "warmup_steps");
  expect_throws_mentioning([&] { optim::ScheduleFreeSGD(params, optim::ScheduleFreeSGDOptions().weight_decay(-0.1)); },
                           "weight_decay");
  auto base = std::make_shared<torch::optim::SGD>(params, torch::optim::SGDOptions(0.1));
  expect_throws_mentioning([&] { optim::ScheduleFree(base, optim::ScheduleFreeOptions().weighting_mode("cosine")); },
                           "weighting_mode");
  expect_throws_mentioning([&] { optim::ScheduleFree(base, optim::ScheduleFreeOptions().b1(0.0)); }, "b1");
  expect_throws_mentioning([&] { optim::ScheduleFree(base, optim::ScheduleFreeOptions().c_warmup(-1)); }, "c_warmup");
  expect_throws_mentioning([&] { optim::ScheduleFree(base, optim::ScheduleFreeOptions().adamc_weight_decay(-1)); },
                           "adamc_weight_decay");
  // Any case is accepted.
  optim::ScheduleFree ok(base, optim::ScheduleFreeOptions().weighting_mode("SCHEDULET"));
}

TEST(ScheduleFree, StepLRDrivesTheFusedLr) {
  auto params = make_params(torch::kFloat64);
  optim::ScheduleFreeSGD opt(params, optim::ScheduleFreeSGDOptions(0.1));
  torch::optim::StepLR sched(opt, 2, 0.5);
  for (int k = 0; k < 5; ++k) {
    for (auto& p : params) {
      p.mutable_grad() = torch::randn_like(p);
    }
    opt.step();
    sched.step();
  }
  EXPECT_DOUBLE_EQ(opt.param_groups()[0].options().get_lr(), 0.025);
}

// --- wrapper ---------------------------------------------------------------------

// The package's ScheduleFreeWrapperReference in torch ops: its own copy of the
// base optimizer steps z; x and y are kept explicitly (lr_max weighting).
template <typename MakeBase>
void check_wrapper_against_reference(const MakeBase& make_base, const std::string& label) {
  auto params = make_params(torch::kFloat64);
  const auto grads = make_grads(params, kSteps);
  const double b1 = 0.9;
  auto base = make_base(params);
  optim::ScheduleFree opt(base, optim::ScheduleFreeOptions().b1(b1).use_lr_max(true).r(0.5));

  auto z = clone_all(params);
  auto x = clone_all(params);
  auto y = clone_all(params);
  auto ref_base = make_base(z);
  double weight_sum = 0.0, lr_max = 0.0;
  for (int k = 0; k < kSteps; ++k) {
    for (size_t i = 0; i < params.size(); ++i) {
      params[i].mutable_grad() = grads[k][i].clone();
      z[i].mutable_grad() = grads[k][i].clone();
    }
    opt.step();
    const double lr = ref_base->param_groups()[0].options().get_lr();
    ref_base->step();
    {
      torch::NoGradGuard no_grad;
      lr_max = std::max(lr_max, lr);
      const double w = std::pow(k + 1.0, 0.5) * lr_max * lr_max;
      weight_sum += w;
      const double c = w / weight_sum;
      for (size_t i = 0; i < params.size(); ++i) {
        x[i] = x[i].lerp(z[i], c);
        y[i] = x[i].lerp(z[i], 1 - b1);
      }
    }
    expect_close_within(params, y, 1e-12, 1e-12, label + " y step " + std::to_string(k));
    if (k == kSwitchAt) {
      opt.eval();
      expect_close_within(params, x, 1e-12, 1e-12, label + " x at the switch");
      opt.train();
    }
  }
  EXPECT_EQ(opt.sf_state(0)[0].item<double>(), kSteps);
}

TEST(ScheduleFreeWrapper, AroundTorchSGDMatchesReference) {
  check_wrapper_against_reference(
      [](std::vector<torch::Tensor> ps) {
        return std::make_shared<torch::optim::SGD>(ps, torch::optim::SGDOptions(0.1).momentum(0.5));
      },
      "SGD");
}

TEST(ScheduleFreeWrapper, AroundTorchAdamMatchesReference) {
  check_wrapper_against_reference(
      [](std::vector<torch::Tensor> ps) {
        return std::make_shared<torch::optim::Adam>(ps, torch::optim::AdamOptions(1e-2).betas({0.0, 0.99}));
      },
      "Adam");
}

TEST(ScheduleFreeWrapper, AdamCFirstStepIsExact) {
  // rollfast.md §8: zero grads, lr 0.01 / 0.02, lambda 0.1: update -gamma^2 lambda theta.
  auto matrix = torch::ones({4, 3}, torch::kFloat64);
  auto vector = torch::ones({5}, torch::kFloat64);
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(std::vector<torch::Tensor>{matrix},
                      std::make_unique<torch::optim::SGDOptions>(torch::optim::SGDOptions(0.01)));
  groups.emplace_back(std::vector<torch::Tensor>{vector},
                      std::make_unique<torch::optim::SGDOptions>(torch::optim::SGDOptions(0.02)));
  auto base = std::make_shared<torch::optim::SGD>(groups, torch::optim::SGDOptions(0.01));
  optim::ScheduleFree opt(base, optim::ScheduleFreeOptions().adamc_weight_decay(0.1));
  matrix.mutable_grad() = torch::zeros_like(matrix);
  vector.mutable_grad() = torch::zeros_like(vector);
  opt.step();
  const double ulp = std::ldexp(1.0, -52);
  EXPECT_LE(((matrix - 1.0) + 1e-5).abs().max().item<double>(), ulp);
  EXPECT_LE(((vector - 1.0) + 4e-5).abs().max().item<double>(), ulp);
}

TEST(ScheduleFreeWrapper, SaveLoadContinuesBitwiseInBothModes) {
  for (bool in_eval : {false, true}) {
    auto params = make_params(torch::kFloat32);
    const auto grads = make_grads(params, 14);
    const std::vector<std::vector<torch::Tensor>> first(grads.begin(), grads.begin() + 7);
    const std::vector<std::vector<torch::Tensor>> second(grads.begin() + 7, grads.end());
    const auto options =
        optim::ScheduleFreeOptions().weighting_mode("schedulet").b1_anneal_steps(5).adamc_weight_decay(0.1);
    auto step_all = [](optim::ScheduleFree& opt, std::vector<torch::Tensor>& ps,
                       const std::vector<std::vector<torch::Tensor>>& gs) {
      for (const auto& g : gs) {
        for (size_t i = 0; i < ps.size(); ++i) {
          ps[i].mutable_grad() = g[i].clone();
        }
        opt.step();
      }
    };
    optim::ScheduleFree opt(std::make_shared<torch::optim::Adam>(params, torch::optim::AdamOptions(1e-2)), options);
    step_all(opt, params, first);
    if (in_eval) {
      opt.eval();
    }
    auto resumed_params = clone_all(params);
    torch::serialize::OutputArchive out;
    opt.save(out);
    std::stringstream buffer;
    out.save_to(buffer);
    opt.train();
    step_all(opt, params, second);

    optim::ScheduleFree resumed(std::make_shared<torch::optim::Adam>(resumed_params, torch::optim::AdamOptions(1e-2)),
                                options);
    torch::serialize::InputArchive in;
    in.load_from(buffer);
    resumed.load(in);
    EXPECT_EQ(resumed.train_mode(), !in_eval);
    resumed.train();
    step_all(resumed, resumed_params, second);
    expect_bitwise_equal(params, resumed_params);
  }
}

TEST(ScheduleFree, ScheduleFreeAdamWConvenienceIsTheWrapperWithWSD) {
  for (const bool adamc : {false, true}) {
    torch::manual_seed(7);
    std::vector<torch::Tensor> a{torch::randn({4, 3}, torch::kFloat64), torch::randn({5}, torch::kFloat64)};
    auto b = clone_all(a);
    const auto wsd = torchopt_ext::schedules::WSDOptions(20).warmup_fraction(0.1).decay_fraction(0.2);
    auto made =
        optim::schedule_free_adamw(a, 0.05, wsd, optim::ScheduleFreeAdamWConfig().weight_decay(0.1).use_adamc(adamc));
    auto base = std::make_shared<optim::AdamW>(
        b, optim::AdamWOptions(0.05).betas(std::make_tuple(0.0, 0.999)).weight_decay(0.0));
    optim::ScheduleFree manual(
        base, optim::ScheduleFreeOptions().weight_decay_at_y(adamc ? 0.0 : 0.1).adamc_weight_decay(adamc ? 0.1 : 0.0));
    torchopt_ext::schedules::WSD manual_schedule(*base, wsd);
    for (int64_t k = 0; k < 20; ++k) {
      EXPECT_DOUBLE_EQ(made.optimizer->base().param_groups()[0].options().get_lr(),
                       0.05 * torchopt_ext::schedules::wsd_lr_factor(k, wsd));
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

}  // namespace
