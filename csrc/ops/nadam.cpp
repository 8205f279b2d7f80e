#include <torch/library.h>

#include "torchopt_ext/functional/nadam.h"

TORCH_LIBRARY_FRAGMENT(torchopt_ext, m) {
  m.def(
      "nadam_step_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, Tensor(d!)[] exp_avg_sqs, "
      "Tensor(e!)[] mu_products, Tensor(f!)[] state_steps, Tensor lr, *, float beta1, float beta2, float eps, "
      "float weight_decay, float momentum_decay, bool decoupled_weight_decay, bool maximize, "
      "bool stochastic_rounding=False, int seed=0, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
}

TORCH_LIBRARY_IMPL(torchopt_ext, CPU, m) { m.impl("nadam_step_", &torchopt_ext::functional::nadam_step_); }
