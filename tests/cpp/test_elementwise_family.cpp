// LibTorch front ends of Lion, NAdamW, RAdam and QHAdamW: the class drives the
// shared functional step exactly (its math is checked against public oracles
// in tests/python), and checkpoints, param groups, schedulers and option
// checks behave like LibTorch's own optimizers.
#include <gtest/gtest.h>
#include <torch/torch.h>
#include <torchopt_ext/torchopt_ext.h>

#include <sstream>
#include <vector>

#include "test_utils.h"

namespace {

namespace optim = torchopt_ext::optim;
namespace functional = torchopt_ext::functional;
using namespace torchopt_ext::testing;

std::vector<torch::Tensor> zeros_like_all(const std::vector<torch::Tensor>& ts) {
  std::vector<torch::Tensor> out;
  for (const auto& t : ts) {
    out.push_back(torch::zeros_like(t));
  }
  return out;
}

std::vector<torch::Tensor> step_counters(size_t n) {
  std::vector<torch::Tensor> out;
  for (size_t i = 0; i < n; ++i) {
    out.push_back(torch::zeros({}, torch::kFloat32));
  }
  return out;
}

torch::Tensor lr_tensor(double lr) { return torch::scalar_tensor(lr, torch::kFloat64); }

// --- the class drives the functional step, bitwise -------------------------

TEST(ElementwiseFamily, LionClassMatchesFunctional) {
  auto params = make_params(torch::kFloat64);
  auto direct = clone_all(params);
  const auto grads = make_grads(params, 20);
  optim::Lion opt(params, optim::LionOptions(1e-3).betas({0.95, 0.98}).weight_decay(0.1));
  run(opt, params, grads);
  auto exp_avgs = zeros_like_all(direct);
  auto steps = step_counters(direct.size());
  for (const auto& g : grads) {
    functional::lion_step_(direct, clone_all(g), exp_avgs, steps, lr_tensor(1e-3), 0.95, 0.98, 0.1, false, false, 0,
                           std::nullopt, std::nullopt);
  }
  expect_bitwise_equal(params, direct);
}

TEST(ElementwiseFamily, LionDecoupledWeightDecayDividesByInitialLr) {
  auto params = make_params(torch::kFloat64);
  auto direct = clone_all(params);
  const auto grads = make_grads(params, 5);
  optim::Lion opt(params, optim::LionOptions(1e-3).weight_decay(1e-2).decoupled_weight_decay(true));
  run(opt, params, grads);
  auto exp_avgs = zeros_like_all(direct);
  auto steps = step_counters(direct.size());
  for (const auto& g : grads) {
    functional::lion_step_(direct, clone_all(g), exp_avgs, steps, lr_tensor(1e-3), 0.9, 0.99, 1e-2 / 1e-3, false, false,
                           0, std::nullopt, std::nullopt);
  }
  expect_bitwise_equal(params, direct);
}

TEST(ElementwiseFamily, NAdamWClassMatchesFunctional) {
  auto params = make_params(torch::kFloat64);
  auto direct = clone_all(params);
  const auto grads = make_grads(params, 20);
  optim::NAdamW opt(params, optim::NAdamWOptions(1e-2).weight_decay(0.1).momentum_decay(1e-2));
  run(opt, params, grads);
  auto exp_avgs = zeros_like_all(direct);
  auto exp_avg_sqs = zeros_like_all(direct);
  std::vector<torch::Tensor> mu_products;
  for (size_t i = 0; i < direct.size(); ++i) {
    mu_products.push_back(torch::ones({}, torch::kFloat32));
  }
  auto steps = step_counters(direct.size());
  for (const auto& g : grads) {
    functional::nadam_step_(direct, clone_all(g), exp_avgs, exp_avg_sqs, mu_products, steps, lr_tensor(1e-2), 0.9,
                            0.999, 1e-8, 0.1, 1e-2, true, false, false, 0, std::nullopt, std::nullopt);
  }
  expect_bitwise_equal(params, direct);
  auto& state = static_cast<optim::NAdamWParamState&>(*opt.state().at(params[0].unsafeGetTensorImpl()));
  EXPECT_TRUE(torch::equal(state.mu_product(), mu_products[0]));
  EXPECT_LT(state.mu_product().item<double>(), 1.0);
}

TEST(ElementwiseFamily, RAdamClassMatchesFunctional) {
  auto params = make_params(torch::kFloat64);
  auto direct = clone_all(params);
  const auto grads = make_grads(params, 20);
  optim::RAdam opt(params, optim::RAdamOptions(1e-2).weight_decay(0.1).decoupled_weight_decay(true));
  run(opt, params, grads);
  auto exp_avgs = zeros_like_all(direct);
  auto exp_avg_sqs = zeros_like_all(direct);
  auto steps = step_counters(direct.size());
  for (const auto& g : grads) {
    functional::radam_step_(direct, clone_all(g), exp_avgs, exp_avg_sqs, steps, lr_tensor(1e-2), 0.9, 0.999, 1e-8, 0.1,
                            true, false, false, 0, std::nullopt, std::nullopt);
  }
  expect_bitwise_equal(params, direct);
}

TEST(ElementwiseFamily, QHAdamWClassMatchesFunctional) {
  auto params = make_params(torch::kFloat64);
  auto direct = clone_all(params);
  const auto grads = make_grads(params, 20);
  optim::QHAdamW opt(params, optim::QHAdamWOptions(1e-2).nus({0.7, 1.0}).betas({0.995, 0.999}).weight_decay(0.1));
  run(opt, params, grads);
  auto exp_avgs = zeros_like_all(direct);
  auto exp_avg_sqs = zeros_like_all(direct);
  auto steps = step_counters(direct.size());
  for (const auto& g : grads) {
    functional::qhadam_step_(direct, clone_all(g), exp_avgs, exp_avg_sqs, steps, lr_tensor(1e-2), 0.995, 0.999, 0.7,
                             1.0, 1e-8, 0.1, true, false, false, 0, std::nullopt, std::nullopt);
  }
  expect_bitwise_equal(params, direct);
}

TEST(ElementwiseFamily, QHAdamWWithUnitNusIsAdamW) {
  auto params = make_params(torch::kFloat64);
  auto reference = clone_all(params);
  const auto grads = make_grads(params, 20);
  optim::QHAdamW qh(params, optim::QHAdamWOptions(1e-2).weight_decay(0.1));
  torch::optim::AdamW adamw(reference, torch::optim::AdamWOptions(1e-2).weight_decay(0.1));
  run(qh, params, grads);
  run(adamw, reference, grads);
  for (size_t i = 0; i < params.size(); ++i) {
    EXPECT_TRUE(torch::allclose(params[i], reference[i], 1e-10, 1e-10)) << "tensor " << i;
  }
}

// --- checkpoints, groups, schedulers, options ------------------------------

TEST(ElementwiseFamily, SaveLoadContinuesBitwise) {
  check_save_load_continues_bitwise<optim::Lion>(optim::LionOptions(1e-3).weight_decay(0.1));
  check_save_load_continues_bitwise<optim::NAdamW>(optim::NAdamWOptions(1e-2));
  check_save_load_continues_bitwise<optim::RAdam>(optim::RAdamOptions(1e-2).weight_decay(0.1));
  check_save_load_continues_bitwise<optim::QHAdamW>(optim::QHAdamWOptions(1e-2).nus({0.7, 0.9}));
}

TEST(ElementwiseFamily, PerGroupOptionsSurviveAddParamGroup) {
  auto params = make_params(torch::kFloat64);
  optim::NAdamW opt({params[0]}, optim::NAdamWOptions(1e-2));
  opt.add_param_group(torch::optim::OptimizerParamGroup(
      {params[1]}, std::make_unique<optim::NAdamWOptions>(optim::NAdamWOptions(5e-3).momentum_decay(0.02))));
  const auto& second = static_cast<const optim::NAdamWOptions&>(opt.param_groups()[1].options());
  EXPECT_EQ(second.lr(), 5e-3);
  EXPECT_EQ(second.momentum_decay(), 0.02);
  const auto& first = static_cast<const optim::NAdamWOptions&>(opt.param_groups()[0].options());
  EXPECT_EQ(first.momentum_decay(), 4e-3);
}

TEST(ElementwiseFamily, StepLRDrivesTheLearningRate) {
  auto params = make_params(torch::kFloat64);
  auto reference_params = clone_all(params);
  optim::Lion opt(params, optim::LionOptions(1e-3));
  torch::optim::SGD reference(reference_params, torch::optim::SGDOptions(1e-3));
  torch::optim::StepLR scheduler(opt, /*step_size=*/2, /*gamma=*/0.5);
  torch::optim::StepLR reference_scheduler(reference, /*step_size=*/2, /*gamma=*/0.5);
  const auto grads = make_grads(params, 6);
  for (const auto& g : grads) {
    for (size_t i = 0; i < params.size(); ++i) {
      params[i].mutable_grad() = g[i].clone();
      reference_params[i].mutable_grad() = g[i].clone();
    }
    opt.step();
    reference.step();
    scheduler.step();
    reference_scheduler.step();
    // The schedule LibTorch applies to its own optimizers reaches ours too.
    EXPECT_DOUBLE_EQ(opt.param_groups()[0].options().get_lr(), reference.param_groups()[0].options().get_lr());
  }
  EXPECT_LT(opt.param_groups()[0].options().get_lr(), 1e-3);
}

TEST(ElementwiseFamily, BadOptionsNameTheArgument) {
  auto params = make_params(torch::kFloat64);
  expect_error_naming([&] { optim::Lion(params, optim::LionOptions(-1.0)); }, "lr");
  expect_error_naming([&] { optim::Lion(params, optim::LionOptions().betas({1.5, 0.9})); }, "betas[0]");
  expect_error_naming([&] { optim::NAdamW(params, optim::NAdamWOptions().momentum_decay(-1)); }, "momentum_decay");
  expect_error_naming([&] { optim::NAdamW(params, optim::NAdamWOptions().betas({0.9, 1.0})); }, "betas[1]");
  expect_error_naming([&] { optim::RAdam(params, optim::RAdamOptions().eps(-1)); }, "eps");
  expect_error_naming([&] { optim::QHAdamW(params, optim::QHAdamWOptions().nus({0.5, 2.0})); }, "nus[1]");
  expect_error_naming([&] { optim::QHAdamW(params, optim::QHAdamWOptions().weight_decay(-1)); }, "weight_decay");
}

TEST(ElementwiseFamily, SparseGradientIsRejected) {
  auto p = torch::zeros({5});
  optim::RAdam opt({p});
  p.mutable_grad() = torch::sparse_coo_tensor(torch::tensor({{1, 3}}), torch::tensor({1.0f, 2.0f}), {5});
  expect_error_naming([&] { opt.step(); }, "sparse");
}

}  // namespace

