// Fused CPU Adam/AdamW (classic.md §3), written in torch.optim's
// single-tensor operation order so results match it to rounding.
#include "kernels/cpu/adam.h"

#include <cmath>

#include "kernels/algos/adam.h"
#include "kernels/cpu/elementwise_apply.h"

namespace torchopt_ext::kernels::cpu {

void adam_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
               at::TensorList max_exp_avg_sqs, const std::vector<double>& steps, const AdamHyperparams& hp,
               const ElementwiseOptions& options) {
  std::vector<AdamAlgo::TensorScalars> scalars(steps.size());
  for (size_t i = 0; i < steps.size(); ++i) {
    scalars[i].step = steps[i];
  }
  elementwise_step<AdamAlgo>("adam_step_", params, grads, {exp_avgs, exp_avg_sqs, max_exp_avg_sqs}, scalars, steps, hp,
                             options);
}

}  // namespace torchopt_ext::kernels::cpu
