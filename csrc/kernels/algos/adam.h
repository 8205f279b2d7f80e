// Adam/AdamW per-element math (the Algo of kernels/cpu/elementwise_apply.h),
// shared by the CPU kernel and the CUDA launcher so both run the same code.
#pragma once

#include <c10/macros/Macros.h>

#include <array>
#include <cmath>

#include "kernels/algos/elementwise_math.h"
#include "kernels/cpu/adam.h"

namespace torchopt_ext::kernels {
inline namespace TORCHOPT_EXT_ALGO_ABI {

using cpu::AdamHyperparams;

struct AdamAlgo {
  static constexpr int kNumState = 3;  // exp_avg, exp_avg_sq, max_exp_avg_sq
  using Hyper = AdamHyperparams;
  struct TensorScalars {
    double step;
  };

  // Constants rounded to the math type exactly as torch rounds the Python
  // floats it passes to its tensor ops.
  template <typename S>
  struct Coeffs {
    S beta1_weight;  // 1 - beta1, the lerp weight
    S beta2;
    S one_minus_beta2;
    S weight_decay;
    S decay_factor;  // 1 - lr * weight_decay (decoupled)
    S bias_correction2_sqrt;
    S eps;
    S neg_step_size;  // -lr / (1 - beta1^t)
    bool decoupled;
    bool amsgrad;
    bool maximize;
    bool has_weight_decay;
  };

  template <typename S>
  C10_HOST_DEVICE static Coeffs<S> coeffs(const Hyper& hp, const TensorScalars& t) {
    const double bias_correction1 = 1.0 - std::pow(hp.beta1, t.step);
    const double bias_correction2 = 1.0 - std::pow(hp.beta2, t.step);
    return {static_cast<S>(1.0 - hp.beta1),
            static_cast<S>(hp.beta2),
            static_cast<S>(1.0 - hp.beta2),
            static_cast<S>(hp.weight_decay),
            static_cast<S>(1.0 - hp.lr * hp.weight_decay),
            static_cast<S>(std::sqrt(bias_correction2)),
            static_cast<S>(hp.eps),
            static_cast<S>(-(hp.lr / bias_correction1)),
            hp.decoupled_weight_decay,
            hp.amsgrad,
            hp.maximize,
            hp.weight_decay != 0.0};
  }

  template <typename V, typename S>
  C10_HOST_DEVICE static void update(const Coeffs<S>& c, V& param, V grad, std::array<V, kNumState>& state) {
    auto& [exp_avg, exp_avg_sq, max_exp_avg_sq] = state;
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
    V second_moment = exp_avg_sq;
    if (c.amsgrad) {
      max_exp_avg_sq = vmaximum(max_exp_avg_sq, exp_avg_sq);
      second_moment = max_exp_avg_sq;
    }
    const V denom = vsqrt(second_moment) / V(c.bias_correction2_sqrt) + V(c.eps);
    param = param + V(c.neg_step_size) * exp_avg / denom;
  }
};

}  // namespace TORCHOPT_EXT_ALGO_ABI
}  // namespace torchopt_ext::kernels
