// torchopt_ext::optim::AdamW: Adam with decoupled weight decay
// (theta <- theta * (1 - lr * weight_decay) before the update), as torch.optim.AdamW.
#pragma once

#include <vector>

#include "torchopt_ext/optim/adam.h"

namespace torchopt_ext::optim {

class AdamW : public Adam {
 public:
  explicit AdamW(const std::vector<torch::optim::OptimizerParamGroup>& param_groups,
                 AdamOptions defaults = AdamWOptions());
  explicit AdamW(std::vector<at::Tensor> params, AdamOptions defaults = AdamWOptions());
};

}  // namespace torchopt_ext::optim
