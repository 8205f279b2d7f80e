#include <torch/library.h>

#include "torchopt_ext/functional/adafactor.h"

// row_vars/col_vars: one entry per param with dim >= 2 (in param order);
// variances: one per other param; exp_avgs: empty, or one per param with beta1.
TORCH_LIBRARY_FRAGMENT(torchopt_ext, m) {
  m.def(
      "adafactor_step_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] row_vars, Tensor(d!)[] col_vars, "
      "Tensor(e!)[] variances, Tensor(f!)[] exp_avgs, Tensor(g!)[] state_steps, Tensor lr, *, float beta2_decay, "
      "float? eps1, float eps2, float d, float weight_decay, float? beta1, bool relative_step, "
      "bool scale_parameter, bool warmup_init, bool maximize, bool stochastic_rounding=False, int seed=0, "
      "Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  // The same step in three stages (stats: one float64 buffer per param, summed
  // across shards by the caller between stages; see functional/adafactor.h).
  m.def(
      "adafactor_stage_(int stage, Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] row_vars, "
      "Tensor(d!)[] col_vars, Tensor(e!)[] variances, Tensor(f!)[] exp_avgs, Tensor(g!)[] state_steps, Tensor lr, "
      "Tensor(h!)[] stats, *, float beta2_decay, float? eps1, float eps2, float d, float weight_decay, float? beta1, "
      "bool relative_step, bool scale_parameter, bool warmup_init, bool maximize, bool stochastic_rounding=False, "
      "int seed=0, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
}

TORCH_LIBRARY_IMPL(torchopt_ext, CPU, m) {
  m.impl("adafactor_step_", &torchopt_ext::functional::adafactor_step_);
  m.impl("adafactor_stage_", &torchopt_ext::functional::adafactor_stage_);
}
