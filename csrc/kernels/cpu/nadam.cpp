// Fused CPU NAdam / NAdamW (Dozat 2016 with torch's momentum-decay schedule;
// classic.md §4), in torch.optim.NAdam's single-tensor operation order.
#include "kernels/cpu/nadam.h"

#include <cmath>

#include "kernels/algos/nadam.h"
#include "kernels/cpu/elementwise_apply.h"

namespace torchopt_ext::kernels::cpu {
namespace {

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

std::vector<NAdamScalars> nadam_scalars(at::TensorList mu_products, const std::vector<double>& steps,
                                        const NAdamHyperparams& hp) {
  std::vector<NAdamScalars> scalars(steps.size());
  for (size_t i = 0; i < steps.size(); ++i) {
    const double step = steps[i];
    const double mu = hp.beta1 * (1.0 - 0.5 * std::pow(0.96, step * hp.momentum_decay));
    const double mu_next = hp.beta1 * (1.0 - 0.5 * std::pow(0.96, (step + 1.0) * hp.momentum_decay));
    const double mu_product = advance_mu_product(mu_products[i], mu);
    const double mu_product_next = mu_product * mu_next;
    scalars[i] = {1.0 - std::pow(hp.beta2, step), -hp.lr * (1.0 - mu) / (1.0 - mu_product),
                  (-hp.lr * mu_next) / (1.0 - mu_product_next)};
  }
  return scalars;
}

void nadam_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                at::TensorList mu_products, const std::vector<double>& steps, const NAdamHyperparams& hp,
                const ElementwiseOptions& options) {
  const auto scalars = nadam_scalars(mu_products, steps, hp);
  elementwise_step<NAdamAlgo>("nadam_step_", params, grads, {exp_avgs, exp_avg_sqs}, scalars, steps, hp, options);
}

}  // namespace torchopt_ext::kernels::cpu
