// Fused CPU NAdam / NAdamW (Dozat 2016 with torch's momentum-decay schedule;
// classic.md §4), in torch.optim.NAdam's single-tensor operation order.
#include "kernels/cpu/nadam.h"

#include <cmath>

#include "kernels/algos/nadam.h"
#include "kernels/cpu/elementwise_apply.h"

namespace torchopt_ext::kernels::cpu {

std::vector<NAdamScalars> nadam_scalars(at::TensorList mu_products, const std::vector<double>& steps,
                                        const NAdamHyperparams& hp) {
  std::vector<NAdamScalars> scalars(steps.size());
  for (size_t i = 0; i < steps.size(); ++i) {
    if (mu_products[i].scalar_type() == at::kDouble) {
      scalars[i] = nadam_advance(hp, hp.lr, steps[i], *static_cast<double*>(mu_products[i].data_ptr()));
    } else {
      scalars[i] = nadam_advance(hp, hp.lr, steps[i], *static_cast<float*>(mu_products[i].data_ptr()));
    }
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
