// Fused CPU SGD with momentum, dampening and Nesterov (classic.md §2), in
// torch.optim's single-tensor operation order.
#include "kernels/cpu/sgd.h"

#include "kernels/cpu/elementwise_apply.h"

namespace torchopt_ext::kernels::cpu {
namespace {

struct SGDAlgo {
  static constexpr int kNumState = 1;  // momentum_buffer (absent when momentum == 0)
  using Hyper = SGDHyperparams;
  struct TensorScalars {
    double step;
  };

  template <typename S>
  struct Coeffs {
    S neg_lr;
    S momentum;
    S one_minus_dampening;
    S weight_decay;
    bool has_momentum;
    bool first_step;  // the buffer starts as a copy of the gradient
    bool nesterov;
    bool maximize;
    bool has_weight_decay;
  };

  template <typename S>
  static Coeffs<S> coeffs(const Hyper& hp, const TensorScalars& t) {
    return {static_cast<S>(-hp.lr),
            static_cast<S>(hp.momentum),
            static_cast<S>(1.0 - hp.dampening),
            static_cast<S>(hp.weight_decay),
            hp.momentum != 0.0,
            t.step == 1.0,
            hp.nesterov,
            hp.maximize,
            hp.weight_decay != 0.0};
  }

  template <typename V, typename S>
  static void update(const Coeffs<S>& c, V& param, V grad, std::array<V, kNumState>& state) {
    auto& buffer = state[0];
    if (c.maximize) {
      grad = vneg(grad);
    }
    if (c.has_weight_decay) {
      grad = grad + V(c.weight_decay) * param;
    }
    if (c.has_momentum) {
      buffer = c.first_step ? grad : buffer * V(c.momentum) + V(c.one_minus_dampening) * grad;
      grad = c.nesterov ? grad + V(c.momentum) * buffer : buffer;
    }
    param = param + V(c.neg_lr) * grad;
  }
};

}  // namespace

void sgd_step(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
              const std::vector<double>& steps, const SGDHyperparams& hp, const ElementwiseOptions& options) {
  std::vector<SGDAlgo::TensorScalars> scalars(steps.size());
  for (size_t i = 0; i < steps.size(); ++i) {
    scalars[i].step = steps[i];
  }
  elementwise_step<SGDAlgo>("sgd_step_", params, grads, {momentum_buffers}, scalars, steps, hp, options);
}

}  // namespace torchopt_ext::kernels::cpu
