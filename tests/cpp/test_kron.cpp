// Kron in LibTorch: parity with a float64 reference written here from
// rollfast.md §2.3-2.4 on plain ATen ops (default geometry "Q0.5EQ1.5", a
// mixed dense/diagonal matrix and a vector, with the generator draws in the
// documented order), spike skips, options validation and checkpoints.
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <iostream>
#include <limits>
#include <vector>

#include "test_utils.h"
#include "torchopt_ext/common/psgd.h"
#include "torchopt_ext/optim/kron.h"

namespace {

using namespace torchopt_ext;
using namespace torchopt_ext::testing;

constexpr double kTiny = std::numeric_limits<double>::min();

torch::Tensor lower_bound(const torch::Tensor& a_in, const torch::Tensor& scale, at::Generator& gen) {
  const auto a = a_in / scale;
  const auto j = a.norm(2, {1}).argmax().item<int64_t>();
  auto v = at::randn({32, a.size(1)}, gen, a.options());
  v = a[j] + torch::sign((a[j] * v).sum(1, true)) * v;
  for (int i = 0; i < 2; ++i) {
    v = v.mm(a);
    v = v / (v.norm(2, {1}, true) + kTiny);
    v = v.mm(a);
  }
  return scale * v.norm(2, {1}).max();
}

// One param's factors, one entry per axis (dense: matrix, diagonal: vector).
struct RefParam {
  torch::Tensor p, mu;
  std::vector<torch::Tensor> q;
  std::vector<double> lip;
};

torch::Tensor along(const torch::Tensor& x, const torch::Tensor& q, int64_t axis, bool transpose) {
  if (q.dim() == 1) {
    auto shape = std::vector<int64_t>(x.dim(), 1);
    shape[axis] = q.size(0);
    return x * q.view(shape);
  }
  return torch::tensordot(transpose ? q.t() : q, x, {1}, {axis}).movedim(0, axis);
}

torch::Tensor precondition(torch::Tensor x, const std::vector<torch::Tensor>& q) {
  for (size_t i = 0; i < q.size(); ++i) {
    x = along(along(x, q[i], i, false), q[i], i, true);
  }
  return x;
}

// rollfast's Kron step with default options (lr, b1 = 0.9, p = 1, lazy init).
void reference_step(std::vector<RefParam>& ps, const std::vector<torch::Tensor>& grads, int64_t t, double lr,
                    at::Generator& gen) {
  const double damping = 1e-9;
  const double eps = std::numeric_limits<double>::epsilon();
  const double beta = std::min(static_cast<double>(t) / (1.0 + t), 0.9);
  for (size_t i = 0; i < ps.size(); ++i) {
    ps[i].mu = (1 - beta) * grads[i] + beta * ps[i].mu;
  }
  if (t == 0) {
    double largest = 0;
    for (const auto& g : grads) {
      largest = std::max(largest, g.abs().pow(4).mean().item<double>());
    }
    const double s = std::pow(largest + std::pow(damping, 4), -1.0 / 8.0);
    for (auto& rp : ps) {
      const double per = std::pow(s, 1.0 / rp.q.size());
      for (auto& q : rp.q) {
        q = q * per;
      }
    }
  }
  EXPECT_LT(at::rand({}, gen, torch::kFloat64).item<double>(), 1.0);  // the gate draw (p = 1)
  for (size_t i = 0; i < ps.size(); ++i) {
    auto& rp = ps[i];
    const auto& g = grads[i];
    const auto v = at::randn(g.sizes(), gen, g.options());
    const auto x = precondition(g + (damping + eps * g.abs()) * v, rp.q);
    for (size_t f = 0; f < rp.q.size(); ++f) {
      auto& q = rp.q[f];
      const auto rows = x.movedim(f, 0).reshape({x.size(f), -1});
      const double t2 = static_cast<double>(g.numel()) / q.size(0);
      const bool dense = q.dim() == 2;
      const auto t1 = (dense ? rows.mm(rows.t()) : rows.square().sum(1)) + damping;
      const double ell = dense ? lower_bound(t1, t1.diagonal().max() + kTiny, gen).item<double>() + t2
                               : t1.abs().max().item<double>() + t2;
      rp.lip[f] = std::max(0.9 * rp.lip[f] + 0.1 * ell, ell);
      const double eta = 0.1 / rp.lip[f];
      if (!dense) {
        q = (q * (1 - eta * (t1 - t2))).abs();
        continue;
      }
      q = q - eta * (t1.mm(q) - t2 * q);
      auto r = q.t() - q;
      r = r / (lower_bound(r, r.abs().max() + kTiny, gen) + kTiny);
      const auto rq = r.mm(q);
      const auto rrq = r.mm(rq);
      const double tr_rq = rq.trace().item<double>();
      const double tr_rrq = rrq.trace().item<double>();
      const double a = tr_rrq < 0 ? std::min(-tr_rq / tr_rrq, 0.125) : 0.125;
      q = q + a * (rq + 0.5 * a * rrq);
    }
  }
  at::rand({}, gen, torch::kFloat64);  // the balancing draw (rarely < 0.01)
  for (auto& rp : ps) {
    auto d = precondition(rp.mu, rp.q);
    d = (d * std::min(1.0, 2.0 / (d.square().mean().sqrt().item<double>() + std::numeric_limits<float>::min())))
            .clamp(-10.0, 10.0);
    rp.p = rp.p - lr * d;
  }
}

TEST(Kron, MatchesSpecReferenceInFloat64) {
  torch::manual_seed(0);
  // (5, 4): 25 > 20 makes axis 0 diagonal, axis 1 dense; (3,): one diagonal factor.
  std::vector<torch::Tensor> params{torch::randn({5, 4}, torch::kFloat64), torch::randn({3}, torch::kFloat64)};
  std::vector<RefParam> ref;
  ref.push_back({params[0].clone(),
                 torch::zeros({5, 4}, torch::kFloat64),
                 {torch::ones({5}, torch::kFloat64), torch::eye(4, torch::kFloat64)},
                 {0.0, 0.0}});
  ref.push_back({params[1].clone(), torch::zeros({3}, torch::kFloat64), {torch::ones({3}, torch::kFloat64)}, {0.0}});
  const auto grads = make_grads(params, 20);
  optim::Kron opt(params, optim::KronOptions(0.01).seed(11));
  run(opt, params, grads);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(11);
  for (size_t t = 0; t < grads.size(); ++t) {
    reference_step(ref, grads[t], static_cast<int64_t>(t), 0.01, gen);
  }
  expect_close_within(params, {ref[0].p, ref[1].p}, 1e-12, 1e-12, "kron fp64");
  EXPECT_TRUE(torch::equal(opt.rng_state(), gen.get_state()));
}

TEST(Kron, LayoutAndStateShapes) {
  common::psgd::LayoutOptions layout;
  EXPECT_EQ(common::psgd::factor_layout({5, 9}, layout), (std::vector<bool>{true, false}));
  EXPECT_EQ(common::psgd::factor_layout({}, layout), (std::vector<bool>{false}));
  layout.memory_save_mode = common::psgd::MemorySaveMode::OneDiag;
  EXPECT_EQ(common::psgd::factor_layout({4, 4, 2}, layout), (std::vector<bool>{true, false, true}));
  std::vector<torch::Tensor> params{torch::randn({5, 9}), torch::randn({})};
  optim::Kron opt(params, optim::KronOptions(0.01));
  run(opt, params, make_grads(params, 1));
  const auto& s = static_cast<const optim::KronParamState&>(*opt.state().at(params[0].unsafeGetTensorImpl()));
  EXPECT_EQ(s.Q().numel(), 25 + 9);
  EXPECT_EQ(s.L().numel(), 2);
  EXPECT_EQ(s.Q().scalar_type(), torch::kFloat32);
}

TEST(Kron, StrictSpikeSkipLeavesEverythingUntouched) {
  std::vector<torch::Tensor> params{torch::randn({4, 3}), torch::randn({5})};
  optim::Kron opt(params, optim::KronOptions(0.05).raw_global_grad_clip(1.0).permissive_spike_protection(false));
  auto small = make_grads(params, 2);
  for (auto& step : small) {
    for (auto& g : step) {
      g = g * 0.01;
    }
  }
  run(opt, params, small);
  const auto before = clone_all(params);
  const auto rng = opt.rng_state().clone();
  const auto& s = static_cast<const optim::KronParamState&>(*opt.state().at(params[0].unsafeGetTensorImpl()));
  const auto q = s.Q().clone();
  const auto mu = s.mu().clone();
  run(opt, params, make_grads(params, 1, 9));  // norm ~ 4 > 1: a spike
  expect_bitwise_equal(params, before);
  EXPECT_TRUE(torch::equal(opt.rng_state(), rng));
  EXPECT_TRUE(torch::equal(s.Q(), q));
  EXPECT_TRUE(torch::equal(s.mu(), mu));
  EXPECT_EQ(s.step().item<double>(), 2.0);
}

TEST(Kron, EveryGeometryRunsAndDiffers) {
  std::vector<torch::Tensor> finals;
  for (const std::string mode : {"Q0.5EQ1.5", "EQ", "QUAD", "NS", "EXP", "TAYLOR2", "HYPER"}) {
    torch::manual_seed(0);
    std::vector<torch::Tensor> params{torch::randn({4, 4}, torch::kFloat64)};
    optim::Kron opt(params, optim::KronOptions(0.05).preconditioner_mode(mode).seed(1));
    run(opt, params, make_grads(params, 5));
    const auto& s = static_cast<const optim::KronParamState&>(*opt.state().at(params[0].unsafeGetTensorImpl()));
    ASSERT_TRUE(torch::isfinite(s.Q()).all().item<bool>()) << mode;
    for (const auto& other : finals) {
      EXPECT_GT((other - s.Q()).abs().max().item<double>(), 1e-6) << mode;
    }
    finals.push_back(s.Q().clone());
  }
}

TEST(Kron, CheckpointRoundTrip) {
  std::vector<torch::Tensor> params{torch::randn({6, 5}), torch::randn({7}), torch::randn({2, 3, 4})};
  const auto options = optim::KronOptions(0.01)
                           .weight_decay(0.1)
                           .preconditioner_update_probability(0.7)
                           .memory_save_mode("one_diag")
                           .raw_global_grad_clip(50.0)
                           .mu_dtype(torch::kBFloat16)
                           .preconditioner_mode("QUAD")
                           .grad_clip_mode("global_rms")
                           .use_magma(true)
                           .seed(3);
  check_checkpoint_round_trip<optim::Kron, optim::KronOptions, optim::KronParamState>(
      options, optim::KronOptions(0.5).seed(8), params, 4, 4);
}

// Stacked (L, m, n) params are updated as batches of slices (bmm, batched
// norm bounds) with the draws taken per slice in order, so they equal L
// separate (m, n) params listed in that order, draws included (same
// generator state), for every chunk size; values agree to rounding (a bmm
// and an mm of the same matrices round differently).
class KronStackedChunks : public ::testing::TestWithParam<std::optional<int64_t>> {};

TEST_P(KronStackedChunks, EqualsSeparateSlices) {
  torch::manual_seed(0);
  const auto stacked_init = torch::randn({3, 5, 4}, torch::kFloat64);
  const auto other_init = torch::randn({3, 6, 2}, torch::kFloat64);
  const auto base = optim::KronOptions(0.02).weight_decay(0.1).use_magma(true).seed(5);
  std::vector<torch::Tensor> stacked{stacked_init.clone(), other_init.clone()};
  std::vector<torch::Tensor> separate;
  for (const auto& init : {stacked_init, other_init}) {
    for (int64_t i = 0; i < init.size(0); ++i) {
      separate.push_back(init[i].clone());
    }
  }
  optim::Kron stacked_opt(stacked, optim::KronOptions(base).stacked(true).stacked_chunk_size(GetParam()));
  optim::Kron separate_opt(separate, base);
  const auto grads = make_grads(stacked, 20, 4);
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
  double err = 0.0;
  auto track = [&](const torch::Tensor& a, const torch::Tensor& b) {
    err = std::max(err, (a - b).abs().max().item<double>());
  };
  for (const auto& p : stacked) {
    const auto& s = static_cast<const optim::KronParamState&>(*stacked_opt.state().at(p.unsafeGetTensorImpl()));
    EXPECT_EQ(s.step().item<double>(), 20.0);
    EXPECT_EQ(s.Q().size(0), p.size(0));
    EXPECT_EQ(s.magma_score().sizes(), torch::IntArrayRef({p.size(0)}));
    for (int64_t i = 0; i < p.size(0); ++i, ++k) {
      const auto& r =
          static_cast<const optim::KronParamState&>(*separate_opt.state().at(separate[k].unsafeGetTensorImpl()));
      track(p[i], separate[k]);
      track(s.Q()[i], r.Q());
      track(s.L()[i], r.L());
      track(s.mu()[i], r.mu());
      track(s.magma_score()[i], r.magma_score());
    }
  }
  EXPECT_EQ(k, separate.size());
  EXPECT_LE(err, 1e-12);
  // The slices' factors moved apart from their shared initial value.
  const auto& first =
      static_cast<const optim::KronParamState&>(*stacked_opt.state().at(stacked[0].unsafeGetTensorImpl()));
  EXPECT_GT((first.Q()[0] - first.Q()[1]).abs().max().item<double>(), 1e-3);
  std::cout << "stacked (chunk " << GetParam().value_or(0) << ") vs separate max |diff| = " << err << std::endl;
  EXPECT_TRUE(torch::equal(stacked_opt.rng_state(), separate_opt.rng_state()));
}

INSTANTIATE_TEST_SUITE_P(Kron, KronStackedChunks,
                         ::testing::Values(std::optional<int64_t>(), std::optional<int64_t>(1),
                                           std::optional<int64_t>(2)));

TEST(Kron, StackedChunkSizeIsValidated) {
  std::vector<torch::Tensor> params{torch::randn({3, 4, 4})};
  expect_throws_mentioning([&] { optim::Kron(params, optim::KronOptions(0.01).stacked(true).stacked_chunk_size(0)); },
                           "stacked_chunk_size");
}

TEST(Kron, StackedRejectsParamsWithoutLayerAxis) {
  for (const auto& shape : {std::vector<int64_t>{4}, std::vector<int64_t>{}}) {
    std::vector<torch::Tensor> params{torch::randn(shape)};
    optim::Kron opt(params, optim::KronOptions(0.01).stacked(true));
    params[0].mutable_grad() = torch::randn(shape);
    expect_throws_mentioning([&] { opt.step(); }, "stacked");
  }
}

TEST(Kron, StackedCheckpointRoundTrip) {
  std::vector<torch::Tensor> params{torch::randn({3, 6, 5}), torch::randn({2, 7})};
  const auto options = optim::KronOptions(0.01)
                           .weight_decay(0.1)
                           .preconditioner_update_probability(0.7)
                           .mu_dtype(torch::kBFloat16)
                           .use_magma(true)
                           .stacked(true)
                           .stacked_chunk_size(2)
                           .seed(3);
  check_checkpoint_round_trip<optim::Kron, optim::KronOptions, optim::KronParamState>(
      options, optim::KronOptions(0.5).seed(8), params, 4, 4);
}

TEST(Kron, LRSchedulerDrivesLr) {
  std::vector<torch::Tensor> params{torch::randn({3, 3})};
  optim::Kron opt(params, optim::KronOptions(0.1));
  torch::optim::StepLR scheduler(opt, 1, 0.5);
  run(opt, params, make_grads(params, 1));
  scheduler.step();  // LibTorch's StepLR counts its first call as epoch 0
  scheduler.step();
  EXPECT_DOUBLE_EQ(opt.param_groups()[0].options().get_lr(), 0.05);
}

TEST(Kron, BadOptionsNameTheArgument) {
  const std::vector<torch::Tensor> params{torch::randn({3, 3})};
  using optim::Kron;
  using optim::KronOptions;
  expect_throws_mentioning([&] { Kron(params, KronOptions(-1.0)); }, "lr");
  expect_throws_mentioning([&] { Kron(params, KronOptions().b1(1.0)); }, "b1");
  expect_throws_mentioning([&] { Kron(params, KronOptions().preconditioner_mode("QEQ")); }, "preconditioner_mode");
  expect_throws_mentioning([&] { Kron(params, KronOptions().memory_save_mode("x")); }, "memory_save_mode");
  expect_throws_mentioning([&] { Kron(params, KronOptions().grad_clip_mode("x")); }, "grad_clip_mode");
  expect_throws_mentioning([&] { Kron(params, KronOptions().preconditioner_update_probability(2.0)); },
                           "preconditioner_update_probability");
  expect_throws_mentioning([&] { Kron(params, KronOptions().preconditioner_lr(0.0)); }, "preconditioner_lr");
  expect_throws_mentioning([&] { Kron(params, KronOptions().raw_global_grad_clip(-1.0)); }, "raw_global_grad_clip");
  expect_throws_mentioning([&] { Kron(params, KronOptions().whiten_grad(false).b1(0.0)); }, "whiten_grad");
  expect_throws_mentioning([&] { Kron(params, KronOptions().newton_schulz_iters(0)); }, "newton_schulz_iters");
  expect_throws_mentioning([&] { Kron(params, KronOptions().grad_clip_max_amps(std::make_tuple(0.0, 1.0))); },
                           "grad_clip_max_amps");
}

// The batched PSGD primitives (psgd.h, batched = true) equal the unbatched
// ones slice by slice: contractions, Grams, solves, every geometry's factor
// update with the same probes, and the balancing (whose 1% gate the stacked
// optimizer tests rarely open).
TEST(Kron, BatchedPrimitivesEqualPerSlice) {
  namespace psgd = common::psgd;
  torch::manual_seed(3);
  const int64_t B = 3;
  const std::vector<int64_t> shape{5, 4};
  const std::vector<bool> dense{true, false};
  auto spd = [](int64_t d) {
    const auto a = torch::randn({d, d}, torch::kFloat64);
    return a.mm(a.t()) / d + torch::eye(d, torch::kFloat64);
  };
  std::vector<torch::Tensor> left, right;
  for (int64_t b = 0; b < B; ++b) {
    left.push_back(torch::triu(spd(5)));
    right.push_back(torch::rand({4}, torch::kFloat64) + 0.5);
  }
  const std::vector<torch::Tensor> batch{torch::stack(left), torch::stack(right)};
  const auto x = torch::randn({B, 5, 4}, torch::kFloat64);
  double err = 0.0;
  auto track = [&](const torch::Tensor& a, const torch::Tensor& b) {
    err = std::max(err, (a - b).abs().max().item<double>());
  };
  const auto px = psgd::apply_p(x, batch, true);
  const auto qx = psgd::apply_q(x, batch, true);
  const auto sx = psgd::solve_q_right(x, batch, true);
  for (int64_t b = 0; b < B; ++b) {
    const std::vector<torch::Tensor> one{left[b], right[b]};
    track(px[b], psgd::apply_p(x[b], one));
    track(qx[b], psgd::apply_q(x[b], one));
    track(sx[b], psgd::solve_q_right(x[b], one));
    for (int64_t axis = 0; axis < 2; ++axis) {
      track(psgd::factor_gram(x, axis, dense[axis], true)[b], psgd::factor_gram(x[b], axis, dense[axis]));
    }
  }
  for (const auto* mode : {"EQ", "Q0.5EQ1.5", "QUAD", "NS", "EXP", "TAYLOR2", "HYPER"}) {
    psgd::FactorUpdateOptions options;
    options.geometry = psgd::parse_geometry(mode, "mode");
    const int64_t draws = psgd::probe_draws(options.geometry, true);
    EXPECT_EQ(psgd::probe_draws(options.geometry, false), 0);
    const auto probes = torch::randn({draws, B, psgd::kNormProbeRows, 5}, torch::kFloat64);
    const auto t1 = psgd::factor_gram(x, 0, true, true);
    const bool eq = options.geometry == psgd::Geometry::EQ;
    const auto t2 = eq ? psgd::factor_gram(sx, 0, true, true) : torch::scalar_tensor(4.0, torch::kFloat64);
    auto q = batch[0].clone();
    auto lip = torch::full({B}, 0.5, torch::kFloat64);
    int64_t next = 0;
    // update_factor_ uses its t1 as scratch: each call gets a copy.
    psgd::update_factor_(q, t1.clone(), t2, lip, options, [&](int64_t) { return probes[next++]; }, true);
    EXPECT_EQ(next, draws) << mode;
    for (int64_t b = 0; b < B; ++b) {
      auto qb = left[b].clone();
      auto lb = torch::scalar_tensor(0.5, torch::kFloat64);
      int64_t k = 0;
      psgd::update_factor_(
          qb, t1[b].clone(), eq ? t2[b] : t2, lb, options, [&](int64_t) { return probes[k++][b]; }, false);
      track(q[b], qb);
      track(lip[b], lb);
    }
  }
  auto balanced = batch;
  psgd::balance_factors_(balanced, true);
  for (int64_t b = 0; b < B; ++b) {
    std::vector<torch::Tensor> one{left[b], right[b]};
    psgd::balance_factors_(one);
    track(balanced[0][b], one[0]);
    track(balanced[1][b], one[1]);
  }
  std::cout << "batched vs per-slice primitives max |diff| = " << err << std::endl;
  EXPECT_LE(err, 1e-13);
  EXPECT_GT((balanced[0] - batch[0]).abs().max().item<double>(), 1e-6);  // the balance did rescale
}

}  // namespace
