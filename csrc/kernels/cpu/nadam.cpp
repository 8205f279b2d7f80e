// Fused CPU NAdam / NAdamW (Dozat 2016 with torch's momentum-decay schedule;
// classic.md §4), in torch.optim.NAdam's single-tensor operation order.
#include "kernels/cpu/nadam.h"

#include <cmath>

#include "kernels/cpu/elementwise_apply.h"

namespace torchopt_ext::kernels::cpu {
namespace {

struct NAdamAlgo {
  static constexpr int kNumState = 2;  // exp_avg, exp_avg_sq
  using Hyper = NAdamHyperparams;
  struct TensorScalars {
    double bias_correction2;
    double grad_coeff;     // -lr (1 - mu_t) / (1 - prod_{i<=t} mu_i)
    double exp_avg_coeff;  // -lr mu_{t+1} / (1 - prod_{i<=t+1} mu_i)
  };

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
  static Coeffs<S> coeffs(const Hyper& hp, const TensorScalars& t) {
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
    const V denom = vsqrt(exp_avg_sq / V(c.bias_correction2)) + V(c.eps);
    param = param + V(c.grad_coeff) * grad / denom;
    param = param + V(c.exp_avg_coeff) * exp_avg / denom;
  }
};

// mu_product *= mu, rounded in the product tensor's dtype as torch's
// in-place tensor-by-scalar multiply rounds it.
double advance_mu_product(const at::Tensor& mu_product, double mu) {
  if (mu_product.scalar_type() == at::kDouble) {
    auto* value = static_cast<double*>(mu_product.data_ptr());
    *value *= mu;
    return *value;
  }
  auto* value = static_cast<float*>(mu_product.data_ptr());
  *value = *value * static_cast<float>(mu);
  return *value;
}

}  // namespace

void nadam_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                at::TensorList mu_products, const std::vector<double>& steps, const NAdamHyperparams& hp,
                const ElementwiseOptions& options) {
  std::vector<NAdamAlgo::TensorScalars> scalars(steps.size());
  for (size_t i = 0; i < steps.size(); ++i) {
    const double step = steps[i];
    const double mu = hp.beta1 * (1.0 - 0.5 * std::pow(0.96, step * hp.momentum_decay));
    const double mu_next = hp.beta1 * (1.0 - 0.5 * std::pow(0.96, (step + 1.0) * hp.momentum_decay));
    const double mu_product = advance_mu_product(mu_products[i], mu);
    const double mu_product_next = mu_product * mu_next;
    scalars[i] = {1.0 - std::pow(hp.beta2, step), -hp.lr * (1.0 - mu) / (1.0 - mu_product),
                  (-hp.lr * mu_next) / (1.0 - mu_product_next)};
  }
  elementwise_step<NAdamAlgo>("nadam_step_", params, grads, {exp_avgs, exp_avg_sqs}, scalars, steps, hp, options);
}

}  // namespace torchopt_ext::kernels::cpu
