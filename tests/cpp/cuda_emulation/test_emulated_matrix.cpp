// The element-wise apply of the matrix optimizers (matrix.cu: Muon, PRISM,
// SOAP; lr, step and Magma's draw read on the device) and the PSGD family's
// reduced-precision store (psgd_store.cu) under the host emulation, against
// the CPU's formula (fp32 / fp64: bitwise) and the CPU store kernel (bf16 /
// fp16: to the rounding of its FMA contraction, kRounding).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <string>
#include <vector>

#include "emulation_test_utils.h"
#include "kernels/algos/adam_magma.h"
#include "kernels/algos/matrix_apply.h"
#include "kernels/cpu/muon.h"
#include "kernels/cpu/stochastic_rounding.h"
#include "kernels/cuda/matrix.h"
#include "kernels/cuda/psgd_store.h"

namespace torchopt_ext::emulation_testing {
namespace {

namespace gpu = kernels::cuda;

// More elements than the grid-stride loops cover in one pass (4096 blocks of 512).
constexpr int64_t kLongNumel = 4096 * 512 + 1234;

// What the CPU path computes: p * decay + alpha * u in the math type, then the
// store (round-to-nearest, or bf16 stochastic rounding from the CPU kernel).
at::Tensor expected_apply(const at::Tensor& param, const at::Tensor& update, double decay, double alpha,
                          bool stochastic_rounding, uint64_t stream) {
  at::Tensor out = param.clone();
  if (param.scalar_type() == at::kFloat || param.scalar_type() == at::kDouble) {
    const auto math = param.scalar_type();
    out.copy_(param * at::scalar_tensor(decay, math) + update * at::scalar_tensor(alpha, math));
  } else {
    kernels::cpu::muon_apply_update_reduced(out, update, decay, alpha, stochastic_rounding, stream);
  }
  return out;
}

// fp32 / fp64: ATen's separate multiply and add round as the kernel does;
// bf16 / fp16: the CPU store kernel contracts into FMAs.
double tolerance_for(at::ScalarType dtype) { return dtype == at::kFloat || dtype == at::kDouble ? 0.0 : kRounding; }

struct ApplyCase {
  at::ScalarType dtype;
  int64_t numel;
  bool stochastic_rounding;
};

std::vector<ApplyCase> apply_cases() {
  return {{at::kFloat, 1001, false},        {at::kDouble, 777, false}, {at::kBFloat16, 1001, false},
          {at::kBFloat16, 1001, true},      {at::kHalf, 513, false},   {at::kFloat, kLongNumel, false},
          {at::kBFloat16, kLongNumel, true}};
}

TEST(EmulatedCudaMatrix, ApplyWithHostAndDeviceScalarsAndMagmaMatchesCpu) {
  const double lr = 0.02, weight_decay = 0.1, lr_scale = 0.5, magma_p = 0.5;
  const int64_t seed = 11, index = 2;
  for (const auto& c : apply_cases()) {
    for (int variant = 0; variant < 4; ++variant) {
      const bool device_scalars = variant & 1;
      const bool magma = variant & 2;
      at::manual_seed(c.numel);
      const at::Tensor param = make_tensor(c.numel, c.dtype, /*unaligned=*/false, /*positive=*/false);
      const auto math = c.dtype == at::kDouble ? at::kDouble : at::kFloat;
      const at::Tensor update = at::randn({c.numel}, math);
      // The long cases (grid-stride loops wrapping around) take one step.
      const std::vector<double> steps = c.numel == kLongNumel ? std::vector<double>{3.0} : std::vector<double>{3, 4, 5};
      for (double step : steps) {
        gpu::MatrixApplyScalars s;
        s.weight_decay = weight_decay;
        s.lr_scale = lr_scale;
        s.stochastic_rounding = c.stochastic_rounding;
        s.rounding_seed = seed;
        s.index = index;
        if (device_scalars) {
          s.lr = std::numeric_limits<double>::quiet_NaN();
          s.step = std::numeric_limits<double>::quiet_NaN();
          s.lr_device = at::full({}, lr, at::kDouble);
          s.step_device = at::full({}, step, at::kFloat);
        } else {
          s.lr = lr;
          s.step = step;
        }
        double multiplier = 1.0;
        if (magma) {
          s.magma_score = at::full({}, 0.7f, at::kFloat);
          s.magma_p = magma_p;
          s.magma_seed = seed;
          multiplier = kernels::magma_keep_draw(seed, index, step, magma_p) ? static_cast<double>(0.7f) : 0.0;
        }
        const auto f = kernels::matrix_apply_factors(lr, multiplier, weight_decay, lr_scale);
        const at::Tensor expected = expected_apply(param, update, f.decay, f.alpha, c.stochastic_rounding,
                                                   kernels::cpu::rounding_stream(seed, index, step));
        for (auto order : {emu::Order::kForward, emu::Order::kReverse}) {
          emu::set_order(order);
          at::Tensor actual = clone_with_storage(param);
          gpu::matrix_apply_update(actual, update, s);
          expect_guards_intact({actual}, "matrix apply");
          expect_lists_equal({expected}, {actual},
                             std::string(c10::toString(c.dtype)) + " numel " + std::to_string(c.numel) +
                                 (c.stochastic_rounding ? " SR" : "") +
                                 (device_scalars ? " device lr/step" : " host lr/step") + (magma ? " magma" : "") +
                                 " step " + std::to_string(step) +
                                 (order == emu::Order::kReverse ? " (reverse order)" : ""),
                             tolerance_for(c.dtype));
        }
        emu::set_order(emu::Order::kForward);
      }
    }
  }
}

TEST(EmulatedCudaMatrix, FixedFactorsAndArgumentChecks) {
  const at::Tensor param = at::randn({4097}, at::kBFloat16);
  const at::Tensor update = at::randn({4097}, at::kFloat);
  gpu::MatrixApplyScalars s;
  s.fixed = true;
  s.decay = 0.9;
  s.alpha = -0.3;
  s.step = 7.0;
  at::Tensor actual = param.clone();
  gpu::matrix_apply_update(actual, update, s);
  expect_lists_equal({expected_apply(param, update, 0.9, -0.3, false, 0)}, {actual}, "fixed factors", kRounding);

  s.step_device = at::full({}, 7.0, at::kDouble);
  at::Tensor untouched = param.clone();
  try {
    gpu::matrix_apply_update(untouched, update, s);
    ADD_FAILURE() << "a float64 device step counter was accepted";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("step counters on the device must be float32"), std::string::npos) << e.what();
  }
  EXPECT_TRUE(at::equal(param, untouched));
}

TEST(EmulatedCudaPsgdStore, HostAndDeviceCoefficientsMatchTheCpuStore) {
  for (const auto& c : apply_cases()) {
    if (c.dtype != at::kBFloat16 && c.dtype != at::kHalf) {
      continue;  // the store is for reduced-precision params
    }
    at::manual_seed(c.numel + 1);
    const at::Tensor param = make_tensor(c.numel, c.dtype, /*unaligned=*/false, /*positive=*/false);
    const at::Tensor update = at::randn({c.numel}, at::kFloat);
    const double decay = 1.0 - 1e-3, alpha = -2e-2;
    const uint64_t stream = kernels::cpu::rounding_stream(5, 3, 9.0);
    const at::Tensor expected = expected_apply(param, update, decay, alpha, c.stochastic_rounding, stream);
    at::Tensor host = clone_with_storage(param);
    gpu::psgd_apply_update_reduced(host, update, decay, alpha, c.stochastic_rounding, stream);
    expect_guards_intact({host}, "psgd store");
    const std::string label = std::string(c10::toString(c.dtype)) + " numel " + std::to_string(c.numel);
    expect_lists_equal({expected}, {host}, label, kRounding);
    at::Tensor device = clone_with_storage(param);
    const at::Tensor coefficients = at::tensor({decay, alpha}, at::kDouble);
    gpu::psgd_apply_update_reduced_device_coefficients(device, update, coefficients, c.stochastic_rounding, stream);
    expect_guards_intact({device}, "psgd store, device coefficients");
    expect_lists_equal({expected}, {device}, label + " (coefficients read on the device)", kRounding);
    EXPECT_TRUE(at::equal(host, device)) << label << ": host and device coefficients must give the same bits";
  }
}

}  // namespace
}  // namespace torchopt_ext::emulation_testing
