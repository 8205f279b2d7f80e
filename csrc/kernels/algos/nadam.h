// NAdam/NAdamW per-element math (the Algo of kernels/cpu/elementwise_apply.h),
// shared by the CPU kernel and the CUDA launcher so both run the same code.
#pragma once

#include <c10/macros/Macros.h>

#include <array>
#include <cmath>

#include "kernels/algos/elementwise_math.h"
#include "kernels/cpu/nadam.h"

namespace torchopt_ext::kernels {
inline namespace TORCHOPT_EXT_ALGO_ABI {

using cpu::NAdamHyperparams;

// One tensor's step t of torch's momentum-decay schedule: mu_t and
// mu_{t+1}, the mu-product advanced in its storage type T (float32 or
// float64: rounded as torch's in-place tensor-by-scalar multiply rounds it)
// and the tensor's scalars. The CPU (nadam_scalars) and the CUDA pre-kernel
// (device counters) both call it, so they advance the product alike.
template <typename T>
C10_HOST_DEVICE inline cpu::NAdamScalars nadam_advance(const NAdamHyperparams& hp, double lr, double step,
                                                       T& mu_product) {
  const double mu = hp.beta1 * (1.0 - 0.5 * ::pow(0.96, step * hp.momentum_decay));
  const double mu_next = hp.beta1 * (1.0 - 0.5 * ::pow(0.96, (step + 1.0) * hp.momentum_decay));
  mu_product = mu_product * static_cast<T>(mu);
  const double product = static_cast<double>(mu_product);
  const double product_next = product * mu_next;
  return {1.0 - ::pow(hp.beta2, step), -lr * (1.0 - mu) / (1.0 - product), (-lr * mu_next) / (1.0 - product_next)};
}

struct NAdamAlgo {
  static constexpr int kNumState = 2;  // exp_avg, exp_avg_sq
  using Hyper = NAdamHyperparams;
  using TensorScalars = cpu::NAdamScalars;  // from nadam_advance: on the host, or a CUDA pre-kernel

  template <typename S>
  struct Coeffs {
    S beta1_weight;
    S beta2;
    S one_minus_beta2;
    S weight_decay;
    S decay_factor;
    S bias_correction2;
    S eps;
    S grad_coeff;
    S exp_avg_coeff;
    bool decoupled;
    bool maximize;
    bool has_weight_decay;
  };

  template <typename S>
  C10_HOST_DEVICE static Coeffs<S> coeffs(const Hyper& hp, const TensorScalars& t) {
    return {static_cast<S>(1.0 - hp.beta1),
            static_cast<S>(hp.beta2),
            static_cast<S>(1.0 - hp.beta2),
            static_cast<S>(hp.weight_decay),
            static_cast<S>(1.0 - hp.lr * hp.weight_decay),
            static_cast<S>(t.bias_correction2),
            static_cast<S>(hp.eps),
            static_cast<S>(t.grad_coeff),
            static_cast<S>(t.exp_avg_coeff),
            hp.decoupled_weight_decay,
            hp.maximize,
            hp.weight_decay != 0.0};
  }

  template <typename V, typename S>
  C10_HOST_DEVICE static void update(const Coeffs<S>& c, V& param, V grad, std::array<V, kNumState>& state) {
    auto& [exp_avg, exp_avg_sq] = state;
    if (c.maximize) {
      grad = vneg(grad);
    }
    if (c.has_weight_decay) {
      if (c.decoupled) {
        param = param * V(c.decay_factor);
      } else {
        grad = grad + V(c.weight_decay) * param;
      }
    }
    exp_avg = vlerp(exp_avg, grad, c.beta1_weight);
    exp_avg_sq = exp_avg_sq * V(c.beta2) + V(c.one_minus_beta2) * grad * grad;
    const V denom = vsqrt(exp_avg_sq / V(c.bias_correction2)) + V(c.eps);
    param = param + V(c.grad_coeff) * grad / denom;
    param = param + V(c.exp_avg_coeff) * exp_avg / denom;
  }
};

}  // namespace TORCHOPT_EXT_ALGO_ABI
}  // namespace torchopt_ext::kernels
