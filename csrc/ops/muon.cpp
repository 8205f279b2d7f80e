#include <ATen/ATen.h>
#include <torch/library.h>

#include "torchopt_ext/common/newton_schulz.h"
#include "torchopt_ext/functional/muon.h"

namespace {

// The shared Newton-Schulz core as a functional op, for users and benchmarks.
at::Tensor newton_schulz_op(const at::Tensor& input, at::ArrayRef<double> coefficients, int64_t steps,
                            c10::string_view normalization, double eps, bool eps_clamp,
                            std::optional<at::ScalarType> dtype, c10::string_view preset) {
  using namespace torchopt_ext::common;
  NewtonSchulzOptions options;
  options.steps = steps;
  options.coefficients = resolve_ns_coefficients(std::string(preset), coefficients.vec(), steps, "coefficients");
  options.normalization = parse_ns_normalization(std::string(normalization), "normalization");
  options.eps = eps;
  options.eps_clamp = eps_clamp;
  options.dtype = dtype;
  return newton_schulz(input, options);
}

// A named coefficient preset as a float64 (rows, 3) table.
at::Tensor ns_coefficient_table_op(c10::string_view preset, int64_t steps) {
  const auto rows = torchopt_ext::common::ns_coefficients_preset(std::string(preset), steps, "preset");
  at::Tensor table = at::empty({static_cast<int64_t>(rows.size()), 3}, at::kDouble);
  auto acc = table.accessor<double, 2>();
  for (size_t i = 0; i < rows.size(); ++i) {
    for (size_t j = 0; j < 3; ++j) {
      acc[static_cast<int64_t>(i)][static_cast<int64_t>(j)] = rows[i][j];
    }
  }
  return table;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(torchopt_ext, m) {
  m.def(
      "muon_step_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] momentum_buffers, Tensor(d!)[] magma_scores, "
      "Tensor(e!)[] state_steps, "
      "Tensor lr, *, float weight_decay, float momentum, bool nesterov, float[] ns_coefficients, int ns_steps, "
      "float eps, str adjust_lr_fn, str ns_normalization='frobenius', str ns_preset='', int[] matrix_dims=[], "
      "ScalarType? ns_dtype=None, bool maximize=False, "
      "bool use_magma=False, float magma_p=0.5, float magma_tau=2.0, bool stochastic_rounding=False, int seed=0, "
      "Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  m.def(
      "newton_schulz(Tensor input, *, float[] coefficients=[3.4445, -4.775, 2.0315], int steps=5, "
      "str normalization='frobenius', float eps=1e-7, bool eps_clamp=True, ScalarType? dtype=None, "
      "str preset='') -> Tensor");
  // No tensor arguments: a catch-all kernel.
  m.def("ns_coefficient_table(str preset, int steps) -> Tensor", &ns_coefficient_table_op);
}

TORCH_LIBRARY_IMPL(torchopt_ext, CPU, m) {
  m.impl("muon_step_", &torchopt_ext::functional::muon_step_);
  m.impl("newton_schulz", &newton_schulz_op);
}

#if defined(TORCHOPT_EXT_WITH_CUDA)
// ATen ops only: on CUDA the GEMMs are cuBLAS calls in ns_dtype (bf16 by
// default), batched inputs as one baddbmm per iteration step.
TORCH_LIBRARY_IMPL(torchopt_ext, CUDA, m) { m.impl("newton_schulz", &newton_schulz_op); }
#endif
