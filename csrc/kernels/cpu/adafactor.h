#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

#include "kernels/cpu/elementwise_options.h"

namespace torchopt_ext::kernels::cpu {

struct AdafactorHyperparams {
  double lr;
  double beta2_decay;
  std::optional<double> eps1;  // nullopt: finfo(param dtype).eps, per param (torch)
  double eps2;
  double d;
  double weight_decay;
  std::optional<double> beta1;
  bool relative_step;
  bool scale_parameter;
  bool warmup_init;
  bool maximize;
};

// Fused CPU Adafactor (classic.md §8, torch.optim.Adafactor's math) over one
// param group of contiguous tensors. Params with dim >= 2 are factored over
// their last two dims and take the next entries of row_vars / col_vars (in
// param order); the others take the next entry of variances. exp_avgs is
// empty, or one per param when beta1 is set. Three passes per tensor:
// ||theta|| with the row/col sums of g^2 (one read of g), then RMS(U), then
// the update; every sum is reduced in a fixed order, so results do not depend
// on the thread count.
void adafactor_step(at::TensorList params, at::TensorList grads, at::TensorList row_vars, at::TensorList col_vars,
                    at::TensorList variances, at::TensorList exp_avgs, const std::vector<double>& steps,
                    const AdafactorHyperparams& hp, const ElementwiseOptions& options);

}  // namespace torchopt_ext::kernels::cpu
