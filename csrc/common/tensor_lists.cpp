#include "common/tensor_lists.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>

namespace torchopt_ext::common {
namespace {

bool same_math_type(at::ScalarType a, at::ScalarType b) {
  auto math = [](at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; };
  return math(a) == math(b);
}

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

}  // namespace

void check_cpu_kernels_usable(const char* op, at::TensorList params) {
#if defined(TORCHOPT_EXT_WITH_CUDA)
  if (!params.empty() && params[0].is_cuda()) {
    for (size_t i = 0; i < params.size(); ++i) {
      TORCH_CHECK_VALUE(params[i].device() == params[0].device(), op, ": params[", i, "] is on ", params[i].device(),
                        " but params[0] is on ", params[0].device(), "; one group runs on one device");
    }
    return;
  }
#endif
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK_VALUE(params[i].is_cpu(), op, ": params[", i, "] is on ", params[i].device(),
                      "; this build of torchopt_ext has kernels for CPU tensors only");
  }
#if defined(TORCHOPT_EXT_CPU_CAPABILITY_AVX2)
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  TORCH_CHECK(supported, op,
              ": torchopt_ext's CPU kernels were built for AVX2+FMA, which this CPU lacks; rebuild with "
              "-DTORCHOPT_EXT_CPU_CAPABILITY=DEFAULT");
#elif defined(TORCHOPT_EXT_CPU_CAPABILITY_AVX512)
  static const bool supported = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                                __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  TORCH_CHECK(supported, op,
              ": torchopt_ext's CPU kernels were built for AVX512, which this CPU lacks; rebuild with "
              "-DTORCHOPT_EXT_CPU_CAPABILITY=AVX2 or DEFAULT");
#endif
}

void check_hyperparameter(const char* op, const char* name, double value, bool ok, const char* rule) {
  TORCH_CHECK_VALUE(ok, op, ": ", name, " must be ", rule, ", got ", value);
}

void check_params_and_grads(const char* op, at::TensorList params, at::TensorList grads) {
  TORCH_CHECK_VALUE(params.size() == grads.size(), op, ": params and grads must have the same length, got ",
                    params.size(), " and ", grads.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const auto& p = params[i];
    const auto& g = grads[i];
    TORCH_CHECK_VALUE(p.defined() && g.defined(), op, ": params[", i, "] and grads[", i, "] must be defined");
    TORCH_CHECK_VALUE(!g.is_sparse(), op, ": grads[", i,
                      "] is sparse; this optimizer does not support sparse gradients");
    TORCH_CHECK_VALUE(p.layout() == at::kStrided && g.layout() == at::kStrided, op, ": params[", i, "] and grads[", i,
                      "] must be strided (dense) tensors");
    TORCH_CHECK_VALUE(!p.is_complex() && !g.is_complex(), op, ": params[", i,
                      "] is complex; complex parameters are not supported");
    TORCH_CHECK_VALUE(is_supported_float(p.scalar_type()), op, ": params[", i,
                      "] must be float32, float64, bfloat16 or float16, got ", p.scalar_type());
    TORCH_CHECK_VALUE(g.scalar_type() == p.scalar_type(), op, ": grads[", i, "] has dtype ", g.scalar_type(),
                      " but params[", i, "] has dtype ", p.scalar_type());
    TORCH_CHECK_VALUE(g.sizes() == p.sizes(), op, ": grads[", i, "] has shape ", g.sizes(), " but params[", i,
                      "] has shape ", p.sizes());
    TORCH_CHECK_VALUE(g.device() == p.device(), op, ": grads[", i, "] is on ", g.device(), " but params[", i,
                      "] is on ", p.device());
  }
}

