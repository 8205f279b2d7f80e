// Helpers of the emulated-CUDA tests: param groups with the layouts the
// launcher treats differently (empty, tails, several chunks, unaligned
// storage, mixed dtypes), and the check that the emulated kernels agree with
// the CPU kernels under both thread orders.
#pragma once

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <functional>
#include <string>
#include <vector>

#include "common/tensor_lists.h"
#include "cuda_emulation.h"

namespace torchopt_ext::emulation_testing {

using common::DeviceArgs;
namespace emu = cuda_emulation;

struct TensorSpec {
  int64_t numel;
  at::ScalarType param_dtype = at::kFloat;
  at::ScalarType state_dtype = at::kFloat;
  bool unaligned = false;  // storage offset of one element: the launcher's element-load path
};

// One param group: params, grads and num_state state lists.
// Every test tensor sits in a larger storage whose other elements hold
// kGuardValue: a kernel writing past either end of a tensor changes them.
constexpr double kGuardValue = 7.0;  // exact in every dtype; randn never gives it
constexpr int64_t kGuardBytes = 64;  // keeps an aligned tensor 16-byte aligned

inline at::Tensor whole_storage(const at::Tensor& t) {
  const auto elements = static_cast<int64_t>(t.storage().nbytes()) / static_cast<int64_t>(t.element_size());
  return t.as_strided({elements}, {1}, 0);
}

// A copy with the same storage layout (offset, alignment, guards).
inline at::Tensor clone_with_storage(const at::Tensor& t) {
  return whole_storage(t).clone().as_strided(t.sizes(), t.strides(), t.storage_offset());
}

// One param group: params, grads and num_state state lists.
struct Group {
  std::vector<at::Tensor> params;
  std::vector<at::Tensor> grads;
  std::vector<std::vector<at::Tensor>> state;

