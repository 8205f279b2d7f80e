// QHAdam per-element math (the Algo of kernels/cpu/elementwise_apply.h),
// shared by the CPU kernel and the CUDA launcher so both run the same code.
#pragma once

#include <c10/macros/Macros.h>

#include <array>
#include <cmath>

#include "kernels/algos/elementwise_math.h"
#include "kernels/cpu/qhadam.h"

namespace torchopt_ext::kernels {
inline namespace TORCHOPT_EXT_ALGO_ABI {

using cpu::QHAdamHyperparams;

struct QHAdamAlgo {
  static constexpr int kNumState = 2;  // exp_avg, exp_avg_sq (bias-corrected)
  using Hyper = QHAdamHyperparams;
  struct TensorScalars {
    double step;
  };

  template <typename S>
  struct Coeffs {
    S beta1_adj;
    S one_minus_beta1_adj;
    S beta2_adj;
    S one_minus_beta2_adj;
    S nu1;
    S one_minus_nu1;
    S nu2;
    S one_minus_nu2;
    S weight_decay;
    S decay_factor;
    S eps;
    S neg_lr;
    bool mix_grad;     // nu1 != 1
    bool mix_grad_sq;  // nu2 != 1
    bool decoupled;
    bool maximize;
    bool has_weight_decay;
  };

  // 1 - 1/w_t with w_t = 1 + beta w_{t-1}, w_0 = 0 (qhoptim's recursion),
  // in closed form: w_t = (1 - beta^t) / (1 - beta).
  C10_HOST_DEVICE static double adjusted_beta(double beta, double step) {
    return 1.0 - (1.0 - beta) / (1.0 - std::pow(beta, step));
  }

  template <typename S>
  C10_HOST_DEVICE static Coeffs<S> coeffs(const Hyper& hp, const TensorScalars& t) {
    const double beta1_adj = adjusted_beta(hp.beta1, t.step);
    const double beta2_adj = adjusted_beta(hp.beta2, t.step);
    return {static_cast<S>(beta1_adj),
            static_cast<S>(1.0 - beta1_adj),
            static_cast<S>(beta2_adj),
            static_cast<S>(1.0 - beta2_adj),
            static_cast<S>(hp.nu1),
            static_cast<S>(1.0 - hp.nu1),
            static_cast<S>(hp.nu2),
            static_cast<S>(1.0 - hp.nu2),
            static_cast<S>(hp.weight_decay),
            static_cast<S>(1.0 - hp.lr * hp.weight_decay),
            static_cast<S>(hp.eps),
            static_cast<S>(-hp.lr),
            hp.nu1 != 1.0,
            hp.nu2 != 1.0,
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
    const V grad_sq = grad * grad;
    exp_avg = exp_avg * V(c.beta1_adj) + V(c.one_minus_beta1_adj) * grad;
    exp_avg_sq = exp_avg_sq * V(c.beta2_adj) + V(c.one_minus_beta2_adj) * grad_sq;
    V average = exp_avg * V(c.nu1);
    if (c.mix_grad) {
      average = average + V(c.one_minus_nu1) * grad;
    }
    V rms = exp_avg_sq * V(c.nu2);
    if (c.mix_grad_sq) {
      rms = rms + V(c.one_minus_nu2) * grad_sq;
    }
    rms = vsqrt(rms) + V(c.eps);
    param = param + V(c.neg_lr) * average / rms;
  }
};

}  // namespace TORCHOPT_EXT_ALGO_ABI
}  // namespace torchopt_ext::kernels
