// LAMB and MARS split at their per-tensor norms (lamb_norm_sqs / mars_norm_sqs,
// then *_step_ with norm_sqs), as the FSDP2 front ends run them: on one
// process the split is the fused step bit for bit, and on row shards whose
// norm rows are summed it is the whole-tensor step.
#include <gtest/gtest.h>
#include <torch/torch.h>
#include <torchopt_ext/torchopt_ext.h>

#include <vector>

#include "test_utils.h"

namespace {

namespace functional = torchopt_ext::functional;
using namespace torchopt_ext::testing;

using Tensors = std::vector<torch::Tensor>;

Tensors zeros_like_all(const Tensors& ts) {
  Tensors out;
  for (const auto& t : ts) {
    out.push_back(torch::zeros_like(t));
  }
  return out;
}

Tensors counters(size_t n) {
  Tensors out;
  for (size_t i = 0; i < n; ++i) {
    out.push_back(torch::zeros({}, torch::kFloat32));
  }
  return out;
}

torch::Tensor lr_tensor(double lr) { return torch::scalar_tensor(lr, torch::kFloat64); }

// Two-row-block shards of every tensor (a 0-d or 1-row tensor keeps one
// shard and an empty one), as FSDP2's Shard(0) cuts them.
std::vector<Tensors> row_shards(const Tensors& whole) {
  std::vector<Tensors> shards(2);
  for (const auto& t : whole) {
    const auto flat = t.dim() == 0 ? t.reshape({1}) : t;
    const int64_t rows = flat.size(0);
    const int64_t cut = (rows + 1) / 2;
    shards[0].push_back(flat.narrow(0, 0, cut).clone());
    shards[1].push_back(flat.narrow(0, cut, rows - cut).clone());
  }
  return shards;
}

Tensors join(const std::vector<Tensors>& shards, const Tensors& like) {
  Tensors out;
  for (size_t i = 0; i < like.size(); ++i) {
    out.push_back(torch::cat({shards[0][i], shards[1][i]}).reshape(like[i].sizes()));
  }
  return out;
}

struct LambCase {
  double weight_decay;
  bool decoupled;
  bool trust_clip;
};

void lamb_step(Tensors& p, const Tensors& g, Tensors& m, Tensors& v, Tensors& s, const LambCase& c,
               const std::optional<torch::Tensor>& norm_sqs) {
  functional::lamb_step_(p, g, m, v, s, lr_tensor(1e-2), 0.9, 0.999, 1e-6, c.weight_decay, true, true, c.trust_clip,
                         false, c.decoupled, false, torch::scalar_tensor(1.5, torch::kFloat64), false, 0, std::nullopt,
                         std::nullopt, norm_sqs);
}

torch::Tensor lamb_norms(Tensors& p, const Tensors& g, Tensors& m, Tensors& v, Tensors& s, const LambCase& c) {
  return functional::lamb_norm_sqs(p, g, m, v, s, lr_tensor(1e-2), 0.9, 0.999, 1e-6, c.weight_decay, true, true,
                                   c.trust_clip, false, c.decoupled, false, torch::scalar_tensor(1.5, torch::kFloat64),
                                   std::nullopt, std::nullopt);
}

TEST(TwoStageNorms, LambSplitIsTheFusedStepBitwise) {
  for (const auto dtype : {torch::kFloat32, torch::kFloat64, torch::kBFloat16}) {
    for (const LambCase c : {LambCase{0.1, false, false}, LambCase{0.1, true, true}}) {
      auto fused = make_params(dtype);
      auto split = clone_all(fused);
      const auto grads = make_grads(fused, 6);
      auto m1 = zeros_like_all(fused), v1 = zeros_like_all(fused), m2 = zeros_like_all(fused),
           v2 = zeros_like_all(fused);
      auto s1 = counters(3), s2 = counters(3);
      for (const auto& g : grads) {
        lamb_step(fused, g, m1, v1, s1, c, std::nullopt);
        const auto norm_sqs = lamb_norms(split, g, m2, v2, s2, c);
        ASSERT_EQ(s2[0].item<float>(), s1[0].item<float>() - 1.0f) << "the norm stage advanced the step";
        ASSERT_EQ(norm_sqs.sizes(), torch::IntArrayRef({3, 2}));
        lamb_step(split, g, m2, v2, s2, c, norm_sqs);
      }
      expect_bitwise_equal(fused, split);
      expect_bitwise_equal(m1, m2);
      expect_bitwise_equal(v1, v2);
    }
  }
}

TEST(TwoStageNorms, LambOnRowShardsWithSummedNormsIsTheWholeStep) {
  const LambCase c{0.1, false, false};
  auto whole = make_params(torch::kFloat64);
  const auto grads = make_grads(whole, 6);
  auto shards = row_shards(whole);
  auto m = zeros_like_all(whole), v = zeros_like_all(whole), s = counters(3);
  std::vector<Tensors> ms = {zeros_like_all(shards[0]), zeros_like_all(shards[1])};
  std::vector<Tensors> vs = {zeros_like_all(shards[0]), zeros_like_all(shards[1])};
  std::vector<Tensors> ss = {counters(3), counters(3)};
  for (const auto& g : grads) {
    lamb_step(whole, g, m, v, s, c, std::nullopt);
    const auto gs = row_shards(g);
    // The "all-reduce": the two shards' rows summed.
    const auto total =
        lamb_norms(shards[0], gs[0], ms[0], vs[0], ss[0], c) + lamb_norms(shards[1], gs[1], ms[1], vs[1], ss[1], c);
    for (int r = 0; r < 2; ++r) {
      lamb_step(shards[r], gs[r], ms[r], vs[r], ss[r], c, total);
    }
  }
  const auto joined = join(shards, whole);
  for (size_t i = 0; i < whole.size(); ++i) {
    EXPECT_TRUE(torch::allclose(joined[i], whole[i], 1e-12, 1e-12)) << "param " << i;
  }
  // Local norms alone (no reduction) give another result, so the check above can fail.
  auto local = row_shards(make_params(torch::kFloat64))[0];
  auto lm = zeros_like_all(local), lv = zeros_like_all(local), ls = counters(3);
  lamb_step(local, row_shards(grads[0])[0], lm, lv, ls, c, std::nullopt);
  auto full = make_params(torch::kFloat64);
  auto fm = zeros_like_all(full), fv = zeros_like_all(full), fs = counters(3);
  lamb_step(full, grads[0], fm, fv, fs, c, std::nullopt);
  EXPECT_FALSE(torch::allclose(local[0], row_shards(full)[0][0], 1e-9, 1e-9));
}

void mars_step(Tensors& p, const Tensors& g, Tensors& m, Tensors& v, Tensors& last, Tensors& s, bool lion,
               const std::optional<torch::Tensor>& norm_sqs) {
  Tensors none;
  Tensors& second = lion ? none : v;
  functional::mars_step_(p, g, m, second, {}, last, s, lr_tensor(1e-2), 0.95, 0.99, 1e-8, 0.1, 0.025,
                         lion ? "mars-lion" : "mars-adamw", false, false, false, 0, std::nullopt, std::nullopt,
                         norm_sqs);
}

torch::Tensor mars_norms(Tensors& p, const Tensors& g, Tensors& m, Tensors& v, Tensors& last, Tensors& s, bool lion) {
  Tensors none;
  Tensors& second = lion ? none : v;
  return functional::mars_norm_sqs(p, g, m, second, {}, last, s, lr_tensor(1e-2), 0.95, 0.99, 1e-8, 0.1, 0.025,
                                   lion ? "mars-lion" : "mars-adamw", false, false, std::nullopt, std::nullopt);
}

// Grads of norm ~ 30 per tensor: the unit-norm clip of c_t binds.
std::vector<Tensors> large_grads(const Tensors& params, int steps) {
  auto grads = make_grads(params, steps);
  for (auto& step : grads) {
    for (auto& g : step) {
      g.mul_(3.0);
    }
  }
  return grads;
}

TEST(TwoStageNorms, MarsSplitIsTheFusedStepBitwise) {
  for (const auto dtype : {torch::kFloat32, torch::kFloat64}) {
    for (const bool lion : {false, true}) {
      auto fused = make_params(dtype);
      auto split = clone_all(fused);
      const auto grads = large_grads(fused, 6);
      auto m1 = zeros_like_all(fused), v1 = zeros_like_all(fused), l1 = zeros_like_all(fused);
      auto m2 = zeros_like_all(fused), v2 = zeros_like_all(fused), l2 = zeros_like_all(fused);
      auto s1 = counters(3), s2 = counters(3);
      for (const auto& g : grads) {
        mars_step(fused, g, m1, v1, l1, s1, lion, std::nullopt);
        const auto norm_sqs = mars_norms(split, g, m2, v2, l2, s2, lion);
        ASSERT_EQ(norm_sqs.sizes(), torch::IntArrayRef({3, 1}));
        ASSERT_GT(norm_sqs[0].item<double>(), 1.0) << "the clip should bind";
        mars_step(split, g, m2, v2, l2, s2, lion, norm_sqs);
      }
      expect_bitwise_equal(fused, split);
      expect_bitwise_equal(m1, m2);
      expect_bitwise_equal(l1, l2);
    }
  }
}

TEST(TwoStageNorms, MarsOnRowShardsWithSummedNormsIsTheWholeStep) {
  auto whole = make_params(torch::kFloat64);
  const auto grads = large_grads(whole, 6);
  auto shards = row_shards(whole);
  auto m = zeros_like_all(whole), v = zeros_like_all(whole), last = zeros_like_all(whole), s = counters(3);
  std::vector<Tensors> ms = {zeros_like_all(shards[0]), zeros_like_all(shards[1])};
  std::vector<Tensors> vs = {zeros_like_all(shards[0]), zeros_like_all(shards[1])};
  std::vector<Tensors> ls = {zeros_like_all(shards[0]), zeros_like_all(shards[1])};
  std::vector<Tensors> ss = {counters(3), counters(3)};
  for (const auto& g : grads) {
    mars_step(whole, g, m, v, last, s, false, std::nullopt);
    const auto gs = row_shards(g);
    const auto total = mars_norms(shards[0], gs[0], ms[0], vs[0], ls[0], ss[0], false) +
                       mars_norms(shards[1], gs[1], ms[1], vs[1], ls[1], ss[1], false);
    for (int r = 0; r < 2; ++r) {
      mars_step(shards[r], gs[r], ms[r], vs[r], ls[r], ss[r], false, total);
    }
  }
  const auto joined = join(shards, whole);
  for (size_t i = 0; i < whole.size(); ++i) {
    EXPECT_TRUE(torch::allclose(joined[i], whole[i], 1e-12, 1e-12)) << "param " << i;
  }
}

TEST(TwoStageNorms, BadNormSqsNameTheArgument) {
  auto p = make_params(torch::kFloat32);
  const auto g = make_grads(p, 1)[0];
  auto m = zeros_like_all(p), v = zeros_like_all(p), last = zeros_like_all(p), s = counters(3);
  const LambCase c{0.1, false, false};
  expect_error_naming([&] { lamb_step(p, g, m, v, s, c, torch::zeros({3, 1}, torch::kFloat64)); }, "norm_sqs");
  expect_error_naming([&] { lamb_step(p, g, m, v, s, c, torch::zeros({3, 2}, torch::kFloat32)); }, "norm_sqs");
  expect_error_naming([&] { mars_step(p, g, m, v, last, s, false, torch::zeros({2, 1}, torch::kFloat64)); },
                      "norm_sqs");
  // A found_inf step: zeros, nothing advanced.
  const auto skipped =
      functional::lamb_norm_sqs(p, g, m, v, s, lr_tensor(1e-2), 0.9, 0.999, 1e-6, 0.1, true, true, false, false, false,
                                false, std::nullopt, std::nullopt, torch::ones({}, torch::kFloat32));
  EXPECT_TRUE(torch::equal(skipped, torch::zeros({3, 2}, torch::kFloat64)));
  EXPECT_EQ(s[0].item<float>(), 0.0f);
}

}  // namespace
