// Muon in LibTorch: parity with a reference written here from classic.md §11
// on plain ATen ops, the AdamW fallback, checkpoints, schedulers, errors.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <vector>

#include "test_utils.h"
#include "torchopt_ext/common/newton_schulz.h"
#include "torchopt_ext/optim/muon.h"

namespace {

using namespace torchopt_ext;
using namespace torchopt_ext::testing;

// Newton-Schulz in `dtype` written from the spec: transpose tall inputs,
// X / max(||X||, eps), then X <- a X + (b A + c A A) X with A = X X^T.
torch::Tensor reference_ns(const torch::Tensor& g, torch::Dtype dtype, int steps = 5, double eps = 1e-7) {
  torch::Tensor x = g.to(dtype);
  const bool tall = x.size(0) > x.size(1);
  if (tall) {
    x = x.t();
  }
  x = x / x.norm().clamp_min(eps);
  for (int i = 0; i < steps; ++i) {
    const auto a = torch::mm(x, x.t());
    x = 3.4445 * x + torch::mm(-4.775 * a + 2.0315 * torch::mm(a, a), x);
  }
  return tall ? x.t() : x;
}

// One Muon step per gradient set, reference form (fp64 iteration).
void reference_muon(std::vector<torch::Tensor>& params, std::vector<torch::Tensor>& buffers,
                    const std::vector<torch::Tensor>& grads, double lr, double wd, double mu) {
  for (size_t i = 0; i < params.size(); ++i) {
    buffers[i] = mu * buffers[i] + (1 - mu) * grads[i];
    const auto update = (1 - mu) * grads[i] + mu * buffers[i];
    const auto rows = static_cast<double>(params[i].size(0));
    const auto cols = static_cast<double>(params[i].size(1));
    const auto o = reference_ns(update, torch::kFloat64);
    params[i] = params[i] * (1 - lr * wd) - lr * std::sqrt(std::max(1.0, rows / cols)) * o;
  }
}

std::vector<torch::Tensor> matrices(torch::Dtype dtype) {
  torch::manual_seed(0);
  return {torch::randn({17, 33}, dtype), torch::randn({40, 12}, dtype), torch::randn({16, 16}, dtype)};
}

TEST(Muon, MatchesSpecReferenceInFloat64) {
  auto params = matrices(torch::kFloat64);
  auto ref = clone_all(params);
  std::vector<torch::Tensor> buffers;
  for (const auto& p : ref) {
    buffers.push_back(torch::zeros_like(p));
  }
  const auto grads = make_grads(params, 20);
  optim::Muon opt(params, optim::MuonOptions(0.02).weight_decay(0.1).ns_dtype(std::nullopt));
  run(opt, params, grads);
  for (const auto& step : grads) {
    reference_muon(ref, buffers, step, 0.02, 0.1, 0.95);
  }
  expect_close_within(params, ref, 1e-12, 1e-12, "muon fp64");
}

TEST(Muon, Bf16IterationTracksTheFp64Reference) {
  auto params = matrices(torch::kFloat32);
  auto ref = clone_all(params);
  for (auto& p : ref) {
    p = p.to(torch::kFloat64);
  }
  std::vector<torch::Tensor> buffers;
  for (const auto& p : ref) {
    buffers.push_back(torch::zeros_like(p));
  }
  const auto grads = make_grads(params, 20);
  optim::Muon opt(params, optim::MuonOptions(0.02));
  run(opt, params, grads);
  for (const auto& step : grads) {
    std::vector<torch::Tensor> g64;
    for (const auto& g : step) {
      g64.push_back(g.to(torch::kFloat64));
    }
    reference_muon(ref, buffers, g64, 0.02, 0.1, 0.95);
  }
  // bf16 matmuls: each step is off by ~1% of lr * O (classic.md §11), 20 steps.
  expect_close_within(params, ref, 0.0, 20 * 0.02 * 0.05, "muon bf16 vs fp64");
}

TEST(Muon, NewtonSchulzCoreMatchesReference) {
  torch::manual_seed(1);
  const auto g = torch::randn({24, 10}, torch::kFloat64);
  common::NewtonSchulzOptions options;
  options.dtype = std::nullopt;
  expect_close_within({common::newton_schulz(g, options)}, {reference_ns(g, torch::kFloat64)}, 1e-12, 1e-12, "ns");
  const auto batch = torch::randn({3, 8, 6}, torch::kFloat64);
  const auto out = common::newton_schulz(batch, options);
  for (int64_t i = 0; i < 3; ++i) {
    expect_close_within({out[i]}, {reference_ns(batch[i], torch::kFloat64)}, 1e-12, 1e-12, "ns batch");
  }
}

TEST(Muon, NonMatricesTakeTheAdamWFallback) {
  torch::manual_seed(2);
  std::vector<torch::Tensor> params{torch::randn({12, 7}), torch::randn({9}), torch::randn({})};
  auto vectors = std::vector<torch::Tensor>{params[1].clone(), params[2].clone()};
  const auto grads = make_grads(params, 20);
  optim::Muon opt(params, optim::MuonOptions(0.02).adam_lr(0.004).adam_betas({0.9, 0.95}).adam_eps(1e-10));
  torch::optim::AdamW adamw(vectors, torch::optim::AdamWOptions(0.004).betas({0.9, 0.95}).eps(1e-10).weight_decay(0.1));
  for (const auto& step : grads) {
    for (size_t i = 0; i < params.size(); ++i) {
      params[i].mutable_grad() = step[i].clone();
    }
    vectors[0].mutable_grad() = step[1].clone();
    vectors[1].mutable_grad() = step[2].clone();
    opt.step();
    adamw.step();
  }
  expect_close({params[1], params[2]}, vectors);
  const auto& matrix_state =
      static_cast<const optim::MuonParamState&>(*opt.state().at(params[0].unsafeGetTensorImpl()));
  EXPECT_TRUE(matrix_state.momentum_buffer().defined());
  EXPECT_FALSE(matrix_state.exp_avg().defined());
}

TEST(Muon, UseMuonRoutesConvKernelsAsMatrices) {
  torch::manual_seed(3);
  auto conv = torch::randn({8, 3, 3, 3}, torch::kFloat64);
  auto flat = conv.reshape({8, 27}).clone();
  const auto grads = make_grads({conv}, 10);
  optim::Muon a({conv}, optim::MuonOptions(0.02).use_muon(true).ns_dtype(std::nullopt));
  optim::Muon b({flat}, optim::MuonOptions(0.02).ns_dtype(std::nullopt));
  for (const auto& step : grads) {
    conv.mutable_grad() = step[0].clone();
    flat.mutable_grad() = step[0].reshape({8, 27}).clone();
    a.step();
    b.step();
  }
  expect_close({conv.reshape({8, 27})}, {flat});
}

TEST(Muon, CheckpointRoundTrip) {
  std::vector<torch::Tensor> params{torch::randn({6, 5}), torch::randn({7}), torch::randn({5, 9})};
  const auto options = optim::MuonOptions(0.01)
                           .momentum(0.9)
                           .adjust_lr_fn("match_rms_adamw")
                           .ns_coefficients({4.0, -6.0, 2.5, 3.4445, -4.775, 2.0315})
                           .adam_lr(0.003)
                           .initial_lr(0.01)
                           .adam_weight_decay(0.0)
                           .ns_dtype(at::kFloat);
  check_checkpoint_round_trip<optim::Muon, optim::MuonOptions, optim::MuonParamState>(options, optim::MuonOptions(0.5),
                                                                                      params, 4, 4);
}

TEST(Muon, MagmaCheckpointRoundTrip) {
  std::vector<torch::Tensor> params{torch::randn({6, 5}), torch::randn({5, 9}), torch::randn({4})};
  check_checkpoint_round_trip<optim::Muon, optim::MuonOptions, optim::MuonParamState>(
      optim::MuonOptions(0.01).use_magma(true).magma_p(0.7).seed(3).initial_lr(0.01), optim::MuonOptions(0.5), params,
      4, 6);
}

TEST(Muon, MagmaNeverKeepFreezesTheMatrix) {
  auto matrix = torch::randn({6, 5});
  const auto start = matrix.clone();
  optim::Muon opt({matrix}, optim::MuonOptions(0.1).weight_decay(0.5).use_magma(true).magma_p(0.0));
  for (int i = 0; i < 4; ++i) {
    matrix.mutable_grad() = torch::randn({6, 5});
    opt.step();
  }
  EXPECT_TRUE(torch::equal(matrix, start));
  const auto& state = static_cast<const optim::MuonParamState&>(*opt.state().at(matrix.unsafeGetTensorImpl()));
  EXPECT_NE(state.magma_score().item<float>(), 0.5f);
}

TEST(Muon, StepLRDrivesBothBranches) {
  torch::manual_seed(4);
  std::vector<torch::Tensor> params{torch::randn({4, 4}), torch::randn({4})};
  auto vector = std::vector<torch::Tensor>{params[1].clone()};
  optim::Muon opt(params, optim::MuonOptions(0.02).adam_lr(0.01));
  torch::optim::AdamW adamw(vector, torch::optim::AdamWOptions(0.01).weight_decay(0.1));
  torch::optim::StepLR sched(opt, 1, 0.5);
  torch::optim::StepLR sched_ref(adamw, 1, 0.5);
  for (int i = 0; i < 6; ++i) {
    for (auto& p : params) {
      p.mutable_grad() = torch::randn_like(p);
    }
    vector[0].mutable_grad() = params[1].grad().clone();
    opt.step();
    adamw.step();
    sched.step();
    sched_ref.step();
  }
  // LibTorch's StepLR leaves the first step alone: 5 halvings in 6 steps.
  EXPECT_DOUBLE_EQ(opt.param_groups()[0].options().get_lr(), 0.02 / 32);
  expect_close({params[1]}, vector);
}

TEST(Muon, BadOptionsNameTheArgument) {
  const std::vector<torch::Tensor> params{torch::randn({3, 3})};
  expect_throws_mentioning([&] { optim::Muon(params, optim::MuonOptions(-1.0)); }, "lr");
  expect_throws_mentioning([&] { optim::Muon(params, optim::MuonOptions().momentum(1.0)); }, "momentum");
  expect_throws_mentioning([&] { optim::Muon(params, optim::MuonOptions().ns_steps(0)); }, "ns_steps");
  expect_throws_mentioning([&] { optim::Muon(params, optim::MuonOptions().ns_coefficients({1.0, 2.0})); },
                           "ns_coefficients");
  expect_throws_mentioning([&] { optim::Muon(params, optim::MuonOptions().adjust_lr_fn("sqrt")); }, "adjust_lr_fn");
  expect_throws_mentioning([&] { optim::Muon(params, optim::MuonOptions().ns_normalization("nuclear")); },
                           "ns_normalization");
  expect_throws_mentioning([&] { optim::Muon(params, optim::MuonOptions().adam_betas({0.9, 1.0})); }, "adam_betas");
  expect_throws_mentioning([&] { optim::Muon({torch::randn({4})}, optim::MuonOptions().use_muon(true)); }, "use_muon");
}

}  // namespace
