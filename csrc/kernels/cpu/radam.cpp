// Fused CPU RAdam (Liu et al. 2020; classic.md §5), in torch.optim.RAdam's
// single-tensor operation order: un-adapted momentum SGD until the variance
// rectification term is defined (rho_t > 5), rectified Adam after.
#include "kernels/cpu/radam.h"

#include <cmath>

#include "kernels/cpu/elementwise_apply.h"

namespace torchopt_ext::kernels::cpu {
namespace {

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
  static Coeffs<S> coeffs(const Hyper& hp, const TensorScalars& t) {
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
  static void update(const Coeffs<S>& c, V& param, V grad, std::array<V, kNumState>& state) {
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

}  // namespace

void radam_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                const std::vector<double>& steps, const RAdamHyperparams& hp, const ElementwiseOptions& options) {
  std::vector<RAdamAlgo::TensorScalars> scalars(steps.size());
  for (size_t i = 0; i < steps.size(); ++i) {
    scalars[i].step = steps[i];
  }
  elementwise_step<RAdamAlgo>("radam_step_", params, grads, {exp_avgs, exp_avg_sqs}, scalars, steps, hp, options);
}

}  // namespace torchopt_ext::kernels::cpu
