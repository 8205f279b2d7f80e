#include "torchopt_ext/optim/muon.h"

#include <ATen/ATen.h>
#include <torch/utils.h>

#include <algorithm>
#include <cmath>

#include "torchopt_ext/common/magma.h"
#include "torchopt_ext/common/newton_schulz.h"
#include "torchopt_ext/functional/muon.h"

namespace torchopt_ext::optim {

MuonOptions::MuonOptions(double lr) : lr_(lr) {}

void MuonOptions::validate() const {
  TORCH_CHECK_VALUE(std::isfinite(lr()) && lr() >= 0.0, "Muon: lr must be >= 0, got ", lr());
  TORCH_CHECK_VALUE(weight_decay() >= 0.0, "Muon: weight_decay must be >= 0, got ", weight_decay());
  TORCH_CHECK_VALUE(momentum() >= 0.0 && momentum() < 1.0, "Muon: momentum must be in [0, 1), got ", momentum());
  common::ns_coefficients_from_flat(ns_coefficients(), "ns_coefficients");
  if (!ns_preset().empty()) {
    common::ns_coefficients_preset(ns_preset(), std::max<int64_t>(ns_steps(), 1), "ns_preset");
  }
  if (matrix_dims()) {
    common::check_matrix_dims(*matrix_dims(), "matrix_dims");
  }
  TORCH_CHECK_VALUE(eps() >= 0.0, "Muon: eps must be >= 0, got ", eps());
  TORCH_CHECK_VALUE(ns_steps() >= 1 && ns_steps() < 100, "Muon: ns_steps must be in [1, 100), got ", ns_steps());
  TORCH_CHECK_VALUE(adjust_lr_fn() == "original" || adjust_lr_fn() == "match_rms_adamw",
                    "Muon: adjust_lr_fn must be 'original' or 'match_rms_adamw', got '", adjust_lr_fn(), "'");
  common::parse_ns_normalization(ns_normalization(), "ns_normalization");
  if (ns_dtype()) {
    TORCH_CHECK_VALUE(at::isFloatingType(*ns_dtype()), "Muon: ns_dtype must be a floating dtype, got ", *ns_dtype());
  }
  if (adam_lr()) {
    TORCH_CHECK_VALUE(*adam_lr() >= 0.0, "Muon: adam_lr must be >= 0, got ", *adam_lr());
  }
  const auto [beta1, beta2] = adam_betas();
  TORCH_CHECK_VALUE(beta1 >= 0.0 && beta1 < 1.0, "Muon: adam_betas[0] must be in [0, 1), got ", beta1);
  TORCH_CHECK_VALUE(beta2 >= 0.0 && beta2 < 1.0, "Muon: adam_betas[1] must be in [0, 1), got ", beta2);
  TORCH_CHECK_VALUE(adam_eps() >= 0.0, "Muon: adam_eps must be >= 0, got ", adam_eps());
  if (adam_weight_decay()) {
    TORCH_CHECK_VALUE(*adam_weight_decay() >= 0.0, "Muon: adam_weight_decay must be >= 0, got ", *adam_weight_decay());
  }
  common::check_magma_options("Muon", {magma_p(), magma_tau(), seed()});
  detail::check_state_dtype("Muon", state_dtype());
}

bool operator==(const MuonOptions& lhs, const MuonOptions& rhs) {
  return lhs.lr() == rhs.lr() && lhs.weight_decay() == rhs.weight_decay() && lhs.momentum() == rhs.momentum() &&
         lhs.nesterov() == rhs.nesterov() && lhs.ns_coefficients() == rhs.ns_coefficients() &&
         lhs.ns_preset() == rhs.ns_preset() && lhs.matrix_dims() == rhs.matrix_dims() && lhs.eps() == rhs.eps() &&
         lhs.ns_steps() == rhs.ns_steps() && lhs.adjust_lr_fn() == rhs.adjust_lr_fn() &&
         lhs.ns_normalization() == rhs.ns_normalization() && lhs.ns_dtype() == rhs.ns_dtype() &&
         lhs.use_muon() == rhs.use_muon() && lhs.adam_lr() == rhs.adam_lr() && lhs.initial_lr() == rhs.initial_lr() &&
         lhs.adam_betas() == rhs.adam_betas() && lhs.adam_eps() == rhs.adam_eps() &&
         lhs.adam_weight_decay() == rhs.adam_weight_decay() && lhs.maximize() == rhs.maximize() &&
         lhs.use_magma() == rhs.use_magma() && lhs.magma_p() == rhs.magma_p() && lhs.magma_tau() == rhs.magma_tau() &&
         lhs.state_dtype() == rhs.state_dtype() && lhs.stochastic_rounding() == rhs.stochastic_rounding() &&
         lhs.seed() == rhs.seed();
}

namespace {

// Optional non-negative doubles are archived with -1 for "not set".
double encode_optional(const std::optional<double>& value) { return value ? *value : -1.0; }
std::optional<double> decode_optional(double value) {
  return value < 0.0 ? std::nullopt : std::optional<double>(value);
}

}  // namespace

void MuonOptions::serialize(torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(lr);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(weight_decay);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(momentum);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(nesterov);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(ns_coefficients);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(ns_preset);
  archive.write("matrix_dims", torch::IValue(common::encode_matrix_dims(matrix_dims())));
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(eps);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(ns_steps);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(adjust_lr_fn);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(ns_normalization);
  archive.write("ns_dtype", torch::IValue(detail::encode_dtype(ns_dtype())));
  archive.write("use_muon", torch::IValue(static_cast<int64_t>(use_muon() ? (*use_muon() ? 1 : 0) : -1)));
  archive.write("adam_lr", torch::IValue(encode_optional(adam_lr())));
  archive.write("initial_lr", torch::IValue(encode_optional(initial_lr())));
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(adam_betas);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(adam_eps);
  archive.write("adam_weight_decay", torch::IValue(encode_optional(adam_weight_decay())));
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(maximize);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(use_magma);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(magma_p);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(magma_tau);
  detail::write_storage_options(archive, *this);
}

void MuonOptions::serialize(torch::serialize::InputArchive& archive) {
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, lr);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, weight_decay);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, momentum);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, nesterov);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(std::vector<double>, ns_coefficients);
  {
    // Archives written before presets and specs existed have neither key.
    torch::IValue extra;
    ns_preset(archive.try_read("ns_preset", extra) ? extra.toStringRef() : std::string());
    matrix_dims(archive.try_read("matrix_dims", extra)
                    ? common::decode_matrix_dims(extra.toIntVector(), 1, "matrix_dims")[0]
                    : std::nullopt);
  }
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, eps);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(int64_t, ns_steps);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(std::string, adjust_lr_fn);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(std::string, ns_normalization);
  torch::IValue value;
  archive.read("ns_dtype", value);
  ns_dtype(detail::decode_dtype(value.toInt()));
  archive.read("use_muon", value);
  const int64_t route = value.toInt();
  use_muon(route < 0 ? std::nullopt : std::optional<bool>(route == 1));
  archive.read("adam_lr", value);
  adam_lr(decode_optional(value.toDouble()));
  archive.read("initial_lr", value);
  initial_lr(decode_optional(value.toDouble()));
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(betas_t, adam_betas);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, adam_eps);
  archive.read("adam_weight_decay", value);
  adam_weight_decay(decode_optional(value.toDouble()));
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, maximize);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, use_magma);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, magma_p);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, magma_tau);
  detail::read_storage_options(archive, *this);
}