  Group clone() const {
    Group out;
    auto copy = [](const std::vector<at::Tensor>& ts) {
      std::vector<at::Tensor> o;
      for (const auto& t : ts) {
        o.push_back(clone_with_storage(t));
      }
      return o;
    };
    out.params = copy(params);
    out.grads = copy(grads);
    for (const auto& list : state) {
      out.state.push_back(copy(list));
    }
    return out;
  }
};

inline at::Tensor make_tensor(int64_t numel, at::ScalarType dtype, bool unaligned, bool positive) {
  const int64_t guard = kGuardBytes / static_cast<int64_t>(c10::elementSize(dtype));
  const int64_t offset = guard + (unaligned ? 1 : 0);
  at::Tensor base = at::full({offset + numel + guard}, kGuardValue, at::TensorOptions().dtype(dtype));
  at::Tensor t = base.narrow(0, offset, numel);
  at::Tensor values = at::randn({numel}, at::kDouble);
  t.copy_(positive ? values.abs() + 0.1 : values);
  return t;
}

inline void expect_guards_intact(const std::vector<at::Tensor>& ts, const std::string& what) {
  for (size_t i = 0; i < ts.size(); ++i) {
    const at::Tensor full = whole_storage(ts[i]);
    const int64_t begin = ts[i].storage_offset();
    const int64_t end = begin + ts[i].numel();
    const at::Tensor outside = at::cat({full.narrow(0, 0, begin), full.narrow(0, end, full.numel() - end)});
    EXPECT_TRUE(outside.eq(kGuardValue).all().item<bool>()) << what << "[" << i << "]: written outside the tensor";
  }
}

// `positive_state[k]`: state list k holds non-negative values (second moments).
inline Group make_group(const std::vector<TensorSpec>& specs, const std::vector<bool>& positive_state,
                        uint64_t seed = 0) {
  at::manual_seed(seed);
  Group g;
  g.state.resize(positive_state.size());
  for (const auto& s : specs) {
    g.params.push_back(make_tensor(s.numel, s.param_dtype, s.unaligned, false));
    g.grads.push_back(make_tensor(s.numel, s.param_dtype, s.unaligned, false));
    for (size_t k = 0; k < positive_state.size(); ++k) {
      g.state[k].push_back(make_tensor(s.numel, s.state_dtype, s.unaligned, positive_state[k]));
    }
  }
  return g;
}

// Empty, one element, a partial pack, a block's worth, unaligned, several
// 64K-element chunks (each chunk is one block).
inline std::vector<TensorSpec> layout_specs(at::ScalarType param_dtype, at::ScalarType state_dtype) {
  return {{0, param_dtype, state_dtype},          {1, param_dtype, state_dtype},
          {7, param_dtype, state_dtype},          {33 * 17, param_dtype, state_dtype},
          {1001, param_dtype, state_dtype, true}, {2 * 65536 + 5, param_dtype, state_dtype}};
}

// The dtype pairs the launcher dispatches on: fp32, fp64, and bf16 / fp16
// params with fp32 state.
inline std::vector<std::pair<at::ScalarType, at::ScalarType>> dtype_pairs() {
  return {{at::kFloat, at::kFloat}, {at::kDouble, at::kDouble}, {at::kBFloat16, at::kFloat}, {at::kHalf, at::kFloat}};
}

inline std::string dtype_label(at::ScalarType p, at::ScalarType s) {
  return std::string(c10::toString(p)) + " params, " + c10::toString(s) + " state";
}

// CPU vs emulated CUDA. The CPU kernels are built with GCC's default FMA
// contraction (a * b + c in one rounding, as ATen's kernels that the torch
// parity tests pin); the CUDA kernels with --fmad=false, which the emulation
// mirrors with -ffp-contract=off. So the two round some expressions
// differently and agree to a few units in the last place of each tensor's
// dtype. (With the CPU kernels built without contraction as well, every such
// comparison here was bitwise: docs/design.md, "Host emulation".)
constexpr double kRounding = -1.0;

inline double rounding_tolerance(at::ScalarType dtype) {
  switch (dtype) {
    case at::kDouble:
      return 1e-13;
    case at::kBFloat16:
      return 1.6e-2;  // two bf16 ulps
    case at::kHalf:
      return 2e-3;
    default:
      return 4e-6;
  }
}

// Results that go through a sum the device adds in another order than the
// CPU (LAMB / MARS norms, Magma scores, Adafactor's statistics): ~1e-7
// relative in fp32, which can move a reduced-precision param by one ulp.
inline double reordered_sum_tolerance(at::ScalarType dtype) {
  switch (dtype) {
    case at::kDouble:
      return 1e-11;
    case at::kBFloat16:
      return 1.6e-2;
    case at::kHalf:
      return 2e-3;
    default:
      return 2e-5;
  }
}

inline void expect_lists_equal(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b,
                               const std::string& what, double tolerance) {
  ASSERT_EQ(a.size(), b.size()) << what;
  for (size_t i = 0; i < a.size(); ++i) {
    const double tol = tolerance == kRounding ? rounding_tolerance(a[i].scalar_type()) : tolerance;
    if (tol == 0.0) {
      EXPECT_TRUE(at::equal(a[i], b[i])) << what << "[" << i << "] differs (bitwise), max abs diff "
                                         << (a[i].to(at::kDouble) - b[i].to(at::kDouble)).abs().max().item<double>();
    } else {
      EXPECT_TRUE(at::allclose(a[i].to(at::kDouble), b[i].to(at::kDouble), tol, tol))
          << what << "[" << i << "] differs beyond " << tol << ", max abs diff "
          << (a[i].to(at::kDouble) - b[i].to(at::kDouble)).abs().max().item<double>();
    }
  }
}

inline void expect_groups_equal(const Group& a, const Group& b, const std::string& what, double tol = kRounding) {
  expect_lists_equal(a.params, b.params, what + ": params", tol);
  expect_lists_equal(a.grads, b.grads, what + ": grads", tol);
  for (size_t k = 0; k < a.state.size(); ++k) {
    expect_lists_equal(a.state[k], b.state[k], what + ": state " + std::to_string(k), tol);
  }
  for (const Group* g : {&a, &b}) {
    expect_guards_intact(g->params, what + ": params");
    expect_guards_intact(g->grads, what + ": grads");
    for (const auto& list : g->state) {
      expect_guards_intact(list, what + ": state");
    }
  }
}

// Runs `emulated` on two copies of `start`, threads and blocks in forward and
// in reverse order: a kernel whose result depends on the schedule (a missing
// barrier, a race on shared or global memory) differs between the two.
inline Group run_both_orders(const Group& start, const std::function<void(Group&)>& emulated, const std::string& what) {
  Group forward = start.clone();
  Group reverse = start.clone();
  emu::set_order(emu::Order::kForward);
  emulated(forward);
  emu::set_order(emu::Order::kReverse);
  emulated(reverse);
  emu::set_order(emu::Order::kForward);
  expect_groups_equal(forward, reverse, what + " (forward vs reverse thread order)", 0.0);
  return forward;
}

inline std::vector<double> steps_of(const Group& g, double step) { return std::vector<double>(g.params.size(), step); }

// float32 step counters holding `value`, as the Python classes create them.
inline std::vector<at::Tensor> step_counters(size_t n, double value) {
  std::vector<at::Tensor> out;
  for (size_t i = 0; i < n; ++i) {
    out.push_back(at::full({}, value, at::kFloat));
  }
  return out;
}

}  // namespace torchopt_ext::emulation_testing
