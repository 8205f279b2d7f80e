#include <torch/library.h>

#include "torchopt_ext/functional/sophia.h"

TORCH_LIBRARY_FRAGMENT(torchopt_ext, m) {
  m.def(
      "sophia_step_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, Tensor[] hessians, "
      "Tensor(d!)[] state_steps, Tensor lr, *, float beta1, float gamma, float eps, float weight_decay, "
      "str eps_mode, bool maximize, bool stochastic_rounding=False, int seed=0, Tensor? grad_scale=None, "
      "Tensor? found_inf=None) -> ()");
  m.def("sophia_update_hessian_(Tensor(a!)[] hessians, Tensor[] estimates, *, float beta2) -> ()");
}

TORCH_LIBRARY_IMPL(torchopt_ext, CPU, m) {
  m.impl("sophia_step_", &torchopt_ext::functional::sophia_step_);
  m.impl("sophia_update_hessian_", &torchopt_ext::functional::sophia_update_hessian_);
}
