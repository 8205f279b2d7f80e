// Helpers shared by the GoogleTest files.
#pragma once

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <functional>
#include <sstream>
#include <string>
#include <vector>

namespace torchopt_ext::testing {

// 0-d, odd 1-D and odd 2-D shapes: every kernel corner (scalar tail, blocks).
inline std::vector<torch::Tensor> make_params(torch::Dtype dtype, int64_t seed = 0) {
  torch::manual_seed(seed);
  return {torch::randn({17, 33}, dtype), torch::randn({1001}, dtype), torch::randn({}, dtype)};
}

inline std::vector<std::vector<torch::Tensor>> make_grads(const std::vector<torch::Tensor>& params, int steps,
                                                          int64_t seed = 1) {
  torch::manual_seed(seed);
  std::vector<std::vector<torch::Tensor>> grads(steps);
  for (auto& step : grads) {
    for (const auto& p : params) {
      step.push_back(torch::randn_like(p));
    }
  }
  return grads;
}

inline std::vector<torch::Tensor> clone_all(const std::vector<torch::Tensor>& ts) {
  std::vector<torch::Tensor> out;
  for (const auto& t : ts) {
    out.push_back(t.clone());
  }
  return out;
}

// Feeds the same gradients (fresh clones) to the optimizer, one step each.
inline void run(torch::optim::Optimizer& opt, std::vector<torch::Tensor>& params,
                const std::vector<std::vector<torch::Tensor>>& grads) {
  for (const auto& step : grads) {
    for (size_t i = 0; i < params.size(); ++i) {
      params[i].mutable_grad() = step[i].clone();
    }
    opt.step();
  }
}

inline void expect_bitwise_equal(const std::vector<torch::Tensor>& a, const std::vector<torch::Tensor>& b) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_TRUE(torch::equal(a[i], b[i])) << "tensor " << i << " differs";
  }
}

// fp64: agreement to 1e-12; fp32: a few ulps after 20 steps (torch's own
// op-by-op rounding differs from a fused loop in the last bits).
inline void expect_close(const std::vector<torch::Tensor>& a, const std::vector<torch::Tensor>& b) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    const double tol = a[i].scalar_type() == torch::kFloat64 ? 1e-12 : 2e-6;
    const double diff = (a[i] - b[i]).abs().max().item<double>();
    EXPECT_TRUE(torch::allclose(a[i], b[i], tol, tol)) << "tensor " << i << " max |diff| " << diff;
  }
}

inline void expect_error_naming(const std::function<void()>& action, const std::string& text) {
  try {
    action();
    ADD_FAILURE() << "expected an error mentioning '" << text << "'";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find(text), std::string::npos) << e.what();
  }
}

// Trains, saves, trains on; a fresh optimizer loaded from the checkpoint
// must continue bitwise identically.
template <typename Optimizer, typename Options>
void check_save_load_continues_bitwise(const Options& options) {
  auto params = make_params(torch::kFloat32);
  const auto grads = make_grads(params, 12);
  const std::vector<std::vector<torch::Tensor>> first(grads.begin(), grads.begin() + 6);
  const std::vector<std::vector<torch::Tensor>> second(grads.begin() + 6, grads.end());
  Optimizer opt(params, options);
  run(opt, params, first);
  auto resumed_params = clone_all(params);
  std::stringstream buffer;
  torch::save(opt, buffer);
  run(opt, params, second);
  Optimizer resumed(resumed_params, options);
  torch::load(resumed, buffer);
  run(resumed, resumed_params, second);
  expect_bitwise_equal(params, resumed_params);
}

}  // namespace torchopt_ext::testing
