// Argument checks and bookkeeping shared by every functional optimizer step:
// list validation, step counters, AMP (grad_scale / found_inf), and dense
// stand-ins for tensors whose layout the fused kernels cannot walk directly.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <array>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace torchopt_ext::common {

// params/grads: same length, same shape/dtype/device, dense, real floating.
void check_params_and_grads(const char* op, at::TensorList params, at::TensorList grads);

// A per-param state list: same length and shape as params, on the same device,
// real floating. Reduced-precision storage must share the param's math type
// (fp64 params keep fp64 state; fp32/bf16/fp16 params keep any of those).
void check_state_list(const char* op, const char* name, at::TensorList params, at::TensorList state);

// Per-param host scalars (step counters, NAdam's mu_product): one float32 or
// float64 one-element CPU tensor per param.
void check_scalar_list(const char* op, const char* name, at::TensorList params, at::TensorList scalars);

// Per-param scalars kept on their param's device (Magma's scores, NAdam's
// mu-products with device counters): one contiguous float32 or float64
// one-element tensor per param, on that param's device. `why` ends the error.
void check_scalar_list_on_param_devices(const char* op, const char* name, at::TensorList params, at::TensorList scalars,
                                        const char* why);

// Adds one to every step counter and returns the new values.
std::vector<double> increment_steps(at::TensorList steps);

// The learning rate as a host double (lr may be a 0-d tensor of any floating dtype).
double read_lr(const char* op, const at::Tensor& lr);

// AMP contract of torch.amp.GradScaler: skip the whole step when found_inf is
// nonzero; otherwise divide grads by grad_scale and write them back.
struct AmpArgs {
  bool skip_step = false;
  std::optional<double> grad_scale;
};
AmpArgs read_amp(const char* op, const std::optional<at::Tensor>& grad_scale,
                 const std::optional<at::Tensor>& found_inf);

// Scalars that a CUDA group's kernels read on the device (no host sync, so a
// step can be captured in a CUDA graph). Undefined / empty: the host value in
// the group is used instead.
struct DeviceArgs {
  at::Tensor lr;          // one-element float32/float64 CUDA tensor
  at::Tensor grad_scale;  // float32 CUDA tensors from GradScaler
  at::Tensor found_inf;
  std::vector<at::Tensor> steps;  // float32 CUDA step counters, incremented by the kernel launcher
};

// Replaces tensors that the kernels cannot walk as flat memory with
// contiguous copies, and copies results back on finish().
class DenseWorkspace {
 public:
  // Returns `tensors` with every non-contiguous one swapped for a copy; when
  // write_back is set the copy's final contents are copied back on finish().
  std::vector<at::Tensor> dense(at::TensorList tensors, bool write_back);
  void finish();

 private:
  std::vector<std::pair<at::Tensor, at::Tensor>> write_backs_;
};

// The params are on the CPU and this CPU runs the instruction set the CPU
// kernels were built for (TORCHOPT_EXT_CPU_CAPABILITY): a clear error instead
// of a SIGILL.
void check_cpu_kernels_usable(const char* op, at::TensorList params);

// One state list of an element-wise op: `used` says whether the algorithm
// needs it with the current options (then one tensor per param), otherwise
// it must be empty.
struct StateList {
  const char* name;
  at::TensorList tensors;
  bool used = true;
  bool read_only = false;  // the kernel never writes it (no copy-back for strided ones)
};

// A param group checked and ready for a fused CPU kernel: dense tensors,
// incremented steps, the host lr and the AMP arguments. Call finish() after
// the kernel to copy results back into non-contiguous originals.
template <size_t N>
struct DenseGroup {
  std::vector<at::Tensor> params;
  std::vector<at::Tensor> grads;
  std::array<std::vector<at::Tensor>, N> state;
  std::vector<double> steps;
  double lr = 0.0;
  AmpArgs amp;
  DenseWorkspace workspace;
  bool on_cuda = false;  // params on a CUDA device: run kernels::cuda, with `device`
  DeviceArgs device;

  std::array<at::TensorList, N> state_lists() const {
    std::array<at::TensorList, N> lists;
    for (size_t k = 0; k < N; ++k) {
      lists[k] = state[k];
    }
    return lists;
  }
  void finish() { workspace.finish(); }
};

// Validates lists, lr, steps and the device; returns nullopt when there is
// nothing to do (no params, or found_inf says skip: then nothing is touched).
// Otherwise increments the steps and returns the dense group. For CUDA params
// (builds with TORCHOPT_EXT_WITH_CUDA), CUDA lr / grad_scale / found_inf and
// CUDA float32 step counters go to `device` unread: the kernels read them and
// increment the counters; host step counters are incremented here (reading a
// CUDA found_inf first, which syncs).
template <size_t N>
std::optional<DenseGroup<N>> prepare_elementwise_group(const char* op, at::TensorList params, at::TensorList grads,
                                                       const std::array<StateList, N>& state,
                                                       at::TensorList state_steps, const at::Tensor& lr,
                                                       const std::optional<at::Tensor>& grad_scale,
                                                       const std::optional<at::Tensor>& found_inf);

// Throws "<op>: <name> must be <rule>, got <value>" style errors.
void check_hyperparameter(const char* op, const char* name, double value, bool ok, const char* rule);

}  // namespace torchopt_ext::common
