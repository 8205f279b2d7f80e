#include "torchopt_ext/optim/kron.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/utils.h>

#include <cmath>

#include "torchopt_ext/common/clipping.h"
#include "torchopt_ext/common/magma.h"
#include "torchopt_ext/common/psgd.h"
#include "torchopt_ext/functional/kron.h"

namespace torchopt_ext::optim {

KronOptions::KronOptions(double lr) : lr_(lr) {}

void KronOptions::validate() const {
  constexpr const char* name = "Kron";
  TORCH_CHECK_VALUE(std::isfinite(lr()) && lr() >= 0.0, name, ": lr must be >= 0, got ", lr());
  TORCH_CHECK_VALUE(b1() >= 0.0 && b1() < 1.0, name, ": b1 must be in [0, 1), got ", b1());
  TORCH_CHECK_VALUE(weight_decay() >= 0.0, name, ": weight_decay must be >= 0, got ", weight_decay());
  if (preconditioner_update_probability()) {
    const double p = *preconditioner_update_probability();
    TORCH_CHECK_VALUE(p >= 0.0 && p <= 1.0, name, ": preconditioner_update_probability must be in [0, 1], got ", p);
  }
  TORCH_CHECK_VALUE(max_size_triangular() >= 0, name, ": max_size_triangular must be >= 0, got ",
                    max_size_triangular());
  TORCH_CHECK_VALUE(max_skew_triangular() >= 0.0, name, ": max_skew_triangular must be >= 0, got ",
                    max_skew_triangular());
  TORCH_CHECK_VALUE(min_ndim_triangular() >= 0, name, ": min_ndim_triangular must be >= 0, got ",
                    min_ndim_triangular());
  common::psgd::parse_memory_save_mode(memory_save_mode(), "Kron: memory_save_mode");
  TORCH_CHECK_VALUE(whiten_grad() || b1() > 0.0, name,
                    ": whiten_grad=false fits the preconditioner on the momentum, which needs b1 > 0");
  TORCH_CHECK_VALUE(std::isfinite(preconditioner_lr()) && preconditioner_lr() > 0.0, name,
                    ": preconditioner_lr must be > 0, got ", preconditioner_lr());
  if (preconditioner_init_scale()) {
    TORCH_CHECK_VALUE(std::isfinite(*preconditioner_init_scale()) && *preconditioner_init_scale() > 0.0, name,
                      ": preconditioner_init_scale must be > 0, got ", *preconditioner_init_scale());
  }
  detail::check_state_dtype("Kron (mu_dtype)", mu_dtype());
  detail::check_state_dtype("Kron (precond_dtype)", precond_dtype());
  common::psgd::parse_geometry(preconditioner_mode(), "Kron: preconditioner_mode");
  TORCH_CHECK_VALUE(beta_lipschitz() >= 0.0 && beta_lipschitz() < 1.0, name, ": beta_lipschitz must be in [0, 1), got ",
                    beta_lipschitz());
  TORCH_CHECK_VALUE(std::isfinite(damping()) && damping() >= 0.0, name, ": damping must be >= 0, got ", damping());
  if (grad_clip_max_amps()) {
    const auto [rms, element] = *grad_clip_max_amps();
    common::check_post_clip_options(name, {rms, element});
  }
  common::parse_grad_clip_mode(grad_clip_mode(), "Kron: grad_clip_mode");
  if (raw_global_grad_clip()) {
    TORCH_CHECK_VALUE(std::isfinite(*raw_global_grad_clip()) && *raw_global_grad_clip() > 0.0, name,
                      ": raw_global_grad_clip must be > 0, got ", *raw_global_grad_clip());
  }
  TORCH_CHECK_VALUE(newton_schulz_iters() >= 1 && newton_schulz_iters() < 100, name,
                    ": newton_schulz_iters must be in [1, 100), got ", newton_schulz_iters());
  common::check_magma_options(name, {magma_p(), magma_tau(), seed()});
  TORCH_CHECK_VALUE(!use_magma() || b1() > 0.0, name, ": use_magma needs momentum (b1 > 0)");
  if (stacked_chunk_size()) {
    TORCH_CHECK_VALUE(*stacked_chunk_size() >= 1, name, ": stacked_chunk_size must be >= 1 (or nullopt), got ",
                      *stacked_chunk_size());
  }
}

bool operator==(const KronOptions& lhs, const KronOptions& rhs) {
  return lhs.lr() == rhs.lr() && lhs.b1() == rhs.b1() && lhs.weight_decay() == rhs.weight_decay() &&
         lhs.preconditioner_update_probability() == rhs.preconditioner_update_probability() &&
         lhs.max_size_triangular() == rhs.max_size_triangular() &&
         lhs.max_skew_triangular() == rhs.max_skew_triangular() &&
         lhs.min_ndim_triangular() == rhs.min_ndim_triangular() && lhs.memory_save_mode() == rhs.memory_save_mode() &&
         lhs.whiten_grad() == rhs.whiten_grad() &&
         lhs.update_preconditioner_first() == rhs.update_preconditioner_first() &&
         lhs.preconditioner_lr() == rhs.preconditioner_lr() &&
         lhs.preconditioner_init_scale() == rhs.preconditioner_init_scale() && lhs.mu_dtype() == rhs.mu_dtype() &&
         lhs.precond_dtype() == rhs.precond_dtype() && lhs.preconditioner_mode() == rhs.preconditioner_mode() &&
         lhs.beta_lipschitz() == rhs.beta_lipschitz() && lhs.track_lipschitz() == rhs.track_lipschitz() &&
         lhs.damping() == rhs.damping() && lhs.grad_clip_max_amps() == rhs.grad_clip_max_amps() &&
         lhs.grad_clip_mode() == rhs.grad_clip_mode() && lhs.raw_global_grad_clip() == rhs.raw_global_grad_clip() &&
         lhs.permissive_spike_protection() == rhs.permissive_spike_protection() &&
         lhs.newton_schulz_iters() == rhs.newton_schulz_iters() && lhs.maximize() == rhs.maximize() &&
         lhs.use_magma() == rhs.use_magma() && lhs.magma_p() == rhs.magma_p() && lhs.magma_tau() == rhs.magma_tau() &&
         lhs.stochastic_rounding() == rhs.stochastic_rounding() && lhs.seed() == rhs.seed() &&
         lhs.stacked_chunk_size() == rhs.stacked_chunk_size() && lhs.stacked() == rhs.stacked() &&
         lhs.batch_equal_shapes() == rhs.batch_equal_shapes();
}

namespace {

// Optional doubles are archived as a 0- or 1-element list, optional strings as "".
std::vector<double> encode_optional(const std::optional<double>& value) {
  return value ? std::vector<double>{*value} : std::vector<double>{};
}
std::optional<double> decode_optional(const torch::IValue& value) {
  const auto list = value.toDoubleVector();
  return list.empty() ? std::nullopt : std::optional<double>(list[0]);
}

std::vector<double> clip_amps(const KronOptions& options) {
  if (!options.grad_clip_max_amps()) {
    return {};
  }
  return {std::get<0>(*options.grad_clip_max_amps()), std::get<1>(*options.grad_clip_max_amps())};
}

at::ScalarType math_dtype(const at::Tensor& param) {
  return param.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace

void KronOptions::serialize(torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(lr);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(b1);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(weight_decay);
  archive.write("preconditioner_update_probability",
                torch::IValue(encode_optional(preconditioner_update_probability())));
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(max_size_triangular);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(max_skew_triangular);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(min_ndim_triangular);
  archive.write("memory_save_mode", torch::IValue(memory_save_mode().value_or("")));
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(whiten_grad);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(update_preconditioner_first);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(preconditioner_lr);
  archive.write("preconditioner_init_scale", torch::IValue(encode_optional(preconditioner_init_scale())));
  archive.write("mu_dtype", torch::IValue(detail::encode_dtype(mu_dtype())));
  archive.write("precond_dtype", torch::IValue(detail::encode_dtype(precond_dtype())));
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(preconditioner_mode);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(beta_lipschitz);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(track_lipschitz);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(damping);
  archive.write("grad_clip_max_amps", torch::IValue(clip_amps(*this)));
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(grad_clip_mode);
  archive.write("raw_global_grad_clip", torch::IValue(encode_optional(raw_global_grad_clip())));
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(permissive_spike_protection);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(newton_schulz_iters);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(maximize);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(use_magma);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(magma_p);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(magma_tau);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(stochastic_rounding);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(seed);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(stacked);
  // 0 encodes nullopt (a chunk size is >= 1).
  archive.write("stacked_chunk_size", torch::IValue(stacked_chunk_size().value_or(0)));
  // -1 encodes nullopt (the default rule), 0 / 1 false / true.
  archive.write("batch_equal_shapes",
                torch::IValue(static_cast<int64_t>(batch_equal_shapes() ? (*batch_equal_shapes() ? 1 : 0) : -1)));
}

void KronOptions::serialize(torch::serialize::InputArchive& archive) {
  torch::IValue value;
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, lr);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, b1);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, weight_decay);
  archive.read("preconditioner_update_probability", value);
  preconditioner_update_probability(decode_optional(value));
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(int64_t, max_size_triangular);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, max_skew_triangular);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(int64_t, min_ndim_triangular);
  archive.read("memory_save_mode", value);
  const std::string mode = value.toStringRef();
  memory_save_mode(mode.empty() ? std::nullopt : std::optional<std::string>(mode));
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, whiten_grad);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, update_preconditioner_first);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, preconditioner_lr);
  archive.read("preconditioner_init_scale", value);
  preconditioner_init_scale(decode_optional(value));
  archive.read("mu_dtype", value);
  mu_dtype(detail::decode_dtype(value.toInt()));
  archive.read("precond_dtype", value);
  precond_dtype(detail::decode_dtype(value.toInt()));
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(std::string, preconditioner_mode);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, beta_lipschitz);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, track_lipschitz);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, damping);
  archive.read("grad_clip_max_amps", value);
  const auto amps = value.toDoubleVector();
  grad_clip_max_amps(amps.size() == 2 ? std::optional<amps_t>(std::make_tuple(amps[0], amps[1])) : std::nullopt);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(std::string, grad_clip_mode);
  archive.read("raw_global_grad_clip", value);
  raw_global_grad_clip(decode_optional(value));
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, permissive_spike_protection);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(int64_t, newton_schulz_iters);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, maximize);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, use_magma);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, magma_p);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, magma_tau);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, stochastic_rounding);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(int64_t, seed);
  // Archives written before `stacked` existed hold unstacked groups.
  stacked(archive.try_read("stacked", value) && value.toBool());
  const int64_t chunk = archive.try_read("stacked_chunk_size", value) ? value.toInt() : 0;
  stacked_chunk_size(chunk > 0 ? std::optional<int64_t>(chunk) : std::nullopt);
  const int64_t batch = archive.try_read("batch_equal_shapes", value) ? value.toInt() : -1;
  batch_equal_shapes(batch < 0 ? std::nullopt : std::optional<bool>(batch == 1));
}

