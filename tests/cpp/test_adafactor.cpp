// torchopt_ext::optim::Adafactor against a float64 torch-ops reference written
// from classic.md §8 (torch.optim.Adafactor's epsilon placement, Hugging Face
// extras), checkpoints, LR schedulers and option checks.
#include <cmath>
#include <limits>
#include <optional>

#include "test_utils.h"
#include "torchopt_ext/torchopt_ext.h"

namespace {

namespace optim = torchopt_ext::optim;
using namespace torchopt_ext::testing;

// One param's reference state and step, op by op in float64.
struct Reference {
  optim::AdafactorOptions options;
  int64_t t = 0;
  std::vector<torch::Tensor> rows, cols, variances, moments;

  void step(std::vector<torch::Tensor>& params) {
    ++t;
    const auto [eps1_opt, eps2] = options.eps();
    for (size_t i = 0; i < params.size(); ++i) {
      auto& p = params[i];
      if (rows.size() < params.size()) {
        rows.resize(params.size());
        cols.resize(params.size());
        variances.resize(params.size());
        moments.resize(params.size());
      }
      // eps1 unset: finfo(param dtype).eps, as torch.
      const double eps1 = eps1_opt.value_or(p.scalar_type() == torch::kFloat64
                                                ? std::numeric_limits<double>::epsilon()
                                                : static_cast<double>(std::numeric_limits<float>::epsilon()));
      auto g = p.grad().to(torch::kFloat64);
      if (options.maximize()) {
        g = -g;
      }
      auto theta = p.to(torch::kFloat64);
      double rho = options.lr();
      if (options.relative_step()) {
        rho = std::min(rho, 1.0 / std::sqrt(double(t)));
        if (options.warmup_init()) {
          rho = std::min(rho, 1e-6 * double(t));
        }
      }
      const double rms = theta.pow(2).mean().sqrt().item<double>();
      const double alpha = options.scale_parameter() ? std::max(eps2, rms) * rho : rho;
      const double w = std::pow(double(t), options.beta2_decay());
      torch::Tensor v_hat;
      if (p.dim() >= 2) {
        if (!rows[i].defined()) {
          rows[i] = torch::zeros_like(g.mean(-1));
          cols[i] = torch::zeros_like(g.mean(-2));
        }
        rows[i] = (1 - w) * rows[i] + w * (g * g).mean(-1);
        cols[i] = (1 - w) * cols[i] + w * (g * g).mean(-2);
        const auto mean = rows[i].mean(-1).clamp_min(eps1);
        v_hat = rows[i].unsqueeze(-1) * cols[i].unsqueeze(-2) / mean.unsqueeze(-1).unsqueeze(-1);
      } else {
        if (!variances[i].defined()) {
          variances[i] = torch::zeros_like(g);
        }
        variances[i] = (1 - w) * variances[i] + w * g * g;
        v_hat = variances[i];
      }
      auto u = g / v_hat.clamp_min(eps1 * eps1).sqrt();
      u = u / std::max(1.0, u.pow(2).mean().sqrt().item<double>() / options.d());
      theta = theta * (1 - options.lr() * options.weight_decay());
      if (options.beta1()) {
        if (!moments[i].defined()) {
          moments[i] = torch::zeros_like(g);
        }
        moments[i] = *options.beta1() * moments[i] + (1 - *options.beta1()) * alpha * u;
        theta = theta - moments[i];
      } else {
        theta = theta - alpha * u;
      }
      torch::NoGradGuard no_grad;
      p.copy_(theta);
    }
  }
};

std::vector<torch::Tensor> adafactor_params(torch::Dtype dtype) {
  torch::manual_seed(0);
  return {torch::randn({17, 33}, dtype), torch::randn({1001}, dtype), torch::randn({}, dtype),
          torch::randn({3, 4, 5}, dtype), torch::randn({7}, dtype)};
}

double run_against_reference(const optim::AdafactorOptions& options, torch::Dtype dtype, double tol,
                             const std::string& label) {
  auto params = adafactor_params(dtype);
  auto reference_params = clone_all(params);
  const auto grads = make_grads(params, 20);
  optim::Adafactor opt(params, options);
  Reference reference{options};
  for (const auto& g : grads) {
    for (size_t i = 0; i < params.size(); ++i) {
      params[i].mutable_grad() = g[i].clone();
      reference_params[i].mutable_grad() = g[i].clone();
    }
    opt.step();
    reference.step(reference_params);
  }
  return expect_close_within(params, reference_params, tol, tol, label);
}

TEST(Adafactor, MatchesTorchOpsReferenceOver20Steps) {
  const std::vector<std::pair<std::string, optim::AdafactorOptions>> configs = {
      {"defaults", optim::AdafactorOptions()},
      {"weight-decay-maximize", optim::AdafactorOptions(0.05).weight_decay(0.1).maximize(true)},
      {"beta1", optim::AdafactorOptions().beta1(0.9).eps({1e-30, 1e-3})},
      {"explicit-lr", optim::AdafactorOptions(2e-3).relative_step(false).scale_parameter(false).d(2.0)},
      {"warmup", optim::AdafactorOptions().warmup_init(true).beta2_decay(-0.5)},
  };
  for (const auto& [label, options] : configs) {
    run_against_reference(options, torch::kFloat64, 1e-12, label + " fp64");
    run_against_reference(options, torch::kFloat32, 1e-5, label + " fp32");
  }
}

TEST(Adafactor, StateIsFactoredForMatrices) {
  auto p = torch::randn({256, 512});
  auto v = torch::randn({9});
  optim::Adafactor opt({p, v}, optim::AdafactorOptions());
  p.mutable_grad() = torch::randn_like(p);
  v.mutable_grad() = torch::randn_like(v);
  opt.step();
  const auto& state = static_cast<const optim::AdafactorParamState&>(*opt.state().at(p.unsafeGetTensorImpl()));
  EXPECT_EQ(state.row_var().sizes(), torch::IntArrayRef({256, 1}));
  EXPECT_EQ(state.col_var().sizes(), torch::IntArrayRef({1, 512}));
  EXPECT_EQ(state.row_var().numel() + state.col_var().numel(), 256 + 512);
  EXPECT_FALSE(state.variance().defined());
  EXPECT_FALSE(state.exp_avg().defined());
  const auto& vector_state = static_cast<const optim::AdafactorParamState&>(*opt.state().at(v.unsafeGetTensorImpl()));
  EXPECT_EQ(vector_state.variance().sizes(), v.sizes());
  EXPECT_FALSE(vector_state.row_var().defined());
}

TEST(Adafactor, SaveLoadContinuesBitwise) {
  check_checkpoint_round_trip<optim::Adafactor, optim::AdafactorOptions, optim::AdafactorParamState>(
      optim::AdafactorOptions(0.05).beta1(0.8).weight_decay(0.1).eps({1e-20, 1e-3}), optim::AdafactorOptions(),
      adafactor_params(torch::kFloat32), 6, 6);
  check_checkpoint_round_trip<optim::Adafactor, optim::AdafactorOptions, optim::AdafactorParamState>(
      optim::AdafactorOptions(1e-3).relative_step(false), optim::AdafactorOptions().beta1(0.5),
      adafactor_params(torch::kFloat64), 5, 5, temp_checkpoint_path("adafactor"));
}

TEST(Adafactor, StepLRDrivesTheLearningRate) {
  // With relative_step off, rho_t is the scheduled lr: the reference follows it.
  auto params = adafactor_params(torch::kFloat64);
  auto reference_params = clone_all(params);
  const auto options = optim::AdafactorOptions(0.02).relative_step(false);
  optim::Adafactor opt(params, options);
  torch::optim::StepLR scheduler(opt, /*step_size=*/2, /*gamma=*/0.5);
  Reference reference{options};
  const auto grads = make_grads(params, 8);
  for (const auto& g : grads) {
    for (size_t i = 0; i < params.size(); ++i) {
      params[i].mutable_grad() = g[i].clone();
      reference_params[i].mutable_grad() = g[i].clone();
    }
    reference.options.lr(opt.param_groups()[0].options().get_lr());
    opt.step();
    reference.step(reference_params);
    scheduler.step();
  }
  EXPECT_LE(opt.param_groups()[0].options().get_lr(), 0.02 * 0.25);  // the schedule reached the optimizer
  expect_close_within(params, reference_params, 1e-12, 1e-12, "StepLR");
}

TEST(Adafactor, PerGroupOptionsSurviveAddParamGroup) {
  auto params = adafactor_params(torch::kFloat64);
  optim::Adafactor opt({params[0]}, optim::AdafactorOptions());
  opt.add_param_group(torch::optim::OptimizerParamGroup(
      {params[1]}, std::make_unique<optim::AdafactorOptions>(optim::AdafactorOptions(5e-3).beta1(0.9))));
  const auto& second = static_cast<const optim::AdafactorOptions&>(opt.param_groups()[1].options());
  EXPECT_EQ(second.lr(), 5e-3);
  EXPECT_EQ(second.beta1(), std::optional<double>(0.9));
  params[0].mutable_grad() = torch::randn_like(params[0]);
  params[1].mutable_grad() = torch::randn_like(params[1]);
  opt.step();
  const auto& state = static_cast<const optim::AdafactorParamState&>(*opt.state().at(params[1].unsafeGetTensorImpl()));
  EXPECT_TRUE(state.exp_avg().defined());
}

TEST(Adafactor, BadOptionsNameTheArgument) {
  auto params = adafactor_params(torch::kFloat32);
  expect_throws_mentioning([&] { optim::Adafactor(params, optim::AdafactorOptions(-1.0)); }, "lr");
  expect_throws_mentioning([&] { optim::Adafactor(params, optim::AdafactorOptions().beta2_decay(0.5)); },
                           "beta2_decay");
  expect_throws_mentioning([&] { optim::Adafactor(params, optim::AdafactorOptions().eps({-1.0, 1e-3})); }, "eps1");
  expect_throws_mentioning([&] { optim::Adafactor(params, optim::AdafactorOptions().eps({std::nullopt, -1.0})); },
                           "eps2");
  expect_throws_mentioning([&] { optim::Adafactor(params, optim::AdafactorOptions().d(0.5)); }, "d (clipping");
  expect_throws_mentioning([&] { optim::Adafactor(params, optim::AdafactorOptions().weight_decay(-1)); },
                           "weight_decay");
  expect_throws_mentioning([&] { optim::Adafactor(params, optim::AdafactorOptions().beta1(1.0)); }, "beta1");
  expect_throws_mentioning(
      [&] { optim::Adafactor(params, optim::AdafactorOptions().warmup_init(true).relative_step(false)); },
      "warmup_init");
  expect_throws_mentioning([&] { optim::Adafactor(params, optim::AdafactorOptions().state_dtype(torch::kInt)); },
                           "state_dtype");
}

TEST(Adafactor, SparseGradientIsRejected) {
  auto p = torch::zeros({5});
  optim::Adafactor opt({p});
  p.mutable_grad() = torch::sparse_coo_tensor(torch::tensor({{1, 3}}), torch::tensor({1.0f, 2.0f}), {5});
  expect_throws_mentioning([&] { opt.step(); }, "sparse");
}

}  // namespace