namespace {

namespace optim = torchopt_ext::optim;
namespace functional = torchopt_ext::functional;
using namespace torchopt_ext::testing;

TEST(MARS, ClassDrivesTheMatrixAndAdamWBranches) {
  auto params = make_params(torch::kFloat64);  // (17, 33) takes the MARS step, the rest AdamW
  auto direct = clone_all(params);
  const auto grads = make_grads(params, 20);
  optim::MARS opt(params, optim::MARSOptions(1e-2).weight_decay(0.1).lr_1d(5e-3).amsgrad(true));
  run(opt, params, grads);

  std::vector<torch::Tensor> matrix = {direct[0]};
  std::vector<torch::Tensor> others = {direct[1], direct[2]};
  auto m = zeros_like_all(matrix), v = zeros_like_all(matrix), vmax = zeros_like_all(matrix);
  auto last = zeros_like_all(matrix);
  auto m1 = zeros_like_all(others), v1 = zeros_like_all(others), vmax1 = zeros_like_all(others);
  auto steps = step_counters(1), steps_1d = step_counters(2);
  for (const auto& g : grads) {
    functional::mars_step_(matrix, {g[0].clone()}, m, v, vmax, last, steps, lr_tensor(1e-2), 0.95, 0.99, 1e-8, 0.1,
                           0.025, "mars-adamw", true, false, false, 0, std::nullopt, std::nullopt);
    // amsgrad reaches the AdamW branch too, as in the official code.
    functional::adam_step_(others, {g[1].clone(), g[2].clone()}, m1, v1, vmax1, steps_1d,
                           lr_tensor(1e-2 * (5e-3 / 1e-2)), 0.9, 0.95, 1e-8, 0.1, true, true, false, false, 0,
                           std::nullopt, std::nullopt);
  }
  expect_bitwise_equal(params, {matrix[0], others[0], others[1]});
  const auto& state = static_cast<const optim::MARSParamState&>(*opt.state().at(params[0].unsafeGetTensorImpl()));
  EXPECT_TRUE(torch::equal(state.last_grad(), grads.back()[0]));
}

TEST(MARS, ShampooOrthogonalizesTheMomentumOfMatrices) {
  // (17, 33) takes the Newton-Schulz rule; with optimize_1d the other params
  // take mars-adamw (one call each, as the class makes them).
  auto params = make_params(torch::kFloat64);
  auto direct = clone_all(params);
  const auto grads = make_grads(params, 20);
  optim::MARS opt(
      params,
      optim::MARSOptions(1e-2).mars_type("mars-shampoo").optimize_1d(true).weight_decay(0.1).ns_dtype(std::nullopt));
  run(opt, params, grads);

  std::vector<torch::Tensor> matrix = {direct[0]};
  std::vector<torch::Tensor> others = {direct[1], direct[2]};
  auto m = zeros_like_all(matrix), last = zeros_like_all(matrix);
  auto m1 = zeros_like_all(others), v1 = zeros_like_all(others), last1 = zeros_like_all(others);
  auto steps = step_counters(1), steps_1d = step_counters(2);
  for (const auto& g : grads) {
    functional::mars_step_(others, {g[1].clone(), g[2].clone()}, m1, v1, {}, last1, steps_1d, lr_tensor(1e-2), 0.95,
                           0.99, 1e-8, 0.1, 0.025, "mars-adamw", false, false, false, 0, std::nullopt, std::nullopt);
    functional::mars_step_(matrix, {g[0].clone()}, m, {}, {}, last, steps, lr_tensor(1e-2), 0.95, 0.99, 1e-8, 0.1,
                           0.025, "mars-shampoo", false, false, false, 0, std::nullopt, std::nullopt, std::nullopt,
                           true, std::nullopt);
  }
  expect_bitwise_equal(params, {matrix[0], others[0], others[1]});
  const auto& state = static_cast<const optim::MARSParamState&>(*opt.state().at(params[0].unsafeGetTensorImpl()));
  EXPECT_FALSE(state.exp_avg_sq().defined());  // no second moment for the orthogonalized matrix

  // The orthogonalized direction has singular values near 1: the update of a
  // zero-decay step is lr * sqrt(max(1, r/c)) * O with ||O||_2 ~ 1.
  auto p = torch::zeros({17, 33}, torch::kFloat64);
  optim::MARS one({p}, optim::MARSOptions(1.0).mars_type("mars-shampoo").ns_dtype(std::nullopt));
  p.mutable_grad() = torch::randn({17, 33}, torch::kFloat64);
  one.step();
  const auto singular = torch::linalg_svdvals(p);
  EXPECT_GT(singular.min().item<double>(), 0.5);
  EXPECT_LT(singular.max().item<double>(), 1.3);
}

TEST(MARS, ExactModeTakesGPrevFromUpdateLastGrad) {
  auto p = torch::randn({5, 4}, torch::kFloat64);
  optim::MARS opt({p}, optim::MARSOptions(1e-2).is_approx(false));
  const auto next_batch_grad = torch::randn({5, 4}, torch::kFloat64);
  p.mutable_grad() = next_batch_grad.clone();
  opt.update_previous_grad();
  p.mutable_grad() = torch::randn({5, 4}, torch::kFloat64);
  opt.step();
  const auto& state = static_cast<const optim::MARSParamState&>(*opt.state().at(p.unsafeGetTensorImpl()));
  // The step leaves g_prev alone in the exact mode (zeros until update_last_grad).
  EXPECT_TRUE(torch::equal(state.last_grad(), torch::zeros_like(p)));
  opt.update_last_grad();
  EXPECT_TRUE(torch::equal(state.last_grad(), next_batch_grad));
  // Approximate groups ignore both calls.
  auto q = torch::randn({5, 4}, torch::kFloat64);
  optim::MARS approx({q}, optim::MARSOptions(1e-2));
  q.mutable_grad() = torch::randn({5, 4}, torch::kFloat64);
  approx.update_previous_grad();
  EXPECT_TRUE(approx.state().empty());
}

TEST(MARS, SaveLoadContinuesBitwise) {
  check_save_load_continues_bitwise<optim::MARS>(optim::MARSOptions(1e-2).weight_decay(0.1));
  check_save_load_continues_bitwise<optim::MARS>(optim::MARSOptions(1e-3).mars_type("mars-lion").optimize_1d(true));
  check_save_load_continues_bitwise<optim::MARS>(
      optim::MARSOptions(1e-2).mars_type("mars-shampoo").weight_decay(0.1).ns_dtype(std::nullopt));
  check_save_load_continues_bitwise<optim::MARS>(optim::MARSOptions(1e-2).mars_type("mars-shampoo").optimize_1d(true));
}

TEST(MARS, BadOptionsNameTheArgument) {
  auto params = make_params(torch::kFloat32);
  expect_error_naming([&] { optim::MARS(params, optim::MARSOptions().mars_type("mars-muon")); }, "mars_type");
  expect_error_naming([&] { optim::MARS(params, optim::MARSOptions().ns_dtype(torch::kInt32)); }, "ns_dtype");
  expect_error_naming([&] { optim::MARS(params, optim::MARSOptions().gamma(-1)); }, "gamma");
  expect_error_naming([&] { optim::MARS(params, optim::MARSOptions().betas_1d({0.9, 1.0})); }, "betas_1d[1]");
  expect_error_naming([&] { optim::MARS(params, optim::MARSOptions().mars_type("mars-lion").amsgrad(true)); },
                      "amsgrad");
}

}  // namespace

