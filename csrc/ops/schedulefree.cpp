#include <torch/library.h>

#include "torchopt_ext/functional/schedulefree.h"

TORCH_LIBRARY_FRAGMENT(torchopt_ext, m) {
  m.def(
      "schedulefree_adamw_step_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] zs, Tensor(d!)[] exp_avg_sqs, "
      "Tensor(e!)[] weight_sums, Tensor(f!)[] lr_maxes, Tensor(g!)[] state_steps, Tensor lr, *, float beta1, "
      "float beta2, float eps, float weight_decay, int warmup_steps, float r, float weight_lr_power, "
      "bool stochastic_rounding=False, int seed=0, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  m.def(
      "schedulefree_sgd_step_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] zs, Tensor(d!)[] weight_sums, "
      "Tensor(e!)[] lr_maxes, Tensor(f!)[] state_steps, Tensor lr, *, float momentum, float weight_decay, "
      "int warmup_steps, float r, float weight_lr_power, bool stochastic_rounding=False, int seed=0, "
      "Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  m.def("schedulefree_set_mode_(Tensor(a!)[] params, Tensor[] zs, *, float beta, bool to_eval) -> ()");
  m.def(
      "schedulefree_wrapper_pre_(Tensor(a!)[] params, Tensor(b!)[] zs, Tensor sf_state, Tensor lr, *, "
      "float weight_decay_at_y=0., float adamc_weight_decay=0.) -> ()");
  m.def(
      "schedulefree_wrapper_post_(Tensor(a!)[] params, Tensor(b!)[] zs, Tensor(c!) sf_state, Tensor lr, *, "
      "str weighting_mode, float b1, float r=0., float weight_lr_power=2., bool use_lr_max=False, int c_warmup=0, "
      "int b1_anneal_steps=0, float b1_max=0.965) -> ()");
  m.def(
      "schedulefree_polyak_(Tensor[] params, Tensor[] grads, Tensor[] zs, Tensor(a!) polyak_state, Tensor loss, "
      "Tensor sf_state, *, float b1, int b1_anneal_steps=0, float b1_max=0.965, float f_star=0., "
      "float polyak_beta=0., float polyak_eps=1e-30) -> ()");
}

TORCH_LIBRARY_IMPL(torchopt_ext, CPU, m) {
  m.impl("schedulefree_adamw_step_", &torchopt_ext::functional::schedulefree_adamw_step_);
  m.impl("schedulefree_sgd_step_", &torchopt_ext::functional::schedulefree_sgd_step_);
  m.impl("schedulefree_set_mode_", &torchopt_ext::functional::schedulefree_set_mode_);
  m.impl("schedulefree_wrapper_pre_", &torchopt_ext::functional::schedulefree_wrapper_pre_);
  m.impl("schedulefree_wrapper_post_", &torchopt_ext::functional::schedulefree_wrapper_post_);
  m.impl("schedulefree_polyak_", &torchopt_ext::functional::schedulefree_polyak_);
}
