#include <torch/library.h>

#include "torchopt_ext/functional/lion.h"

TORCH_LIBRARY_FRAGMENT(torchopt_ext, m) {
  m.def(
      "lion_step_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, Tensor(d!)[] state_steps, "
      "Tensor lr, *, float beta1, float beta2, float weight_decay, bool maximize, bool stochastic_rounding=False, "
      "int seed=0, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
}

TORCH_LIBRARY_IMPL(torchopt_ext, CPU, m) { m.impl("lion_step_", &torchopt_ext::functional::lion_step_); }
