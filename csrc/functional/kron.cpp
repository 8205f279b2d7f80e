#include "torchopt_ext/functional/kron.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include "common/tensor_lists.h"
#include "kernels/cpu/muon.h"
#include "kernels/cpu/stochastic_rounding.h"
#include "torchopt_ext/common/clipping.h"
#include "torchopt_ext/common/magma.h"
#include "torchopt_ext/common/psgd.h"

namespace torchopt_ext::functional {

namespace psgd = common::psgd;

namespace {

// Salts of the stochastic-rounding streams of the two bf16-storable states.
constexpr uint64_t kMomentumSalt = 0x4B524F4E4D55ULL;      // "KRONMU"
constexpr uint64_t kPreconditionerSalt = 0x4B524F4E51ULL;  // "KRONQ"

// Stores `value` (math dtype) into `storage`: bf16 with stochastic rounding
// (rollfast stores bf16 state that way), other dtypes by a plain cast.
void store(const at::Tensor& storage, const at::Tensor& value, int64_t seed, uint64_t salt, int64_t index,
           double step) {
  if (storage.scalar_type() == at::kBFloat16) {
    const uint64_t stream = kernels::cpu::rounding_stream(seed ^ static_cast<int64_t>(salt), index, step);
    kernels::cpu::muon_apply_update_reduced(storage, value.reshape(storage.sizes()).contiguous(), 0.0, 1.0, true,
                                            stream);
  } else {
    storage.copy_(value.reshape(storage.sizes()));
  }
}

at::Tensor flatten_factors(const std::vector<at::Tensor>& factors) {
  std::vector<at::Tensor> flat;
  flat.reserve(factors.size());
  for (const auto& q : factors) {
    flat.push_back(q.reshape({-1}));
  }
  return at::cat(flat);
}

}  // namespace

double kron_default_update_probability(double step) {
  return std::min(std::max(std::exp(-0.001 * (step - 500.0)), 0.03), 1.0);
}

std::vector<int64_t> kron_factor_layout(at::IntArrayRef shape, int64_t max_size_triangular, double max_skew_triangular,
                                        int64_t min_ndim_triangular, std::optional<c10::string_view> memory_save_mode) {
  psgd::LayoutOptions layout;
  layout.max_size_triangular = max_size_triangular;
  layout.max_skew_triangular = max_skew_triangular;
  layout.min_ndim_triangular = min_ndim_triangular;
  layout.memory_save_mode = psgd::parse_memory_save_mode(
      memory_save_mode ? std::optional<std::string>(std::string(*memory_save_mode)) : std::nullopt, "memory_save_mode");
  const auto dense = psgd::factor_layout(shape, layout);
  return std::vector<int64_t>(dense.begin(), dense.end());
}

void kron_step_(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                at::TensorList preconditioners, at::TensorList lipschitz, at::TensorList magma_scores,
                at::TensorList state_steps, const at::Tensor& lr, const at::Tensor& rng_state, double b1,
                double weight_decay, const std::optional<at::Tensor>& update_probability, int64_t max_size_triangular,
                double max_skew_triangular, int64_t min_ndim_triangular,
                std::optional<c10::string_view> memory_save_mode, bool whiten_grad, bool update_preconditioner_first,
                double preconditioner_lr, std::optional<double> preconditioner_init_scale,
                c10::string_view preconditioner_mode, double beta_lipschitz, bool track_lipschitz, double damping,
                at::ArrayRef<double> grad_clip_max_amps, c10::string_view grad_clip_mode,
                std::optional<double> raw_global_grad_clip, bool permissive_spike_protection,
                int64_t newton_schulz_iters, bool maximize, bool use_magma, double magma_p, double magma_tau,
                bool stochastic_rounding, int64_t seed, const std::optional<at::Tensor>& grad_scale,
                const std::optional<at::Tensor>& found_inf) {
  constexpr const char* op = "kron_step_";
  using common::check_hyperparameter;
  check_hyperparameter(op, "b1", b1, b1 >= 0.0 && b1 < 1.0, "in [0, 1)");
  check_hyperparameter(op, "weight_decay", weight_decay, weight_decay >= 0.0, ">= 0");
  TORCH_CHECK_VALUE(max_size_triangular >= 0, op, ": max_size_triangular must be >= 0, got ", max_size_triangular);
  check_hyperparameter(op, "max_skew_triangular", max_skew_triangular, max_skew_triangular >= 0.0, ">= 0");
  TORCH_CHECK_VALUE(min_ndim_triangular >= 0, op, ": min_ndim_triangular must be >= 0, got ", min_ndim_triangular);
  TORCH_CHECK_VALUE(whiten_grad || b1 > 0.0, op, ": whiten_grad=False fits the preconditioner on the momentum, ",
                    "which needs b1 > 0");
  check_hyperparameter(op, "preconditioner_lr", preconditioner_lr,
                       std::isfinite(preconditioner_lr) && preconditioner_lr > 0.0, "> 0");
  if (preconditioner_init_scale) {
    check_hyperparameter(op, "preconditioner_init_scale", *preconditioner_init_scale,
                         std::isfinite(*preconditioner_init_scale) && *preconditioner_init_scale > 0.0, "> 0");
  }
  psgd::FactorUpdateOptions factor_options;
  factor_options.geometry = psgd::parse_geometry(std::string(preconditioner_mode), "preconditioner_mode");
  check_hyperparameter(op, "beta_lipschitz", beta_lipschitz, beta_lipschitz >= 0.0 && beta_lipschitz < 1.0,
                       "in [0, 1)");
  check_hyperparameter(op, "damping", damping, std::isfinite(damping) && damping >= 0.0, ">= 0");
  TORCH_CHECK_VALUE(newton_schulz_iters >= 1 && newton_schulz_iters < 100, op,
                    ": newton_schulz_iters must be in [1, 100), got ", newton_schulz_iters);
  factor_options.lr = preconditioner_lr;
  factor_options.beta_lipschitz = beta_lipschitz;
  factor_options.track_lipschitz = track_lipschitz;
  factor_options.damping = damping;
  factor_options.ns_iters = newton_schulz_iters;
  psgd::LayoutOptions layout;
  layout.max_size_triangular = max_size_triangular;
  layout.max_skew_triangular = max_skew_triangular;
  layout.min_ndim_triangular = min_ndim_triangular;
  layout.memory_save_mode = psgd::parse_memory_save_mode(
      memory_save_mode ? std::optional<std::string>(std::string(*memory_save_mode)) : std::nullopt, "memory_save_mode");
  TORCH_CHECK_VALUE(grad_clip_max_amps.empty() || grad_clip_max_amps.size() == 2, op,
                    ": grad_clip_max_amps must be (rms_cap, element_cap) or empty, got ", grad_clip_max_amps.size(),
                    " values");
  std::optional<common::PostClipOptions> post_clip;
  if (!grad_clip_max_amps.empty()) {
    post_clip = common::PostClipOptions{};
    post_clip->max_rms = grad_clip_max_amps[0];
    post_clip->max_element = grad_clip_max_amps[1];
    post_clip->mode = common::parse_grad_clip_mode(std::string(grad_clip_mode), "grad_clip_mode");
    // rollfast's rms + tiny (per tensor) / max(rms, tiny) (global), tiny of float32.
    post_clip->rms_eps = static_cast<double>(std::numeric_limits<float>::min());
    common::check_post_clip_options(op, *post_clip);
  } else {
    common::parse_grad_clip_mode(std::string(grad_clip_mode), "grad_clip_mode");
  }
  if (raw_global_grad_clip) {
    check_hyperparameter(op, "raw_global_grad_clip", *raw_global_grad_clip,
                         std::isfinite(*raw_global_grad_clip) && *raw_global_grad_clip > 0.0, "> 0");
  }
  const common::MagmaOptions magma{magma_p, magma_tau, seed};
  common::check_magma_options(op, magma);
  TORCH_CHECK_VALUE(!use_magma || b1 > 0.0, op, ": use_magma needs momentum (b1 > 0)");
  if (use_magma) {
    common::check_scalar_list(op, "magma_scores", params, magma_scores);
  } else {
    TORCH_CHECK_VALUE(magma_scores.empty(), op, ": magma_scores must be empty without use_magma");
  }
  TORCH_CHECK_VALUE(preconditioners.size() == params.size(), op, ": preconditioners must have one tensor per param (",
                    params.size(), "), got ", preconditioners.size());
  TORCH_CHECK_VALUE(lipschitz.size() == params.size(), op, ": lipschitz must have one tensor per param (",
                    params.size(), "), got ", lipschitz.size());
  std::vector<std::vector<bool>> layouts;
  for (size_t i = 0; i < params.size(); ++i) {
    layouts.push_back(psgd::factor_layout(params[i].sizes(), layout));
    const auto& q = preconditioners[i];
    const int64_t numel = psgd::factors_numel(params[i].sizes(), layouts.back());
    TORCH_CHECK_VALUE(q.dim() == 1 && q.numel() == numel && q.is_contiguous(), op, ": preconditioners[", i,
                      "] must be a contiguous 1-D tensor of ", numel, " elements for a param of shape ",
                      params[i].sizes(), ", got shape ", q.sizes());
    TORCH_CHECK_VALUE(at::isFloatingType(q.scalar_type()) && q.device() == params[i].device(), op, ": preconditioners[",
                      i, "] must be floating and on the param's device");
    const auto factors = static_cast<int64_t>(layouts.back().size());
    const auto& l = lipschitz[i];
    TORCH_CHECK_VALUE(l.dim() == 1 && l.numel() == factors && at::isFloatingType(l.scalar_type()), op, ": lipschitz[",
                      i, "] must be a floating 1-D tensor with one entry per factor (", factors, "), got shape ",
                      l.sizes());
  }
  TORCH_CHECK_VALUE(rng_state.scalar_type() == at::kByte && rng_state.device().is_cpu() && rng_state.dim() == 1, op,
                    ": rng_state must be a CPU uint8 generator state (torch.Generator.get_state())");
  if (update_probability) {
    TORCH_CHECK_VALUE(update_probability->numel() == 1, op,
                      ": preconditioner_update_probability must be one value, got shape ", update_probability->sizes());
  }

  auto group = common::prepare_elementwise_group<1>(
      op, params, grads, {{{"momentum_buffers", momentum_buffers, b1 > 0.0}}}, state_steps, lr, grad_scale, found_inf);
  if (!group) {
    return;
  }
  const size_t n = group->params.size();
  if (group->amp.grad_scale) {
    for (auto& grad : group->grads) {
      grad.div_(*group->amp.grad_scale);
    }
  }
  // The group's step (1-based): the first param's counter.
  const double step = group->steps[0];
  // Host read of a CPU scalar: no device sync (the functional is CPU-only).
  const double probability =
      update_probability ? update_probability->item<double>() : kron_default_update_probability(step);
  TORCH_CHECK_VALUE(std::isfinite(probability) && probability >= 0.0 && probability <= 1.0, op,
                    ": preconditioner_update_probability must be in [0, 1], got ", probability);
  double raw_scale = 1.0;
  if (raw_global_grad_clip) {
    // rollfast: a spike only continues (clipped) while p >= 1 and protection is permissive.
    const auto clip =
        common::raw_global_clip(group->grads, *raw_global_grad_clip, permissive_spike_protection && probability >= 1.0);
    if (clip.skip) {
      // The whole state stays as it was (rollfast 1.1): counters, factors,
      // Lipschitz, momentum, Magma and the generator (nothing is drawn).
      for (const auto& s : state_steps) {
        s.sub_(1);
      }
      group->finish();
      return;
    }
    raw_scale = clip.scale;
  }

  auto gen = at::make_generator<at::CPUGeneratorImpl>();
  gen.set_state(rng_state);
  // EQ keeps its dense factors upper triangular: the products skip the zeros.
  const bool triangular = factor_options.geometry == psgd::Geometry::EQ;

  std::vector<at::ScalarType> math(n);
  std::vector<at::Tensor> g(n), raw_g(n), m(n);
  for (size_t i = 0; i < n; ++i) {
    math[i] = group->params[i].scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    at::Tensor gi = group->grads[i].to(math[i]);
    if (maximize) {
      gi = gi.neg();
    }
    raw_g[i] = gi;  // Magma's cosine uses the grad before any clipping
    g[i] = raw_scale != 1.0 ? gi * raw_scale : gi;
    if (b1 > 0.0) {
      // Warm-up beta_t = min(t / (1 + t), b1), t = steps before this one (LX).
      const double t = group->steps[i] - 1.0;
      const double beta = std::min(t / (1.0 + t), b1);
      at::Tensor& buffer = group->state[0][i];
      m[i] = at::lerp(buffer.to(math[i]), g[i], 1.0 - beta);
      store(buffer, m[i], seed, kMomentumSalt, static_cast<int64_t>(i), group->steps[i]);
    }
  }

  // Factors are created on a param's first step: preconditioner_init_scale,
  // or rollfast's lazy (max over these params of mean |g|^4 + damping^4)^(-1/8).
  std::vector<size_t> fresh;
  for (size_t i = 0; i < n; ++i) {
    if (group->steps[i] == 1.0) {
      fresh.push_back(i);
    }
  }
  if (!fresh.empty()) {
    double scale = preconditioner_init_scale.value_or(0.0);
    if (!preconditioner_init_scale) {
      double largest = 0.0;
      for (const auto i : fresh) {
        if (g[i].numel() > 0) {
          largest = std::max(largest, g[i].abs().pow(4).mean().item<double>());
        }
      }
      scale = std::pow(largest + std::pow(damping, 4), -1.0 / 8.0);
    }
    for (const auto i : fresh) {
      psgd::init_factors_(preconditioners[i], group->params[i].sizes(), layouts[i], scale);
      lipschitz[i].zero_();
    }
  }

  const bool do_update = at::rand({}, gen, at::TensorOptions().dtype(at::kDouble)).item<double>() < probability;
  std::vector<std::vector<at::Tensor>> old_factors(n), new_factors(n);
  for (size_t i = 0; i < n; ++i) {
    old_factors[i] = psgd::unflatten_factors(preconditioners[i].to(math[i]), group->params[i].sizes(), layouts[i]);
  }
  if (do_update) {
    for (size_t i = 0; i < n; ++i) {
      const at::Tensor& G = whiten_grad ? g[i] : m[i];
      // The noise scale: damping + eps |G|, eps of the math dtype (rollfast / LX).
      const double eps_i = math[i] == at::kDouble ? std::numeric_limits<double>::epsilon()
                                                  : static_cast<double>(std::numeric_limits<float>::epsilon());
      const at::Tensor V = at::randn(G.sizes(), gen, G.options());
      const at::Tensor noisy = G + (damping + eps_i * G.abs()) * V;
      auto& qs = old_factors[i];
      const at::Tensor X = psgd::probes_with_q(factor_options.geometry) ? psgd::apply_q(noisy, qs, triangular)
                                                                        : psgd::apply_p(noisy, qs, triangular);
      at::Tensor conj_b;
      if (factor_options.geometry == psgd::Geometry::EQ) {
        conj_b = psgd::solve_q_right(V, qs);
      }
      const int64_t numel = G.numel();
      at::Tensor lip = lipschitz[i].to(math[i]);
      std::vector<at::Tensor> updated;
      for (size_t f = 0; f < qs.size(); ++f) {
        const auto axis = static_cast<int64_t>(f);
        const bool dense = layouts[i][f];
        const at::Tensor t1 = psgd::factor_gram(X, axis, dense);
        const at::Tensor t2 =
            conj_b.defined()
                ? psgd::factor_gram(conj_b, axis, dense)
                : at::scalar_tensor(static_cast<double>(numel) / static_cast<double>(qs[f].size(0)), X.options());
        at::Tensor q = qs[f].clone();
        at::Tensor l = lip.select(0, axis);
        psgd::update_factor_(q, t1, t2, l, factor_options, gen);
        updated.push_back(q);
      }
      if (track_lipschitz) {
        lipschitz[i].copy_(lip);
      }
      new_factors[i] = std::move(updated);
    }
    // LX / rollfast: balance the factor norms with probability 0.01.
    if (at::rand({}, gen, at::TensorOptions().dtype(at::kDouble)).item<double>() < 0.01) {
      for (auto& factors : new_factors) {
        psgd::balance_factors_(factors);
      }
    }
  }
  rng_state.copy_(gen.get_state());

  std::vector<at::Tensor> updates(n);
  for (size_t i = 0; i < n; ++i) {
    const auto& factors = do_update && update_preconditioner_first ? new_factors[i] : old_factors[i];
    updates[i] = psgd::apply_p(b1 > 0.0 ? m[i] : g[i], factors, triangular);
  }
  if (post_clip) {
    common::clip_updates_(updates, *post_clip);
  }
  if (do_update) {
    // After preconditioning: old_factors may view the stored factors.
    for (size_t i = 0; i < n; ++i) {
      store(preconditioners[i], flatten_factors(new_factors[i]), seed, kPreconditionerSalt, static_cast<int64_t>(i),
            group->steps[i]);
    }
  }
  for (size_t i = 0; i < n; ++i) {
    at::Tensor& param = group->params[i];
    // -lr (d + lambda p); Magma scales both (decay folded in before masking).
    double multiplier = 1.0;
    if (use_magma) {
      at::Tensor score = magma_scores[i];
      const bool keep = common::magma_keep(magma, static_cast<int64_t>(i), group->steps[i]);
      multiplier = common::magma_multiplier(raw_g[i], m[i], score, keep, magma_tau).item<double>();
    }
    const double decay = 1.0 - group->lr * multiplier * weight_decay;
    const double alpha = -group->lr * multiplier;
    if (param.scalar_type() == at::kBFloat16 || param.scalar_type() == at::kHalf) {
      const uint64_t stream = kernels::cpu::rounding_stream(seed, static_cast<int64_t>(i), group->steps[i]);
      kernels::cpu::muon_apply_update_reduced(param, updates[i].to(at::kFloat).contiguous(), decay, alpha,
                                              stochastic_rounding, stream);
    } else {
      param.mul_(decay);
      param.add_(updates[i].to(param.scalar_type()), alpha);
    }
  }
  group->finish();
}

}  // namespace torchopt_ext::functional
