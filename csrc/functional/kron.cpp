#include "torchopt_ext/functional/kron.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/util/Exception.h>

#include <c10/util/accumulate.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <string>

#include "common/tensor_lists.h"
#include "functional/psgd_device.h"
#include "kernels/cpu/stochastic_rounding.h"
#include "torchopt_ext/common/clipping.h"
#include "torchopt_ext/common/magma.h"
#include "torchopt_ext/common/psgd.h"
#include "torchopt_ext/common/side_by_side.h"

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
    psgd_device::apply_update_reduced(storage, value.reshape(storage.sizes()).contiguous(), 0.0, 1.0, true, stream);
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
                bool stochastic_rounding, int64_t seed, bool stacked, std::optional<int64_t> stacked_chunk_size,
                at::OptionalIntArrayRef stacked_slices, std::optional<bool> batch_equal_shapes,
                const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                at::IntArrayRef param_indices, at::IntArrayRef group_shapes) {
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
  TORCH_CHECK_VALUE(!stacked_chunk_size || *stacked_chunk_size >= 1, op,
                    ": stacked_chunk_size must be None or >= 1, got ", stacked_chunk_size.value_or(0));
  TORCH_CHECK_VALUE(stacked || !stacked_slices, op, ": stacked_slices needs stacked=True");
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
  TORCH_CHECK_VALUE(preconditioners.size() == params.size(), op, ": preconditioners must have one tensor per param (",
                    params.size(), "), got ", preconditioners.size());
  TORCH_CHECK_VALUE(lipschitz.size() == params.size(), op, ": lipschitz must have one tensor per param (",
                    params.size(), "), got ", lipschitz.size());
  if (stacked_slices) {
    TORCH_CHECK_VALUE(stacked_slices->size() == 2 * params.size(), op,
                      ": stacked_slices must hold (first slice, total slices) per param (", 2 * params.size(),
                      " values), got ", stacked_slices->size());
  }
  // Per param: the shape the factors precondition (a slice's when stacked),
  // its number of local slices (1 unstacked), the stacked param's global
  // slice range [first, first + layers) of `total` (a shard of a stacked
  // DTensor holds whole slices) and the global index of its first slice in
  // the group (the tensor index of Magma and stochastic rounding).
  const size_t n = params.size();
  std::vector<std::vector<int64_t>> shapes(n);
  std::vector<int64_t> layers(n, 1), first(n, 0), total(n, 1), base(n, 0);
  // The ownership path's group: per param of the whole group, its shape and
  // math dtype, and which of this call's params it is (-1: another rank's).
  std::vector<std::vector<int64_t>> group_sizes;
  std::vector<at::ScalarType> group_math;
  std::vector<int64_t> local_of;
  if (!group_shapes.empty() || !param_indices.empty()) {
    TORCH_CHECK_VALUE(!stacked, op, ": stacked=True does not take param_indices / group_shapes (the ownership path)");
    TORCH_CHECK_VALUE(param_indices.size() == params.size(), op,
                      ": param_indices must have one entry per param on the ownership path (", params.size(), "), got ",
                      param_indices.size());
    for (size_t at_ = 0; at_ < group_shapes.size();) {
      const int64_t ndim = group_shapes[at_];
      TORCH_CHECK_VALUE(ndim >= 0 && at_ + ndim + 2 <= group_shapes.size(), op, ": malformed group_shapes");
      group_sizes.emplace_back(group_shapes.begin() + at_ + 1, group_shapes.begin() + at_ + 1 + ndim);
      group_math.push_back(group_shapes[at_ + 1 + ndim] ? at::kDouble : at::kFloat);
      at_ += ndim + 2;
    }
    local_of.assign(group_sizes.size(), -1);
    for (size_t i = 0; i < param_indices.size(); ++i) {
      const int64_t k = param_indices[i];
      TORCH_CHECK_VALUE(k >= 0 && k < static_cast<int64_t>(group_sizes.size()) && (i == 0 || k > param_indices[i - 1]),
                        op, ": param_indices must ascend within the group's ", group_sizes.size(), " params");
      TORCH_CHECK_VALUE(params[i].sizes() == at::IntArrayRef(group_sizes[k]), op, ": params[", i,
                        "] does not have the shape group_shapes gives its index ", k);
      local_of[k] = static_cast<int64_t>(i);
    }
  }
  std::vector<std::vector<bool>> layouts;
  int64_t next_base = 0;
  for (size_t i = 0; i < n; ++i) {
    if (stacked) {
      TORCH_CHECK_VALUE(params[i].dim() >= 2, op, ": stacked=True needs params of shape (L, ...) with at least 2 dims ",
                        "(one preconditioner per slice), got params[", i, "] of shape ", params[i].sizes());
      shapes[i] = params[i].sizes().slice(1).vec();
      layers[i] = params[i].size(0);
      total[i] = layers[i];
      if (stacked_slices) {
        first[i] = (*stacked_slices)[2 * i];
        total[i] = (*stacked_slices)[2 * i + 1];
        TORCH_CHECK_VALUE(first[i] >= 0 && first[i] + layers[i] <= total[i], op, ": stacked_slices[", 2 * i, "] = (",
                          first[i], ", ", total[i], ") does not hold the ", layers[i], " local slices of params[", i,
                          "]");
      }
    } else {
      shapes[i] = params[i].sizes().vec();
    }
    // The ownership path keys a param by its index in the whole group.
    base[i] = param_indices.empty() ? next_base + first[i] : param_indices[i];
    next_base += total[i];
    layouts.push_back(psgd::factor_layout(shapes[i], layout));
    const auto& q = preconditioners[i];
    const int64_t numel = psgd::factors_numel(shapes[i], layouts.back());
    const auto factors = static_cast<int64_t>(layouts.back().size());
    const auto& l = lipschitz[i];
    if (stacked) {
      TORCH_CHECK_VALUE(q.dim() == 2 && q.size(0) == layers[i] && q.size(1) == numel && q.is_contiguous(), op,
                        ": preconditioners[", i, "] must be a contiguous (", layers[i], ", ", numel,
                        ") tensor for a stacked param of shape ", params[i].sizes(), ", got shape ", q.sizes());
      TORCH_CHECK_VALUE(l.dim() == 2 && l.size(0) == layers[i] && l.size(1) == factors, op, ": lipschitz[", i,
                        "] must be (", layers[i], ", ", factors, ") for a stacked param, got shape ", l.sizes());
    } else {
      TORCH_CHECK_VALUE(q.dim() == 1 && q.numel() == numel && q.is_contiguous(), op, ": preconditioners[", i,
                        "] must be a contiguous 1-D tensor of ", numel, " elements for a param of shape ",
                        params[i].sizes(), ", got shape ", q.sizes());
      TORCH_CHECK_VALUE(l.dim() == 1 && l.numel() == factors, op, ": lipschitz[", i,
                        "] must be a 1-D tensor with one entry per factor (", factors, "), got shape ", l.sizes());
    }
    TORCH_CHECK_VALUE(at::isFloatingType(q.scalar_type()) && q.device() == params[i].device(), op, ": preconditioners[",
                      i, "] must be floating and on the param's device");
    TORCH_CHECK_VALUE(at::isFloatingType(l.scalar_type()), op, ": lipschitz[", i, "] must be floating");
  }
  if (use_magma) {
    if (stacked) {
      TORCH_CHECK_VALUE(magma_scores.size() == n, op, ": magma_scores must have one tensor per param (", n, "), got ",
                        magma_scores.size());
      for (size_t i = 0; i < n; ++i) {
        TORCH_CHECK_VALUE(
            magma_scores[i].dim() == 1 && magma_scores[i].size(0) == layers[i] &&
                magma_scores[i].scalar_type() == at::kFloat && magma_scores[i].device() == params[i].device(),
            op, ": magma_scores[", i, "] must be a float32 tensor of one score per slice on the param's device (",
            layers[i], " on ", params[i].device(), "), got shape ", magma_scores[i].sizes(), " on ",
            magma_scores[i].device());
      }
    } else {
      // A CUDA score is updated and read on the device (no sync).
      common::check_scalar_list_on_param_devices(op, "magma_scores", params, magma_scores, "");
    }
  } else {
    TORCH_CHECK_VALUE(magma_scores.empty(), op, ": magma_scores must be empty without use_magma");
  }
  TORCH_CHECK_VALUE(rng_state.scalar_type() == at::kByte && rng_state.device().is_cpu() && rng_state.dim() == 1, op,
                    ": rng_state must be a CPU uint8 generator state (torch.Generator.get_state())");
  if (update_probability) {
    TORCH_CHECK_VALUE(update_probability->numel() == 1, op,
                      ": preconditioner_update_probability must be one value, got shape ", update_probability->sizes());
    // The gate is a host decision (see below): a CUDA value would cost a sync per step.
    TORCH_CHECK_VALUE(update_probability->is_cpu(), op,
                      ": preconditioner_update_probability must be a float or a CPU tensor, got a tensor on ",
                      update_probability->device());
  }
  psgd_device::check_host_scalars(op, params, lr, state_steps);

  auto group = common::prepare_elementwise_group<1>(
      op, params, grads, {{{"momentum_buffers", momentum_buffers, b1 > 0.0}}}, state_steps, lr, grad_scale, found_inf);
  if (!group) {
    return;
  }
  psgd_device::unscale_grads_(*group);
  // One problem per (param, local slice) in group order: s = -1 for an
  // unstacked param. Per-slice work (clips, Magma, rounding streams) runs
  // over these, so a stacked param behaves like its slices listed as params.
  struct Slice {
    size_t i;
    int64_t s;
  };
  std::vector<Slice> slices;
  for (size_t i = 0; i < n; ++i) {
    if (!stacked) {
      slices.push_back({i, -1});
      continue;
    }
    for (int64_t s = 0; s < layers[i]; ++s) {
      slices.push_back({i, s});
    }
  }
  auto part = [](const at::Tensor& t, const Slice& slice) { return slice.s < 0 ? t : t.select(0, slice.s); };
  auto index_of = [&](const Slice& slice) { return base[slice.i] + std::max<int64_t>(slice.s, 0); };

  // The group's step (1-based): the first param's counter.
  const double step = group->steps[0];
  // Host read of a CPU scalar (checked above): no device sync on CUDA either.
  const double probability =
      update_probability ? update_probability->item<double>() : kron_default_update_probability(step);
  TORCH_CHECK_VALUE(std::isfinite(probability) && probability >= 0.0 && probability <= 1.0, op,
                    ": preconditioner_update_probability must be in [0, 1], got ", probability);
  double raw_scale = 1.0;
  if (raw_global_grad_clip) {
    // Per slice, in slice order: the sum rounds as with the slices as params.
    std::vector<at::Tensor> slice_grads;
    for (const auto& slice : slices) {
      slice_grads.push_back(part(group->grads[slice.i], slice));
    }
    // rollfast: a spike only continues (clipped) while p >= 1 and protection is permissive.
    // The norm is summed on the grads' device; its one host read (the skip
    // decision gates every state write, the generator included) is a sync on CUDA.
    const auto clip =
        common::raw_global_clip(slice_grads, *raw_global_grad_clip, permissive_spike_protection && probability >= 1.0);
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
      const at::Tensor& stored = group->state[0][i];
      // Stored in the math dtype: updated in place (the same lerp, no copy back).
      m[i] = stored.scalar_type() == math[i] ? stored.lerp_(g[i], 1.0 - beta)
                                             : at::lerp(stored.to(math[i]), g[i], 1.0 - beta);
    }
  }
  if (b1 > 0.0) {
    for (const auto& slice : slices) {
      if (group->state[0][slice.i].scalar_type() != math[slice.i]) {
        store(part(group->state[0][slice.i], slice), part(m[slice.i], slice), seed, kMomentumSalt, index_of(slice),
              group->steps[slice.i]);
      }
    }
  }

  // Factors are created on a param's first step: preconditioner_init_scale,
  // or rollfast's lazy (max over these params' slices of mean |g|^4 +
  // damping^4)^(-1/8).
  std::vector<Slice> fresh;
  for (const auto& slice : slices) {
    if (group->steps[slice.i] == 1.0) {
      fresh.push_back(slice);
    }
  }
  if (!fresh.empty()) {
    double scale = preconditioner_init_scale.value_or(0.0);
    if (!preconditioner_init_scale) {
      // One host read (a sync on CUDA) on a param's first step only.
      std::vector<at::Tensor> means;
      for (const auto& slice : fresh) {
        const at::Tensor gs = part(g[slice.i], slice);
        if (gs.numel() > 0) {
          means.push_back(gs.abs().pow(4).mean().to(at::kDouble));
        }
      }
      // NaN means are ignored, as a running std::max over them would.
      const at::Tensor all = means.empty() ? at::Tensor() : at::stack(means);
      const double largest =
          means.empty() ? 0.0 : std::max(0.0, at::where(at::isnan(all), 0.0, all).max().item<double>());
      scale = std::pow(largest + std::pow(damping, 4), -1.0 / 8.0);
    }
    for (const auto& slice : fresh) {
      psgd::init_factors_(part(preconditioners[slice.i], slice), shapes[slice.i], layouts[slice.i], scale);
      part(lipschitz[slice.i], slice).zero_();
    }
  }

  // Work units: one problem (an unstacked param, or a stacked slice) run
  // through the unbatched primitives, or a batch of problems of one slice
  // shape and math dtype run as one (B, ...) stack through the batched ones
  // (bmm, batched solves and norm bounds): at most stacked_chunk_size
  // consecutive slices of a stacked param, or unstacked params of equal
  // shape (the first such param's turn collects the later ones). Whether a
  // shape batches: batch_equal_shapes, or by default psgd::prefer_batched
  // (always on CUDA; on the CPU only for small slices, where bmm beats a loop
  // of mm). The draws do not depend on the grouping (made per problem in
  // group order before any math), so neither do the results beyond rounding.
  struct Unit {
    std::vector<Slice> members;
    bool batched = false;
    bool chunk = false;  // consecutive slices of one stacked param: narrow views, no gather
  };
  std::vector<int64_t> slice_begin(n, 0);  // position of param i's first problem in `slices`
  for (size_t i = 1; i < n; ++i) {
    slice_begin[i] = slice_begin[i - 1] + (stacked ? layers[i - 1] : 1);
  }
  auto position = [&](const Slice& slice) { return slice_begin[slice.i] + std::max<int64_t>(slice.s, 0); };
  auto batch_shape = [&](size_t i) {
    if (batch_equal_shapes) {
      return *batch_equal_shapes;
    }
    return psgd::prefer_batched(params[i].device(), c10::multiply_integers(shapes[i]));
  };
  const int64_t cap = stacked_chunk_size.value_or(std::numeric_limits<int64_t>::max());
  std::vector<Unit> units;
  if (stacked) {
    for (size_t i = 0; i < n; ++i) {
      if (layers[i] == 0) {
        continue;  // an empty shard: it only skips the draws
      }
      const bool batch = batch_shape(i);
      const int64_t chunk = batch ? std::min(cap, layers[i]) : 1;
      for (int64_t s = 0; s < layers[i]; s += chunk) {
        Unit unit;
        for (int64_t k = s; k < std::min(s + chunk, layers[i]); ++k) {
          unit.members.push_back({i, k});
        }
        unit.batched = batch;
        unit.chunk = batch;
        units.push_back(std::move(unit));
      }
    }
  } else {
    std::vector<bool> taken(n, false);
    for (size_t i = 0; i < n; ++i) {
      if (taken[i]) {
        continue;
      }
      Unit unit;
      unit.members.push_back({i, -1});
      // 0-d and empty params stay unbatched (the batched primitives take rank >= 1).
      if (params[i].dim() >= 1 && params[i].numel() > 0 && batch_shape(i)) {
        for (size_t j = i + 1; j < n && static_cast<int64_t>(unit.members.size()) < cap; ++j) {
          if (!taken[j] && shapes[j] == shapes[i] && math[j] == math[i]) {
            unit.members.push_back({j, -1});
            taken[j] = true;
          }
        }
      }
      unit.batched = unit.members.size() > 1;
      units.push_back(std::move(unit));
    }
  }
  // A unit's tensor from a per-param one: the problem's own, a narrow view
  // of the stacked tensor, or the members' stacked (then a copy).
  auto of_unit = [&](const Unit& unit, const std::function<at::Tensor(size_t)>& whole,
                     std::optional<at::ScalarType> dtype) {
    const Slice& head = unit.members[0];
    at::Tensor out;
    if (!unit.batched) {
      out = part(whole(head.i), head);
    } else if (unit.chunk) {
      out = whole(head.i).narrow(0, head.s, static_cast<int64_t>(unit.members.size()));
    } else {
      std::vector<at::Tensor> parts;
      for (const auto& member : unit.members) {
        parts.push_back(dtype ? whole(member.i).to(*dtype) : whole(member.i));
      }
      return at::stack(parts);
    }
    return dtype ? out.to(*dtype) : out;
  };
  auto factors_of = [&](const at::Tensor& flat, const Unit& unit) {
    const size_t i = unit.members[0].i;
    return unit.batched ? psgd::unflatten_factors_batched(flat, shapes[i], layouts[i])
                        : psgd::unflatten_factors(flat, shapes[i], layouts[i]);
  };

  // The gate and every random draw come from the CPU generator that rng_state
  // holds: a host decision and host draws (copied to the params' device), so
  // no device sync, and a seed gives the same draws, hence the same
  // trajectory up to rounding, on the CPU and on CUDA. The cost on CUDA is
  // host randn time and one copy per noise / probe batch.
  const bool do_update = at::rand({}, gen, at::TensorOptions().dtype(at::kDouble)).item<double>() < probability;
  const size_t units_n = units.size();
  // A unit's relative cost, for running units side by side: its GEMM work,
  // numel times the summed sizes of its dense factors (plus its element-wise passes).
  std::vector<double> unit_costs(units_n);
  for (size_t u = 0; u < units_n; ++u) {
    const size_t i = units[u].members[0].i;
    double width = 1.0;
    for (size_t f = 0; f < layouts[i].size(); ++f) {
      width += layouts[i][f] ? static_cast<double>(shapes[i][f]) : 0.0;
    }
    unit_costs[u] =
        static_cast<double>(units[u].members.size()) * static_cast<double>(c10::multiply_integers(shapes[i])) * width;
  }
  const bool on_cpu = n > 0 && params[0].is_cpu();
  std::vector<std::vector<at::Tensor>> old_factors(units_n), new_factors(units_n);
  for (size_t u = 0; u < units_n; ++u) {
    const size_t i = units[u].members[0].i;
    old_factors[u] = factors_of(of_unit(units[u], [&](size_t j) { return preconditioners[j]; }, math[i]), units[u]);
  }
  if (do_update) {
    // 1. The draws of every problem in group order (the unbatched order: per
    // problem the noise V, then per dense factor in axis order its probes),
    // on the host. The draws of slices another rank holds (a sharded
    // stacked param) are drawn and dropped so every rank's generator stays
    // the single-process one; the ownership path does the same for the
    // group's params that other ranks step (see kron.h).
    struct Draws {
      at::Tensor noise;
      std::vector<std::vector<at::Tensor>> probes;  // [factor][k]
    };
    std::vector<Draws> draws(slices.size());
    auto skip_param = [&](at::IntArrayRef shape, at::ScalarType dtype) {
      (void)at::randn(shape, gen, at::TensorOptions().dtype(dtype));
      const auto dense = psgd::factor_layout(shape, layout);
      for (size_t f = 0; f < dense.size(); ++f) {
        psgd::skip_update_factor_draws(shape.empty() ? 1 : shape[f], dense[f], factor_options, dtype, gen);
      }
    };
    auto skip_slices = [&](size_t i, int64_t count) {
      for (int64_t s = 0; s < count; ++s) {
        skip_param(shapes[i], math[i]);
      }
    };
    size_t next_group = 0;
    auto skip_group_until = [&](size_t stop) {
      for (; next_group < stop; ++next_group) {
        if (local_of[next_group] < 0) {
          skip_param(group_sizes[next_group], group_math[next_group]);
        }
      }
    };
    auto draw = [&](const Slice& slice) {
      const auto& shape = shapes[slice.i];
      const auto& dense = layouts[slice.i];
      const auto opts = at::TensorOptions().dtype(math[slice.i]);
      Draws& out = draws[position(slice)];
      out.noise = at::randn(shape, gen, opts);
      out.probes.resize(dense.size());
      for (size_t f = 0; f < dense.size(); ++f) {
        for (int64_t k = 0; k < psgd::probe_draws(factor_options.geometry, dense[f]); ++k) {
          out.probes[f].push_back(at::randn({psgd::kNormProbeRows, shape.empty() ? 1 : shape[f]}, gen, opts));
        }
      }
    };
    for (size_t i = 0; i < n; ++i) {
      if (!group_sizes.empty()) {
        skip_group_until(static_cast<size_t>(param_indices[i]));
        next_group = static_cast<size_t>(param_indices[i]) + 1;
      }
      if (!stacked) {
        draw({i, -1});
        continue;
      }
      if (layers[i] == 0) {
        skip_slices(i, total[i]);
        continue;
      }
      skip_slices(i, first[i]);
      for (int64_t s = 0; s < layers[i]; ++s) {
        draw({i, s});
      }
      skip_slices(i, total[i] - first[i] - layers[i]);
    }
    skip_group_until(group_sizes.size());

    // 2. The factor updates, unit by unit (side by side on a multi-threaded CPU).
    common::run_side_by_side(unit_costs, on_cpu, [&](size_t u) {
      const Unit& unit = units[u];
      const size_t i = unit.members[0].i;
      const auto& dense = layouts[i];
      const at::Tensor G = of_unit(unit, [&](size_t j) { return whiten_grad ? g[j] : m[j]; }, std::nullopt);
      // The members' host draws picked by `pick(position)`, stacked when
      // batched, on G's device.
      auto host_batch = [&](const std::function<at::Tensor(int64_t)>& pick) {
        if (!unit.batched) {
          return psgd_device::to_device_of(pick(position(unit.members[0])), G);
        }
        std::vector<at::Tensor> rows;
        for (const auto& member : unit.members) {
          rows.push_back(pick(position(member)));
        }
        return psgd_device::to_device_of(at::stack(rows), G);
      };
      const at::Tensor V = host_batch([&](int64_t k) { return draws[k].noise; });
      // The noise scale: damping + eps |G|, eps of the math dtype (rollfast / LX).
      const double eps_i = math[i] == at::kDouble ? std::numeric_limits<double>::epsilon()
                                                  : static_cast<double>(std::numeric_limits<float>::epsilon());
      const at::Tensor noisy = at::addcmul(G, G.abs().mul_(eps_i).add_(damping), V);
      auto& qs = old_factors[u];
      const at::Tensor X = psgd::probes_with_q(factor_options.geometry)
                               ? psgd::apply_q(noisy, qs, unit.batched, triangular)
                               : psgd::apply_p(noisy, qs, unit.batched, triangular);
      at::Tensor conj_b;
      if (factor_options.geometry == psgd::Geometry::EQ) {
        conj_b = psgd::solve_q_right(V, qs, unit.batched);
      }
      const auto count = static_cast<int64_t>(unit.members.size());
      const int64_t numel = unit.batched ? G.numel() / count : G.numel();
      at::Tensor lip = of_unit(unit, [&](size_t j) { return lipschitz[j]; }, math[i]);
      std::vector<at::Tensor> updated;
      for (size_t f = 0; f < qs.size(); ++f) {
        const auto axis = static_cast<int64_t>(f);
        const at::Tensor t1 = psgd::factor_gram(X, axis, dense[f], unit.batched);
        const int64_t d = qs[f].size(unit.batched ? 1 : 0);
        const at::Tensor t2 = conj_b.defined()
                                  ? psgd::factor_gram(conj_b, axis, dense[f], unit.batched)
                                  : at::scalar_tensor(static_cast<double>(numel) / static_cast<double>(d), X.options());
        at::Tensor q = qs[f];  // update_factor_ rebinds q, never writes it
        at::Tensor l = lip.select(-1, axis);
        int64_t next = 0;
        const psgd::ProbeSource source = [&, f](int64_t) {
          const int64_t k = next++;
          return host_batch([&](int64_t p) { return draws[p].probes[f][k]; });
        };
        psgd::update_factor_(q, t1, t2, l, factor_options, source, unit.batched);
        updated.push_back(q);
      }
      if (track_lipschitz) {
        if (unit.batched && !unit.chunk) {
          for (int64_t s = 0; s < count; ++s) {
            lipschitz[unit.members[s].i].copy_(lip.select(0, s));
          }
        } else {
          of_unit(unit, [&](size_t j) { return lipschitz[j]; }, std::nullopt).copy_(lip);
        }
      }
      new_factors[u] = std::move(updated);
    });
    // LX / rollfast: balance the factor norms with probability 0.01.
    if (at::rand({}, gen, at::TensorOptions().dtype(at::kDouble)).item<double>() < 0.01) {
      for (size_t u = 0; u < units_n; ++u) {
        psgd::balance_factors_(new_factors[u], units[u].batched);
      }
    }
  }
  rng_state.copy_(gen.get_state());

  // d = P m per unit, then per-problem views (group order) for the clip and the apply.
  std::vector<at::Tensor> updates(slices.size());
  common::run_side_by_side(unit_costs, on_cpu, [&](size_t u) {
    const Unit& unit = units[u];
    const auto& factors = do_update && update_preconditioner_first ? new_factors[u] : old_factors[u];
    const at::Tensor d = psgd::apply_p(of_unit(
                                           unit, [&](size_t j) { return b1 > 0.0 ? m[j] : g[j]; }, std::nullopt),
                                       factors, unit.batched, triangular);
    for (size_t s = 0; s < unit.members.size(); ++s) {
      // Views: the clip scales them in place.
      updates[position(unit.members[s])] = unit.batched ? d.select(0, static_cast<int64_t>(s)) : d;
    }
  });
  if (post_clip) {
    common::clip_updates_(updates, *post_clip);
  }
  if (do_update) {
    // After preconditioning: old_factors may view the stored factors.
    for (size_t u = 0; u < units_n; ++u) {
      const Unit& unit = units[u];
      if (!unit.batched) {
        const Slice& slice = unit.members[0];
        const at::Tensor storage = part(preconditioners[slice.i], slice);
        if (storage.scalar_type() != at::kBFloat16) {
          // A plain cast per factor into its view: no concatenated copy.
          auto views = psgd::unflatten_factors(storage, shapes[slice.i], layouts[slice.i]);
          for (size_t f = 0; f < views.size(); ++f) {
            views[f].copy_(new_factors[u][f]);
          }
          continue;
        }
        store(storage, flatten_factors(new_factors[u]), seed, kPreconditionerSalt, index_of(slice),
              group->steps[slice.i]);
        continue;
      }
      const auto count = static_cast<int64_t>(unit.members.size());
      std::vector<at::Tensor> flat;
      for (const auto& q : new_factors[u]) {
        flat.push_back(q.reshape({count, -1}));
      }
      const at::Tensor all = at::cat(flat, 1);
      for (int64_t s = 0; s < count; ++s) {
        const Slice& slice = unit.members[s];
        store(part(preconditioners[slice.i], slice), all.select(0, s), seed, kPreconditionerSalt, index_of(slice),
              group->steps[slice.i]);
      }
    }
  }
  for (size_t k = 0; k < slices.size(); ++k) {
    const Slice& slice = slices[k];
    at::Tensor param = part(group->params[slice.i], slice);
    const int64_t index = index_of(slice);
    const double slice_step = group->steps[slice.i];
    // -lr (d + lambda p); Magma scales both (decay folded in before masking).
    const uint64_t stream = kernels::cpu::rounding_stream(seed, index, slice_step);
    if (use_magma) {
      at::Tensor score = part(magma_scores[slice.i], slice);
      const bool keep = common::magma_keep(magma, index, slice_step);
      const at::Tensor z_s =
          common::magma_multiplier(part(raw_g[slice.i], slice), part(m[slice.i], slice), score, keep, magma_tau);
      // z * s stays a tensor: on CUDA the coefficients are applied on the device (no sync).
      psgd_device::apply_update_device_coefficients(
          param, updates[k], psgd_device::scaled_update_coefficients(z_s, group->lr, weight_decay), stochastic_rounding,
          stream);
    } else {
      psgd_device::apply_update(param, updates[k], 1.0 - group->lr * weight_decay, -group->lr, stochastic_rounding,
                                stream);
    }
  }
  group->finish();
}

}  // namespace torchopt_ext::functional
