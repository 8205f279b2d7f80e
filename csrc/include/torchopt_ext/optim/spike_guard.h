// A spike guard for any torch::optim::Optimizer, built on the clipping core
// (common::raw_global_clip, rollfast.md §2.3 steps 1 and 6 / §3.3 step 1):
// before each step the global L2 norm of all the optimizer's gradients is
// taken; above max_norm the gradients are scaled to it (permissive) or the
// step is skipped entirely (strict: the base optimizer's step() is not called,
// so none of its state moves).
//
// The decision is read on the host: the LibTorch optimizers run on CPU
// tensors, where that read is no device sync. (Python's SpikeGuard skips on
// the device instead, through the found_inf argument of our fused ops.)
#pragma once

#include <torch/arg.h>
#include <torch/optim/optimizer.h>

#include <memory>

namespace torchopt_ext::optim {

struct SpikeGuardOptions {
  explicit SpikeGuardOptions(double max_norm) : max_norm_(max_norm) {}
  TORCH_ARG(double, max_norm);  // > 0
  // true: clip and step; false: skip the step on a spike (the grads are clipped either way).
  TORCH_ARG(bool, permissive) = true;
};

class SpikeGuard {
 public:
  SpikeGuard(std::shared_ptr<torch::optim::Optimizer> optimizer, SpikeGuardOptions options);

  // Runs the closure (if any), clips, then steps the optimizer unless skipped.
  at::Tensor step(torch::optim::Optimizer::LossClosure closure = nullptr);
  void zero_grad(bool set_to_none = true) { optimizer_->zero_grad(set_to_none); }

  torch::optim::Optimizer& optimizer() { return *optimizer_; }
  const SpikeGuardOptions& options() const { return options_; }
  // Whether the last step saw a spike and whether it was skipped.
  bool last_spike() const { return last_spike_; }
  bool last_skipped() const { return last_skipped_; }
  int64_t num_spikes() const { return num_spikes_; }
  int64_t num_skipped() const { return num_skipped_; }

 private:
  std::shared_ptr<torch::optim::Optimizer> optimizer_;
  SpikeGuardOptions options_;
  bool last_spike_ = false;
  bool last_skipped_ = false;
  int64_t num_spikes_ = 0;
  int64_t num_skipped_ = 0;
};

}  // namespace torchopt_ext::optim
