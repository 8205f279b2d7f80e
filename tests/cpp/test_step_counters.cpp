// Where the LibTorch optimizers keep their step counters and one-element
// state (docs/design.md "CUDA kernels"): the classes whose ops have CUDA
// kernels create them on a CUDA param's device (no host sync, capturable),
// CPU params keep float32 CPU counters exactly as before, and checkpoints
// move counters next to their param. The CUDA tests skip with "no CUDA
// device" where torch::cuda::is_available() is false.
#include <gtest/gtest.h>
#include <torch/torch.h>
#include <torchopt_ext/torchopt_ext.h>

#include <functional>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "test_utils.h"

namespace {

namespace optim = torchopt_ext::optim;
namespace detail = torchopt_ext::optim::detail;
using namespace torchopt_ext::testing;

// One optimizer class under test: how to build it, and its per-param
// one-element state (the step first) read from the optimizer's state map.
struct Case {
  std::string name;
  std::function<std::unique_ptr<torch::optim::Optimizer>(std::vector<torch::Tensor>)> make;
  std::function<std::vector<torch::Tensor>(torch::optim::OptimizerParamState&)> scalars;
  // Replaces them (same order as `scalars`).
  std::function<void(torch::optim::OptimizerParamState&, const std::vector<torch::Tensor>&)> set_scalars;
};

template <typename Opt, typename State, typename Options>
Case make_case(const std::string& name, Options options,
               std::function<std::vector<torch::Tensor>(State&)> extra = nullptr,
               std::function<void(State&, const std::vector<torch::Tensor>&)> set_extra = nullptr) {
  Case c;
  c.name = name;
  c.make = [options](std::vector<torch::Tensor> params) -> std::unique_ptr<torch::optim::Optimizer> {
    return std::make_unique<Opt>(std::move(params), options);
  };
  c.scalars = [extra](torch::optim::OptimizerParamState& base) {
    auto& state = static_cast<State&>(base);
    std::vector<torch::Tensor> out{state.step()};
    if (extra) {
      for (auto& t : extra(state)) {
        out.push_back(t);
      }
    }
    return out;
  };
  c.set_scalars = [set_extra](torch::optim::OptimizerParamState& base, const std::vector<torch::Tensor>& values) {
    auto& state = static_cast<State&>(base);
    state.step(values[0]);
    if (set_extra) {
      set_extra(state, values);
    }
  };
  return c;
}

// Every class whose op has a CUDA kernel that reads device counters, with
// options that reach its scalar state (Magma's score, NAdamW's mu-product,
// Schedule-Free's weights, MARS's and the matrix classes' AdamW branch for
// the 1-D params).
std::vector<Case> cases() {
  using V = std::vector<torch::Tensor>;
  return {
      make_case<optim::Adam, optim::AdamParamState>("Adam", optim::AdamOptions(1e-2).amsgrad(true)),
      make_case<optim::AdamW, optim::AdamParamState>("AdamW", optim::AdamWOptions(1e-2)),
      make_case<optim::AdamW, optim::AdamParamState>(
          "AdamW-magma", optim::AdamWOptions(1e-2).use_magma(true).seed(3),
          std::function<V(optim::AdamParamState&)>([](optim::AdamParamState& s) { return V{s.magma_score()}; }),
          std::function<void(optim::AdamParamState&, const V&)>(
              [](optim::AdamParamState& s, const V& v) { s.magma_score(v[1]); })),
      make_case<optim::NAdamW, optim::NAdamWParamState>(
          "NAdamW", optim::NAdamWOptions(1e-2),
          std::function<V(optim::NAdamWParamState&)>([](optim::NAdamWParamState& s) { return V{s.mu_product()}; }),
          std::function<void(optim::NAdamWParamState&, const V&)>(
              [](optim::NAdamWParamState& s, const V& v) { s.mu_product(v[1]); })),
      make_case<optim::RAdam, optim::AdamParamState>("RAdam", optim::RAdamOptions(1e-2)),
      make_case<optim::QHAdamW, optim::AdamParamState>("QHAdamW", optim::QHAdamWOptions(1e-2)),
      make_case<optim::LAMB, optim::AdamParamState>("LAMB", optim::LAMBOptions(1e-2).weight_decay(0.1)),
      make_case<optim::SGD, optim::SGDParamState>("SGD", optim::SGDOptions(1e-2).momentum(0.9)),
      make_case<optim::Lion, optim::LionParamState>("Lion", optim::LionOptions(1e-3)),
      make_case<optim::SophiaG, optim::SophiaParamState>("SophiaG", optim::SophiaGOptions(1e-2)),
      make_case<optim::MARS, optim::MARSParamState>("MARS", optim::MARSOptions(1e-2)),
      make_case<optim::Adafactor, optim::AdafactorParamState>("Adafactor", optim::AdafactorOptions(1e-2)),
      make_case<optim::ScheduleFreeAdamW, optim::ScheduleFreeParamState>(
          "ScheduleFreeAdamW", optim::ScheduleFreeAdamWOptions(1e-2).warmup_steps(2),
          std::function<V(optim::ScheduleFreeParamState&)>(
              [](optim::ScheduleFreeParamState& s) { return V{s.weight_sum(), s.lr_max()}; }),
          std::function<void(optim::ScheduleFreeParamState&, const V&)>(
              [](optim::ScheduleFreeParamState& s, const V& v) {
                s.weight_sum(v[1]);
                s.lr_max(v[2]);
              })),
      // The matrix classes (Muon, PRISM: matrix branch and AdamW / NAdamW
      // fallback for the 1-D and 0-d params), Newton-Schulz in the param's
      // dtype so CUDA and CPU agree to fp64 rounding.
      make_case<optim::Muon, optim::MuonParamState>("Muon", optim::MuonOptions(1e-2).ns_dtype(std::nullopt)),
      make_case<optim::Muon, optim::MuonParamState>(
          "Muon-magma", optim::MuonOptions(1e-2).ns_dtype(std::nullopt).use_magma(true).seed(3),
          std::function<V(optim::MuonParamState&)>([](optim::MuonParamState& s) { return V{s.magma_score()}; }),
          std::function<void(optim::MuonParamState&, const V&)>(
              [](optim::MuonParamState& s, const V& v) { s.magma_score(v[1]); })),
      make_case<optim::PRISM, optim::PRISMParamState>("PRISM", optim::PRISMOptions(1e-2).ns_dtype(std::nullopt)),
      make_case<optim::ScheduleFreeSGD, optim::ScheduleFreeParamState>(
          "ScheduleFreeSGD", optim::ScheduleFreeSGDOptions(1e-2),
          std::function<V(optim::ScheduleFreeParamState&)>(
              [](optim::ScheduleFreeParamState& s) { return V{s.weight_sum(), s.lr_max()}; }),
          std::function<void(optim::ScheduleFreeParamState&, const V&)>(
              [](optim::ScheduleFreeParamState& s, const V& v) {
                s.weight_sum(v[1]);
                s.lr_max(v[2]);
              })),
  };
}

std::vector<torch::Tensor> to_device(const std::vector<torch::Tensor>& ts, const torch::Device& device) {
  std::vector<torch::Tensor> out;
  for (const auto& t : ts) {
    out.push_back(t.to(device));
  }
  return out;
}

std::vector<std::vector<torch::Tensor>> grads_to(const std::vector<std::vector<torch::Tensor>>& grads,
                                                 const torch::Device& device) {
  std::vector<std::vector<torch::Tensor>> out;
  for (const auto& step : grads) {
    out.push_back(to_device(step, device));
  }
  return out;
}

// Checks every param's step (float32, 0-d, == steps) and scalar state live on `device`.
void expect_scalars_on(const Case& c, torch::optim::Optimizer& opt, const torch::Device& device, double steps) {
  ASSERT_FALSE(opt.state().empty()) << c.name;
  for (auto& [key, state] : opt.state()) {
    const auto scalars = c.scalars(*state);
    const auto& step = scalars[0];
    EXPECT_EQ(step.device(), device) << c.name << ": step";
    EXPECT_EQ(step.scalar_type(), torch::kFloat32) << c.name;
    EXPECT_EQ(step.dim(), 0) << c.name;
    EXPECT_EQ(step.item<double>(), steps) << c.name;
    for (size_t k = 1; k < scalars.size(); ++k) {
      EXPECT_EQ(scalars[k].device(), device) << c.name << ": scalar state " << k;
    }
  }
}

// fp64 params: the CUDA kernels agree with the CPU ones to rounding of the
// coefficients (and summation order in the norm / factor reductions).
void expect_near(const std::string& name, const std::vector<torch::Tensor>& ours,
                 const std::vector<torch::Tensor>& ref) {
  ASSERT_EQ(ours.size(), ref.size());
  for (size_t i = 0; i < ours.size(); ++i) {
    const auto a = ours[i].cpu();
    const auto b = ref[i].cpu();
    EXPECT_TRUE(torch::allclose(a, b, 1e-9, 1e-12))
        << name << " tensor " << i << " max |diff| " << (a - b).abs().max().item<double>();
  }
}

bool no_cuda() { return !torch::cuda::is_available(); }

TEST(StepCounters, CpuParamsKeepFloat32CpuCountersAndScalarState) {
  for (const auto& c : cases()) {
    auto params = make_params(torch::kFloat32);
    auto opt = c.make(params);
    run(*opt, params, make_grads(params, 3));
    expect_scalars_on(c, *opt, torch::kCPU, 3.0);
  }
}

TEST(StepCounters, PlacementLeavesCpuCountersAsTheyAre) {
  // A CPU param's counter is returned as is (same tensor, any float dtype):
  // the CPU path is untouched.
  const auto param = torch::randn({3});
  for (auto dtype : {torch::kFloat32, torch::kFloat64}) {
    const auto step = torch::full({}, 4.0, dtype);
    EXPECT_TRUE(detail::placed_step(step, param).is_same(step));
    EXPECT_TRUE(detail::placed_scalar(step, param).is_same(step));
  }
  EXPECT_FALSE(detail::placed_scalar(torch::Tensor(), param).defined());
  EXPECT_EQ(detail::scalar_device(param), torch::Device(torch::kCPU));
  const auto counter = detail::new_step_counter(param);
  EXPECT_EQ(counter.device(), torch::Device(torch::kCPU));
  EXPECT_EQ(counter.scalar_type(), torch::kFloat32);
  EXPECT_EQ(counter.dim(), 0);
}

TEST(StepCounters, CpuSaveLoadRoundTripContinuesBitwise) {
  for (const auto& c : cases()) {
    auto params = make_params(torch::kFloat32);
    const auto grads = make_grads(params, 8);
    const std::vector<std::vector<torch::Tensor>> first(grads.begin(), grads.begin() + 4);
    const std::vector<std::vector<torch::Tensor>> second(grads.begin() + 4, grads.end());
    auto opt = c.make(params);
    run(*opt, params, first);
    auto resumed_params = clone_all(params);
    std::stringstream buffer;
    torch::save(*opt, buffer);
    run(*opt, params, second);
    auto resumed = c.make(resumed_params);
    torch::load(*resumed, buffer);
    expect_scalars_on(c, *resumed, torch::kCPU, 4.0);
    run(*resumed, resumed_params, second);
    SCOPED_TRACE(c.name);
    expect_bitwise_equal(params, resumed_params);
    expect_scalars_on(c, *resumed, torch::kCPU, 8.0);
  }
}

TEST(StepCountersCuda, CudaParamsGetDeviceCountersAndMatchCpu) {
  if (no_cuda()) {
    GTEST_SKIP() << "no CUDA device";
  }
  const torch::Device cuda(torch::kCUDA, 0);
  for (const auto& c : cases()) {
    auto cpu_params = make_params(torch::kFloat64);
    auto cuda_params = to_device(cpu_params, cuda);
    const auto grads = make_grads(cpu_params, 5);
    auto cpu_opt = c.make(cpu_params);
    auto cuda_opt = c.make(cuda_params);
    run(*cpu_opt, cpu_params, grads);
    run(*cuda_opt, cuda_params, grads_to(grads, cuda));
    expect_scalars_on(c, *cuda_opt, cuda, 5.0);
    expect_near(c.name, cuda_params, cpu_params);
  }
}

TEST(StepCountersCuda, HostCountersFromACheckpointMoveOntoTheDevice) {
  if (no_cuda()) {
    GTEST_SKIP() << "no CUDA device";
  }
  const torch::Device cuda(torch::kCUDA, 0);
  for (const auto& c : cases()) {
    auto params = to_device(make_params(torch::kFloat64), cuda);
    const auto grads = grads_to(make_grads(params, 6), cuda);
    const std::vector<std::vector<torch::Tensor>> first(grads.begin(), grads.begin() + 3);
    const std::vector<std::vector<torch::Tensor>> second(grads.begin() + 3, grads.end());
    auto opt = c.make(params);
    run(*opt, params, first);
    // What a checkpoint written before device counters holds: CPU counters
    // (and CPU scalar state) next to CUDA moments.
    auto move_scalars = [&](const torch::Device& device) {
      for (auto& [key, state] : opt->state()) {
        auto values = c.scalars(*state);
        for (auto& v : values) {
          v = v.to(device);
        }
        c.set_scalars(*state, values);
      }
    };
    move_scalars(torch::kCPU);
    std::stringstream buffer;
    torch::save(*opt, buffer);
    auto resumed_params = clone_all(params);
    move_scalars(cuda);
    run(*opt, params, second);
    auto resumed = c.make(resumed_params);
    torch::load(*resumed, buffer);
    run(*resumed, resumed_params, second);
    expect_scalars_on(c, *resumed, cuda, 6.0);
    SCOPED_TRACE(c.name);
    expect_bitwise_equal(params, resumed_params);
  }
}

TEST(StepCountersCuda, CheckpointsMoveBetweenCpuAndCuda) {
  if (no_cuda()) {
    GTEST_SKIP() << "no CUDA device";
  }
  const torch::Device cuda(torch::kCUDA, 0);
  for (const auto& c : cases()) {
    // CPU run saved, resumed on CUDA (loaded onto the device) and on the CPU.
    auto cpu_params = make_params(torch::kFloat64);
    const auto grads = make_grads(cpu_params, 6);
    const std::vector<std::vector<torch::Tensor>> first(grads.begin(), grads.begin() + 3);
    const std::vector<std::vector<torch::Tensor>> second(grads.begin() + 3, grads.end());
    auto cpu_opt = c.make(cpu_params);
    run(*cpu_opt, cpu_params, first);
    std::stringstream buffer;
    torch::save(*cpu_opt, buffer);
    auto cuda_params = to_device(cpu_params, cuda);
    run(*cpu_opt, cpu_params, second);
    auto cuda_opt = c.make(cuda_params);
    torch::load(*cuda_opt, buffer, cuda);
    run(*cuda_opt, cuda_params, grads_to(second, cuda));
    expect_scalars_on(c, *cuda_opt, cuda, 6.0);
    expect_near(c.name, cuda_params, cpu_params);
    // And back: a CUDA checkpoint resumed on CPU params keeps CPU counters.
    std::stringstream back;
    torch::save(*cuda_opt, back);
    auto host_params = to_device(cuda_params, torch::kCPU);
    auto host_opt = c.make(host_params);
    torch::load(*host_opt, back, torch::Device(torch::kCPU));
    run(*host_opt, host_params, first);
    expect_scalars_on(c, *host_opt, torch::kCPU, 9.0);
  }
}

}  // namespace
