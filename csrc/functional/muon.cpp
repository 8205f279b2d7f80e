#include "torchopt_ext/functional/muon.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/tensor_lists.h"
#include "functional/matrix_parts.h"
#include "kernels/cpu/muon.h"
#include "kernels/cpu/stochastic_rounding.h"
#include "torchopt_ext/common/magma.h"
#include "torchopt_ext/common/matrix_dims.h"
#include "torchopt_ext/common/newton_schulz.h"
#include "torchopt_ext/common/side_by_side.h"

namespace torchopt_ext::functional {

double muon_lr_scale(c10::string_view adjust_lr_fn, int64_t rows, int64_t cols) {
  const auto r = static_cast<double>(rows);
  const auto c = static_cast<double>(cols);
  if (adjust_lr_fn == "original") {
    return std::sqrt(std::max(1.0, r / c));
  }
  if (adjust_lr_fn == "match_rms_adamw") {
    return 0.2 * std::sqrt(std::max(r, c));
  }
  TORCH_CHECK_VALUE(false, "muon_step_: adjust_lr_fn must be 'original' or 'match_rms_adamw', got '", adjust_lr_fn,
                    "'");
}

void muon_step_(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                at::TensorList magma_scores, at::TensorList state_steps, const at::Tensor& lr, double weight_decay,
                double momentum, bool nesterov, at::ArrayRef<double> ns_coefficients, int64_t ns_steps, double eps,
                c10::string_view adjust_lr_fn, c10::string_view ns_normalization, c10::string_view ns_preset,
                at::IntArrayRef matrix_dims, std::optional<at::ScalarType> ns_dtype, bool maximize, bool use_magma,
                double magma_p, double magma_tau, bool stochastic_rounding, int64_t seed,
                const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  constexpr const char* op = "muon_step_";
  using common::check_hyperparameter;
  check_hyperparameter(op, "momentum", momentum, momentum >= 0.0 && momentum < 1.0, "in [0, 1)");
  check_hyperparameter(op, "weight_decay", weight_decay, weight_decay >= 0.0, ">= 0");
  muon_lr_scale(adjust_lr_fn, 1, 1);  // validates the name
  common::NewtonSchulzOptions ns;
  ns.steps = ns_steps;
  ns.coefficients =
      common::resolve_ns_coefficients(std::string(ns_preset), ns_coefficients.vec(), ns_steps, "ns_coefficients");
  ns.eps = eps;
  ns.normalization = common::parse_ns_normalization(std::string(ns_normalization), "ns_normalization");
  ns.dtype = ns_dtype;
  common::check_newton_schulz_options(op, ns);
  const common::MagmaOptions magma{magma_p, magma_tau, seed};
  common::check_magma_options(op, magma);
  if (use_magma) {
    detail::check_magma_scores(op, params, magma_scores);
  } else {
    TORCH_CHECK_VALUE(magma_scores.empty(), op, ": magma_scores must be empty without use_magma");
  }
  const auto specs = common::decode_matrix_dims(matrix_dims, params.size(), "matrix_dims");
  std::vector<common::MatrixLayout> layouts;
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK_VALUE(specs[i] || params[i].dim() >= 2, op, ": params[", i, "] has ", params[i].dim(),
                      " dims; Muon orthogonalizes matrices (route other tensors to the AdamW fallback)");
    layouts.push_back(common::matrix_layout(params[i].sizes(), specs[i], "matrix_dims"));
  }
  auto group = common::prepare_elementwise_group<1>(op, params, grads, {{{"momentum_buffers", momentum_buffers}}},
                                                    state_steps, lr, grad_scale, found_inf);
  if (!group || (group->on_cuda && !detail::begin_cuda_matrix_step(group->device))) {
    return;
  }
  const size_t n = group->params.size();
  // One matrix at a time, start to finish (as torch.optim.Muon): each
  // temporary is freed before the next is made, so the allocator reuses warm
  // memory and the peak stays one matrix's worth (per thread: on a
  // multi-threaded CPU the matrices run side by side, one thread each,
  // costed by their Newton-Schulz GEMM work rows * cols * min(rows, cols)).
  std::vector<double> costs(n);
  for (size_t i = 0; i < n; ++i) {
    const auto& layout = layouts[i];
    costs[i] = static_cast<double>(group->params[i].numel()) * static_cast<double>(std::min(layout.rows, layout.cols));
  }
  common::run_side_by_side(costs, !group->on_cuda, [&](size_t i) {
    at::Tensor& param = group->params[i];
    at::Tensor& grad = group->grads[i];
    detail::unscale_grad(grad, group->amp.grad_scale, group->device.grad_scale);
    at::Tensor& buffer = group->state[0][i];
    const auto parts = detail::muon_momentum(grad, buffer, momentum, nesterov, maximize);
    // A param with more dims is the (shape[0], rest) matrix, or the batch of
    // matrices its spec describes.
    const auto& layout = layouts[i];
    const at::Tensor update = common::from_matrices(
        common::newton_schulz(common::to_matrices(parts.ns_input, layout), ns), layout, param.sizes());
    const double scale = muon_lr_scale(adjust_lr_fn, layout.rows, layout.cols);
    if (group->on_cuda) {
      // lr, step and Magma's keep * score are read by the apply kernel on the device.
      const at::Tensor score =
          use_magma ? detail::magma_score_cuda(parts.grad, buffer, magma_scores[i], magma_tau) : at::Tensor();
      detail::apply_matrix_update_cuda(param, update, detail::matrix_scalars(*group, i), score, magma, weight_decay,
                                       scale, stochastic_rounding, seed, static_cast<int64_t>(i));
      return;
    }
    double multiplier = 1.0;
    if (use_magma) {
      at::Tensor score = magma_scores[i];
      const bool keep = common::magma_keep(magma, static_cast<int64_t>(i), group->steps[i]);
      // Host read of a CPU scalar: no device sync (CUDA params take the branch above).
      multiplier = common::magma_multiplier(parts.grad, buffer, score, keep, magma_tau).item<double>();
    }
    detail::apply_matrix_update(param, update, group->lr, multiplier, weight_decay, scale, stochastic_rounding, seed,
                                static_cast<int64_t>(i), group->steps[i]);
  });
  group->finish();
}

}  // namespace torchopt_ext::functional
