// Kron's ownership-path arguments (functional/kron.h): a group split over two
// "owners", each calling kron_step_ with the params it holds, param_indices
// and group_shapes, must give the single call over the whole group bit for
// bit (generator replay for the other owner's params, keyed Magma draws and
// rounding), with the generators of both owners equal afterwards.
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <vector>

#include "torchopt_ext/common/psgd.h"
#include "torchopt_ext/functional/kron.h"

namespace {

using namespace torchopt_ext;

struct KronState {
  std::vector<at::Tensor> params, mus, qs, ls, scores, steps;
};

KronState make_state(const std::vector<at::Tensor>& base) {
  KronState s;
  for (const auto& p : base) {
    const auto dense = functional::kron_factor_layout(p.sizes(), 8192, 1.0, 2, std::nullopt);
    int64_t numel = p.dim() == 0 ? 1 : 0;
    for (int64_t f = 0; f < p.dim(); ++f) {
      numel += dense[f] ? p.size(f) * p.size(f) : p.size(f);
    }
    s.params.push_back(p.clone());
    s.mus.push_back(torch::zeros_like(p));
    s.qs.push_back(torch::zeros({numel}));
    s.ls.push_back(torch::zeros({static_cast<int64_t>(dense.size())}));
    s.scores.push_back(torch::full({}, 0.5));
    s.steps.push_back(torch::zeros({}));
  }
  return s;
}

void call(KronState& s, const std::vector<at::Tensor>& grads, const std::vector<int64_t>& idx, const at::Tensor& rng,
          const std::vector<int64_t>& group_shapes, const at::Tensor& prob) {
  auto pick = [&](const std::vector<at::Tensor>& v) {
    std::vector<at::Tensor> out;
    for (auto i : idx) {
      out.push_back(v[i]);
    }
    return out;
  };
  const std::vector<double> amps{2.0, 10.0};
  const std::vector<int64_t> none;
  functional::kron_step_(pick(s.params), pick(grads), pick(s.mus), pick(s.qs), pick(s.ls), pick(s.scores),
                         pick(s.steps), torch::scalar_tensor(0.01, torch::kDouble), rng, 0.9, 0.1, prob, 8192, 1.0, 2,
                         std::nullopt, true, true, 0.1, 1.0, "Q0.5EQ1.5", 0.9, true, 1e-9, amps, "per_tensor_rms",
                         std::nullopt, true, 5, false, true, 0.6, 2.0, false, 5, /*stacked=*/false, std::nullopt,
                         std::nullopt, /*batch_equal_shapes=*/std::nullopt, std::nullopt, std::nullopt,
                         group_shapes.empty() ? at::IntArrayRef(none) : at::IntArrayRef(idx), group_shapes);
}

TEST(OwnerDraws, KronSplitOverOwnersEqualsGroupCall) {
  const std::vector<std::vector<int64_t>> shapes{{6, 4}, {3, 7}, {5, 2, 3}, {4}};
  torch::manual_seed(0);
  std::vector<at::Tensor> base;
  std::vector<int64_t> group_shapes;
  for (const auto& s : shapes) {
    base.push_back(torch::randn(s));
    group_shapes.push_back(static_cast<int64_t>(s.size()));
    group_shapes.insert(group_shapes.end(), s.begin(), s.end());
    group_shapes.push_back(0);
  }
  KronState single = make_state(base), split = make_state(base);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(3);
  const at::Tensor s_rng = gen.get_state();
  const at::Tensor o_rng = s_rng.clone();
  const at::Tensor prob = torch::scalar_tensor(0.5, torch::kDouble);
  const std::vector<std::vector<int64_t>> owners{{0, 2}, {1, 3}};
  for (int step = 0; step < 6; ++step) {
    std::vector<at::Tensor> grads;
    for (const auto& s : shapes) {
      grads.push_back(torch::randn(s));
    }
    call(single, grads, {0, 1, 2, 3}, s_rng, {}, prob);
    std::vector<at::Tensor> after;
    for (const auto& idx : owners) {
      after.push_back(o_rng.clone());
      call(split, grads, idx, after.back(), group_shapes, prob);
    }
    ASSERT_TRUE(torch::equal(after[0], after[1])) << "owners' generators diverged at step " << step;
    o_rng.copy_(after[0]);
  }
  EXPECT_TRUE(torch::equal(o_rng, s_rng));
  for (size_t i = 0; i < shapes.size(); ++i) {
    EXPECT_TRUE(torch::equal(split.params[i], single.params[i])) << "param " << i;
    EXPECT_TRUE(torch::equal(split.qs[i], single.qs[i])) << "factors " << i;
    EXPECT_TRUE(torch::equal(split.scores[i], single.scores[i])) << "Magma score " << i;
  }
}

TEST(OwnerDraws, KronRejectsMismatchedGroupShapes) {
  KronState s = make_state({torch::randn({4, 3})});
  const at::Tensor rng = at::make_generator<at::CPUGeneratorImpl>(1).get_state();
  EXPECT_THROW(call(s, {torch::randn({4, 3})}, {0}, rng, {2, 3, 4, 0}, torch::scalar_tensor(1.0, torch::kDouble)),
               c10::ValueError);
}

}  // namespace
