#include "torchopt_ext/optim/spike_guard.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/utils.h>

#include <cmath>
#include <vector>

#include "torchopt_ext/common/clipping.h"

namespace torchopt_ext::optim {

SpikeGuard::SpikeGuard(std::shared_ptr<torch::optim::Optimizer> optimizer, SpikeGuardOptions options)
    : optimizer_(std::move(optimizer)), options_(options) {
  TORCH_CHECK_VALUE(optimizer_ != nullptr, "SpikeGuard: optimizer must not be null");
  TORCH_CHECK_VALUE(std::isfinite(options_.max_norm()) && options_.max_norm() > 0.0,
                    "SpikeGuard: max_norm must be > 0, got ", options_.max_norm());
}

at::Tensor SpikeGuard::step(torch::optim::Optimizer::LossClosure closure) {
  at::Tensor loss;
  if (closure) {
    at::AutoGradMode enable_grad(true);
    loss = closure();
  }
  torch::NoGradGuard no_grad;
  std::vector<at::Tensor> grads;
  for (auto& group : optimizer_->param_groups()) {
    for (auto& p : group.params()) {
      if (p.grad().defined()) {
        grads.push_back(p.mutable_grad());
      }
    }
  }
  const at::Tensor spike = common::raw_global_clip_on_device_(grads, options_.max_norm());
  // One host read of a CPU scalar (see the header).
  last_spike_ = spike.item<bool>();
  last_skipped_ = last_spike_ && !options_.permissive();
  num_spikes_ += last_spike_ ? 1 : 0;
  num_skipped_ += last_skipped_ ? 1 : 0;
  if (!last_skipped_) {
    optimizer_->step();
  }
  return loss;
}

}  // namespace torchopt_ext::optim
