// The CUDA kernels that compute per-tensor scalars on the device before the
// element-wise update (LAMB / MARS norms, Magma scores, NAdam mu-products,
// Schedule-Free weights), run under the host emulation against the CPU kernels.
// Norms are summed in another order on the device, so LAMB and MARS agree to
// the norms' rounding; the rest to the rounding of FMA contraction (kRounding).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <limits>
#include <string>
#include <vector>

#include "emulation_test_utils.h"
#include "kernels/algos/schedulefree.h"
#include "kernels/cuda/elementwise.h"
#include "torchopt_ext/common/magma.h"

namespace torchopt_ext::emulation_testing {
namespace {

namespace cpu = kernels::cpu;
namespace gpu = kernels::cuda;

std::vector<TensorSpec> two_stage_specs(at::ScalarType pd, at::ScalarType sd) {
  // Several chunks per tensor, so the per-chunk partials and their ordered sum matter.
  return {{1, pd, sd}, {7, pd, sd}, {1001, pd, sd, true}, {3 * 65536 + 11, pd, sd}, {0, pd, sd}};
}

TEST(EmulatedCudaPreKernels, LambNormsAndUpdateMatchCpu) {
  for (const auto& [pd, sd] : dtype_pairs()) {
    for (bool decoupled : {false, true}) {
      const cpu::LAMBHyperparams hp{1e-2, 0.9, 0.999, 1e-6, 0.01, 1.0, true, true, false, false, decoupled, false};
      const Group start = make_group(two_stage_specs(pd, sd), {false, true});
      Group host = start.clone();
      Group device = start.clone();
      const auto label = "lamb " + dtype_label(pd, sd) + (decoupled ? " decoupled" : "");
      for (int step = 1; step <= 3; ++step) {
        const auto steps = steps_of(start, step);
        const at::Tensor host_norms = at::zeros({static_cast<int64_t>(start.params.size()), 2}, at::kDouble);
        const at::Tensor device_norms = at::zeros_like(host_norms);
        cpu::lamb_norm_sqs(host.params, host.grads, host.state[0], host.state[1], steps, hp, {}, host_norms);
        gpu::lamb_norm_sqs(device.params, device.grads, device.state[0], device.state[1], steps, hp, {}, device_norms,
                           DeviceArgs{});
        // The CPU sums fp32 squares in double, the device squares in double
        // (docs/design.md, LAMB and MARS): ~1e-7 relative apart.
        const double rtol = pd == at::kDouble ? 1e-13 : 1e-6;
        EXPECT_TRUE(at::allclose(host_norms, device_norms, rtol, 0.0))
            << label << ": squared norms, max relative diff "
            << ((host_norms - device_norms).abs() / host_norms.abs().clamp_min(1e-300)).max().item<double>();
        cpu::lamb_step(host.params, host.grads, host.state[0], host.state[1], steps, hp, {}, at::Tensor());
        device = run_both_orders(
            device,
            [&](Group& g) {
              gpu::lamb_step(g.params, g.grads, g.state[0], g.state[1], steps, hp, {}, at::Tensor(), DeviceArgs{});
            },
            label);
      }
      expect_groups_equal(host, device, label, reordered_sum_tolerance(pd));
    }
  }
}

TEST(EmulatedCudaPreKernels, LambWithDeviceCountersAndLr) {
  const cpu::LAMBHyperparams hp{1e-2, 0.9, 0.999, 1e-6, 0.01, 1.0, true, true, false, false, true, false};
  cpu::LAMBHyperparams poisoned = hp;
  poisoned.lr = std::numeric_limits<double>::quiet_NaN();
  const Group start = make_group(two_stage_specs(at::kFloat, at::kFloat), {false, true});
  Group host = start.clone();
  Group device = start.clone();
  DeviceArgs dev;
  dev.lr = at::full({}, hp.lr, at::kDouble);
  dev.steps = step_counters(start.params.size(), 0.0);
  for (int step = 1; step <= 3; ++step) {
    cpu::lamb_step(host.params, host.grads, host.state[0], host.state[1], steps_of(start, step), hp, {}, at::Tensor());
    gpu::lamb_step(device.params, device.grads, device.state[0], device.state[1],
                   steps_of(start, std::numeric_limits<double>::quiet_NaN()), poisoned, {}, at::Tensor(), dev);
  }
  expect_groups_equal(host, device, "lamb with device lr and counters", reordered_sum_tolerance(at::kFloat));
  for (const auto& s : dev.steps) {
    EXPECT_EQ(s.item<float>(), 3.0f);
  }
}

TEST(EmulatedCudaPreKernels, MarsAdamAndLionMatchCpu) {
  for (const auto& [pd, sd] : dtype_pairs()) {
    for (bool lion : {false, true}) {
      for (bool amsgrad : {false, true}) {
        if (lion && amsgrad) {
          continue;
        }
        cpu::MARSHyperparams hp{3e-3, 0.95, 0.99, 1e-8, 0.01, 0.025, lion, amsgrad, false};
        const Group start = make_group(two_stage_specs(pd, sd), {false, true, true, false});
        auto lists = [&](Group& g) {
          return std::array<std::vector<at::Tensor>, 4>{g.state[0], lion ? std::vector<at::Tensor>{} : g.state[1],
                                                        amsgrad ? g.state[2] : std::vector<at::Tensor>{}, g.state[3]};
        };
        Group host = start.clone();
        Group device = start.clone();
        const auto label = "mars " + dtype_label(pd, sd) + (lion ? " lion" : "") + (amsgrad ? " amsgrad" : "");
        for (int step = 1; step <= 3; ++step) {
          const auto steps = steps_of(start, step);
          const auto h = lists(host);
          cpu::mars_step(host.params, host.grads, h[0], h[1], h[2], h[3], steps, hp, {}, at::Tensor());
          device = run_both_orders(
              device,
              [&](Group& g) {
                const auto d = lists(g);
                gpu::mars_step(g.params, g.grads, d[0], d[1], d[2], d[3], steps, hp, {}, at::Tensor(), DeviceArgs{});
              },
              label);
        }
        expect_groups_equal(host, device, label, reordered_sum_tolerance(pd));
      }
    }
  }
}

TEST(EmulatedCudaPreKernels, AdamMagmaScoresAndMasksMatchCpu) {
  for (const auto& [pd, sd] : dtype_pairs()) {
    const cpu::AdamMagmaHyperparams hp{{1e-2, 0.9, 0.999, 1e-8, 0.1, true, false, false}, 2.0};
    const double magma_p = 0.5;
    const cpu::ElementwiseOptions options{false, 77, std::nullopt};
    const Group start = make_group(two_stage_specs(pd, sd), {false, true});
    Group host = start.clone();
    Group device = start.clone();
    auto host_scores = step_counters(start.params.size(), 0.5);
    auto device_scores = step_counters(start.params.size(), 0.5);
    const auto label = "adam magma " + dtype_label(pd, sd);
    for (int step = 1; step <= 4; ++step) {
      const auto steps = steps_of(start, step);
      std::vector<bool> keep(steps.size());
      for (size_t i = 0; i < keep.size(); ++i) {
        keep[i] = common::magma_keep({magma_p, hp.tau, options.seed}, static_cast<int64_t>(i), steps[i]);
      }
      cpu::adam_magma_step(host.params, host.grads, host.state[0], host.state[1], {}, host_scores, keep, steps, hp,
                           options);
      gpu::adam_magma_step(device.params, device.grads, device.state[0], device.state[1], {}, device_scores, steps, hp,
                           magma_p, options, DeviceArgs{});
    }
    // The cosine's norms are summed in another order: scores (and so the
    // updates they scale) agree to rounding.
    expect_lists_equal(host_scores, device_scores, label + ": scores", 1e-6);
    expect_groups_equal(host, device, label, pd == at::kDouble ? 1e-12 : 1e-5);
  }
}

TEST(EmulatedCudaPreKernels, NAdamDeviceMuProductsMatchHostOnes) {
  const cpu::NAdamHyperparams hp{1e-3, 0.9, 0.999, 1e-8, 0.1, 4e-3, true, false};
  cpu::NAdamHyperparams poisoned = hp;
  poisoned.lr = std::numeric_limits<double>::quiet_NaN();
  for (auto mu_dtype : {at::kFloat, at::kDouble}) {
    const Group start = make_group(layout_specs(at::kFloat, at::kFloat), {false, true});
    Group host = start.clone();
    Group device = start.clone();
    std::vector<at::Tensor> mu_host, mu_device;
    for (size_t i = 0; i < start.params.size(); ++i) {
      mu_host.push_back(at::ones({}, mu_dtype));
      mu_device.push_back(at::ones({}, mu_dtype));
    }
    DeviceArgs dev;
    dev.lr = at::full({}, hp.lr, at::kDouble);
    dev.steps = step_counters(start.params.size(), 0.0);
    for (int step = 1; step <= 3; ++step) {
      cpu::nadam_step(host.params, host.grads, host.state[0], host.state[1], mu_host, steps_of(start, step), hp, {});
      gpu::nadam_step(device.params, device.grads, device.state[0], device.state[1], mu_device,
                      steps_of(start, std::numeric_limits<double>::quiet_NaN()), poisoned, {}, dev);
    }
    const std::string label = std::string("nadam device counters, ") + c10::toString(mu_dtype) + " mu_product";
    expect_groups_equal(host, device, label);
    expect_lists_equal(mu_host, mu_device, label + ": mu_products", 0.0);
  }
}

TEST(EmulatedCudaPreKernels, ScheduleFreeHostAndDeviceWeightsMatchCpu) {
  const cpu::ScheduleFreeWeighting weighting{2, 0.0, 2.0, 0.999};
  const cpu::ScheduleFreeAdamWHyperparams adamw{0.9, 0.999, 1e-8, 0.01};
  const cpu::ScheduleFreeSGDHyperparams sgd{0.9, 0.01};
  const double lr = 2.5e-2;
  for (const auto& [pd, sd] : dtype_pairs()) {
    for (bool device_counters : {false, true}) {
      for (bool use_adamw : {true, false}) {
        const Group start = make_group(layout_specs(pd, sd), {false, true});
        const size_t n = start.params.size();
        Group host = start.clone();
        Group device = start.clone();
        auto host_sums = std::vector<double>(n, 0.0);
        auto host_maxes = std::vector<double>(n, 0.0);
        std::vector<at::Tensor> sums, maxes;
        for (size_t i = 0; i < n; ++i) {
          sums.push_back(at::zeros({}, at::kDouble));
          maxes.push_back(at::zeros({}, at::kDouble));
        }
        DeviceArgs dev;
        if (device_counters) {
          dev.steps = step_counters(n, 0.0);
          dev.lr = at::full({}, lr, at::kDouble);
        }
        const auto label = std::string("schedulefree ") + (use_adamw ? "adamw " : "sgd ") + dtype_label(pd, sd) +
                           (device_counters ? ", device counters" : ", host counters");
        for (int step = 1; step <= 4; ++step) {
          const auto steps = steps_of(start, step);
          std::vector<cpu::ScheduleFreeScalars> scalars(n);
          for (size_t i = 0; i < n; ++i) {
            scalars[i] = kernels::schedulefree_advance(weighting, steps[i], lr, host_sums[i], host_maxes[i]);
          }
          if (use_adamw) {
            cpu::schedulefree_adamw_step(host.params, host.grads, host.state[0], host.state[1], scalars, steps, adamw,
                                         {});
            gpu::schedulefree_adamw_step(device.params, device.grads, device.state[0], device.state[1], sums, maxes,
                                         device_counters ? std::vector<cpu::ScheduleFreeScalars>(n) : scalars, steps,
                                         adamw, weighting, lr, {}, dev);
          } else {
            cpu::schedulefree_sgd_step(host.params, host.grads, host.state[0], scalars, steps, sgd, {});
            gpu::schedulefree_sgd_step(device.params, device.grads, device.state[0], sums, maxes,
                                       device_counters ? std::vector<cpu::ScheduleFreeScalars>(n) : scalars, steps, sgd,
                                       weighting, lr, {}, dev);
          }
        }
        expect_lists_equal(host.params, device.params, label + ": params", kRounding);
        expect_lists_equal(host.state[0], device.state[0], label + ": z", kRounding);
        if (use_adamw) {
          expect_lists_equal(host.state[1], device.state[1], label + ": exp_avg_sq", kRounding);
        }
        if (device_counters) {
          for (size_t i = 0; i < n; ++i) {
            EXPECT_EQ(sums[i].item<double>(), host_sums[i]) << label << ": weight_sum " << i;
            EXPECT_EQ(maxes[i].item<double>(), host_maxes[i]) << label << ": lr_max " << i;
          }
        }
      }
    }
  }
}

TEST(EmulatedCudaPreKernels, ScheduleFreePassesAndSophiaHessianEmaMatchCpu) {
  for (const auto& [pd, sd] : dtype_pairs()) {
    if (pd != sd) {
      continue;  // these passes take one dtype for both lists
    }
    const auto label = dtype_label(pd, sd);
    const Group start = make_group(layout_specs(pd, sd), {false});
    Group host = start.clone();
    Group device = start.clone();
    cpu::schedulefree_lerp_to_z(host.params, host.state[0], 0.3);
    gpu::schedulefree_lerp_to_z(device.params, device.state[0], 0.3);
    cpu::schedulefree_wrapper_pre(host.params, host.state[0], 0.9, 0.99);
    gpu::schedulefree_wrapper_pre(device.params, device.state[0], 0.9, 0.99);
    cpu::schedulefree_wrapper_post(host.params, host.state[0], 0.25, 0.9);
    gpu::schedulefree_wrapper_post(device.params, device.state[0], 0.25, 0.9);
    expect_groups_equal(host, device, "schedulefree passes " + label);
    // Sophia's Hessian EMA: grads stand in for the estimates.
    cpu::sophia_update_hessian(host.state[0], host.grads, 0.99);
    gpu::sophia_update_hessian(device.state[0], device.grads, 0.99);
    expect_groups_equal(host, device, "sophia hessian EMA " + label);
  }
}

}  // namespace
}  // namespace torchopt_ext::emulation_testing