void check_state_list(const char* op, const char* name, at::TensorList params, at::TensorList state) {
  TORCH_CHECK_VALUE(state.size() == params.size(), op, ": ", name, " must have one tensor per param (", params.size(),
                    "), got ", state.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const auto& s = state[i];
    TORCH_CHECK_VALUE(s.defined() && s.layout() == at::kStrided, op, ": ", name, "[", i,
                      "] must be a defined dense tensor");
    TORCH_CHECK_VALUE(s.sizes() == params[i].sizes(), op, ": ", name, "[", i, "] has shape ", s.sizes(), " but params[",
                      i, "] has shape ", params[i].sizes());
    TORCH_CHECK_VALUE(s.device() == params[i].device(), op, ": ", name, "[", i, "] is on ", s.device(), " but params[",
                      i, "] is on ", params[i].device());
    TORCH_CHECK_VALUE(is_supported_float(s.scalar_type()) && same_math_type(s.scalar_type(), params[i].scalar_type()),
                      op, ": ", name, "[", i, "] has dtype ", s.scalar_type(), ", which cannot hold state for a ",
                      params[i].scalar_type(),
                      " param (fp64 params need fp64 state; fp32/bf16/fp16 params take any of "
                      "fp32/bf16/fp16 state)");
  }
}

void check_scalar_list(const char* op, const char* name, at::TensorList params, at::TensorList scalars) {
  TORCH_CHECK_VALUE(scalars.size() == params.size(), op, ": ", name, " must have one tensor per param (", params.size(),
                    "), got ", scalars.size());
  for (size_t i = 0; i < scalars.size(); ++i) {
    const auto& s = scalars[i];
    TORCH_CHECK_VALUE(s.defined() && s.numel() == 1 && s.is_cpu() &&
                          (s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble),
                      op, ": ", name, "[", i, "] must be a one-element float32 or float64 CPU tensor");
  }
}

void check_scalar_list_on_param_devices(const char* op, const char* name, at::TensorList params, at::TensorList scalars,
                                        const char* why) {
  TORCH_CHECK_VALUE(scalars.size() == params.size(), op, ": ", name, " must have one tensor per param (", params.size(),
                    "), got ", scalars.size());
  for (size_t i = 0; i < scalars.size(); ++i) {
    const auto& s = scalars[i];
    TORCH_CHECK_VALUE(s.defined() && s.numel() == 1 && s.device() == params[i].device() && s.is_contiguous() &&
                          (s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble),
                      op, ": ", name, "[", i,
                      "] must be a one-element float32 or float64 tensor on the param's device (", params[i].device(),
                      ")", why);
  }
}

std::vector<double> increment_steps(at::TensorList steps) {
  std::vector<double> values(steps.size());
  for (size_t i = 0; i < steps.size(); ++i) {
    // Raw writes: an ATen add_ per tensor would cost more than the update of
    // a small param. The schema declares the mutation.
    if (steps[i].scalar_type() == at::kFloat) {
      auto* s = static_cast<float*>(steps[i].data_ptr());
      *s += 1.0f;
      values[i] = *s;
    } else {
      auto* s = static_cast<double*>(steps[i].data_ptr());
      *s += 1.0;
      values[i] = *s;
    }
  }
  return values;
}

double read_lr(const char* op, const at::Tensor& lr) {
  TORCH_CHECK_VALUE(lr.defined() && lr.numel() == 1 && at::isFloatingType(lr.scalar_type()), op,
                    ": lr must be a one-element floating tensor");
  const double value = lr.item<double>();
  check_hyperparameter(op, "lr", value, std::isfinite(value) && value >= 0.0, "a finite value >= 0");
  return value;
}

AmpArgs read_amp(const char* op, const std::optional<at::Tensor>& grad_scale,
                 const std::optional<at::Tensor>& found_inf) {
  AmpArgs amp;
  if (found_inf.has_value() && found_inf->defined()) {
    TORCH_CHECK_VALUE(found_inf->numel() == 1, op, ": found_inf must have one element");
    amp.skip_step = found_inf->item<double>() != 0.0;
  }
  if (grad_scale.has_value() && grad_scale->defined()) {
    TORCH_CHECK_VALUE(grad_scale->numel() == 1, op, ": grad_scale must have one element");
    amp.grad_scale = grad_scale->item<double>();
  }
  return amp;
}

