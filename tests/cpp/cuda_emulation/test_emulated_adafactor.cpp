// The CUDA Adafactor kernels (adafactor.cu: row / column sums in slabs, the
// per-tensor statistics, the factored scale and the update) under the host
// emulation, against the CPU kernel. The device sums in another fixed order,
// so results agree to rounding (docs/design.md "CUDA kernels", Adafactor).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "emulation_test_utils.h"
#include "kernels/cuda/adafactor.h"

namespace torchopt_ext::emulation_testing {
namespace {

namespace cpu = kernels::cpu;
namespace gpu = kernels::cuda;

struct AdafactorGroup {
  std::vector<at::Tensor> params, grads, row_vars, col_vars, variances, exp_avgs;

  AdafactorGroup clone() const {
    auto copy = [](const std::vector<at::Tensor>& ts) {
      std::vector<at::Tensor> out;
      for (const auto& t : ts) {
        out.push_back(t.clone());
      }
      return out;
    };
    return {copy(params), copy(grads), copy(row_vars), copy(col_vars), copy(variances), copy(exp_avgs)};
  }
};

// 0-d, vectors (one and several 2048-element units), matrices with several
// 128-row slabs and more columns than a block has threads, a batch of matrices.
AdafactorGroup make_adafactor_group(at::ScalarType param_dtype, at::ScalarType state_dtype, bool with_exp_avg) {
  at::manual_seed(3);
  const std::vector<std::vector<int64_t>> shapes = {{}, {5}, {5000}, {7, 9}, {300, 300}, {3, 4, 130}};
  AdafactorGroup g;
  const auto s_opts = at::TensorOptions().dtype(state_dtype);
  for (const auto& shape : shapes) {
    g.params.push_back(at::randn(shape, at::kDouble).to(param_dtype));
    g.grads.push_back(at::randn(shape, at::kDouble).to(param_dtype));
    if (shape.size() >= 2) {
      std::vector<int64_t> row(shape.begin(), shape.end() - 1);
      row.push_back(1);
      std::vector<int64_t> col(shape.begin(), shape.end() - 2);
      col.push_back(1);
      col.push_back(shape.back());
      g.row_vars.push_back(at::zeros(row, s_opts));
      g.col_vars.push_back(at::zeros(col, s_opts));
    } else {
      g.variances.push_back(at::zeros(shape, s_opts));
    }
    if (with_exp_avg) {
      g.exp_avgs.push_back(at::zeros(shape, s_opts));  // the functional requires the state's dtype
    }
  }
  return g;
}

void expect_adafactor_equal(const AdafactorGroup& a, const AdafactorGroup& b, const std::string& what, double tol) {
  expect_lists_equal(a.params, b.params, what + ": params", tol);
  expect_lists_equal(a.row_vars, b.row_vars, what + ": row_vars", tol);
  expect_lists_equal(a.col_vars, b.col_vars, what + ": col_vars", tol);
  expect_lists_equal(a.variances, b.variances, what + ": variances", tol);
  expect_lists_equal(a.exp_avgs, b.exp_avgs, what + ": exp_avgs", tol);
}

struct Case {
  std::string name;
  cpu::AdafactorHyperparams hp;
};

std::vector<Case> cases() {
  return {
      {"fixed lr", {1e-2, -0.8, std::nullopt, 1e-3, 1.0, 0.01, std::nullopt, false, false, false, false}},
      {"relative step, beta1, warmup", {0.0, -0.8, 1e-30, 1e-3, 1.0, 0.0, 0.9, true, true, true, false}},
      {"scaled, maximize", {1e-2, -0.8, std::nullopt, 1e-3, 1.0, 0.0, std::nullopt, false, true, false, true}},
  };
}

TEST(EmulatedCudaAdafactor, WholeStepMatchesCpu) {
  for (const auto& [pd, sd] : std::vector<std::pair<at::ScalarType, at::ScalarType>>{
           {at::kFloat, at::kFloat}, {at::kDouble, at::kDouble}, {at::kBFloat16, at::kFloat}}) {
    for (const auto& c : cases()) {
      const auto label = "adafactor " + c.name + ", " + dtype_label(pd, sd);
      const AdafactorGroup start = make_adafactor_group(pd, sd, c.hp.beta1.has_value());
      AdafactorGroup host = start.clone();
      AdafactorGroup forward = start.clone();
      AdafactorGroup reverse = start.clone();
      for (int step = 1; step <= 3; ++step) {
        const std::vector<double> steps(start.params.size(), step);
        cpu::adafactor_step(host.params, host.grads, host.row_vars, host.col_vars, host.variances, host.exp_avgs, steps,
                            c.hp, {});
        for (auto [g, order] : {std::pair{&forward, emu::Order::kForward}, std::pair{&reverse, emu::Order::kReverse}}) {
          emu::set_order(order);
          gpu::adafactor_run(0, g->params, g->grads, g->row_vars, g->col_vars, g->variances, g->exp_avgs, steps, {},
                             c.hp, {}, DeviceArgs{}, true);
        }
        emu::set_order(emu::Order::kForward);
      }
      // Fixed partitions and fixed-order trees: the schedule cannot change a bit.
      expect_adafactor_equal(forward, reverse, label + " (forward vs reverse thread order)", 0.0);
      expect_adafactor_equal(host, forward, label, reordered_sum_tolerance(pd));
    }
  }
}

TEST(EmulatedCudaAdafactor, StagesWithStatsMatchCpuStages) {
  const auto c = cases()[1];
  const AdafactorGroup start = make_adafactor_group(at::kFloat, at::kFloat, true);
  AdafactorGroup host = start.clone();
  AdafactorGroup device = start.clone();
  std::vector<at::Tensor> host_stats, device_stats;
  for (const auto& p : start.params) {
    host_stats.push_back(at::zeros({cpu::adafactor_stats_size(p)}, at::kDouble));
    device_stats.push_back(at::zeros({cpu::adafactor_stats_size(p)}, at::kDouble));
  }
  DeviceArgs dev;
  dev.steps = step_counters(start.params.size(), 0.0);
  for (int step = 1; step <= 2; ++step) {
    const std::vector<double> steps(start.params.size(), step);
    for (int stage = 1; stage <= 3; ++stage) {
      cpu::adafactor_stage(static_cast<cpu::AdafactorStage>(stage), host.params, host.grads, host.row_vars,
                           host.col_vars, host.variances, host.exp_avgs, steps, host_stats, c.hp, {});
      // Device counters advance in stage 1 only; the host steps are not read.
      gpu::adafactor_run(stage, device.params, device.grads, device.row_vars, device.col_vars, device.variances,
                         device.exp_avgs, std::vector<double>(steps.size(), std::numeric_limits<double>::quiet_NaN()),
                         device_stats, c.hp, {}, dev, stage == 1);
      expect_lists_equal(host_stats, device_stats, "adafactor stats after stage " + std::to_string(stage), 1e-6);
    }
  }
  expect_adafactor_equal(host, device, "adafactor staged", reordered_sum_tolerance(at::kFloat));
  for (const auto& s : dev.steps) {
    EXPECT_EQ(s.item<float>(), 2.0f);
  }
}

TEST(EmulatedCudaAdafactor, FoundInfLeavesEverythingAndGradScaleUnscales) {
  const auto c = cases()[0];
  const AdafactorGroup start = make_adafactor_group(at::kFloat, at::kFloat, false);
  {
    AdafactorGroup device = start.clone();
    DeviceArgs dev;
    dev.found_inf = at::ones({}, at::kFloat);
    dev.steps = step_counters(start.params.size(), 1.0);
    gpu::adafactor_run(0, device.params, device.grads, device.row_vars, device.col_vars, device.variances,
                       device.exp_avgs, std::vector<double>(start.params.size(), 2.0), {}, c.hp, {}, dev, true);
    expect_adafactor_equal(start, device, "adafactor with found_inf", 0.0);
    for (const auto& s : dev.steps) {
      EXPECT_EQ(s.item<float>(), 1.0f);
    }
  }
  {
    AdafactorGroup host = start.clone();
    AdafactorGroup device = start.clone();
    for (auto* g : {&host, &device}) {
      for (auto& grad : g->grads) {
        grad.mul_(4.0);
      }
    }
    DeviceArgs dev;
    dev.grad_scale = at::full({}, 4.0f, at::kFloat);
    const std::vector<double> steps(start.params.size(), 1.0);
    cpu::adafactor_step(host.params, host.grads, host.row_vars, host.col_vars, host.variances, host.exp_avgs, steps,
                        c.hp, {false, 0, 4.0});
    gpu::adafactor_run(0, device.params, device.grads, device.row_vars, device.col_vars, device.variances,
                       device.exp_avgs, steps, {}, c.hp, {}, dev, true);
    expect_adafactor_equal(host, device, "adafactor with a device grad_scale", reordered_sum_tolerance(at::kFloat));
    expect_lists_equal(host.grads, device.grads, "adafactor unscaled grads", 0.0);
  }
}

}  // namespace
}  // namespace torchopt_ext::emulation_testing
