// Spike protection and update clipping (rollfast.md §2.3 steps 1, 6, 9 and
// §3.3 steps 1, 7), written once for PRISM and Kron: a raw global-norm clip of
// the gradients with permissive (clip and continue) or strict (skip the step)
// protection, and a post-clip of the finished updates (per-tensor RMS cap then
// element cap, or one global RMS factor).
//
// Host syncs: the raw clip returns its spike / skip decision as host bools
// (one read of the 0-d norm), because a skipped step must leave every piece of
// state untouched and deciding that on the device would cost a full copy of
// the state. The functionals that call it are CPU-only, where that read is no
// device sync (as the Magma score read). The post-clips never read the host.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <vector>

namespace torchopt_ext::common {

// The L2 norm over all elements of all `tensors`, as a 0-d tensor in float32
// (float64 when any input is float64), accumulated in that dtype on the
// first tensor's device.
at::Tensor global_l2_norm(at::TensorList tensors);

struct RawClipResult {
  at::Tensor norm;     // 0-d: the global norm of the raw gradients
  double scale = 1.0;  // multiply the gradients by this (c / (norm + tiny) on a spike, else 1)
  bool spike = false;  // norm > max_norm (NaN norms are no spike)
  bool skip = false;   // spike and strict protection: the step must change no state
};

// rollfast's raw global clip: spike = ||g|| > max_norm; on a spike the grads
// are scaled by max_norm / (||g|| + tiny) (tiny = float32's smallest normal),
// and with permissive = false the step is to be skipped. max_norm > 0.
RawClipResult raw_global_clip(at::TensorList grads, double max_norm, bool permissive);
// The same decision for a norm computed elsewhere (e.g. over several param
// groups by the optimizer front end).
RawClipResult raw_global_clip_from_norm(const at::Tensor& norm, double max_norm, bool permissive);

// The same clip with no host read, for the standalone spike guard: the
// grads are multiplied in place by where(spike, max_norm / (norm + tiny), 1)
// (a multiply by 1 leaves them bitwise unchanged) and the 0-d bool spike flag
// is returned on the grads' device. max_norm > 0. `sum_of_squares` (0-d):
// the squared global norm computed elsewhere, used instead of the grads' own
// (sharded grads: the front end all-reduces the shards' sums, and the grads
// given are this rank's shards).
at::Tensor raw_global_clip_on_device_(at::TensorList grads, double max_norm,
                                      const std::optional<at::Tensor>& sum_of_squares = std::nullopt);

enum class GradClipMode { PerTensorRMS, GlobalRMS };

// "per_tensor_rms" or "global_rms"; anything else is an error naming `argument`.
GradClipMode parse_grad_clip_mode(const std::string& name, const char* argument);

struct PostClipOptions {
  double max_rms = 2.0;                      // a_rms > 0
  std::optional<double> max_element = 10.0;  // a_el > 0 (PerTensorRMS only; nullopt: no element cap)
  GradClipMode mode = GradClipMode::PerTensorRMS;
  double rms_eps = 1e-9;  // PerTensorRMS: rms + rms_eps (PRISM); GlobalRMS: max(rms, rms_eps)
};

// Errors name `op` and the option (grad_clip_max_amps).
void check_post_clip_options(const char* op, const PostClipOptions& options);

// In place on one update: u <- u * min(1, max_rms / (rms(u) + rms_eps)), then
// clamp to [-max_element, max_element]. The RMS is taken in u's dtype.
void clip_update_per_tensor_rms_(at::Tensor& update, const PostClipOptions& options);

// In place on all updates: one factor min(1, max_rms / max(rms_global, rms_eps))
// with rms_global = sqrt(sum |u|^2 / sum numel) over every tensor; no
// element cap. PerTensorRMS options clip each tensor on its own instead.
void clip_updates_(std::vector<at::Tensor>& updates, const PostClipOptions& options);

}  // namespace torchopt_ext::common
