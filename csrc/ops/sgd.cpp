#include <torch/library.h>

#include "torchopt_ext/functional/sgd.h"

TORCH_LIBRARY_FRAGMENT(torchopt_ext, m) {
  m.def(
      "sgd_step_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] momentum_buffers, "
      "Tensor(d!)[] state_steps, Tensor lr, *, float momentum, float dampening, float weight_decay, "
      "bool nesterov, bool maximize, bool stochastic_rounding=False, int seed=0, Tensor? grad_scale=None, "
      "Tensor? found_inf=None) -> ()");
}

TORCH_LIBRARY_IMPL(torchopt_ext, CPU, m) { m.impl("sgd_step_", &torchopt_ext::functional::sgd_step_); }
