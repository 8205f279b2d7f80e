#include <ATen/ATen.h>
#include <torch/library.h>

#include "torchopt_ext/functional/soap.h"

TORCH_LIBRARY_FRAGMENT(torchopt_ext, m) {
  m.def(
      "soap_step_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, Tensor(d!)[] exp_avg_sqs, "
      "Tensor(e!)[] GGs, Tensor(f!)[] Qs, Tensor(g!)[] state_steps, Tensor lr, *, float beta1, float beta2, "
      "float shampoo_beta, float eps, float weight_decay, int precondition_frequency, int max_precond_dim, "
      "bool merge_dims, bool precondition_1d, bool normalize_grads, str data_format, bool correct_bias, "
      "bool stochastic_rounding=False, int seed=0, Tensor? grad_scale=None, Tensor? found_inf=None, "
      "bool? batch_equal_shapes=None) -> ()");
}

TORCH_LIBRARY_IMPL(torchopt_ext, CPU, m) { m.impl("soap_step_", &torchopt_ext::functional::soap_step_); }