double KronOptions::get_lr() const { return lr(); }

void KronOptions::set_lr(const double lr) { this->lr(lr); }

bool operator==(const KronParamState& lhs, const KronParamState& rhs) {
  using detail::same_state_tensor;
  return same_state_tensor(lhs.step(), rhs.step()) && same_state_tensor(lhs.mu(), rhs.mu()) &&
         same_state_tensor(lhs.Q(), rhs.Q()) && same_state_tensor(lhs.L(), rhs.L()) &&
         same_state_tensor(lhs.magma_score(), rhs.magma_score());
}

void KronParamState::serialize(torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(step);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(mu);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(Q);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(L);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(magma_score);
}

void KronParamState::serialize(torch::serialize::InputArchive& archive) {
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, step);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, mu);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, Q);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, L);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, magma_score);
}

Kron::Kron(const std::vector<torch::optim::OptimizerParamGroup>& param_groups, KronOptions defaults)
    : OptimizerBase(param_groups, defaults),
      rng_state_(at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(defaults.seed())).get_state()) {}

Kron::Kron(std::vector<at::Tensor> params, KronOptions defaults)
    : Kron(std::vector<torch::optim::OptimizerParamGroup>{torch::optim::OptimizerParamGroup(std::move(params))},
           std::move(defaults)) {}

