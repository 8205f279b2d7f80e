#include <torch/library.h>

#include "torchopt_ext/functional/mars.h"

TORCH_LIBRARY_FRAGMENT(torchopt_ext, m) {
  m.def(
      "mars_step_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, Tensor(d!)[] exp_avg_sqs, "
      "Tensor(e!)[] max_exp_avg_sqs, Tensor(f!)[] last_grads, Tensor(g!)[] state_steps, Tensor lr, *, float beta1, "
      "float beta2, float eps, float weight_decay, float gamma, str mars_type, bool amsgrad, bool maximize, "
      "bool stochastic_rounding=False, int seed=0, Tensor? grad_scale=None, Tensor? found_inf=None, "
      "Tensor? norm_sqs=None, bool is_approx=True, ScalarType? ns_dtype=None) -> ()");
  // Stage 1 of a sharded step: per-param squared norms, read-only.
  m.def(
      "mars_norm_sqs(Tensor[] params, Tensor[] grads, Tensor[] exp_avgs, Tensor[] exp_avg_sqs, "
      "Tensor[] max_exp_avg_sqs, Tensor[] last_grads, Tensor[] state_steps, Tensor lr, *, float beta1, "
      "float beta2, float eps, float weight_decay, float gamma, str mars_type, bool amsgrad, bool maximize, "
      "Tensor? grad_scale=None, Tensor? found_inf=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(torchopt_ext, CPU, m) {
  m.impl("mars_step_", &torchopt_ext::functional::mars_step_);
  m.impl("mars_norm_sqs", &torchopt_ext::functional::mars_norm_sqs);
}
