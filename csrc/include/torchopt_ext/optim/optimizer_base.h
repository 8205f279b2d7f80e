// Pieces every torchopt_ext LibTorch optimizer shares.
#pragma once

#include <torch/optim/optimizer.h>
#include <torch/optim/serialize.h>
#include <torch/serialize/archive.h>

#include <memory>
#include <optional>
#include <vector>

namespace torchopt_ext::optim {

// LibTorch's Optimizer::add_param_group (torch >= 2.10) keeps per-group
// options only for its own optimizer types and silently replaces the options
// of any other type with the defaults. This base re-applies the caller's
// options and validates every group; derived classes construct through it and
// callers may use add_param_group as usual.
template <typename Options>
class OptimizerBase : public torch::optim::Optimizer {
 public:
  OptimizerBase(const std::vector<torch::optim::OptimizerParamGroup>& param_groups, const Options& defaults)
      : torch::optim::Optimizer(std::vector<torch::optim::OptimizerParamGroup>{}, std::make_unique<Options>(defaults)) {
    defaults.validate();
    for (const auto& group : param_groups) {
      add_param_group(group);
    }
  }

  void add_param_group(const torch::optim::OptimizerParamGroup& group) {
    // Check before adding: a rejected group must not stay behind.
    if (group.has_options()) {
      auto* options = dynamic_cast<const Options*>(&group.options());
      TORCH_CHECK_VALUE(options != nullptr,
                        "add_param_group: the group's options have the wrong type for this optimizer");
      options->validate();
    }
    torch::optim::Optimizer::add_param_group(group);
    if (group.has_options()) {
      param_groups_.back().set_options(group.options().clone());
    }
  }

 protected:
  static Options& options_of(torch::optim::OptimizerParamGroup& group) {
    return static_cast<Options&>(group.options());
  }

  // Runs the closure (if any) with autograd on, as torch::optim optimizers do.
  static at::Tensor run_closure(const LossClosure& closure) {
    if (!closure) {
      return {};
    }
    at::AutoGradMode enable_grad(true);
    return closure();
  }

  // The param's state, created by `init()` on first use.
  template <typename ParamState, typename Init>
  ParamState& state_of(const at::Tensor& param, const Init& init) {
    auto& slot = state_[param.unsafeGetTensorImpl()];
    if (!slot) {
      slot = init();
    }
    return static_cast<ParamState&>(*slot);
  }
};

namespace detail {

// An optional dtype is stored as an int (-1: follow the param's dtype).
inline int64_t encode_dtype(const std::optional<at::ScalarType>& dtype) {
  return dtype ? static_cast<int64_t>(*dtype) : -1;
}

inline std::optional<at::ScalarType> decode_dtype(int64_t code) {
  if (code < 0) {
    return std::nullopt;
  }
  return static_cast<at::ScalarType>(code);
}

// A zero state tensor shaped like `param`, in `dtype` or the param's dtype.
at::Tensor zeros_state(const at::Tensor& param, const std::optional<at::ScalarType>& dtype);

// The per-param step counter: a float32 scalar, as torch.optim keeps it.
// This overload makes a host counter (the PSGD family, whose steps make host
// decisions from the step: the update gate, the Magma and rounding hashes).
at::Tensor new_step_counter();

// Where a param's step counter and its other one-element state (NAdamW's
// mu_product, Schedule-Free's weights, Magma's score) live for the
// optimizers whose ops have CUDA kernels: on a CUDA param's device (the
// kernels read and advance them there: no host sync, so a step can be
// captured in a CUDA graph, as the Python classes do), on the CPU otherwise.
at::Device scalar_device(const at::Tensor& param);

// A float32 zero step counter on scalar_device(param).
at::Tensor new_step_counter(const at::Tensor& param);

// `step` as a float32 0-d counter on scalar_device(param) when it lives
// elsewhere (a checkpoint saved with host counters loads onto the device, a
// device one onto the CPU); returned unchanged when it is already there, so
// CPU params keep exactly what they had.
at::Tensor placed_step(const at::Tensor& step, const at::Tensor& param);

// The same for other one-element state, keeping its dtype (undefined stays
// undefined).
at::Tensor placed_scalar(const at::Tensor& value, const at::Tensor& param);

// A param's Magma score: `score` placed as placed_scalar does, or a fresh
// 0-d float32 0.5 on scalar_device(param) when undefined (the first step, or
// Magma turned on later).
at::Tensor placed_magma_score(const at::Tensor& score, const at::Tensor& param);

void check_state_dtype(const char* name, const std::optional<at::ScalarType>& dtype);

// The options every torchopt_ext optimizer has besides its math:
// state_dtype, stochastic_rounding and seed.
template <typename Options>
void write_storage_options(torch::serialize::OutputArchive& archive, const Options& options) {
  archive.write("state_dtype", torch::IValue(encode_dtype(options.state_dtype())));
  archive.write("stochastic_rounding", torch::IValue(options.stochastic_rounding()));
  archive.write("seed", torch::IValue(options.seed()));
}

template <typename Options>
void read_storage_options(torch::serialize::InputArchive& archive, Options& options) {
  torch::IValue value;
  archive.read("state_dtype", value);
  options.state_dtype(decode_dtype(value.toInt()));
  archive.read("stochastic_rounding", value);
  options.stochastic_rounding(value.toBool());
  archive.read("seed", value);
  options.seed(value.toInt());
}

// Equality for optional state tensors: both undefined, or equal values.
bool same_state_tensor(const at::Tensor& a, const at::Tensor& b);

}  // namespace detail

}  // namespace torchopt_ext::optim