at::Tensor Kron::step(LossClosure closure) {
  torch::NoGradGuard no_grad;
  at::Tensor loss = run_closure(closure);
  for (auto& group : param_groups_) {
    auto& options = options_of(group);
    const auto memory_save_mode = options.memory_save_mode();
    std::vector<at::Tensor> params, grads, mus, qs, ls, scores, steps;
    for (auto& param : group.params()) {
      if (!param.grad().defined()) {
        continue;
      }
      const bool stacked = options.stacked();
      TORCH_CHECK_VALUE(!stacked || param.dim() >= 2, "Kron: stacked=true needs params of shape (L, ...) with at ",
                        "least 2 dims (one preconditioner per slice), got a param of shape ", param.sizes());
      // The factors precondition the whole param, or one slice when stacked.
      const auto slice = stacked ? param.sizes().slice(1) : param.sizes();
      const int64_t layers = stacked ? param.size(0) : 1;
      auto lead = [&](std::vector<int64_t> shape) {
        if (stacked) {
          shape.insert(shape.begin(), layers);
        }
        return shape;
      };
      auto& state = state_of<KronParamState>(param, [&] {
        auto fresh = std::make_unique<KronParamState>();
        fresh->step(detail::new_step_counter());
        const auto dense = functional::kron_factor_layout(
            slice, options.max_size_triangular(), options.max_skew_triangular(), options.min_ndim_triangular(),
            memory_save_mode ? std::optional<c10::string_view>(*memory_save_mode) : std::nullopt);
        const std::vector<bool> flags(dense.begin(), dense.end());
        const auto math = math_dtype(param);
        // Zeros: the functional sets the factors on the param's first step.
        fresh->Q(at::zeros(lead({common::psgd::factors_numel(slice, flags)}),
                           param.options().dtype(options.precond_dtype().value_or(math))));
        fresh->L(at::zeros(lead({static_cast<int64_t>(flags.size())}), param.options().dtype(math)));
        return fresh;
      });
      if (options.b1() > 0.0 && !state.mu().defined()) {
        state.mu(at::zeros(param.sizes(), param.options().dtype(options.mu_dtype().value_or(math_dtype(param)))));
      }
      if (options.use_magma()) {
        // On the param's device, where the op reads them; a checkpoint's follow the param.
        state.magma_score(
            state.magma_score().defined()
                ? detail::placed_scalar(state.magma_score(), param)
                : at::full(lead({}), 0.5, param.options().dtype(at::kFloat)));  // also when turned on later
      }
      // Whole tensors: a stacked param's slices are batched by the functional.
      params.push_back(param);
      grads.push_back(param.grad());
      qs.push_back(state.Q());
      ls.push_back(state.L());
      if (options.b1() > 0.0) {
        mus.push_back(state.mu());
      }
      if (options.use_magma()) {
        scores.push_back(state.magma_score());
      }
      steps.push_back(state.step());
    }
    if (params.empty()) {
      continue;
    }
    std::optional<at::Tensor> probability;
    if (options.preconditioner_update_probability()) {
      probability = at::scalar_tensor(*options.preconditioner_update_probability(), at::kDouble);
    }
    functional::kron_step_(
        params, grads, mus, qs, ls, scores, steps, at::scalar_tensor(options.lr(), at::kDouble), rng_state_,
        options.b1(), options.weight_decay(), probability, options.max_size_triangular(), options.max_skew_triangular(),
        options.min_ndim_triangular(),
        memory_save_mode ? std::optional<c10::string_view>(*memory_save_mode) : std::nullopt, options.whiten_grad(),
        options.update_preconditioner_first(), options.preconditioner_lr(), options.preconditioner_init_scale(),
        options.preconditioner_mode(), options.beta_lipschitz(), options.track_lipschitz(), options.damping(),
        clip_amps(options), options.grad_clip_mode(), options.raw_global_grad_clip(),
        options.permissive_spike_protection(), options.newton_schulz_iters(), options.maximize(), options.use_magma(),
        options.magma_p(), options.magma_tau(), options.stochastic_rounding(), options.seed(), options.stacked(),
        options.stacked_chunk_size(), std::nullopt, options.batch_equal_shapes(), std::nullopt, std::nullopt);
  }
  return loss;
}

void Kron::save(torch::serialize::OutputArchive& archive) const {
  torch::optim::serialize<KronParamState, KronOptions>(archive, *this);
  archive.write("rng_state", rng_state_, /*is_buffer=*/true);
}

void Kron::load(torch::serialize::InputArchive& archive) {
  torch::optim::serialize<KronParamState, KronOptions>(archive, *this);
  at::Tensor saved;
  archive.read("rng_state", saved, /*is_buffer=*/true);
  rng_state_.copy_(saved);
}

}  // namespace torchopt_ext::optim