std::vector<at::Tensor> DenseWorkspace::dense(at::TensorList tensors, bool write_back) {
  std::vector<at::Tensor> out;
  out.reserve(tensors.size());
  for (const auto& t : tensors) {
    if (t.is_contiguous()) {
      out.push_back(t);
    } else {
      auto copy = t.contiguous();
      if (write_back) {
        write_backs_.emplace_back(t, copy);
      }
      out.push_back(std::move(copy));
    }
  }
  return out;
}

void DenseWorkspace::finish() {
  for (auto& [original, copy] : write_backs_) {
    original.copy_(copy);
  }
  write_backs_.clear();
}

namespace {

bool defined(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// CUDA params: scalars on the params' device are handed to the kernels unread.
template <size_t N>
std::optional<DenseGroup<N>> prepare_cuda_group(const char* op, at::TensorList params, at::TensorList grads,
                                                const std::array<StateList, N>& state, at::TensorList state_steps,
                                                const at::Tensor& lr, const std::optional<at::Tensor>& grad_scale,
                                                const std::optional<at::Tensor>& found_inf) {
  const auto device = params[0].device();
  std::optional<DenseGroup<N>> group(std::in_place);
  group->on_cuda = true;
  if (lr.defined() && lr.device() == device) {
    TORCH_CHECK_VALUE(lr.numel() == 1 && (lr.scalar_type() == at::kFloat || lr.scalar_type() == at::kDouble), op,
                      ": a CUDA lr must be a one-element float32 or float64 tensor");
    group->device.lr = lr.contiguous();
    group->lr = std::nan("");  // read on the device
  } else {
    group->lr = read_lr(op, lr);
  }
  for (const auto* amp_tensor : {&grad_scale, &found_inf}) {
    if (defined(*amp_tensor)) {
      const auto& t = **amp_tensor;
      TORCH_CHECK_VALUE(t.numel() == 1, op, ": ", amp_tensor == &grad_scale ? "grad_scale" : "found_inf",
                        " must have one element");
      TORCH_CHECK_VALUE(!t.is_cuda() || (t.device() == device && t.scalar_type() == at::kFloat), op, ": ",
                        amp_tensor == &grad_scale ? "grad_scale" : "found_inf", " on CUDA must be float32 on ", device);
    }
  }
  if (defined(grad_scale)) {
    if (grad_scale->is_cuda()) {
      group->device.grad_scale = *grad_scale;
    } else {
      group->amp.grad_scale = grad_scale->item<double>();
    }
  }
  TORCH_CHECK_VALUE(state_steps.size() == params.size(), op, ": state_steps must have one tensor per param (",
                    params.size(), "), got ", state_steps.size());
  const bool device_steps = !state_steps.empty() && state_steps[0].is_cuda();
  for (size_t i = 0; i < state_steps.size(); ++i) {
    const auto& s = state_steps[i];
    if (device_steps) {
      TORCH_CHECK_VALUE(s.defined() && s.numel() == 1 && s.device() == device && s.scalar_type() == at::kFloat, op,
                        ": state_steps[", i, "] must be a one-element float32 tensor on ", device,
                        " (CUDA step counters are all on the params' device)");
    }
  }
  if (device_steps) {
    if (defined(found_inf) && !found_inf->is_cuda()) {
      if (found_inf->item<double>() != 0.0) {
        return std::nullopt;
      }
    } else if (defined(found_inf)) {
      group->device.found_inf = *found_inf;
    }
    group->device.steps.assign(state_steps.begin(), state_steps.end());
    group->steps.assign(params.size(), std::nan(""));  // on the device
  } else {
    check_scalar_list(op, "state_steps", params, state_steps);
    // Host counters: whether to skip must be known here (a sync if found_inf is on CUDA).
    if (defined(found_inf) && found_inf->item<double>() != 0.0) {
      return std::nullopt;
    }
    group->steps = increment_steps(state_steps);
  }
  group->params = group->workspace.dense(params, true);
  group->grads = group->workspace.dense(grads, defined(grad_scale));
  for (size_t k = 0; k < N; ++k) {
    group->state[k] = group->workspace.dense(state[k].tensors, !state[k].read_only);
  }
  return group;
}

}  // namespace

template <size_t N>
std::optional<DenseGroup<N>> prepare_elementwise_group(const char* op, at::TensorList params, at::TensorList grads,
                                                       const std::array<StateList, N>& state,
                                                       at::TensorList state_steps, const at::Tensor& lr,
                                                       const std::optional<at::Tensor>& grad_scale,
                                                       const std::optional<at::Tensor>& found_inf) {
  // A CUDA lr is read by the kernels: no host copy (and no sync) here.
  const bool on_cuda = !params.empty() && params[0].is_cuda();
  const double lr_value = on_cuda ? 0.0 : read_lr(op, lr);
  check_params_and_grads(op, params, grads);
  const StateList* first_used = nullptr;
  for (const auto& list : state) {
    if (list.used) {
      check_state_list(op, list.name, params, list.tensors);
      if (first_used == nullptr) {
        first_used = &list;
      } else {
        for (size_t i = 0; i < params.size(); ++i) {
          TORCH_CHECK_VALUE(list.tensors[i].scalar_type() == first_used->tensors[i].scalar_type(), op, ": ", list.name,
                            "[", i, "] has dtype ", list.tensors[i].scalar_type(), " but ", first_used->name, "[", i,
                            "] has dtype ", first_used->tensors[i].scalar_type(),
                            "; the state of one param shares one dtype");
        }
      }
    } else {
      TORCH_CHECK_VALUE(list.tensors.empty(), op, ": ", list.name, " must be empty with these options");
    }
  }
  check_cpu_kernels_usable(op, params);
  if (on_cuda) {
    return prepare_cuda_group<N>(op, params, grads, state, state_steps, lr, grad_scale, found_inf);
  }
  check_scalar_list(op, "state_steps", params, state_steps);
  auto amp = read_amp(op, grad_scale, found_inf);
  if (amp.skip_step || params.empty()) {
    return std::nullopt;
  }
  std::optional<DenseGroup<N>> group(std::in_place);
  group->lr = lr_value;
  group->amp = amp;
  group->steps = increment_steps(state_steps);
  group->params = group->workspace.dense(params, true);
  group->grads = group->workspace.dense(grads, amp.grad_scale.has_value());
  for (size_t k = 0; k < N; ++k) {
    group->state[k] = group->workspace.dense(state[k].tensors, !state[k].read_only);
  }
  return group;
}

// The state-list counts the ops use.
template std::optional<DenseGroup<1>> prepare_elementwise_group<1>(const char*, at::TensorList, at::TensorList,
                                                                   const std::array<StateList, 1>&, at::TensorList,
                                                                   const at::Tensor&, const std::optional<at::Tensor>&,
                                                                   const std::optional<at::Tensor>&);
template std::optional<DenseGroup<2>> prepare_elementwise_group<2>(const char*, at::TensorList, at::TensorList,
                                                                   const std::array<StateList, 2>&, at::TensorList,
                                                                   const at::Tensor&, const std::optional<at::Tensor>&,
                                                                   const std::optional<at::Tensor>&);
template std::optional<DenseGroup<3>> prepare_elementwise_group<3>(const char*, at::TensorList, at::TensorList,
                                                                   const std::array<StateList, 3>&, at::TensorList,
                                                                   const at::Tensor&, const std::optional<at::Tensor>&,
                                                                   const std::optional<at::Tensor>&);

template std::optional<DenseGroup<4>> prepare_elementwise_group<4>(const char*, at::TensorList, at::TensorList,
                                                                   const std::array<StateList, 4>&, at::TensorList,
                                                                   const at::Tensor&, const std::optional<at::Tensor>&,
                                                                   const std::optional<at::Tensor>&);

}  // namespace torchopt_ext::common
