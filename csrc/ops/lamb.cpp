#include <torch/library.h>

#include "torchopt_ext/functional/lamb.h"

TORCH_LIBRARY_FRAGMENT(torchopt_ext, m) {
  m.def(
      "lamb_step_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, Tensor(d!)[] exp_avg_sqs, "
      "Tensor(e!)[] state_steps, Tensor lr, *, float beta1, float beta2, float eps, float weight_decay, "
      "bool bias_correction, bool grad_averaging, bool trust_clip, bool always_adapt, bool decoupled_decay, "
      "bool maximize, Tensor? grad_divisor=None, bool stochastic_rounding=False, int seed=0, "
      "Tensor? grad_scale=None, Tensor? found_inf=None, Tensor? norm_sqs=None) -> ()");
  // Stage 1 of a sharded step: per-param squared norms, read-only.
  m.def(
      "lamb_norm_sqs(Tensor[] params, Tensor[] grads, Tensor[] exp_avgs, Tensor[] exp_avg_sqs, "
      "Tensor[] state_steps, Tensor lr, *, float beta1, float beta2, float eps, float weight_decay, "
      "bool bias_correction, bool grad_averaging, bool trust_clip, bool always_adapt, bool decoupled_decay, "
      "bool maximize, Tensor? grad_divisor=None, Tensor? grad_scale=None, Tensor? found_inf=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(torchopt_ext, CPU, m) {
  m.impl("lamb_step_", &torchopt_ext::functional::lamb_step_);
  m.impl("lamb_norm_sqs", &torchopt_ext::functional::lamb_norm_sqs);
}
