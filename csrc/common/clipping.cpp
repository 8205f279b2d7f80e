#include "torchopt_ext/common/clipping.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <limits>

namespace torchopt_ext::common {

namespace {

at::ScalarType accumulation_type(at::TensorList tensors) {
  for (const auto& t : tensors) {
    if (t.scalar_type() == at::kDouble) {
      return at::kDouble;
    }
  }
  return at::kFloat;
}

}  // namespace

at::Tensor global_l2_norm(at::TensorList tensors) {
  const auto dtype = accumulation_type(tensors);
  // Summed on the first tensor's device: no per-tensor copy (a sync on CUDA).
  const auto device = tensors.empty() ? at::Device(at::kCPU) : tensors[0].device();
  at::Tensor sum = at::zeros({}, at::TensorOptions().dtype(dtype).device(device));
  for (const auto& t : tensors) {
    // Square-sum per tensor in the accumulation dtype (bf16 grads upcast first).
    const at::Tensor x = t.to(dtype);
    sum = sum + (x * x).sum().to(sum.device());
  }
  return sum.sqrt();
}

RawClipResult raw_global_clip(at::TensorList grads, double max_norm, bool permissive) {
  return raw_global_clip_from_norm(global_l2_norm(grads), max_norm, permissive);
}

RawClipResult raw_global_clip_from_norm(const at::Tensor& norm_tensor, double max_norm, bool permissive) {
  TORCH_CHECK_VALUE(std::isfinite(max_norm) && max_norm > 0.0, "raw_global_grad_clip must be > 0, got ", max_norm);
  RawClipResult result;
  result.norm = norm_tensor;
  // One host read (see the header): the skip decision gates every state write.
  const double norm = result.norm.item<double>();
  result.spike = norm > max_norm;
  if (result.spike) {
    result.scale = max_norm / (norm + static_cast<double>(std::numeric_limits<float>::min()));
    result.skip = !permissive;
  }
  return result;
}

at::Tensor raw_global_clip_on_device_(at::TensorList grads, double max_norm,
                                      const std::optional<at::Tensor>& sum_of_squares) {
  TORCH_CHECK_VALUE(std::isfinite(max_norm) && max_norm > 0.0, "raw_global_grad_clip: max_norm must be > 0, got ",
                    max_norm);
  const auto dtype = accumulation_type(grads);
  const auto device = grads.empty() ? at::Device(at::kCPU) : grads[0].device();
  at::Tensor sum = at::zeros({}, at::TensorOptions().dtype(dtype).device(device));
  for (const auto& g : grads) {
    TORCH_CHECK_VALUE(g.device() == device, "raw_global_grad_clip: all grads must be on one device, got ", device,
                      " and ", g.device());
    if (!sum_of_squares) {
      const at::Tensor x = g.to(dtype);
      sum = sum + (x * x).sum();
    }
  }
  if (sum_of_squares) {
    TORCH_CHECK_VALUE(sum_of_squares->dim() == 0 && at::isFloatingType(sum_of_squares->scalar_type()),
                      "raw_global_grad_clip: sum_of_squares must be a floating 0-d tensor, got shape ",
                      sum_of_squares->sizes());
    sum = sum_of_squares->to(sum.options());
  }
  const at::Tensor norm = sum.sqrt();
  const at::Tensor spike = norm > max_norm;  // a NaN norm is no spike, as raw_global_clip
  const double tiny = static_cast<double>(std::numeric_limits<float>::min());
  const at::Tensor scale = at::where(spike, max_norm / (norm + tiny), at::ones_like(norm));
  for (const auto& g : grads) {
    const_cast<at::Tensor&>(g).mul_(scale.to(g.scalar_type()));
  }
  return spike;
}

GradClipMode parse_grad_clip_mode(const std::string& name, const char* argument) {
  if (name == "per_tensor_rms") {
    return GradClipMode::PerTensorRMS;
  }
  if (name == "global_rms") {
    return GradClipMode::GlobalRMS;
  }
  TORCH_CHECK_VALUE(false, argument, " must be 'per_tensor_rms' or 'global_rms', got '", name, "'");
}

void check_post_clip_options(const char* op, const PostClipOptions& options) {
  TORCH_CHECK_VALUE(std::isfinite(options.max_rms) && options.max_rms > 0.0, op,
                    ": grad_clip_max_amps[0] (RMS cap) must be > 0, got ", options.max_rms);
  if (options.max_element) {
    TORCH_CHECK_VALUE(*options.max_element > 0.0 && !std::isnan(*options.max_element), op,
                      ": grad_clip_max_amps[1] (element cap) must be > 0, got ", *options.max_element);
  }
  TORCH_CHECK_VALUE(options.rms_eps >= 0.0, op, ": the clip's rms_eps must be >= 0, got ", options.rms_eps);
}

void clip_update_per_tensor_rms_(at::Tensor& update, const PostClipOptions& options) {
  if (update.numel() == 0) {
    return;
  }
  // min(1, a / (rms + eps)) as a 0-d tensor: no host read.
  const at::Tensor rms = update.square().mean().sqrt();
  update.mul_(at::clamp_max(options.max_rms / (rms + options.rms_eps), 1.0));
  if (options.max_element) {
    update.clamp_(-*options.max_element, *options.max_element);
  }
}

void clip_updates_(std::vector<at::Tensor>& updates, const PostClipOptions& options) {
  if (options.mode == GradClipMode::PerTensorRMS) {
    for (auto& u : updates) {
      clip_update_per_tensor_rms_(u, options);
    }
    return;
  }
  int64_t count = 0;
  for (const auto& u : updates) {
    count += u.numel();
  }
  if (count == 0) {
    return;
  }
  const at::Tensor norm = global_l2_norm(updates);
  const at::Tensor rms = norm / std::sqrt(static_cast<double>(count));
  const at::Tensor factor = at::clamp_max(options.max_rms / at::clamp_min(rms, options.rms_eps), 1.0);
  for (auto& u : updates) {
    u.mul_(factor.to(u.device()));
  }
}

}  // namespace torchopt_ext::common