double MuonOptions::get_lr() const { return lr(); }

void MuonOptions::set_lr(const double lr) { this->lr(lr); }

bool operator==(const MuonParamState& lhs, const MuonParamState& rhs) {
  using detail::same_state_tensor;
  return same_state_tensor(lhs.step(), rhs.step()) && same_state_tensor(lhs.momentum_buffer(), rhs.momentum_buffer()) &&
         same_state_tensor(lhs.magma_score(), rhs.magma_score()) && same_state_tensor(lhs.exp_avg(), rhs.exp_avg()) &&
         same_state_tensor(lhs.exp_avg_sq(), rhs.exp_avg_sq());
}

void MuonParamState::serialize(torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(step);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(momentum_buffer);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(magma_score);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(exp_avg);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(exp_avg_sq);
}

void MuonParamState::serialize(torch::serialize::InputArchive& archive) {
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, step);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, momentum_buffer);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, magma_score);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, exp_avg);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, exp_avg_sq);
}

Muon::Muon(const std::vector<torch::optim::OptimizerParamGroup>& param_groups, MuonOptions defaults)
    : MatrixOptimizer(param_groups, defaults, "Muon", "use_muon") {}

Muon::Muon(std::vector<at::Tensor> params, MuonOptions defaults)
    : Muon(std::vector<torch::optim::OptimizerParamGroup>{torch::optim::OptimizerParamGroup(std::move(params))},
           std::move(defaults)) {}

void Muon::matrix_step(MuonOptions& options, MatrixGroupLists& lists) {
  functional::muon_step_(
      lists.params, lists.grads, lists.moments, lists.scores, lists.steps, at::scalar_tensor(options.lr(), at::kDouble),
      options.weight_decay(), options.momentum(), options.nesterov(), options.ns_coefficients(), options.ns_steps(),
      options.eps(), options.adjust_lr_fn(), options.ns_normalization(), options.ns_preset(), lists.matrix_dims,
      options.ns_dtype(), options.maximize(), options.use_magma(), options.magma_p(), options.magma_tau(),
      options.stochastic_rounding(), options.seed(), std::nullopt, std::nullopt);
}

}  // namespace torchopt_ext::optim
