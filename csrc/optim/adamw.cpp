#include "torchopt_ext/optim/adamw.h"

namespace torchopt_ext::optim {

AdamW::AdamW(const std::vector<torch::optim::OptimizerParamGroup>& param_groups, AdamOptions defaults)
    : Adam(param_groups, std::move(defaults)) {
  always_decoupled_ = true;
}

AdamW::AdamW(std::vector<at::Tensor> params, AdamOptions defaults)
    : AdamW(std::vector<torch::optim::OptimizerParamGroup>{torch::optim::OptimizerParamGroup(std::move(params))},
            std::move(defaults)) {}

}  // namespace torchopt_ext::optim