namespace {

namespace optim = torchopt_ext::optim;
namespace functional = torchopt_ext::functional;
using namespace torchopt_ext::testing;

TEST(LAMB, ClassClipsGloballyAndDrivesTheFunctionalStep) {
  auto params = make_params(torch::kFloat64);
  auto direct = clone_all(params);
  const auto grads = make_grads(params, 20);
  // Two groups: the clip divisor must still come from all grads.
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(std::vector<torch::Tensor>{params[0]});
  groups.emplace_back(std::vector<torch::Tensor>{params[1], params[2]},
                      std::make_unique<optim::LAMBOptions>(optim::LAMBOptions(5e-3).weight_decay(0.1)));
  optim::LAMB opt(groups, optim::LAMBOptions(1e-2).max_grad_norm(0.5));
  run(opt, params, grads);

  std::vector<torch::Tensor> first = {direct[0]}, second = {direct[1], direct[2]};
  auto m1 = zeros_like_all(first), v1 = zeros_like_all(first), m2 = zeros_like_all(second), v2 = zeros_like_all(second);
  auto s1 = step_counters(1), s2 = step_counters(2);
  for (const auto& g : grads) {
    const auto divisor = functional::lamb_grad_divisor(g, 0.5);
    functional::lamb_step_(first, {g[0].clone()}, m1, v1, s1, lr_tensor(1e-2), 0.9, 0.999, 1e-6, 0.01, true, true,
                           false, false, false, false, divisor, false, 0, std::nullopt, std::nullopt);
    functional::lamb_step_(second, {g[1].clone(), g[2].clone()}, m2, v2, s2, lr_tensor(5e-3), 0.9, 0.999, 1e-6, 0.1,
                           true, true, false, false, false, false, divisor, false, 0, std::nullopt, std::nullopt);
  }
  expect_bitwise_equal(params, {first[0], second[0], second[1]});
  const auto divisor = functional::lamb_grad_divisor(grads.back(), 0.5).item<double>();
  EXPECT_GT(divisor, 1.0);  // the clip was active in this test
}

TEST(LAMB, SaveLoadContinuesBitwiseAndOptionsAreChecked) {
  check_save_load_continues_bitwise<optim::LAMB>(optim::LAMBOptions(1e-2).trust_clip(true));
  check_save_load_continues_bitwise<optim::LAMB>(optim::LAMBOptions(1e-2).max_grad_norm(std::nullopt));
  auto params = make_params(torch::kFloat32);
  expect_error_naming([&] { optim::LAMB(params, optim::LAMBOptions().max_grad_norm(0.0)); }, "max_grad_norm");
  expect_error_naming([&] { optim::LAMB(params, optim::LAMBOptions().eps(-1)); }, "eps");
}

}  // namespace
