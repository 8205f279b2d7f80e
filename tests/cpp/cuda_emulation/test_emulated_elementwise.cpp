// The element-wise CUDA kernels (multi_tensor_apply.cuh and the .cu files that
// use it) run under the host emulation and are compared with the CPU kernels:
// the per-element math is shared, so fp32 / fp64 / bf16 / fp16 results must be
// bitwise equal; what is checked is the launcher (chunks, packs, tables,
// relaunches, dtype groups) and the device-scalar paths.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "emulation_test_utils.h"
#include "kernels/cuda/elementwise.h"

namespace torchopt_ext::emulation_testing {
namespace {

namespace cpu = kernels::cpu;
namespace gpu = kernels::cuda;

using StepFn = std::function<void(Group&, const std::vector<double>&)>;

// Three steps of the CPU kernel and of the emulated CUDA kernel from the same
// start; the emulated side runs in both thread orders each step.
void expect_trajectories_match(const Group& start, const StepFn& cpu_step, const StepFn& gpu_step,
                               const std::string& what, double tol = kRounding) {
  Group host = start.clone();
  Group device = start.clone();
  for (int step = 1; step <= 3; ++step) {
    const auto steps = steps_of(start, step);
    cpu_step(host, steps);
    device = run_both_orders(device, [&](Group& g) { gpu_step(g, steps); }, what);
  }
  expect_groups_equal(host, device, what, tol);
}

std::vector<at::Tensor> or_empty(const Group& g, size_t k, bool used) {
  return used ? g.state[k] : std::vector<at::Tensor>{};
}

TEST(EmulatedCudaElementwise, AdamMatchesCpuOnEveryLayoutAndDtype) {
  for (const auto& [pd, sd] : dtype_pairs()) {
    for (bool amsgrad : {false, true}) {
      for (bool decoupled : {false, true}) {
        const cpu::AdamHyperparams hp{1e-2, 0.9, 0.999, 1e-8, 0.1, decoupled, amsgrad, false};
        const cpu::ElementwiseOptions options{};
        const Group start = make_group(layout_specs(pd, sd), {false, true, true});
        expect_trajectories_match(
            start,
            [&](Group& g, const auto& steps) {
              cpu::adam_step(g.params, g.grads, g.state[0], g.state[1], or_empty(g, 2, amsgrad), steps, hp, options);
            },
            [&](Group& g, const auto& steps) {
              gpu::adam_step(g.params, g.grads, g.state[0], g.state[1], or_empty(g, 2, amsgrad), steps, hp, options,
                             DeviceArgs{});
            },
            "adam " + dtype_label(pd, sd) + (amsgrad ? " amsgrad" : "") + (decoupled ? " decoupled" : ""));
      }
    }
  }
}

TEST(EmulatedCudaElementwise, MixedDtypesInOneGroupRunAsSeparateLaunches) {
  std::vector<TensorSpec> specs;
  for (const auto& [pd, sd] : dtype_pairs()) {
    specs.push_back({1000, pd, sd});
    specs.push_back({65536 + 3, pd, sd, true});
  }
  specs.push_back({333, at::kBFloat16, at::kBFloat16});  // bf16 state as well
  const cpu::AdamHyperparams hp{1e-2, 0.9, 0.999, 1e-8, 0.0, true, false, false};
  emu::reset_counters();
  expect_trajectories_match(
      make_group(specs, {false, true}),
      [&](Group& g, const auto& steps) {
        cpu::adam_step(g.params, g.grads, g.state[0], g.state[1], {}, steps, hp, {});
      },
      [&](Group& g, const auto& steps) {
        gpu::adam_step(g.params, g.grads, g.state[0], g.state[1], {}, steps, hp, {}, DeviceArgs{});
      },
      "adam mixed dtypes");
  // Five (param, state) dtype pairs: five launches per call, two calls (orders) per step.
  EXPECT_EQ(emu::counters().launches, 5 * 2 * 3);
}

TEST(EmulatedCudaElementwise, ManyTensorsAndBlocksSpillIntoSeveralLaunches) {
  // 30 small tensors (over the 24 per launch), then 300 chunks of one tensor
  // spread over three tensors (over the 256 blocks per launch, so one tensor
  // is carried over into the next launch mid-way).
  std::vector<TensorSpec> specs(30, TensorSpec{129});
  for (int i = 0; i < 3; ++i) {
    specs.push_back({100 * 65536 - 7 * i});
  }
  const cpu::SGDHyperparams hp{1e-2, 0.9, 0.1, 0.01, true, false};
  emu::reset_counters();
  const Group start = make_group(specs, {false});
  Group host = start.clone();
  Group device = start.clone();
  for (int step = 1; step <= 2; ++step) {
    cpu::sgd_step(host.params, host.grads, host.state[0], steps_of(start, step), hp, {});
    gpu::sgd_step(device.params, device.grads, device.state[0], steps_of(start, step), hp, {}, DeviceArgs{});
  }
  expect_groups_equal(host, device, "sgd over several launches");
  // Per step: 30 tensors fill one launch of 24 and start the next; 300 more
  // blocks make it 306 blocks after the first launch: two more launches.
  EXPECT_EQ(emu::counters().launches, 2 * 3);
  EXPECT_EQ(emu::counters().blocks, 2 * 330);
}

TEST(EmulatedCudaElementwise, SgdLionSophiaNAdamRAdamQHAdamMatchCpu) {
  for (const auto& [pd, sd] : dtype_pairs()) {
    const auto label = dtype_label(pd, sd);
    const auto specs = layout_specs(pd, sd);
    {
      const cpu::SGDHyperparams hp{1e-2, 0.9, 0.1, 0.01, true, false};
      expect_trajectories_match(
          make_group(specs, {false}),
          [&](Group& g, const auto& s) { cpu::sgd_step(g.params, g.grads, g.state[0], s, hp, {}); },
          [&](Group& g, const auto& s) { gpu::sgd_step(g.params, g.grads, g.state[0], s, hp, {}, DeviceArgs{}); },
          "sgd " + label);
      const cpu::SGDHyperparams plain{1e-2, 0.0, 0.0, 0.0, false, true};
      expect_trajectories_match(
          make_group(specs, {}), [&](Group& g, const auto& s) { cpu::sgd_step(g.params, g.grads, {}, s, plain, {}); },
          [&](Group& g, const auto& s) { gpu::sgd_step(g.params, g.grads, {}, s, plain, {}, DeviceArgs{}); },
          "sgd without momentum " + label);
    }
    {
      const cpu::LionHyperparams hp{1e-3, 0.9, 0.99, 0.1, false};
      expect_trajectories_match(
          make_group(specs, {false}),
          [&](Group& g, const auto& s) { cpu::lion_step(g.params, g.grads, g.state[0], s, hp, {}); },
          [&](Group& g, const auto& s) { gpu::lion_step(g.params, g.grads, g.state[0], s, hp, {}, DeviceArgs{}); },
          "lion " + label);
    }
    {
      const cpu::SophiaHyperparams hp{1e-3, 0.96, 0.05, 1e-12, 0.1, false, false};
      expect_trajectories_match(
          make_group(specs, {false, true}),
          [&](Group& g, const auto& s) { cpu::sophia_step(g.params, g.grads, g.state[0], g.state[1], s, hp, {}); },
          [&](Group& g, const auto& s) {
            gpu::sophia_step(g.params, g.grads, g.state[0], g.state[1], s, hp, {}, DeviceArgs{});
          },
          "sophia " + label);
    }
    {
      const cpu::RAdamHyperparams hp{1e-3, 0.9, 0.999, 1e-8, 0.1, true, false};
      // Steps 1-3 stay under RAdam's rectification threshold: start at step 6 too.
      for (double offset : {0.0, 5.0}) {
        expect_trajectories_match(
            make_group(specs, {false, true}),
            [&](Group& g, auto s) {
              for (auto& v : s) v += offset;
              cpu::radam_step(g.params, g.grads, g.state[0], g.state[1], s, hp, {});
            },
            [&](Group& g, auto s) {
              for (auto& v : s) v += offset;
              gpu::radam_step(g.params, g.grads, g.state[0], g.state[1], s, hp, {}, DeviceArgs{});
            },
            "radam " + label);
      }
    }
    {
      const cpu::QHAdamHyperparams hp{1e-3, 0.9, 0.999, 0.7, 1.0, 1e-8, 0.1, true, false};
      expect_trajectories_match(
          make_group(specs, {false, true}),
          [&](Group& g, const auto& s) { cpu::qhadam_step(g.params, g.grads, g.state[0], g.state[1], s, hp, {}); },
          [&](Group& g, const auto& s) {
            gpu::qhadam_step(g.params, g.grads, g.state[0], g.state[1], s, hp, {}, DeviceArgs{});
          },
          "qhadam " + label);
    }
    {
      // NAdam's mu-products live outside the group: one set per side.
      const cpu::NAdamHyperparams hp{1e-3, 0.9, 0.999, 1e-8, 0.1, 4e-3, true, false};
      const Group start = make_group(specs, {false, true});
      auto mu_host = step_counters(specs.size(), 1.0);
      auto mu_device = step_counters(specs.size(), 1.0);
      Group host = start.clone();
      Group device = start.clone();
      for (int step = 1; step <= 3; ++step) {
        cpu::nadam_step(host.params, host.grads, host.state[0], host.state[1], mu_host, steps_of(start, step), hp, {});
        gpu::nadam_step(device.params, device.grads, device.state[0], device.state[1], mu_device, steps_of(start, step),
                        hp, {}, DeviceArgs{});
      }
      expect_groups_equal(host, device, "nadam " + label);
      expect_lists_equal(mu_host, mu_device, "nadam mu_products " + label, 0.0);
    }
  }
}

TEST(EmulatedCudaElementwise, StochasticRoundingDrawsTheCpuStream) {
  const cpu::AdamHyperparams hp{1e-3, 0.9, 0.999, 1e-8, 0.1, true, false, false};
  const cpu::ElementwiseOptions options{true, 1234, std::nullopt};
  expect_trajectories_match(
      make_group(layout_specs(at::kBFloat16, at::kFloat), {false, true}),
      [&](Group& g, const auto& s) { cpu::adam_step(g.params, g.grads, g.state[0], g.state[1], {}, s, hp, options); },
      [&](Group& g, const auto& s) {
        gpu::adam_step(g.params, g.grads, g.state[0], g.state[1], {}, s, hp, options, DeviceArgs{});
      },
      "adam bf16 stochastic rounding");
}

// Device scalars: lr, step counters, grad_scale and found_inf handed to the
// kernels as tensors (CPU tensors here: the emulated kernels read host memory).
TEST(EmulatedCudaElementwise, DeviceLrAndStepCountersReplaceTheHostValues) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const cpu::AdamHyperparams hp{1e-2, 0.9, 0.999, 1e-8, 0.1, true, true, false};
  cpu::AdamHyperparams poisoned = hp;
  poisoned.lr = nan;  // must not be read
  const auto specs = layout_specs(at::kFloat, at::kFloat);
  for (auto lr_dtype : {at::kFloat, at::kDouble}) {
    const Group start = make_group(specs, {false, true, true});
    Group host = start.clone();
    Group device = start.clone();
    DeviceArgs dev;
    dev.lr = at::full({}, hp.lr, lr_dtype);
    dev.steps = step_counters(specs.size(), 0.0);
    cpu::AdamHyperparams host_hp = hp;
    host_hp.lr = dev.lr.item<double>();  // the float32 lr rounds the same way on both sides
    for (int step = 1; step <= 3; ++step) {
      cpu::adam_step(host.params, host.grads, host.state[0], host.state[1], host.state[2], steps_of(start, step),
                     host_hp, {});
      gpu::adam_step(device.params, device.grads, device.state[0], device.state[1], device.state[2],
                     steps_of(start, nan), poisoned, {}, dev);
    }
    expect_groups_equal(host, device, std::string("adam with a device lr (") + c10::toString(lr_dtype) + ")");
    for (const auto& s : dev.steps) {
      EXPECT_EQ(s.item<float>(), 3.0f) << "the launcher advances each device counter once per step";
    }
  }
}

TEST(EmulatedCudaElementwise, FoundInfSkipsTheStepAndGradScaleUnscales) {
  const cpu::AdamHyperparams hp{1e-2, 0.9, 0.999, 1e-8, 0.1, true, false, false};
  const auto specs = layout_specs(at::kFloat, at::kFloat);
  const Group start = make_group(specs, {false, true});
  {
    Group device = start.clone();
    DeviceArgs dev;
    dev.steps = step_counters(specs.size(), 4.0);
    dev.found_inf = at::ones({}, at::kFloat);
    dev.grad_scale = at::full({}, 8.0f, at::kFloat);
    gpu::adam_step(device.params, device.grads, device.state[0], device.state[1], {}, steps_of(start, 5), hp, {}, dev);
    expect_groups_equal(start, device, "adam with found_inf set", 0.0);
    for (const auto& s : dev.steps) {
      EXPECT_EQ(s.item<float>(), 4.0f) << "a skipped step leaves the counters";
    }
  }
  {
    // Grads scaled by 8 on both sides: the CPU kernel divides by the host
    // scale, the emulated one reads it from the device tensor; both write the
    // unscaled grads back.
    Group host = start.clone();
    Group device = start.clone();
    for (auto* g : {&host, &device}) {
      for (auto& grad : g->grads) {
        grad.mul_(8.0);
      }
    }
    DeviceArgs dev;
    dev.grad_scale = at::full({}, 8.0f, at::kFloat);
    dev.found_inf = at::zeros({}, at::kFloat);
    cpu::adam_step(host.params, host.grads, host.state[0], host.state[1], {}, steps_of(start, 1), hp, {false, 0, 8.0});
    gpu::adam_step(device.params, device.grads, device.state[0], device.state[1], {}, steps_of(start, 1), hp,
                   {false, 0, std::nullopt}, dev);
    expect_groups_equal(host, device, "adam with a device grad_scale");
  }
}

}  // namespace
}  // namespace torchopt_ext::emulation_testing
