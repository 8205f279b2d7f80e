#include <ATen/ATen.h>
#include <torch/library.h>

#include "torchopt_ext/common/newton_schulz.h"
#include "torchopt_ext/functional/muon.h"

namespace {

// The shared Newton-Schulz core as a functional op, for users and benchmarks.
at::Tensor newton_schulz_op(const at::Tensor& input, at::ArrayRef<double> coefficients, int64_t steps,
                            c10::string_view normalization, double eps, bool eps_clamp,
                            std::optional<at::ScalarType> dtype) {
  using namespace torchopt_ext::common;
  NewtonSchulzOptions options;
  options.coefficients = ns_coefficients_from_flat(coefficients.vec(), "coefficients");
  options.steps = steps;
  options.normalization = parse_ns_normalization(std::string(normalization), "normalization");
  options.eps = eps;
  options.eps_clamp = eps_clamp;
  options.dtype = dtype;
  return newton_schulz(input, options);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(torchopt_ext, m) {
  m.def(
      "muon_step_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] momentum_buffers, Tensor(d!)[] magma_scores, "
      "Tensor(e!)[] state_steps, "
      "Tensor lr, *, float weight_decay, float momentum, bool nesterov, float[] ns_coefficients, int ns_steps, "
      "float eps, str adjust_lr_fn, str ns_normalization='frobenius', ScalarType? ns_dtype=None, bool maximize=False, "
      "bool use_magma=False, float magma_p=0.5, float magma_tau=2.0, bool stochastic_rounding=False, int seed=0, "
      "Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  m.def(
      "newton_schulz(Tensor input, *, float[] coefficients=[3.4445, -4.775, 2.0315], int steps=5, "
      "str normalization='frobenius', float eps=1e-7, bool eps_clamp=True, ScalarType? dtype=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(torchopt_ext, CPU, m) {
  m.impl("muon_step_", &torchopt_ext::functional::muon_step_);
  m.impl("newton_schulz", &newton_schulz_op);
}
