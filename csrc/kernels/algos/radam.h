// RAdam per-element math (the Algo of kernels/cpu/elementwise_apply.h),
// shared by the CPU kernel and the CUDA launcher so both run the same code.
#pragma once

#include <c10/macros/Macros.h>

#include <array>
#include <cmath>

#include "kernels/algos/elementwise_math.h"
#include "kernels/cpu/radam.h"

namespace torchopt_ext::kernels {
inline namespace TORCHOPT_EXT_ALGO_ABI {

using cpu::RAdamHyperparams;

struct RAdamAlgo {
  static constexpr int kNumState = 2;  // exp_avg, exp_avg_sq
  using Hyper = RAdamHyperparams;
  struct TensorScalars {
    double step;
  };

  template <typename S>
  struct Coeffs {
    S beta1_weight;
    S beta2;
    S one_minus_beta2;
    S weight_decay;
    S decay_factor;
    S bias_correction1;
    S lr;
    S eps;
    S bias_correction2_sqrt;
    S rect;
    bool rectified;
    bool decoupled;
    bool maximize;
    bool has_weight_decay;
  };

  template <typename S>
  C10_HOST_DEVICE static Coeffs<S> coeffs(const Hyper& hp, const TensorScalars& t) {
    const double bias_correction1 = 1.0 - std::pow(hp.beta1, t.step);
    const double bias_correction2 = 1.0 - std::pow(hp.beta2, t.step);
    const double rho_inf = 2.0 / (1.0 - hp.beta2) - 1.0;
    const double rho_t = rho_inf - 2.0 * t.step * std::pow(hp.beta2, t.step) / bias_correction2;
    const bool rectified = rho_t > 5.0;
    const double rect =
        rectified ? std::sqrt((rho_t - 4.0) * (rho_t - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t))
                  : 1.0;
    return {static_cast<S>(1.0 - hp.beta1),
            static_cast<S>(hp.beta2),
            static_cast<S>(1.0 - hp.beta2),
            static_cast<S>(hp.weight_decay),
            static_cast<S>(1.0 - hp.lr * hp.weight_decay),
            static_cast<S>(bias_correction1),
            static_cast<S>(hp.lr),
            static_cast<S>(hp.eps),
            static_cast<S>(std::sqrt(bias_correction2)),
            static_cast<S>(rect),
            rectified,
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
    const V corrected = exp_avg / V(c.bias_correction1);
    if (c.rectified) {
      // torch evaluates `scalar / tensor` as reciprocal(tensor) * scalar.
      const V adaptive_lr = V(S(1)) / (vsqrt(exp_avg_sq) + V(c.eps)) * V(c.bias_correction2_sqrt);
      param = param - corrected * V(c.lr) * adaptive_lr * V(c.rect);
    } else {
      param = param - corrected * V(c.lr);
    }
  }
};

}  // namespace TORCHOPT_EXT_ALGO_ABI
}  // namespace torchopt_ext::kernels
