// Helpers shared by the GoogleTest files.
#pragma once

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <cstdio>
#include <functional>
#include <iostream>
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

// Elementwise |ours - ref| <= atol + rtol * |ref| for every tensor; prints the
// worst absolute and relative differences (label, tensor index, shape) so the
// tolerances can be kept tight. Returns the worst absolute difference.
inline double expect_close_within(const std::vector<torch::Tensor>& ours, const std::vector<torch::Tensor>& ref,
                                  double rtol, double atol, const std::string& label) {
  EXPECT_EQ(ours.size(), ref.size());
  double worst = 0.0;
  for (size_t i = 0; i < ours.size() && i < ref.size(); ++i) {
    const auto a = ours[i].to(torch::kFloat64);
    const auto b = ref[i].to(torch::kFloat64);
    const auto diff = (a - b).abs();
    const double max_abs = diff.max().item<double>();
    const double max_rel = (diff / b.abs().clamp_min(1e-30)).max().item<double>();
    const double excess = (diff - (atol + rtol * b.abs())).max().item<double>();
    worst = std::max(worst, max_abs);
    std::cout << "[ max diff ] " << label << " tensor " << i << " shape " << ours[i].sizes() << " "
              << ours[i].scalar_type() << ": abs " << max_abs << ", rel " << max_rel << "\n";
    EXPECT_LE(excess, 0.0) << label << " tensor " << i << " shape " << ours[i].sizes() << ": max |diff| " << max_abs
                           << ", max rel diff " << max_rel << " (rtol " << rtol << ", atol " << atol << ")";
  }
  return worst;
}

// Expects `action` to throw a c10::Error whose message contains `text` (the
// name of the offending argument, say). With value_error, the error must be a
// c10::ValueError (TORCH_CHECK_VALUE), the type Python sees as ValueError.
inline void expect_throws_mentioning(const std::function<void()>& action, const std::string& text,
                                     bool value_error = true) {
  try {
    action();
  } catch (const c10::Error& e) {
    const std::string message = e.what_without_backtrace();
    EXPECT_NE(message.find(text), std::string::npos) << "error does not mention '" << text << "': " << message;
    if (value_error) {
      EXPECT_NE(dynamic_cast<const c10::ValueError*>(&e), nullptr) << "not a c10::ValueError: " << message;
    }
    return;
  }
  ADD_FAILURE() << "expected a c10::Error mentioning '" << text << "'";
}

// Saves `opt` after the first steps, loads the checkpoint into a fresh
// optimizer (built with `fresh_defaults`, which should differ from the trained
// options) over cloned params, and checks the options and states came back
// and that both continue bitwise identically. An empty `path` uses a
// std::stringstream, otherwise that file.
template <typename Optimizer, typename Options, typename ParamState>
void check_checkpoint_round_trip(const Options& options, const Options& fresh_defaults,
                                 std::vector<torch::Tensor> params, int before, int after,
                                 const std::string& path = "") {
  const auto grads = make_grads(params, before + after, 3);
  const std::vector<std::vector<torch::Tensor>> first(grads.begin(), grads.begin() + before);
  const std::vector<std::vector<torch::Tensor>> second(grads.begin() + before, grads.end());
  Optimizer opt(params, options);
  run(opt, params, first);
  auto resumed_params = clone_all(params);
  Optimizer resumed(resumed_params, fresh_defaults);
  if (path.empty()) {
    std::stringstream buffer;
    torch::save(opt, buffer);
    torch::load(resumed, buffer);
  } else {
    torch::save(opt, path);
    torch::load(resumed, path);
    std::remove(path.c_str());
  }
  ASSERT_EQ(resumed.param_groups().size(), 1u);
  EXPECT_TRUE(static_cast<const Options&>(resumed.param_groups()[0].options()) == options)
      << "the checkpoint's options did not replace the fresh optimizer's";
  ASSERT_EQ(resumed.state().size(), params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const auto& saved = static_cast<const ParamState&>(*opt.state().at(params[i].unsafeGetTensorImpl()));
    const auto& loaded = static_cast<const ParamState&>(*resumed.state().at(resumed_params[i].unsafeGetTensorImpl()));
    EXPECT_TRUE(saved == loaded) << "state of param " << i << " differs after load";
  }
  run(opt, params, second);
  run(resumed, resumed_params, second);
  expect_bitwise_equal(params, resumed_params);
  for (size_t i = 0; i < params.size(); ++i) {
    const auto& a = static_cast<const ParamState&>(*opt.state().at(params[i].unsafeGetTensorImpl()));
    const auto& b = static_cast<const ParamState&>(*resumed.state().at(resumed_params[i].unsafeGetTensorImpl()));
    EXPECT_TRUE(a == b) << "state of param " << i << " differs after continuing";
  }
}

// A serialized checkpoint of `opt` as bytes (load it any number of times).
inline std::string checkpoint_bytes(const torch::optim::Optimizer& opt) {
  std::ostringstream out;
  torch::save(opt, out);
  return out.str();
}

template <typename Optimizer>
void load_bytes(Optimizer& opt, const std::string& bytes) {
  std::istringstream in(bytes);
  torch::load(opt, in);
}

// A file path under the test temp dir, unique to this test.
inline std::string temp_checkpoint_path(const std::string& stem) {
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  std::string name = stem + "_" + (info ? info->name() : "test") + ".pt";
  for (auto& ch : name) {
    if (ch == '/') {
      ch = '_';
    }
  }
  return ::testing::TempDir() + name;
}

}  // namespace torchopt_ext::testing
