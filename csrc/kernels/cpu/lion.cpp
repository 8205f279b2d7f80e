// Fused CPU Lion (Chen et al. 2023; classic.md §9), in lion-pytorch's order:
// decay, signed interpolated update, then the momentum EMA.
#include "kernels/cpu/lion.h"

#include "kernels/cpu/elementwise_apply.h"

namespace torchopt_ext::kernels::cpu {
namespace {

struct LionAlgo {
  static constexpr int kNumState = 1;  // exp_avg
  using Hyper = LionHyperparams;
  struct TensorScalars {};

  template <typename S>
  struct Coeffs {
    S decay_factor;  // 1 - lr * weight_decay
    S beta1;
    S one_minus_beta1;
    S beta2;
    S one_minus_beta2;
    S neg_lr;
    bool maximize;
  };

  template <typename S>
  static Coeffs<S> coeffs(const Hyper& hp, const TensorScalars&) {
    return {static_cast<S>(1.0 - hp.lr * hp.weight_decay),
            static_cast<S>(hp.beta1),
            static_cast<S>(1.0 - hp.beta1),
            static_cast<S>(hp.beta2),
            static_cast<S>(1.0 - hp.beta2),
            static_cast<S>(-hp.lr),
            hp.maximize};
  }

  template <typename V, typename S>
  static void update(const Coeffs<S>& c, V& param, V grad, std::array<V, kNumState>& state) {
    auto& exp_avg = state[0];
    if (c.maximize) {
      grad = vneg(grad);
    }
    param = param * V(c.decay_factor);
    const V direction = vsign(exp_avg * V(c.beta1) + V(c.one_minus_beta1) * grad);
    param = param + V(c.neg_lr) * direction;
    exp_avg = exp_avg * V(c.beta2) + V(c.one_minus_beta2) * grad;
  }
};

}  // namespace

void lion_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, const std::vector<double>& steps,
               const LionHyperparams& hp, const ElementwiseOptions& options) {
  const std::vector<LionAlgo::TensorScalars> scalars(steps.size());
  elementwise_step<LionAlgo>("lion_step_", params, grads, {exp_avgs}, scalars, steps, hp, options);
}

}  // namespace torchopt_ext::kernels::cpu
